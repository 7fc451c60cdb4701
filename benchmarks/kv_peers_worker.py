"""kvpress's side of benchmarks/kv_peers.py, run by that module in kvpress's own virtual environment
(it needs an older transformers than nnforge's): reads a JSON request, writes a JSON result.

    python kv_peers_worker.py request.json result.json

The request: ``model_dir``, ``presses`` (kvpress class names), ``ratio``, ``new_tokens``, ``threads``,
``passkey`` (``{"ids", "answer", "depth", "context"}`` each) and ``continuation`` (``{"context_ids",
"continuation_ids"}`` each). The result: ``{"versions": {...}, "rows": [...]}``, one row per press
(``"none"``: transformers' own float cache) and context length; a press that fails on a case keeps
its row, with the error.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kv_tasks  # noqa: E402  (beside this file; only the standard library)

NO_PRESS = "none"
# ObservedAttentionPress scores tokens by the attention weights the layer returns, which only the
# eager attention gives; the others compute what they need themselves and run on SDPA, as kvpress
# recommends
EAGER = {"ObservedAttentionPress"}


def make_press(name: str, ratio: float):
    """kvpress's ``name`` at ``ratio`` (the share of the context's cache it removes), its other
    options at kvpress's defaults; None for ``"none"``."""
    if name == NO_PRESS:
        return None
    import kvpress
    cls = getattr(kvpress, name, None)
    if cls is None or not isinstance(cls, type):
        raise ValueError(f"kvpress {_version('kvpress')} has no press {name!r}")
    press = cls(compression_ratio=ratio)
    # kvpress leaves Gemma 3's sliding-window layers uncompressed (a compressed window breaks the
    # window mask, which counts cache slots as positions) but only checks for the multimodal
    # Gemma3ForConditionalGeneration; the text-only 270M is Gemma3ForCausalLM, so the same rule is
    # applied here by wrapping the press's hook
    hook = press.forward_hook

    def global_layers_only(module, args, kwargs, output):
        if getattr(module, "is_sliding", False):
            return output
        _layer_rope(module)
        return hook(module, args, kwargs, output)
    press.forward_hook = global_layers_only
    return press


class TypedRope(torch.nn.Module):
    """Transformers 5's Gemma 3 keeps one rotary table per layer type and needs the type in each
    call; presses that rotate their own queries (ExpectedAttentionPress) call the rotary embedding
    kvpress hangs on the attention module without it. This one passes the layer's type."""

    def __init__(self, rope, layer_type: str):
        super().__init__()
        self.rope, self.layer_type = rope, layer_type

    def forward(self, x, position_ids):
        return self.rope(x, position_ids, layer_type=self.layer_type)


def _layer_rope(module) -> None:
    rope = module.rotary_emb
    if not isinstance(rope, TypedRope) and "layer_type" in inspect.signature(rope.forward).parameters:
        module.rotary_emb = TypedRope(rope, module.layer_type)


def _cache_stats(cache) -> tuple[list[int], int]:
    """(tokens each layer keeps, the cache's bytes) after a prefill."""
    kept, nbytes = [], 0
    for layer in cache.layers:
        kept.append(int(layer.keys.shape[-2]))
        nbytes += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return kept, nbytes


