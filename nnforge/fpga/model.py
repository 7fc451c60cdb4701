"""Workloads for the FPGA simulator: the weight layers of a decoder LLM (from its config) or of an
nnforge graph / bundle (from its weight encodings), each with its precision and sparsity.

    >>> from nnforge.fpga.model import decoder_workload, FLIGHTLLM_LLAMA2_COMPRESSION
    >>> w = decoder_workload("llama2-7b", FLIGHTLLM_LLAMA2_COMPRESSION)
    >>> round(w.weight_bytes / 1e9, 2)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .params import SimulatorError


@dataclass(frozen=True)
class Linear:
    """One weight matrix: ``rows`` outputs x ``cols`` inputs, applied once per token per repeat."""
    name: str
    rows: int
    cols: int
    weight_bits: int = 8          # bits of one stored weight code (decides the DSP packing)
    density: float = 1.0          # fraction of weights kept
    pattern: str = "dense"        # dense | nm | block | unstructured
    nbytes: float | None = None   # stored bytes incl. scales and sparse metadata (None: computed)
    repeat: int = 1               # identical layers (the decoder blocks)
    lookup: bool = False          # an embedding table: one row read per token, no MACs

    @property
    def params(self) -> int:
        return self.rows * self.cols

    @property
    def bytes(self) -> float:
        """HBM bytes of this weight, once (not times repeat)."""
        if self.nbytes is not None:
            return self.nbytes
        kept = self.params * self.density
        meta = 0.0
        if self.pattern == "nm":            # log2 of the kept position within each group, per kept value
            meta = kept * 2 / 8
        elif self.pattern == "block":       # one bit per 16-wide block (FlightLLM FSB_BLOCK_SIZE = 16)
            meta = self.params / 16 / 8
        elif self.pattern == "unstructured":
            meta = self.params / 8          # a bitmask
        scales = self.rows * 2 if self.weight_bits < 16 else 0   # one fp16 scale per output channel
        return kept * self.weight_bits / 8 + meta + scales


@dataclass(frozen=True)
class Workload:
    """What the accelerator runs: linears per token, and (for decoders) attention over a KV cache."""
    name: str
    linears: tuple[Linear, ...]
    layers: int = 0               # decoder blocks (0: no attention / KV cache modelled)
    hidden: int = 0
    heads: int = 0
    kv_dim: int = 0               # K (and V) width per token per layer
    kv_token_bytes: float = 0.0   # K and V bytes of one token, one layer, as an encoded cache stores them (0: kv_bits)
    ffn: int = 0
    misc_per_token: int = 0       # elementwise/norm/activation elements per token per block
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    compression: str = ""         # the weight formats assumed, in words (tables and JSON print it)

    @property
    def weight_bytes(self) -> float:
        return sum(l.bytes * l.repeat for l in self.linears)

    @property
    def params(self) -> int:
        return sum(l.params * l.repeat for l in self.linears)


# Decoder configs (the models' Hugging Face config.json values).
DECODERS = {
    # meta-llama/Llama-2-7b-hf config.json: hidden 4096, intermediate 11008, 32 layers, 32 heads (MHA), vocab 32000
    "llama2-7b": dict(hidden=4096, ffn=11008, layers=32, heads=32, kv_heads=32, vocab=32000, gated=True),
    # facebook/opt-6.7b config.json: hidden 4096, ffn_dim 16384, 32 layers, 32 heads, vocab 50272
    "opt-6.7b": dict(hidden=4096, ffn=16384, layers=32, heads=32, kv_heads=32, vocab=50272, gated=False),
}

# FlightLLM's own per-layer configuration as released: github FlightLLM/flightllm_test_demo,
# profile/.compiler_output/ir_output/llama2_*.yaml: every weight int8; q_proj and k_proj block-sparse
# with sparse_ratio 0.7 (fraction kept, as inst_profiler.py multiplies MACs by it), the rest dense.
FLIGHTLLM_LLAMA2_COMPRESSION = {
    "q_proj": dict(weight_bits=8, density=0.7, pattern="block"),
    "k_proj": dict(weight_bits=8, density=0.7, pattern="block"),
    "*": dict(weight_bits=8, density=1.0, pattern="dense"),
}


DEFAULT_DECODER_COMPRESSION = {"*": dict(weight_bits=8, density=1.0, pattern="dense")}


def _format(weight_bits: int = 8, density: float = 1.0, pattern: str = "dense", **_) -> str:
    """'8-bit dense', '8-bit block-sparse keeping 70%'."""
    sparse = {"nm": "N:M-sparse", "block": "block-sparse"}.get(pattern, f"{pattern}-sparse")
    kind = "dense" if pattern == "dense" else f"{sparse} keeping {density:.0%}"
    return f"{weight_bits}-bit {kind}"


def describe_compression(compression: dict | None) -> str:
    """What a decoder ``compression`` (see :func:`decoder_workload`) assumes, in words, naming the
    configuration it is when it is a known one."""
    comp = dict(compression or DEFAULT_DECODER_COMPRESSION)
    comp.setdefault("*", DEFAULT_DECODER_COMPRESSION["*"])       # what decoder_workload gives unnamed layers
    groups: dict[str, list[str]] = {}
    for layer, settings in comp.items():
        groups.setdefault(_format(**settings), []).append("every other layer" if layer == "*" else layer)
    text = "; ".join(f"{', '.join(layers)}: {fmt}" for fmt, layers in groups.items())
    if comp == FLIGHTLLM_LLAMA2_COMPRESSION:
        return f"FlightLLM's released Llama-2 configuration ({text})"
    if comp == DEFAULT_DECODER_COMPRESSION:
        return f"nnforge's default for a decoder: {_format(**comp['*'])} weights everywhere"
    return text


def describe_layers(linears) -> str:
    """The weight formats of a graph's layers, counted: '36 layers 4-bit dense, 1 embedding 32-bit dense'."""
    counts: dict[str, int] = {}
    for l in linears:
        key = ("embedding " if l.lookup else "layer ") + _format(l.weight_bits, l.density, l.pattern)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {key.replace(' ', 's ', 1) if n > 1 else key}" for key, n in counts.items())


