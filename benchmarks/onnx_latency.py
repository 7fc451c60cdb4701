"""Latency of nnforge `onnx` bundles of the default model against its peers, in one run.

Peers: torch eager (fp32) and ONNX Runtime running `torch.onnx.export`'s model of the same network
(the usual way to get an ONNX model). All run on this machine's CPU with the same threads, on the
same real sentences (batch sizes 1, 8, 32, padded to the longest sentence of the batch).
Reported: median milliseconds per batch and the ratio to torch eager. Writes the table as JSON to
benchmarks/out/onnx_latency.json.

    python benchmarks/onnx_latency.py [--repeat 20]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import nnforge as nf
from nnforge.models import default as dm

warnings.filterwarnings("ignore")
OUT = Path(__file__).parent / "out"


def median_ms(fn, args, repeat: int) -> float:
    fn(*args)
    fn(*args)
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - t0)
    return 1000 * statistics.median(samples)


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
    ap.add_argument("--repeat", type=int, default=20)
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
                           output_names=["embeddings"], out=tmp / recipe)
            runners[f"nnforge onnx {recipe}"] = nf.load(b.path)
        with torch.no_grad():
            for bs in args.batches:
                batch = dm.encode(tok, evals[:bs])
                base = median_ms(runners["torch eager"], batch, args.repeat)
                for name, run in runners.items():
                    ms = base if name == "torch eager" else median_ms(run, batch, args.repeat)
                    rows.append({"runner": name, "batch": bs, "seq": int(batch[0].shape[1]), "ms": round(ms, 3),
                                 "speedup_vs_torch": round(base / ms, 3)})
    print(f"{'runner':<28} {'batch':>5} {'seq':>4} {'ms':>9} {'x torch':>8}")
    for r in rows:
        print(f"{r['runner']:<28} {r['batch']:>5} {r['seq']:>4} {r['ms']:>9.2f} {r['speedup_vs_torch']:>8.2f}")
    OUT.mkdir(exist_ok=True)
    meta = {"machine": f"{os.cpu_count()} CPU threads", "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__, "repeat": args.repeat}
    (OUT / "onnx_latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {OUT / 'onnx_latency.json'}")


if __name__ == "__main__":
    main()
