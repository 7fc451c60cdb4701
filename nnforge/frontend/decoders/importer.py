"""A causal LM as the pipeline takes it: its decoder-form graph (builder), the tokenizer and the
generation settings the bundle carries, and its data: token windows from text for calibration and
for the held-out check, as input tuples of the graph (ids, positions, a zero cache per layer).

    >>> imp = import_decoder("path/to/model", max_len=512)
    >>> batches = imp.text_batches(["some text", ...], window=128)
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...ir import Graph, Interpreter
from ...numerics import FP32_TOLERANCE, compare, json_safe, within
from ...passes.kvcache import cache_report
from ...passes.recipes import HEAD_FORMATS
from ..errors import FrontendError
from .builder import INPUT_IDS, LOGITS, POSITIONS, build, cache_shape, state_pairs
from .loader import LoadedCausalLM, load_causal_lm
from .spec import DecoderSpec, family_of, spec_from_config

DEFAULT_MAX_LEN = 512
# Text for the held-out check when no data is given and no pass reads any (nnforge.heldout): a
# sample to compare the compressed graph with fp32 on, never calibration.
CHECK_TEXT = ("The river rose after three days of rain, and the bridge at the edge of the village was closed "
              "until the water fell. Farmers moved their animals to higher fields, while the school opened its "
              "hall to families from the lower streets. By the end of the week the roads were clear again.")
# A model import is checked against transformers' own forward up to this many parameters (the
# module is rebuilt from the weights when none was given, which holds a second copy of them).
IMPORT_CHECK_MAX_PARAMS = 600_000_000


def is_causal_lm(model) -> bool:
    """Whether ``model`` is for the decoder frontend: a transformers model with a generation head,
    a .gguf file, or a directory with a config.json (a transformers model directory)."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        return path.suffix.lower() == ".gguf" or (path.is_dir() and (path / "config.json").is_file()) or \
            (path.is_dir() and any(path.glob("*.gguf")))
    if isinstance(model, torch.nn.Module):
        try:
            from transformers import GenerationMixin, PreTrainedModel
        except ImportError:
            return False
        return isinstance(model, PreTrainedModel) and isinstance(model, GenerationMixin) and \
            not getattr(model.config, "is_encoder_decoder", False)
    return False