def decoder_workload(name: str, compression: dict | None = None) -> Workload:
    """A decoder LLM's linears from its config; ``compression`` maps a projection name (or "*")
    to weight_bits / density / pattern. Default: int8 dense everywhere."""
    if name not in DECODERS:
        raise SimulatorError(f"unknown decoder {name!r}; known: {', '.join(DECODERS)}")
    c = DECODERS[name]
    comp = compression or DEFAULT_DECODER_COMPRESSION
    h, f, n = c["hidden"], c["ffn"], c["layers"]
    kv = h * c["kv_heads"] // c["heads"]
    shapes = [("q_proj", h, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, h)]
    shapes += ([("gate_proj", f, h), ("up_proj", f, h), ("down_proj", h, f)] if c["gated"]
               else [("fc1", f, h), ("fc2", h, f)])
    default = comp.get("*", dict(weight_bits=8, density=1.0, pattern="dense"))
    linears = [Linear(p, r, k, repeat=n, **comp.get(p, default)) for p, r, k in shapes]
    linears.append(Linear("lm_head", c["vocab"], h, **comp.get("lm_head", default)))
    # per token per block: 2 norms (2 passes each), residual adds, RoPE (LLaMA), activation (+ gate mul)
    misc = 2 * 2 * h + 2 * h + (2 * h if c["gated"] else 0) + (2 * f if c["gated"] else f)
    return Workload(name, tuple(linears), layers=n, hidden=h, heads=c["heads"], kv_dim=kv, ffn=f,
                    misc_per_token=misc, source="config", compression=describe_compression(compression))