class Runner:
    """The model and tokenizer, loaded once, and the two tasks."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.question = list(tokenizer(kv_tasks.QUESTION, add_special_tokens=False)["input_ids"]) if tokenizer else []
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.eos = set(eos if isinstance(eos, list) else [eos])

    @classmethod
    def load(cls, model_dir: str, threads: int) -> "Runner":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads(threads)
        # float32: in float16 Gemma 3's activations overflow (non-finite logits), and CPU float16 is slower
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        return cls(model.eval(), AutoTokenizer.from_pretrained(model_dir))

    def attention(self, press_name: str) -> None:
        self.model.set_attn_implementation("eager" if press_name in EAGER else "sdpa")

    def prefill(self, press, ids: list[int]):
        """(cache, the last position's logits): the context in one forward with the press
        compressing each layer's cache after its attention, as kvpress's pipeline prefills (so the
        logits are the uncompressed model's)."""
        from transformers import DynamicCache
        cache = DynamicCache(config=self.model.config)
        with press(self.model) if press is not None else contextlib.nullcontext():
            out = self.model(input_ids=torch.tensor([ids]), past_key_values=cache, logits_to_keep=1)
        return cache, out.logits[0, -1]

    def masks(self, cache, start: int, n: int) -> dict:
        """Additive attention masks, per layer type, for ``n`` tokens at positions ``start``.. after
        ``cache``. The transformers kvpress accepts (<5.3) sizes them from layer 0's cache, which on
        Gemma 3 is a sliding layer the press leaves whole, so in the compressed layers each new token
        would see the ones after it (kvpress's pipeline feeds its question so). Here a compressed
        layer's kept tokens are all visible (all came before), the new ones causally; a sliding
        layer holds the last tokens before ``start`` in order, seen within the window."""
        config = self.model.config
        types = getattr(config, "layer_types", None) or ["full_attention"] * len(cache.layers)
        q = torch.arange(n)[:, None]
        out = {}
        for kind in set(types):
            lengths = {layer.keys.shape[-2] for layer, t in zip(cache.layers, types) if t == kind}
            if len(lengths) != 1:
                raise ValueError(f"the {kind} layers keep different numbers of tokens ({sorted(lengths)}): one mask "
                                 "per layer type cannot serve them")
            c = lengths.pop()
            kv = torch.arange(c + n)[None, :]
            visible = (kv < c) | (kv - c <= q)
            if kind == "sliding_attention":
                visible &= (start + q) - (start - c + kv) < config.sliding_window
            out[kind] = torch.where(visible, 0.0, torch.finfo(self.model.dtype).min)[None, None].to(self.model.dtype)
        return out

    def feed(self, cache, tokens: list[int], start: int):
        """Logits after each of ``tokens`` (at positions ``start``..), appended to ``cache`` in one
        forward."""
        masks = self.masks(cache, start, len(tokens))
        positions = torch.arange(start, start + len(tokens))
        return self.model(input_ids=torch.tensor([tokens]), past_key_values=cache, attention_mask=masks,
                          position_ids=positions[None], cache_position=positions).logits[0]

    def passkey(self, press, case: dict, new_tokens: int) -> dict:
        ids = case["ids"]
        q = len(self.question)
        if ids[-q:] != self.question:
            raise ValueError(f"passkey case (context {case['context']}, depth {case['depth']}): its ids do not end "
                             "with kv_tasks.QUESTION's tokens, so the question cannot be kept out of the press")
        start = time.perf_counter()
        with torch.inference_mode():
            cache, _ = self.prefill(press, ids[:-q])
            kept, nbytes = _cache_stats(cache)
            logits = self.feed(cache, ids[-q:], len(ids) - q)[-1]
            answer = []
            for p in range(len(ids), len(ids) + new_tokens):      # greedy, as kvpress's pipeline decodes
                answer.append(int(logits.argmax()))
                if answer[-1] in self.eos:
                    break
                logits = self.feed(cache, answer[-1:], p)[-1]
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        return {"right": kv_tasks.passkey_right(case["answer"], text), "text": text, "kept": kept, "bytes": nbytes,
                "tokens": len(ids) - q, "seconds": time.perf_counter() - start}

    def continuation(self, press, case: dict) -> dict:
        context, cont = case["context_ids"], case["continuation_ids"]
        start = time.perf_counter()
        with torch.inference_mode():
            cache, logits = self.prefill(press, context)
            kept, nbytes = _cache_stats(cache)
            # teacher-forced: the continuation but its last token in one forward
            if len(cont) > 1:
                logits = torch.cat([logits[None], self.feed(cache, cont[:-1], len(context))])
            rows = logits.reshape(len(cont), -1)
            nll = -float(rows.double().log_softmax(-1)[torch.arange(len(cont)), torch.tensor(cont)].sum())
        return {"nll": nll, "scored": len(cont), "kept": kept, "bytes": nbytes, "tokens": len(context),
                "seconds": time.perf_counter() - start}


def _row(press_name: str, ratio: float, context: int, runs: list[dict], errors: list[str], dtype) -> dict:
    passkey = [r for r in runs if "right" in r]
    scored = [r for r in runs if "nll" in r]
    row = {"press": press_name, "ratio": 0.0 if press_name == NO_PRESS else ratio, "context": context,
           "dtype": str(dtype).removeprefix("torch."), "attention": "eager" if press_name in EAGER else "sdpa",
           "passkey_right": sum(r["right"] for r in passkey), "passkey_cases": len(passkey),
           "passkey_accuracy": sum(r["right"] for r in passkey) / len(passkey) if passkey else None,
           "passkey_answers": [r["text"] for r in passkey],
           "perplexity": math.exp(sum(r["nll"] for r in scored) / sum(r["scored"] for r in scored)) if scored else None,
           "scored_tokens": sum(r["scored"] for r in scored), "seconds": sum(r["seconds"] for r in runs),
           "error": "; ".join(dict.fromkeys(errors)) or None}
    if runs:
        # per token of the context the cache was built over (the question and answer not counted)
        per_token = [r["bytes"] / r["tokens"] for r in runs]
        row["kept_tokens_per_layer"] = [sum(kept) / len(runs) for kept in zip(*(r["kept"] for r in runs))]
        row["bytes_per_token"] = sum(per_token) / len(per_token)
        row["bytes_per_token_fp16"] = row["bytes_per_token"] * 2 / dtype.itemsize
    return row


def run(request: dict) -> dict:
    import kvpress
    import transformers
    runner = Runner.load(request["model_dir"], int(request.get("threads", 2)))
    ratio, new_tokens = float(request["ratio"]), int(request.get("new_tokens", 8))
    groups: dict[int, tuple[list, list]] = {}
    for case in request.get("passkey", []):
        groups.setdefault(int(case["context"]), ([], []))[0].append(case)
    for case in request.get("continuation", []):
        groups.setdefault(len(case["context_ids"]), ([], []))[1].append(case)
    rows = []
    for name in [NO_PRESS, *[p for p in request["presses"] if p != NO_PRESS]]:
        for context in sorted(groups):
            runs, errors = [], []
            try:
                press = make_press(name, ratio)
                runner.attention(name)
            except Exception as exc:   # a press kvpress lacks or cannot build: its rows say why
                errors.append(f"{type(exc).__name__}: {exc}")
                press = None
            if not errors:
                for case in groups[context][0]:
                    try:
                        runs.append(runner.passkey(press, case, new_tokens))
                    except Exception as exc:   # reported in the row, the other presses go on
                        errors.append(f"passkey at depth {case['depth']}: {type(exc).__name__}: {exc}")
                for case in groups[context][1]:
                    try:
                        runs.append(runner.continuation(press, case))
                    except Exception as exc:
                        errors.append(f"continuation: {type(exc).__name__}: {exc}")
            rows.append(_row(name, ratio, context, runs, errors, runner.model.dtype))
            print(f"kvpress worker: {name} at {context} tokens: {rows[-1]['seconds']:.1f} s"
                  f"{' (error)' if rows[-1]['error'] else ''}", file=sys.stderr, flush=True)
    runner.attention(NO_PRESS)
    return {"versions": {"kvpress": getattr(kvpress, "__version__", None) or _version("kvpress"),
                         "transformers": transformers.__version__, "torch": torch.__version__},
            "threads": torch.get_num_threads(), "rows": rows}


def _version(dist: str) -> str:
    from importlib.metadata import version
    return version(dist)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: kv_peers_worker.py REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    result = run(json.loads(Path(argv[0]).read_text()))
    Path(argv[1]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
