"""The peers of benchmarks/outliers.py: llm-compressor (GPTQ with its W4A8 / W4A4 schemes, plain and
after its QuIP Hadamard transform) and auto-round (SignRound with W4A8 / W4A4 integer schemes and its
MXFP4 scheme, plain and with its Hadamard rotation) on Gemma 3 270M, calibrated on nnforge's
calibration windows and scored on the same held-out token ids by nnforge.generation.perplexity's
recipe, float32 on CPU through each peer's fake-quantised (QDQ) forward.

    >>> rows = peer_results(model_dir, windows, eval_ids, RUNS, Path("benchmarks/out"))
    >>> print(table(rows))

    python benchmarks/outliers_peers.py --smoke      # 4 windows, one short window scored, 2 SignRound steps
    python benchmarks/outliers_peers.py --model default --smoke   # llm-compressor on all-MiniLM-L6-v2

The peers live in their own virtual environment (``outlier-peers-venv`` under ``--work``, built on
first use, reused while its pins hold) and run as a subprocess (benchmarks/outliers_peers_worker.py,
a JSON request in and a JSON result out): llmcompressor 0.14 requires transformers<=5.17 and
auto-round<=0.15.1, older than the transformers nnforge is tested with. torch is pinned to the CPU
build, as the Makefile installs it.

Every compressed row has the LM head as nnforge's rows have it (int8 per output channel, round to
nearest, applied by the worker after the peer's recipe, which leaves the head out as the peers'
examples do); a run the peer cannot do on this model or on CPU is a row with its reason.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "outliers_peers_worker.py"
sys.path.insert(0, str(HERE))            # benchmarks/peer_venv.py, when imported from elsewhere
import peer_venv  # noqa: E402
# torch first in the same command so that pip never resolves the peers' torch ranges to a CUDA build;
# llmcompressor 0.14.0.1 pins auto-round and transformers to these (the newest that fit together)
PINS = ["torch==2.13.0", "llmcompressor==0.14.0.1", "auto-round==0.15.1", "transformers==5.17.0"]
LLMCOMPRESSOR_RUNS = [{"peer": "llm-compressor", "scheme": s, "rotation": r} for s in ("W4A8", "W4A4")
                      for r in (None, "quip")]
RUNS = LLMCOMPRESSOR_RUNS + [{"peer": "auto-round", "scheme": s, "rotation": r} for s in ("W4A8", "W4A4", "MXFP4")
                             for r in (None, "hadamard")]
_VENV = "outlier-peers-venv"


class OutlierPeerError(RuntimeError):
    """The peers' environment or worker failed; the message names the step and ends with its output."""


def ensure_venv(work: Path, python: str = sys.executable) -> Path:
    """The python of the peers' virtual environment under ``work`` (benchmarks/peer_venv.py)."""
    return peer_venv.ensure_venv(Path(work) / _VENV, PINS, "import llmcompressor, auto_round, transformers, torch", OutlierPeerError, "outliers_peers",
                                 python)


def peer_results(model_dir: Path, calibration: list[list[int]], eval_ids: list[int], runs: list[dict], work: Path, *,
                 window: int = 512, stride: int = 256, head: str = "w8", autoround_iters: int = 200,
                 threads: int = 2) -> list[dict]:
    """One row per run (``{"peer", "scheme", "rotation"}``), after a ``transformers fp32`` row: the
    peer's recipe calibrated on ``calibration`` (token-id windows) and scored on ``eval_ids`` by the
    sliding window (``window``, ``stride``). The peers run in their environment under ``work``,
    built on first use."""
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: give a transformers model directory "
                                "(nnforge.models.llm.small_llm_directory writes one)")
    if not calibration or any(len(w) < 2 for w in calibration):
        raise ValueError("give calibration windows of at least 2 token ids each")
    if len(eval_ids) < 2:
        raise ValueError(f"{len(eval_ids)} evaluation token(s): perplexity needs at least 2")
    if head not in ("w8", "float"):
        raise ValueError(f"head {head!r}: give 'w8' (nnforge's default head format) or 'float'")
    for r in runs:
        if r.get("peer") not in ("llm-compressor", "auto-round") or not r.get("scheme"):
            raise ValueError(f"run {r}: give peer 'llm-compressor' or 'auto-round' and a scheme")
    out = _call_worker({"model_dir": str(model_dir), "calibration": [[int(t) for t in w] for w in calibration],
                        "eval_ids": [int(t) for t in eval_ids], "window": window, "stride": stride, "head": head,
                        "autoround_iters": autoround_iters, "threads": threads, "runs": list(runs)}, work)
    return _label(out, "Gemma 3 270M")


