"""NVIDIA's kvpress as the peer of benchmarks/kv_cache.py: its presses on the same model (Gemma 3
270M as a transformers model directory), through transformers, on the same token ids
(benchmarks/kv_tasks.py), beside transformers' own float cache (the row ``none``).

    >>> rows = kvpress_results(model_dir, cases, ["SnapKVPress", "KnormPress"], 0.5, Path("benchmarks/out"))
    >>> print(table(rows))

    python benchmarks/kv_peers.py --smoke        # one short case per task, every default press

kvpress lives in its own virtual environment (``work/kvpress-venv``, built on first use, reused
while its pins hold) and runs as a subprocess (benchmarks/kv_peers_worker.py, a JSON request in and
a JSON result out): kvpress 0.5.5 requires transformers<5.3, and nnforge's ``models`` extra resolves
to a newer transformers that nnforge is tested with. In the ``bench`` extra kvpress would pull the
whole environment back to the older transformers, so it is not there. torch is pinned to the CPU
build, as the Makefile installs it.

Per press (at ``ratio``, the share of the context's cache removed) and context length, a row has
passkey accuracy, continuation perplexity, the tokens each layer's cache keeps, the bytes per
context token and the wall seconds; the model runs in float32 on CPU. docs/kv_cache.md ("Beside
NVIDIA's kvpress") says how each is measured and where the worker departs from kvpress's pipeline.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "kv_peers_worker.py"
sys.path.insert(0, str(HERE))            # benchmarks/peer_venv.py, when imported from elsewhere
import peer_venv  # noqa: E402
# torch first in the same command so that pip never resolves kvpress's torch<3 to a CUDA build
PINS = ["torch==2.13.0", "kvpress==0.5.5", "transformers>=4.56,<5.3"]
PRESSES = ["SnapKVPress", "StreamingLLMPress", "ExpectedAttentionPress", "KnormPress", "TOVAPress",
           "ObservedAttentionPress"]


class KvPeerError(RuntimeError):
    """kvpress's environment or worker failed; the message names the step and ends with its output."""


def ensure_venv(work: Path, python: str = sys.executable) -> Path:
    """The python of the peers' virtual environment under ``work`` (benchmarks/peer_venv.py)."""
    return peer_venv.ensure_venv(Path(work) / "kvpress-venv", PINS, "import kvpress, transformers, torch", KvPeerError, "kv_peers",
                                 python)


def _request_cases(cases: dict) -> tuple[list[dict], list[dict]]:
    """kv_tasks' PasskeyCase objects (or their dicts) and (context ids, continuation ids) pairs as
    JSON-able dicts."""
    passkey = [dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(c) for c in cases.get("passkey", [])]
    continuation = [{"context_ids": list(c[0]), "continuation_ids": list(c[1])} if isinstance(c, (tuple, list))
                    else dict(c) for c in cases.get("continuation", [])]
    for c in continuation:
        if len(c["continuation_ids"]) < 1:
            raise ValueError("a continuation case needs at least one continuation token")
    return passkey, continuation