class CausalLMLogits(torch.nn.Module):
    """forward(input_ids, attention_mask=None) -> the logits of a causal LM run without a cache: a
    stateless graph, which is how a causal LM of a family the decoder frontend does not know is
    compiled. Named arguments, not ``*args``: exporters key dynamic shapes by them."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            return self.lm(input_ids=input_ids, use_cache=False).logits
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def stateless_lm(model: torch.nn.Module, example_inputs) -> CausalLMLogits | None:
    """For a transformers causal LM whose family has no decoder builder: with ``example_inputs``,
    the model wrapped as :class:`CausalLMLogits`, with a warning saying what the bundle is; without,
    the family error, saying how to compile it that way. None for a family the frontend knows."""
    config = getattr(model, "config", None)
    try:
        family_of(config, where=type(model).__name__)
        return None
    except FrontendError as e:
        unknown = str(e)
    if example_inputs is None:
        raise FrontendError(f"{unknown}. To compile it as a stateless graph of its logits (no KV cache, no "
                            "generate()), give example_inputs=(input_ids,): nnforge then traces the logits of "
                            "forward(input_ids, use_cache=False), as a module returning model(ids, "
                            "use_cache=False).logits would")
    warnings.warn(f"{unknown}: compiling it as a stateless graph of its logits, forward(input_ids, "
                  "use_cache=False).logits traced with example_inputs (no KV cache, no generate())", stacklevel=4)
    return CausalLMLogits(model).eval()


@dataclass
class DecoderImport:
    graph: Graph
    spec: DecoderSpec
    max_len: int
    tokenizer: Any | None
    source: str
    generation: dict
    loaded: LoadedCausalLM = field(repr=False)
    module: torch.nn.Module | None = field(default=None, repr=False)
    head: str = "fp32"                  # the LM head's format (passes.recipes.HEAD_FORMATS), set by the pipeline
    _zero_caches: dict = field(default_factory=dict, repr=False)

    # --- inputs -----------------------------------------------------------------------------------
    def inputs(self, ids: torch.Tensor) -> tuple:
        """The graph's inputs for a prefill of ``ids`` [batch, n] from position 0 on a zero cache."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if ids.dim() != 2 or ids.shape[1] < 1:
            raise FrontendError(f"token ids must be [batch, tokens] with at least one token, got {list(ids.shape)}")
        if ids.shape[1] > self.max_len:
            raise FrontendError(f"{ids.shape[1]} tokens do not fit the cache of {self.max_len} (max_len): use shorter "
                                "windows or a larger max_len")
        b, n = ids.shape
        # one zero cache per batch size, shared by every batch made here: a calibration set of many
        # windows must not hold a cache per window and layer (nothing writes into its inputs)
        if b not in self._zero_caches:
            self._zero_caches[b] = [torch.zeros(cache_shape(self.spec, self.max_len, b)) for _ in state_pairs(self.spec)]
        return (ids, torch.arange(n).repeat(b, 1), *self._zero_caches[b])

    def tokenize(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            raise FrontendError(f"{self.source}: the model came without a tokenizer, so text cannot be read; "
                                "give a model directory with tokenizer files (or token ids)")
        return torch.as_tensor(self.tokenizer(text)["input_ids"], dtype=torch.int64)

    def text_batches(self, text, *, window: int | None = None, limit: int = 128) -> list[tuple]:
        """Input tuples of consecutive ``window``-token windows (one row each, at most ``limit``) of
        ``text``: a .txt path, a string, or a list of strings (joined by blank lines)."""
        window = min(window or 128, self.max_len)
        ids = self.tokenize(read_text(text))
        if ids.numel() < 2:
            raise FrontendError(f"{describe_text(text)}: fewer than 2 tokens; calibration and checks need text")
        starts = range(0, max(1, ids.numel() - 1), window)
        return [self.inputs(ids[s:s + window][None]) for s in list(starts)[:limit] if ids[s:s + window].numel() > 1]

    def example(self) -> tuple:
        """A prompt to check the graph on when no data is given: CHECK_TEXT, or seeded random ids
        for a model without a tokenizer."""
        n = min(48, self.max_len)
        if self.tokenizer is not None:
            ids = self.tokenize(CHECK_TEXT)[:n]
        else:
            ids = torch.randint(0, self.spec.vocab, (n,), generator=torch.Generator().manual_seed(0))
        return self.inputs(ids[None])

    # --- the import check -------------------------------------------------------------------------
    def check_import(self, inputs: tuple) -> dict:
        """The graph's logits against transformers' forward on ``inputs``' tokens (FP32 tolerance)."""
        module, why = (self.module, "") if self.module is not None else self._rebuilt_module()
        if module is None:
            return {"checked": False, "why": why}
        ids = inputs[0]
        with torch.no_grad():
            want = module(ids).logits.float()
        got = Interpreter(self.graph).run(*inputs)[0]
        metrics = compare([got], [want])
        if not within(metrics, FP32_TOLERANCE):
            raise FrontendError(f"{self.source}: the decoder graph's logits differ from transformers' forward "
                                f"(cosine {metrics['cosine_min']:.6f}, max abs error {metrics['max_abs_error']:.3g}); "
                                "this is a bug in nnforge's decoder builder, please report it")
        return {"checked": True, "against": f"transformers {type(module).__name__} forward", **json_safe(metrics)}

    def _rebuilt_module(self):
        """(transformers' module over the loaded weights, "") or (None, why it is not made)."""
        params = sum(w.encoding.numel for w in self.graph.weights.values())
        if params > IMPORT_CHECK_MAX_PARAMS:
            return None, f"more than {IMPORT_CHECK_MAX_PARAMS:,} parameters: not rebuilt in transformers to compare"
        from transformers import AutoModelForCausalLM
        config = self.loaded.config
        # parameters made empty (buffers such as rotary tables made for real) and given the loaded
        # tensors themselves (assign): no second copy of the weights
        from accelerate import init_empty_weights
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        weights = {k: self.loaded.weights[k].to(torch.float32) for k in self.loaded.weights}
        missing, _ = model.load_state_dict(weights, strict=False, assign=True)
        missing = [m for m in missing if not m.endswith("inv_freq")]
        if missing and not (self.spec.tied_embeddings and all(m.endswith("lm_head.weight") for m in missing)):
            return None, f"transformers' {type(model).__name__} has parameters the checkpoint lacks: {missing[:3]}"
        if self.spec.tied_embeddings:
            model.tie_weights()
        return model.eval(), ""

    def step_symbols(self) -> dict[str, int]:
        """The dimension symbols of one decode step at batch 1, bound: the call a backend may
        build a function for beside the general one (LowerContext.steps)."""
        ids = next(v for v in self.graph.inputs if v.name == INPUT_IDS)
        return {d: 1 for d in ids.shape if isinstance(d, str)}

    # --- what the bundle records --------------------------------------------------------------
    def manifest_section(self, graph: Graph | None = None, kv_reduce: dict | None = None) -> dict:
        """The manifest's ``decoder`` section for ``graph`` (the compressed graph: its state, which a
        KV-cache encoding changes; default the imported one), with the runner's token reduction
        settings ``kv_reduce`` (passes/kvreduce.py) when the recipe has one."""
        s, graph = self.spec, graph or self.graph
        inputs = {v.name: v for v in graph.inputs}
        return {
            **({"kv_reduce": kv_reduce} if kv_reduce else {}),
            "family": s.family, "architecture": s.architecture, "max_len": self.max_len,
            "layers": s.num_layers, "heads": s.heads, "kv_heads": s.kv_heads, "head_dim": s.head_dim,
            "vocab": s.vocab, "hidden": s.hidden,
            "inputs": {"ids": INPUT_IDS, "positions": POSITIONS}, "logits": LOGITS,
            "state": [{"input": i, "output": o, "shape": list(inputs[i].shape), "dtype": inputs[i].dtype.name}
                      for i, o in graph.state_pairs()],
            "kv_cache": cache_report(graph, self.max_len),
            "functions": {"prefill": "the graph on a prompt (seq >= 1) from its first free position",
                          "decode": "the graph on one token (seq = 1) per step"},
            "tied_embeddings": s.tied_embeddings,
            "head": {"format": self.head, "how": HEAD_FORMATS[self.head][0],
                     "embedding": ("tied: the token embedding reads the head's weight, in the head's format"
                                   if s.tied_embeddings else "its own weight, left out of the weight passes")},
            "windows": sorted({layer.window for layer in s.layers}),
            # longrope (Phi-3): past this length the long factors apply, and generation recomputes
            # the cache as transformers does (generation.Decoder)
            "recompute_at": max((layer.rope.switch_at for layer in s.layers
                                 if layer.rope is not None and layer.rope.long_inv_freq is not None), default=0),
            "tokenizer": "tokenizer" if self.tokenizer is not None else None,
            "generation": self.generation,
        }


def read_text(text) -> str:
    """A .txt path's contents, a string as it is, or a list of strings joined by blank lines."""
    if isinstance(text, Path) or (isinstance(text, str) and text.endswith(".txt") and "\n" not in text):
        path = Path(text)
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FrontendError(f"{path}: cannot read the text file ({type(e).__name__}: {e})") from None
    if isinstance(text, str):
        return text
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return "\n\n".join(text)
    raise FrontendError(f"text data is a .txt path, a string or a list of strings, not {type(text).__name__}")


def describe_text(text) -> str:
    if isinstance(text, (str, Path)) and str(text).endswith(".txt"):
        return str(text)
    return f"the {len(text)} text(s) given" if isinstance(text, (list, tuple)) else "the text given"


def is_text(data) -> bool:
    return isinstance(data, (str, Path)) or (isinstance(data, (list, tuple)) and bool(data)
                                              and all(isinstance(t, str) for t in data))


def _generation_settings(loaded: LoadedCausalLM) -> dict:
    """BOS, EOS and stop tokens from the model's generation config, else its config and tokenizer."""
    config, tok = loaded.config, loaded.tokenizer
    gen = {}
    try:
        from transformers import GenerationConfig
        gen = GenerationConfig.from_model_config(config).to_dict()
    except Exception:                   # an odd config leaves the defaults below
        gen = {}
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config

    def ids(value) -> list[int]:
        if value is None:
            return []
        return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]

    eos = ids(gen.get("eos_token_id")) or ids(getattr(text_config, "eos_token_id", None))
    bos = ids(gen.get("bos_token_id")) or ids(getattr(text_config, "bos_token_id", None))
    if tok is not None:
        eos = eos or ids(tok.eos_token_id)
        bos = bos or ids(tok.bos_token_id)
    return {"bos_token_id": bos[0] if bos else None, "eos_token_ids": eos, "stop_token_ids": sorted(set(eos)),
            "pad_token_id": getattr(text_config, "pad_token_id", None)}