def encoder_results(model_dir: Path, calibration: list[tuple], evaluation: list[tuple], runs: list[dict], work: Path,
                    *, threads: int = 2) -> list[dict]:
    """One row per run, after a ``transformers fp32`` row, on a BERT encoder (the default model):
    the peer's recipe calibrated on the sentences of ``calibration`` (padded (input_ids,
    attention_mask) batches, as nnforge.models.default makes them), and each row's ``embeddings``:
    the mean-pooled, normalised embeddings of ``evaluation``'s sentences, in order."""
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: give the encoder's model directory "
                                "(nnforge.models.default.model_dir())")

    def jsonable(batches):
        return [{"input_ids": ids.tolist(), "attention_mask": mask.tolist()} for ids, mask in batches]
    out = _call_worker({"task": "encoder", "model_dir": str(model_dir), "calibration": jsonable(calibration),
                        "eval": jsonable(evaluation), "threads": threads, "runs": list(runs)}, work)
    return _label(out, "all-MiniLM-L6-v2")


def _label(out: dict, model: str) -> list[dict]:
    label = {"llm-compressor": f"llm-compressor {out['versions']['llmcompressor']}",
             "auto-round": f"auto-round {out['versions']['auto-round']}",
             "transformers": f"transformers {out['versions']['transformers']}"}
    return [{**row, "peer": label.get(row["peer"], row["peer"]), "model": model, "versions": out["versions"],
             "threads": out["threads"]} for row in out["rows"]]


def _call_worker(req: dict, work: Path) -> dict:
    """The worker's result for ``req``, run in the peers' environment under ``work``."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = ensure_venv(work)
    # per process, so that two runs sharing the environment never read each other's result
    request, result = work / f"outlier-peers-request-{os.getpid()}.json", work / f"outlier-peers-result-{os.getpid()}.json"
    # the rows of a run that was stopped, by what was asked (runs aside): a rerun only runs the rest
    asked = hashlib.sha256(json.dumps({k: v for k, v in req.items() if k != "runs"}, sort_keys=True).encode())
    done = work / f"outlier-peers-done-{asked.hexdigest()[:16]}.jsonl"
    request.write_text(json.dumps({**req, "done_file": str(done)}))
    result.unlink(missing_ok=True)
    # torch's OpenMP threads spin at barriers by default, which stalls them on shared cores
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TQDM_DISABLE": "1", "PYTHONPATH": ""}
    tail: deque[str] = deque(maxlen=60)
    log = work / "outlier-peers-worker.log"
    # the peers log every layer they quantise on stdout: kept in a file, not on the caller's screen
    with open(log, "w") as out, subprocess.Popen([str(py), str(WORKER), str(request), str(result)], stdout=out,
                                                 stderr=subprocess.PIPE, text=True, env=env) as proc:
        for line in proc.stderr:
            tail.append(line)
            if line.startswith("outlier peers worker:"):
                print(line, end="", file=sys.stderr, flush=True)
    if proc.returncode != 0 or not result.is_file():
        raise OutlierPeerError(f"the peers' worker ({WORKER.name}, request {request}, its stdout in {log}) failed "
                               f"(exit {proc.returncode}; the runs it finished are kept in {done.name} for the "
                               "next run):\n" + "".join(tail))
    # kept until the caller's report is written (clear_done): a run stopped after this model's
    # rows but before its report reuses them
    return json.loads(result.read_text())


def clear_done(work: Path) -> None:
    """Forget the peers' finished rows once a report holds them: a later run measures again."""
    for f in Path(work).glob("outlier-peers-done-*.jsonl"):
        f.unlink(missing_ok=True)


def parse_runs(spec: str) -> list[dict]:
    """``"peer:scheme[:rotation],..."`` as runs: ``"llm-compressor:W4A4:quip,auto-round:MXFP4"``."""
    runs = []
    for item in (x for x in spec.split(",") if x):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"run {item!r}: write peer:scheme or peer:scheme:rotation")
        runs.append({"peer": parts[0], "scheme": parts[1], "rotation": parts[2] if len(parts) == 3 else None})
    return runs


def calibration_windows(tokenizer, text: str, window: int = 128, limit: int = 128) -> list[list[int]]:
    """``text``'s token ids in consecutive ``window``-token windows (at most ``limit``, none under 2
    tokens): the windows DecoderImport.text_batches makes, for callers without nnforge's import."""
    ids = list(tokenizer(text)["input_ids"])
    starts = list(range(0, max(1, len(ids) - 1), window))[:limit]
    return [ids[s:s + window] for s in starts if len(ids[s:s + window]) > 1]