def kvpress_results(model_dir: Path, cases: dict, presses: list[str], ratio: float, work: Path, *,
                    new_tokens: int = 8, threads: int = 2) -> list[dict]:
    """One row per press (and ``"none"``, the uncompressed cache) and context length: kvpress's
    presses at ``ratio`` on the model in ``model_dir``, scored on ``cases`` (``{"passkey":
    [kv_tasks.PasskeyCase], "continuation": [(context ids, continuation ids)]}``). kvpress runs in
    its own environment under ``work``, built on first use."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"compression ratio {ratio}: give the share of the cache a press removes, 0 <= ratio < 1")
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: give a transformers model directory "
                                "(nnforge.models.llm.small_llm_directory writes one)")
    passkey, continuation = _request_cases(cases)
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = ensure_venv(work)
    request, result = work / "kvpress-request.json", work / "kvpress-result.json"
    request.write_text(json.dumps({"model_dir": str(model_dir), "presses": list(presses), "ratio": ratio,
                                   "new_tokens": new_tokens, "threads": threads, "passkey": passkey,
                                   "continuation": continuation}))
    result.unlink(missing_ok=True)
    # torch's OpenMP threads spin at barriers by default, which stalls them on shared cores
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": ""}
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen([str(py), str(WORKER), str(request), str(result)], stderr=subprocess.PIPE, text=True,
                          env=env) as proc:
        for line in proc.stderr:
            tail.append(line)
            if line.startswith("kvpress worker:"):
                print(line, end="", file=sys.stderr, flush=True)
    if proc.returncode != 0 or not result.is_file():
        raise KvPeerError(f"the kvpress worker ({WORKER.name}, request {request}) failed (exit {proc.returncode}):\n"
                          + "".join(tail))
    out = json.loads(result.read_text())
    peer = f"kvpress {out['versions']['kvpress']}"
    return [{"peer": peer, **row, "versions": out["versions"], "threads": out["threads"]} for row in out["rows"]]


def default_cases(tokenizer, contexts: list[int], depths: list[float], seeds: list[int], continuation: int) -> dict:
    """The passkey cases (every context, depth and seed) and one continuation split per context of
    the held-out text, as kv_tasks defines them."""
    import kv_tasks
    from nnforge.models.llm import text_split
    held = list(tokenizer(text_split()[1])["input_ids"])
    return {"passkey": [kv_tasks.passkey_case(tokenizer, n, d, s) for n in contexts for d in depths for s in seeds],
            "continuation": [kv_tasks.continuation_split(held, n, continuation) for n in contexts]}


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    head = ["press", "ratio", "context", "passkey", "perplexity", "kept tokens/layer", "bytes/token (fp32)",
            "bytes/token (fp16)", "seconds", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kept = r.get("kept_tokens_per_layer")
        cells = [r["press"], f"{r['ratio']:g}", str(r["context"]),
                 f"{r['passkey_right']}/{r['passkey_cases']}" if r["passkey_cases"] else "-",
                 f"{r['perplexity']:.3f}" if r["perplexity"] is not None else "-",
                 f"{min(kept):.0f}-{max(kept):.0f}" if kept else "-",
                 f"{r['bytes_per_token']:.0f}" if "bytes_per_token" in r else "-",
                 f"{r['bytes_per_token_fp16']:.0f}" if "bytes_per_token_fp16" in r else "-",
                 f"{r['seconds']:.1f}", (r["error"] or "")[:120].replace("|", "/").replace("\n", " ")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="one 512-token case per task, 32 continuation tokens")
    p.add_argument("--work", type=Path, default=HERE / "out", help="kvpress's environment and the model live here")
    p.add_argument("--model-dir", type=Path, help="a transformers model directory (default: Gemma 3 270M, "
                   "written once under WORK/models)")
    p.add_argument("--presses", default=",".join(PRESSES))
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--contexts", default="1024,2048")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--seeds", default="0")
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.contexts, args.depths, args.seeds, args.continuation = "512", "0.5", "0", 32
    sys.path.insert(0, str(HERE))
    from transformers import AutoTokenizer
    if args.model_dir is None:
        from nnforge.models.llm import small_llm_directory
        args.model_dir = small_llm_directory(args.work / "models")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    cases = default_cases(tokenizer, [int(n) for n in args.contexts.split(",")],
                          [float(d) for d in args.depths.split(",")], [int(s) for s in args.seeds.split(",")],
                          args.continuation)
    started = time.perf_counter()
    rows = kvpress_results(args.model_dir, cases, [s for s in args.presses.split(",") if s], args.ratio, args.work,
                           new_tokens=args.new_tokens, threads=args.threads)
    print(table(rows))
    print(f"\n{len(cases['passkey'])} passkey and {len(cases['continuation'])} continuation case(s), "
          f"{len(rows)} rows in {time.perf_counter() - started:.0f} s; {rows[0]['peer']}, transformers "
          f"{rows[0]['versions']['transformers']}, torch {rows[0]['versions']['torch']}, {rows[0]['threads']} threads")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