def _encoding_fields(enc) -> dict:
    """weight_bits / density / pattern / nbytes of one nnforge weight encoding."""
    kind = getattr(enc, "kind", "dense")
    out = dict(density=1.0, pattern="dense", nbytes=float(enc.nbytes))
    if kind == "sparse":
        p = enc.pattern
        out.update(density=float(enc.density), pattern=p.kind if p.kind in ("nm", "block") else "unstructured")
        enc = enc.values
        kind = getattr(enc, "kind", "dense")
    if kind == "int":
        out["weight_bits"] = int(enc.bits)
    elif kind == "minifloat":
        out["weight_bits"] = int(enc.fmt.bits)
    elif kind == "palette":
        out["weight_bits"] = int(getattr(enc, "bits", 8))
    else:
        out["weight_bits"] = int(getattr(enc.dtype, "bits", 32))
    return out


def graph_workload(graph, name: str | None = None) -> Workload:
    """The weight layers of an nnforge Graph with their encodings (linear/matmul/conv as matrices,
    embeddings as row look-ups). No attention or KV cache: a graph does not say which matmul is one."""
    linears = []
    for node in graph.nodes:
        if node.op not in ("linear", "matmul", "conv", "embedding") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w is None or not getattr(w, "is_weight", False):
            continue
        enc = w.encoding
        shape = tuple(enc.shape)
        rows, cols = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
        try:
            fields = _encoding_fields(enc)
        except Exception as e:      # an encoding this model cannot read is named, not guessed
            raise SimulatorError(f"layer {node.name}: cannot read weight encoding {enc.describe()!r}: {e}") from None
        linears.append(Linear(node.name, rows, cols, lookup=node.op == "embedding", **fields))
    if not linears:
        raise SimulatorError(f"graph {name or graph.name}: no weight layers (linear/matmul/conv/embedding) to simulate")
    attention = [n for n in graph.nodes if n.op == "attention"]
    if not attention:
        return Workload(name or graph.name, tuple(linears), source="graph",
                        notes=("attention and KV cache not modelled for a graph (no decoder structure known)",),
                        compression=f"the weight encodings of {name or graph.name}: {describe_layers(linears)}")
    # a decoder graph names its attention: each attention node is a block over its own k/v cache
    q, k = attention[0].inputs[0], attention[0].inputs[1]
    heads, head_dim, kv_heads = q.shape[1], q.shape[3], k.shape[1]
    misc = sum(_per_token(n.output) for n in graph.nodes if n.op in MISC_OPS)
    notes = [f"decoder structure from the graph: {len(attention)} attention layers of {heads} heads over {kv_heads} "
             f"kv heads of {head_dim}"]
    kv_token_bytes = 0.0
    writes = [n for n in graph.nodes if n.op == "kv_cache_write"]
    if writes:      # an encoded cache: the bytes its state takes (codes and scales), not the target's kv_bits
        from ..passes.kvcache import cache_report
        kv_token_bytes = cache_report(graph, writes[0].attrs["max_len"])["bytes_per_token"] / len(attention)
        notes.append(f"KV cache as encoded in the graph: {kv_token_bytes:g} bytes per token and layer (K and V)")
    return Workload(name or graph.name, tuple(linears), layers=len(attention), hidden=heads * head_dim, heads=heads,
                    kv_dim=kv_heads * head_dim, kv_token_bytes=kv_token_bytes, misc_per_token=misc // len(attention),
                    source="graph", notes=tuple(notes),
                    compression=f"the weight encodings of {name or graph.name}: {describe_layers(linears)}")


# element-wise, norm and activation ops the misc unit runs (per token elements of their outputs)
MISC_OPS = frozenset({"rms_norm", "layer_norm", "rope", "add", "mul", "silu", "gelu", "softmax"})


def _per_token(v) -> int:
    """Elements of ``v`` per token: the product of its fixed dims (batch and seq are symbols)."""
    return math.prod(d for d in v.shape if isinstance(d, int))


def bundle_workload(path: str | Path) -> Workload:
    """The workload of a compiled nnforge bundle directory (its graph and weight encodings)."""
    from ..bundle import Bundle
    path = Path(path)
    try:
        bundle = Bundle.open(path)
        graph = bundle.graph()
    except Exception as e:
        raise SimulatorError(f"{path}: cannot read the bundle's graph: {e}") from None
    return graph_workload(graph, name=f"{path.name}")
