"""Latency of nnforge `onnx` bundles of the default model against its peers, in one run.

Peers: torch eager (fp32) and ONNX Runtime running `torch.onnx.export`'s model of the same network
(the usual way to get an ONNX model). All run on this machine's CPU with the same threads, on the
same real sentences (batch sizes 1, 8, 32, padded to the longest sentence of the batch), in
stretches that alternate between the runners (nnforge.timing.alternating_ms), so a change of load
hits them all alike. Reported: median milliseconds per batch and the ratio to torch eager. Writes
benchmarks/out/onnx_latency.json and the table in docs/measured/onnx_latency.md.

    python benchmarks/onnx_latency.py [--repeat 21]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import nnforge as nf
from nnforge.models import default as dm
from nnforge.timing import alternating_ms, machine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_table  # noqa: E402

warnings.filterwarnings("ignore")
OUT = Path(__file__).parent / "out"


def torch_onnx_peer(model, example, tmp: Path):
    """ONNX Runtime session on torch.onnx.export's model (dynamo exporter, dynamic batch/seq)."""
    import onnxruntime as ort
    path = tmp / "torch_export.onnx"
    prog = torch.onnx.export(model, example, dynamo=True, dynamic_shapes=dm.dynamic_shapes(),
                             input_names=["input_ids", "attention_mask"], output_names=["embeddings"])
    prog.save(str(path))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda ids, mask: sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=21, help="calls per runner and batch size, in 3 stretches")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args()
    model, tok = dm.load_default_model()
    calib, evals = dm.sentence_splits()
    example = dm.encode(tok, evals[:8])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runners = {"torch eager": lambda ids, mask: model(ids, mask),
                   "ORT on torch.onnx.export": torch_onnx_peer(model, example, tmp)}
        for recipe in ("fp32", "w8", "w4-rtn"):
            b = nf.compile(model, "onnx", None if recipe == "fp32" else recipe, example_inputs=example,
                           dynamic_shapes=dm.dynamic_shapes(), input_names=["input_ids", "attention_mask"],
                           output_names=["embeddings"], out=tmp / recipe, batch_sizes=())
            runners[f"nnforge onnx {recipe}"] = nf.load(b.path)
        with torch.no_grad():
            for bs in args.batches:
                batch = dm.encode(tok, evals[:bs])
                times = alternating_ms(runners, batch, args.repeat)
                base = times["torch eager"]
                for name, ms in times.items():
                    rows.append({"runner": name, "batch": bs, "seq": int(batch[0].shape[1]), "ms": round(ms, 3),
                                 "speedup_vs_torch": round(base / ms, 3)})
    print(f"{'runner':<28} {'batch':>5} {'seq':>4} {'ms':>9} {'x torch':>8}")
    for r in rows:
        print(f"{r['runner']:<28} {r['batch']:>5} {r['seq']:>4} {r['ms']:>9.2f} {r['speedup_vs_torch']:>8.2f}")
    OUT.mkdir(exist_ok=True)
    meta = {"machine": machine(), "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__, "repeat": args.repeat}
    report = {"meta": meta, "rows": rows}
    (OUT / "onnx_latency.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {OUT / 'onnx_latency.json'}")
    write_docs(report)


def docs_rows(report: dict) -> tuple[list[str], list[list]]:
    """The docs table of onnx_latency.json: one line per runner, ms and x torch per batch size."""
    batches = sorted({r["batch"] for r in report["rows"]})
    columns = ["runner", *(f"batch {b}: ms (x torch)" for b in batches)]
    rows = []
    for runner in dict.fromkeys(r["runner"] for r in report["rows"]):
        cells = {r["batch"]: f"{r['ms']:.2f} ({r['speedup_vs_torch']:.2f}x)" for r in report["rows"]
                 if r["runner"] == runner}
        rows.append([runner, *(cells.get(b) for b in batches)])
    return columns, rows


def write_docs(report: dict) -> None:
    columns, rows = docs_rows(report)
    m = report["meta"]
    docs_table.write("measured/onnx_latency.md", "onnx_latency", columns, rows,
                     timed=True, source="benchmarks/out/onnx_latency.json", machine=m["machine"],
                     notes=[f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; median of {m['repeat']} calls a "
                            "runner, in stretches alternating between the runners; real sentences padded to the "
                            "longest of the batch."])


if __name__ == "__main__":
    main()
