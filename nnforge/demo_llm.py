"""The demo's real LLM: the small pretrained decoder of the package index (Gemma 3 270M,
:mod:`nnforge.models.llm`) compiled with ``w4-gptq`` for ``onnx`` and ``cpu``, next to the float32
model in torch: each row's size, perplexity on held-out text calibration never saw, decode
tokens/s at batch 1, and the sentence it generates greedily from one prompt.

    nnforge demo --llm          # make demo-llm

It is its own command, not a row of ``make demo``: compiling a 270M-parameter decoder twice
(calibration, GPTQ and a TVM build) takes minutes on two cores, more than the short tour's
budget. ``benchmarks/llm.py`` measures every preset against llama.cpp and ONNX Runtime GenAI.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .models import llm as small

PROMPT = "A Python function is defined with"
MAX_LEN = 512
CALIBRATION_TOKENS = 16384     # 128 windows of 128 tokens (the compile's default cap)
EVAL_TOKENS = 2048
WINDOW, STRIDE = 512, 256
NEW_TOKENS = 24


@dataclass
class LlmRow:
    name: str
    mb: float
    perplexity: float
    decode_tokens_per_s: float
    text: str
    seconds: float = 0.0                            # compiling (bundles) and measuring the row
    notes: list[str] = field(default_factory=list)


class _TorchDecoder:
    """The float32 transformers model behind the two calls generation.perplexity makes."""

    def __init__(self, model, max_len: int):
        self.model, self.max_len = model, max_len

    def prefill(self, ids, all_logits: bool = True):
        with torch.inference_mode():
            return self.model(input_ids=ids, use_cache=False).logits.float()


def _torch_decode_speed(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Greedy decode tokens/s of the transformers model with its own KV cache (step calls timed)."""
    import inspect
    # transformers 5 names the cache argument and output `cache` (`past_key_values` before it)
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens, decode_s = [], 0.0
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        for _ in range(new_tokens):
            tokens.append(int(out.logits[0, -1].argmax()))
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{arg: getattr(out, arg)})
            decode_s += time.perf_counter() - t0
    return new_tokens / decode_s, tokens


def run_llm_demo(out: str | Path = "bundles/demo-llm", targets=("onnx", "cpu"), preset: str = "w4-gptq",
                 progress: bool = True) -> list[LlmRow]:
    """Compile, score and time the small LLM's bundles; the float32 torch model first."""
    from .generation import perplexity
    from .pipeline import compile as nf_compile
    model, tok, gguf = small.load_small_llm()
    directory = small.small_llm_directory(Path(out) / "model")      # (with its tokenizer, for text calibration)
    calib_text, held_text = small.text_split()
    calibration = tok.decode(tok(calib_text)["input_ids"][:CALIBRATION_TOKENS])
    ids = torch.tensor(tok(held_text)["input_ids"][:EVAL_TOKENS])
    prompt = torch.tensor([tok(PROMPT)["input_ids"]])
    start = time.perf_counter()
    ppl = perplexity(_TorchDecoder(model, MAX_LEN), ids, window=WINDOW, stride=STRIDE).perplexity
    speed, tokens = _torch_decode_speed(model, prompt, NEW_TOKENS)
    fp32_bytes = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                      for t in model.state_dict().values()}.values())
    rows = [LlmRow("fp32, torch eager", fp32_bytes / 1e6, ppl, speed, tok.decode(tokens),
                   time.perf_counter() - start, [f"weights dequantised from {gguf.name}"])]
    for target in targets:
        start = time.perf_counter()
        bundle = nf_compile(directory, target, preset, out=Path(out) / f"gemma3-270m-{target}-{preset}",
                            max_len=MAX_LEN, calibration=calibration, progress=progress)
        lm = bundle.load()
        ppl = lm.perplexity(ids, window=WINDOW, stride=STRIDE).perplexity
        lm.generate(prompt, 4, stop_tokens=[])                      # untimed: first-call costs
        result = lm.generate(prompt, NEW_TOKENS, stop_tokens=[])
        passes = bundle.manifest["timings"].get("passes_s")
        rows.append(LlmRow(f"{preset}, {target}", bundle.deploy_bytes / 1e6, ppl, result.decode_tokens_per_s,
                           result.text, time.perf_counter() - start,
                           [f"calibration + passes {passes:.0f} s" if passes else ""]))
    return rows


def format_llm_table(rows: list[LlmRow]) -> str:
    base = rows[0]
    lines = [f"Gemma 3 270M: perplexity on {EVAL_TOKENS} held-out tokens (windows of {WINDOW} every {STRIDE}), "
             f"greedy decode at batch 1 from {PROMPT!r}",
             f"{'model':<20} {'MB':>7} {'perplexity':>11} {'vs fp32':>8} {'decode tok/s':>13} {'x fp32':>7}  text"]
    for r in rows:
        vs = "" if r is base else f"{r.perplexity / base.perplexity - 1:+.1%}"
        speed = "" if r is base else f"{r.decode_tokens_per_s / base.decode_tokens_per_s:.2f}x"
        text = " ".join(r.text.split())
        lines.append(f"{r.name:<20} {r.mb:>7.0f} {r.perplexity:>11.3f} {vs:>8} {r.decode_tokens_per_s:>13.1f} "
                     f"{speed:>7}  {text[:70]}")
    return "\n".join(lines)


__all__ = ["LlmRow", "format_llm_table", "run_llm_demo"]