def table(rows: list[dict], fp32: float | None = None) -> str:
    """The rows as a Markdown table (perplexity against ``fp32``, default the rows' own fp32)."""
    if fp32 is None:
        fp32 = next((r["perplexity"] for r in rows if r["scheme"] == "fp32"), None)
    head = ["peer", "scheme", "rotation", "perplexity", "vs fp32", "quantise s", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ppl = r.get("perplexity")
        cells = [r["peer"], r["scheme"], r.get("rotation") or "-", f"{ppl:.3f}" if ppl is not None else "-",
                 f"{(ppl / fp32 - 1) * 100:+.1f}%" if ppl is not None and fp32 else "-",
                 f"{r['quantize_s']:.0f}" if r.get("quantize_s") is not None else "-",
                 (r.get("error") or "")[:160].replace("|", "/").replace("\n", " ")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_model_main(args) -> int:
    """The encoder rows on the default model: llm-compressor's runs (auto-round's one reason row),
    scored against nnforge's fp32 torch embeddings as benchmarks/outliers.py scores them."""
    import torch

    from nnforge.models import default as dm
    model, tok = dm.load_default_model()
    calib, evals = dm.sentence_splits()
    n_eval, n_calib = (64, 64) if args.smoke else (500, len(calib))
    evaluation = dm.batches(tok, evals[:n_eval], 32)
    with torch.no_grad():
        reference = torch.cat([model(*b) for b in evaluation])
    runs = parse_runs(args.runs) if args.runs else LLMCOMPRESSOR_RUNS + [{"peer": "auto-round", "scheme": "W4A8"}]
    started = time.perf_counter()
    rows = encoder_results(dm.model_dir(), dm.calibration_batches(tok, calib[:n_calib], 32), evaluation, runs,
                           args.work, threads=args.threads)
    for r in rows:
        emb = r.pop("embeddings")
        fid = dm.evaluate_embeddings(reference, torch.tensor(emb)) if emb is not None else None
        print(f"{r['peer']:24} {r['scheme']:5} {r.get('rotation') or '-':5} "
              f"{'cosine %.4f (min %.4f), NN agreement %.1f%%' % (fid.cosine_mean, fid.cosine_min, 100 * fid.nn_agreement) if fid else r['error']}")
    print(f"\n{n_calib} calibration and {n_eval} evaluation sentences, {len(rows)} rows in "
          f"{time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="4 calibration windows, 300 tokens scored, 2 SignRound steps "
                   "(default model: 64 calibration and 64 evaluation sentences)")
    p.add_argument("--model", choices=["llm", "default"], default="llm",
                   help="Gemma 3 270M (perplexity) or the default model, all-MiniLM-L6-v2 (cosine)")
    p.add_argument("--work", type=Path, default=HERE / "out", help="the peers' environment and the model live here")
    p.add_argument("--model-dir", type=Path, help="a transformers model directory (default: Gemma 3 270M, "
                   "written once under WORK/models)")
    p.add_argument("--runs", help="peer:scheme[:rotation],... (default: every run in RUNS)")
    p.add_argument("--calibration-windows", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--autoround-iters", type=int, default=200)
    p.add_argument("--head", default="w8", choices=["w8", "float"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.calibration_windows, args.eval_tokens, args.autoround_iters = 4, 300, 2
    sys.path.insert(0, str(HERE.parent))
    if args.model == "default":
        return default_model_main(args)
    from transformers import AutoTokenizer

    from nnforge.models.llm import small_llm_directory, text_split
    if args.model_dir is None:
        args.model_dir = small_llm_directory(args.work / "models")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    calib_text, held = text_split()
    windows = calibration_windows(tokenizer, calib_text, limit=args.calibration_windows)
    eval_ids = list(tokenizer(held)["input_ids"])[:args.eval_tokens]
    runs = parse_runs(args.runs) if args.runs else RUNS
    started = time.perf_counter()
    rows = peer_results(args.model_dir, windows, eval_ids, runs, args.work, window=args.window, stride=args.stride,
                        head=args.head, autoround_iters=args.autoround_iters, threads=args.threads)
    print(table(rows))
    v = rows[0]["versions"]
    print(f"\n{len(windows)} calibration windows, {rows[0].get('tokens_scored')} tokens scored, {len(rows)} rows in "
          f"{time.perf_counter() - started:.0f} s; llmcompressor {v['llmcompressor']} (compressed-tensors "
          f"{v['compressed-tensors']}), auto-round {v['auto-round']}, transformers {v['transformers']}, torch "
          f"{v['torch']}, {rows[0]['threads']} threads")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