def import_decoder(model, *, max_len: int | None = None, name: str | None = None,
                   trust_code: bool = False) -> DecoderImport:
    """The decoder-form graph of ``model`` (a transformers causal LM, a model directory or a .gguf
    file) for a static cache of ``max_len`` tokens (default: the smaller of DEFAULT_MAX_LEN and the
    model's max_position_embeddings)."""
    loaded = load_causal_lm(model, trust_remote_code=trust_code)
    probe = spec_from_config(loaded.config)
    if max_len is None:
        max_len = min(DEFAULT_MAX_LEN, probe.max_positions)
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 2:
        raise FrontendError(f"max_len must be an integer >= 2 (the static cache length), got {max_len!r}")
    spec = spec_from_config(loaded.config, max_len=max_len)
    graph = build(spec, loaded.weights, max_len, name=name or _model_name(model, spec))
    return DecoderImport(graph=graph, spec=spec, max_len=max_len, tokenizer=loaded.tokenizer, source=loaded.source,
                         generation=_generation_settings(loaded), loaded=loaded,
                         module=model if isinstance(model, torch.nn.Module) else None)


def _model_name(model, spec: DecoderSpec) -> str:
    if isinstance(model, (str, os.PathLike)):
        return Path(model).stem or spec.family
    origin = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return Path(origin).name if origin not in ("", ".") else spec.family


__all__ = ["DecoderImport", "import_decoder", "is_causal_lm", "is_text", "read_text", "CHECK_TEXT",
           "DEFAULT_MAX_LEN"]
