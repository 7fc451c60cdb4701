"""`nnforge demo --full`, recorded: every recipe of every target family on the default model, with
size, fidelity on held-out sentences and speed against torch eager (alternating in the same
stretches, where the runtime is native here). Writes benchmarks/out/demo.json and the table in
docs/measured/demo.md.

    python benchmarks/demo.py                       # everything (long: GPTQ, TVM builds, C-simulation)
    python benchmarks/demo.py --families onnx cpu   # some families (names or targets)
    python benchmarks/demo.py --tour                # what `nnforge demo` prints, into the table "tour"
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_table  # noqa: E402

from nnforge.demo import (FULL_CALIBRATION, QUICK_CALIBRATION, SPEED_BATCHES, check_rows, format_table,  # noqa: E402
                          rows_json, run_demo)
from nnforge.timing import machine  # noqa: E402

OUT = Path(__file__).parent / "out"


def docs_rows(rows: list[dict]) -> tuple[list[str], list[list]]:
    """The docs table of demo.json's rows: one line per bundle, speed as x torch with ms in brackets."""
    columns = ["family", "target", "recipe", "bundle MB", "sentences", "mean cos", "min cos", "NN agree", "NN query",
               *(f"b={b}: x torch (ms)" for b in SPEED_BATCHES), "notes"]
    out = []
    for r in rows:
        if r.get("missing"):
            out.append([r["family"], r["target"], r["recipe"], *[None] * (len(columns) - 4), r["missing"]])
            continue
        speed = []
        for b in SPEED_BATCHES:
            t = r["ms"].get(str(b))
            speed.append(None if not t else f"{t['torch eager'] / t['bundle']:.2f}x ({t['bundle']:.1f})"
                         + (" unreliable" if r.get("unreliable") else ""))
        out.append([r["family"], r["target"], f"`{r['recipe']}`", docs_table.fmt(r["bundle_mb"], ".1f"), r["sentences"],
                    docs_table.fmt(r["cos_mean"], ".6f"), docs_table.fmt(r["cos_min"], ".6f"),
                    docs_table.fmt(r["nn_agree"], ".1%"), docs_table.fmt(r["query_agree"], ".1%"), *speed,
                    "; ".join(r.get("notes", []))])
    return columns, out


def write_docs(report: dict, name: str, source: str) -> None:
    columns, rows = docs_rows(report["rows"])
    load = report["meta"].get("machine_at_start", report["meta"]["machine"]).get("load_average")
    docs_table.write("measured/demo.md", name, columns, rows, timed=True, source=source,
                     machine=report["meta"]["machine"],
                     notes=[f"Calibration: {report['meta']['calibration_sentences']} sentences; fidelity against fp32 "
                            "torch on the first held-out sentences of each row. Speed: bundle against torch eager "
                            "in alternating stretches of the same run; 'unreliable' where the load per CPU was "
                            f"high while it was timed (load average at the start {load}); the whole run took "
                            f"{report['meta']['seconds']:.0f} s."])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=None, help="family names or targets (default: all)")
    ap.add_argument("--tour", action="store_true", help="the short tour (`nnforge demo`) instead of --full")
    ap.add_argument("--out", default=None, help="bundle directory (default bundles/demo-full or bundles/demo)")
    args = ap.parse_args()
    full = not args.tour
    start_machine = machine()
    t0 = time.perf_counter()
    rows = run_demo(args.out or ("bundles/demo-full" if full else "bundles/demo"), full=full, families=args.families)
    print()
    print(format_table(rows, full=full))
    # the machine as the timings left it: the stamp's load covers the last rows' stretches
    report = {"meta": {"machine": machine(), "machine_at_start": start_machine,
                       "seconds": round(time.perf_counter() - t0, 1),
                       "calibration_sentences": FULL_CALIBRATION if full else QUICK_CALIBRATION,
                       "families": args.families},
              "rows": rows_json(rows)}
    OUT.mkdir(exist_ok=True)
    path = OUT / ("demo.json" if full else "demo_tour.json")
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    write_docs(report, "demo" if full else "tour", str(path))
    failures = check_rows(rows)
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
