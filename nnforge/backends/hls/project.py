"""IR graph -> a complete HLS project: top function, one config struct per layer, the weight memory
image, a testbench with recorded inputs and outputs, and a Vitis HLS Tcl script.

Values are activations (fixed point), integers (ids, masks: ap_int<32>) or booleans (ap_uint<1>);
int/bool values enter only the ops in ``MIXED_OPS`` (mask logic and gathers: :mod:`.logic`), and
int/bool graph inputs arrive as floats (exact up to 2^24) like every other port.

Lowering is a table from op to a small rule returning :mod:`.layers` (one kernel call each); an op
without a rule is a BackendError naming every such op and node at once. Names from the model become
C++ identifiers (``v_`` values, ``in_``/``out_`` ports, ``cfg_n_`` configs, non-identifier characters
as ``_``); two names that map to one identifier are an error.

    >>> plan = build_plan(graph, HlsOptions())
    >>> files = render(plan)             # {relative path: bytes}
    >>> plan.emulate([x])                # bit-accurate outputs, equal to the C-simulation
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from ...hls import HEADER_DIR  # noqa: F401  (re-exported for the project writer and tests)
from ...ir import Graph
from ...ir.encodings import Dense
from ...registry import Registry
from ..base import BackendError, Fallback
from . import emulate as E
from . import layers as L
from .capabilities import CAPABILITIES, refused
from .patterns import fuse_patterns
from .weights import WeightMemory, mat_weights

PROJECT = "hls"        # folder of the project inside a bundle
KV_PORT = "kv_mem"     # the off-chip memory port that holds the KV cache

# Value kinds and their C types: activations in fixed point, integers (ids, masks) as ap_int<32>
# (int64 values saturate to 32 bits), booleans as ap_uint<1>.
CTYPES = {"act": "act_t", "int": "int_t", "bool": "bool_t"}
# Per-op lowering rules (plan, node, name) -> [Layer]; logic.py adds the mask logic, reductions and gathers,
# routing.py the routing of mixture-of-experts layers (top-k, running sums, computed gathers and scatters).
LOWERINGS = Registry("hls lowering")
# Ops whose rule handles int / bool operands; every other op takes and gives activations only.
MIXED_OPS = {"full", "embedding", "permute", "reshape", "slice", "expand", "eq", "ne", "lt", "le", "gt", "ge", "and", "or",
             "not", "where", "cast", "reduce_sum", "reduce_any", "index", "gather_elements", "concat", "topk_indices",
             "cumsum", "index_put", "minimum", "maximum", "div", "rope", "cache_update", "attention", "kv_cache_write",
             "kv_cache_read"}
# How a state tensor lies in the kv memory's int32 words (``Plan.kv_forms``): a float cache as raw
# activations, one a word; a kv8 cache as its tensors' own bytes, little-endian (nf_kv8.h).
KV_FORMS = {"act": 1, "int8": 4, "f16": 2}      # form -> elements per word


def value_kind(v) -> str:
    return "bool" if v.dtype.kind == "bool" else "int" if v.dtype.kind in ("int", "uint") else "act"


@dataclass(frozen=True)
class HlsOptions:
    """Fixed-point choices, read from the target's [options] (keys as the field names).

    Activations: ap_fixed<act_width, act_int, AP_RND, AP_SAT> everywhere between layers.
    Weights: int codes as encoded (int8/int4/int3 ...); float weights become dense_weight_bits-bit
    codes per output channel; group scales are scale_bits-bit signed mantissas with one shift per
    layer; accumulators are exact (width proven per layer). Tables (GELU/SiLU/exp) step by
    2^lut_step_log2 with linear interpolation; softmax's exponentials carry exp_frac bits."""
    act_width: int = 24
    act_int: int = 8
    scale_bits: int = 18
    dense_weight_bits: int = 16
    lut_step_log2: int = -6
    exp_frac: int = 20
    chain: int = 4
    dataflow: bool = False             # one DATAFLOW region: layers as concurrent processes, on-chip channels
    part: str = "xcu280-fsvh2892-2L-e"
    clock_mhz: float = 225.0
    onchip_bytes_max: int = 0          # BRAM + URAM of the device (0: unchecked)
    uram_min_bits: int = 16 * 36864    # activation buffers this large are bound to UltraRAM (0: never)

    @classmethod
    def from_target(cls, target) -> "HlsOptions":
        known = {f.name for f in fields(cls)}
        opts = {k: v for k, v in target.options.items() if k in known}
        fpga = getattr(target, "fpga", {}) or {}
        opts.setdefault("part", fpga.get("part", cls.part))
        opts.setdefault("clock_mhz", float(fpga.get("clock_mhz", cls.clock_mhz)))
        opts.setdefault("onchip_bytes_max", int(fpga.get("bram_36k", 0) * 4608 + fpga.get("uram", 0) * 36864))
        design = fpga.get("design", {}) if isinstance(fpga.get("design"), dict) else {}
        if fpga.get("uram", 0) and "uram_min_buffer_kib" in design:      # the simulator's binding rule too
            opts.setdefault("uram_min_bits", int(design["uram_min_buffer_kib"] * 1024 * 8))
        elif not fpga.get("uram", 0):
            opts.setdefault("uram_min_bits", 0)
        return cls.from_dict(opts, f"target {target.name}")

    @classmethod
    def from_dict(cls, d: dict, where: str = "hls options") -> "HlsOptions":
        types = {f.name: type(f.default) for f in fields(cls)}
        unknown = sorted(set(d) - set(types))
        if unknown:
            raise BackendError(f"{where}: unknown hls option(s) {', '.join(unknown)}; known: {', '.join(types)}")
        for k, v in d.items():
            want = types[k]
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) if want is float else \
                isinstance(v, want) and (want is bool or not isinstance(v, bool))
            if not ok:
                raise BackendError(f"{where}: hls option {k} must be {want.__name__}, got {v!r}")
        o = cls(**{k: float(v) if types[k] is float else v for k, v in d.items()})
        checks = [(2 <= o.act_width <= 32, "act_width must be 2..32 (raw activations are int32 in memory)"),
                  (1 <= o.act_int < o.act_width, "act_int must be 1..act_width-1"),
                  (2 <= o.scale_bits <= 31, "scale_bits must be 2..31"),
                  (2 <= o.dense_weight_bits <= 16, "dense_weight_bits must be 2..16"),
                  (o.act_width - o.act_int + o.lut_step_log2 >= 0, "lut_step_log2 finer than the activation LSB"),
                  (8 <= o.exp_frac <= 30, "exp_frac must be 8..30"), (o.chain >= 1, "chain must be >= 1")]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise BackendError(f"{where}: invalid hls options: {'; '.join(bad)}")
        return o

    @property
    def act(self) -> E.Fixed:
        return E.Fixed(self.act_width, self.act_int)

    def to_dict(self) -> dict:
        return asdict(self)


def cxx_name(name: str) -> str:
    """Every character but ASCII letters, digits and ``_`` becomes ``_`` (keywords, leading digits,
    unicode, newlines, quotes and comment or preprocessor text cannot survive)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


class Names:
    """Unique C++ identifiers for model names: ``prefix`` + :func:`cxx_name` + ``suffix`` with runs
    of ``_`` made one (an identifier containing ``__`` is reserved in C++); every prefix is letters
    then ``_`` (never a keyword, never a leading digit or underscore). A collision is an error
    naming both."""

    def __init__(self):
        self.owner: dict[str, str] = {}

    def __call__(self, prefix: str, name: str, what: str, suffix: str = "") -> str:
        ident = re.sub(r"_{2,}", "_", prefix + cxx_name(name) + suffix)
        prev = self.owner.setdefault(ident, f"{what} {name!r}")
        if prev != f"{what} {name!r}":
            raise BackendError(f"hls backend: {prev} and {what} {name!r} both become the C++ identifier {ident}; "
                               f"rename one of them")
        return ident


@dataclass
class Plan:
    name: str                      # top function
    opts: HlsOptions
    layers: list = field(default_factory=list)
    ids: dict = field(default_factory=dict)          # value name -> C++ buffer
    sizes: dict = field(default_factory=dict)        # buffer -> elements
    shapes: dict = field(default_factory=dict)       # value name -> shape
    inputs: list = field(default_factory=list)       # value names
    outputs: list = field(default_factory=list)
    mem: WeightMemory = field(default_factory=WeightMemory)
    fallbacks: list = field(default_factory=list)
    pool: dict = field(default_factory=dict)         # on-chip buffer -> elements (shared by values)
    kinds: dict = field(default_factory=dict)        # value name -> "act" | "int" | "bool"
    buf_kinds: dict = field(default_factory=dict)    # pool buffer -> kind
    # the KV cache in off-chip memory (the kv_mem port, int32 words): each state value and the
    # cache_update outputs that write it -> (word offset, shape), and its form (KV_FORMS) by state
    # value; state: (input, output) pairs
    kv: dict = field(default_factory=dict)
    kv_forms: dict = field(default_factory=dict)
    state: list = field(default_factory=list)
    kv_words: int = 0
    graph: Graph | None = None                       # the static graph lowered (its uses, for lowering rules)

    @property
    def onchip_bytes(self) -> int:
        """On-chip activation memory of the top function's buffers."""
        size = {"act": (self.opts.act_width + 7) // 8, "int": 4, "bool": 1}
        return sum(n * size[self.buf_kinds.get(b, "act")] for b, n in self.pool.items())

    def buf_bits(self, buf: str) -> int:
        return {"act": self.opts.act_width, "int": 32, "bool": 1}[self.buf_kinds.get(buf, "act")]

    def in_uram(self, buf: str) -> bool:
        """Large buffers go to UltraRAM (288 Kb blocks): a batch's activations overflow the BRAM
        of a U280 long before its URAM; Vitis would map every array to BRAM unless told."""
        m = self.opts.uram_min_bits
        return bool(m) and not self.opts.dataflow and self.pool.get(buf, 0) * self.buf_bits(buf) >= m

    def temp(self, value: str, ident: str, shape: tuple, kind: str = "act") -> str:
        """A value a lowering rule makes between its own layers (``ident``: its C++ name)."""
        self.ids[value], self.kinds[value], self.shapes[value] = ident, kind, tuple(shape)
        self.sizes[ident] = max(1, math.prod(shape))
        return value

    def ctype(self, value: str) -> str:
        return CTYPES[self.kinds.get(value, "act")]

    def emulate_env(self, inputs: list, kv: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every value's raw integers (flat) after the bit-accurate emulation, by value name.
        ``kv``: the KV-cache memory (int64 raw words, updated in place; zeros when None)."""
        act = self.opts.act
        env = {KV_PORT: np.zeros(self.kv_words, np.int64) if kv is None else kv}
        for v, x in zip(self.inputs, inputs):
            x = np.asarray(x, np.float32).reshape(-1)
            k = self.kinds.get(v, "act")
            env[v] = E.from_float(x, act) if k == "act" else E.int_from_float(x) if k == "int" else \
                (x != 0).astype(np.int64)
        for layer in self.layers:
            env[layer.output] = np.asarray(layer.emulate(env, act)).reshape(-1)
        return env

    def kv_region(self, kv: np.ndarray, value: str) -> np.ndarray:
        """The words of the KV-cache memory ``kv`` that hold ``value`` (a state value): a view, in
        its shape for a float cache (one raw activation a word), flat for a packed form."""
        off, shape = self.kv[value]
        form = self.kv_forms.get(value, "act")
        n = kv_words(form, math.prod(shape))
        return kv[off:off + n].reshape(shape) if form == "act" else kv[off:off + n]

    def load_state(self, kv: np.ndarray, value: str, x) -> None:
        """State tensor ``x`` (the graph's ``value``) into its words of ``kv``."""
        self.kv_region(kv, value)[...] = pack_state(self.kv_forms.get(value, "act"), x, self.opts.act).reshape(
            self.kv_region(kv, value).shape)

    def read_state(self, kv: np.ndarray, value: str) -> np.ndarray:
        """The state tensor ``value`` as its words of ``kv`` hold it, in the graph's dtype."""
        return unpack_state(self.kv_forms.get(value, "act"), self.kv_region(kv, value), self.kv[value][1],
                            self.opts.act)

    def emulate(self, inputs: list, kv: np.ndarray | None = None) -> list[np.ndarray]:
        """Float outputs of the bit-accurate emulation (what the C-simulation returns)."""
        act, env = self.opts.act, self.emulate_env(inputs, kv)
        return [(E.to_float(env[v], act) if self.kinds.get(v, "act") == "act" else env[v].astype(np.float32))
                .reshape(self.shapes[v]) for v in self.outputs]


def kv_words(form: str, n: int) -> int:
    """Words of kv memory that ``n`` elements of state in ``form`` take."""
    return -(-n // KV_FORMS[form])


def kv_layout(forms: dict, shapes: dict) -> tuple[dict, int]:
    """({state value: (word offset, shape)}, words in all): regions one after another, in the order
    of ``shapes`` (the graph's state order), as the design addresses them."""
    out, n = {}, 0
    for name, shape in shapes.items():
        out[name] = (n, tuple(shape))
        n += kv_words(forms.get(name, "act"), math.prod(shape))
    return out, n


def pack_state(form: str, x, act: E.Fixed) -> np.ndarray:
    """The kv-memory words (int64 values of int32 words) of state tensor ``x`` in ``form``."""
    if form == "act":
        return E.from_float(np.asarray(x, np.float32), act).reshape(-1)
    if form == "int8":
        return E.pack_words(np.asarray(x).astype(np.int8))
    return E.pack_words(np.asarray(x, np.float32).astype(np.float16))


def unpack_state(form: str, words, shape, act: E.Fixed) -> np.ndarray:
    """State tensor ``shape`` from its kv-memory ``words`` (inverse of :func:`pack_state`): float32
    for a float cache, int8 codes, float16 scales."""
    n = math.prod(shape)
    if form == "act":
        return E.to_float(np.asarray(words).reshape(-1), act).reshape(shape)
    return E.unpack_words(words, np.int8 if form == "int8" else np.float16, n).reshape(shape)


# --- lowering rules: (plan, node, names) -> layers --------------------------------------------------
def _dense(v, what: str) -> torch.Tensor:
    if v is None:
        return None
    if not v.is_weight or not isinstance(v.encoding, Dense):
        raise BackendError(f"{what}: expected a dense weight, got {'an activation' if not v.is_weight else v.encoding.describe()}")
    return v.encoding.data.to(torch.float64)


def _matrix_weights(plan, node, w):
    """The matrix unit's weights for the weight ``w`` of a linear or conv ``node``: its own codes
    when a row of the capability table takes it; otherwise decoded and stored like a float weight
    (a reported fallback), or an error for an encoding the backend refuses."""
    where, enc, bits = f"node {node.name} ({w.name})", w.encoding, plan.opts.dense_weight_bits
    cap, why = CAPABILITIES.find(node.op, enc)
    if cap is not None:
        return mat_weights(enc, where, bits, plan.fallbacks)
    if refused(enc):
        raise BackendError(f"{where}: {why}")
    plan.fallbacks.append(Fallback(where, f"{enc.describe()} weight",
                                   f"decoded and stored as int{bits} per output channel ({why})"))
    rows, cols = enc.shape[0], math.prod(enc.shape[1:])
    return mat_weights(Dense(enc.decode(torch.float32).reshape(rows, cols)), where, bits, [])


def _table_operand(node, v, op: str):
    """A constant operand the capability table must take as it is (a matmul constant, an
    embedding table): a BackendError naming the node and why otherwise."""
    cap, why = CAPABILITIES.find(op, v.encoding)
    if cap is None:
        raise BackendError(f"node {node.name} ({op}): weight {v.name} is {v.encoding.describe()}: {why} in the hls "
                           f"backend; keep it dense (leave it out of the recipe's compression)")


def _raw(t: torch.Tensor, frac: int) -> np.ndarray:
    return np.floor(t.numpy().astype(np.float64) * 2.0 ** frac + 0.5).astype(np.int64)


@LOWERINGS.register("linear")
def _linear(plan, node, name):
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if not w.is_weight:
        raise BackendError(f"node {node.name} (linear): the weight is an activation; the hls backend streams weights "
                           f"from memory (use matmul for activation x activation)")
    mw = _matrix_weights(plan, node, w)
    bias = _raw(_dense(b, f"node {node.name} bias"), plan.opts.act.frac) if b is not None else None
    rows = math.prod(x.shape[:-1])
    return [L.MatMat(name, node.name, [x.name], node.output.name, w=mw, rows=rows, bias=bias,
                     scale_bits=plan.opts.scale_bits, chain=plan.opts.chain)]


@LOWERINGS.register("matmul")
def _matmul(plan, node, name):
    a, b = node.inputs
    if b.is_weight:                       # x @ W with a constant [K, N]: the matrix unit on W^T
        _table_operand(node, b, "matmul")
        w = _dense(b, f"node {node.name}")
        if w.dim() > 2:
            return _matmul_stacked(plan, node, name, w)
        if w.dim() != 2:
            raise BackendError(f"node {node.name} (matmul): constant operand must be 2-D, got {list(w.shape)}")
        mw = mat_weights(Dense(w.T.contiguous().float()), f"node {node.name} ({b.name})", plan.opts.dense_weight_bits,
                         plan.fallbacks)
        return [L.MatMat(name, node.name, [a.name], node.output.name, w=mw, rows=math.prod(a.shape[:-1]),
                         scale_bits=plan.opts.scale_bits, chain=plan.opts.chain)]
    if a.is_weight:
        raise BackendError(f"node {node.name} (matmul): a constant left operand is not supported by the hls backend")
    ab, bb = a.shape[:-2], b.shape[:-2]
    batch = math.prod(node.output.shape[:-2])
    a_b, b_b = math.prod(ab), math.prod(bb)
    if a_b not in (1, batch) or b_b not in (1, batch):
        raise BackendError(f"node {node.name} (matmul): batch dims {list(ab)} and {list(bb)} broadcast partially; "
                           f"the hls matmul shares an operand only as a whole")
    return [L.Matmul(name, node.name, [a.name, b.name], node.output.name, batch=batch, m=a.shape[-2],
                     k=a.shape[-1], n=b.shape[-1], a_bcast=a_b == 1 and batch > 1, b_bcast=b_b == 1 and batch > 1,
                     chain=plan.opts.chain)]


def _matmul_stacked(plan, node, name, w: torch.Tensor) -> list:
    """x @ W with a constant stack W [*batch, K, N] (every expert's weight applied to every row, as
    the dense form of a grouped matmul is): one matrix unit on the stack's rows side by side, then
    a permute of [rows, batch, N] into [batch, rows, N]."""
    a, out = node.inputs[0], node.output
    rows, k, n = math.prod(a.shape[:-1]), w.shape[-2], w.shape[-1]
    stack = math.prod(w.shape[:-2])
    if math.prod(a.shape[:-2]) != 1:
        raise BackendError(f"node {node.name} (matmul): a stack of constant matrices {list(w.shape)} times a batch "
                           f"{list(a.shape)}; the hls backend applies a stack to one matrix of rows only")
    wt = w.reshape(stack, k, n).permute(0, 2, 1).reshape(stack * n, k).contiguous().float()
    mw = mat_weights(Dense(wt), f"node {node.name} ({node.inputs[1].name})", plan.opts.dense_weight_bits,
                     plan.fallbacks)
    side = plan.temp(f"{out.name}.side_by_side", f"t_{name[2:]}_rows", (rows, stack * n))
    return [L.MatMat(name, node.name, [a.name], side, w=mw, rows=rows, scale_bits=plan.opts.scale_bits,
                     chain=plan.opts.chain),
            L.Strided(f"{name}_stack", node.name, [side], out.name, out_shape=(stack, rows, n),
                      strides=(n, stack * n, 1), offset=0, what=f"[rows, {stack}, {n}] -> [{stack}, rows, {n}]")]


def _lut(fn):
    def rule(plan, node, name):
        f = "gelu_tanh" if fn == "gelu" and node.attrs.get("approximate") == "tanh" else fn
        return [L.Lut(name, node.name, [node.inputs[0].name], node.output.name, fn=f,
                      n_in=math.prod(node.output.shape), step_log2=plan.opts.lut_step_log2, act=plan.opts.act)]
    return rule


for _fn in ("gelu", "silu"):
    LOWERINGS.register(_fn)(_lut(_fn))


@LOWERINGS.register("relu")
def _relu(plan, node, name):
    return [L.Relu(name, node.name, [node.inputs[0].name], node.output.name, n_in=math.prod(node.output.shape))]


def _last_axis(node, axis):
    rank = len(node.inputs[0].shape)
    if axis not in (-1, rank - 1):
        raise BackendError(f"node {node.name} ({node.op}): the hls backend normalises over the last axis only, "
                           f"got axis {axis}")


@LOWERINGS.register("softmax")
def _softmax(plan, node, name):
    _last_axis(node, node.attrs["axis"])
    shape = node.output.shape
    return [L.Softmax(name, node.name, [node.inputs[0].name], node.output.name, rows=math.prod(shape[:-1]),
                      n=shape[-1], step_log2=plan.opts.lut_step_log2, e_frac=plan.opts.exp_frac, act=plan.opts.act)]


@LOWERINGS.register("layer_norm")
def _layer_norm(plan, node, name):
    _last_axis(node, node.attrs["axis"])
    shape, F = node.output.shape, plan.opts.act.frac
    ins = list(node.inputs) + [None] * (3 - len(node.inputs))
    g, b = (_dense(v, f"node {node.name} {s}") for v, s in zip(ins[1:], ("weight", "bias")))
    return [L.Norm(name, node.name, [ins[0].name], node.output.name, rows=math.prod(shape[:-1]), n=shape[-1],
                   eps=node.attrs["eps"], gamma=None if g is None else _raw(g.reshape(-1), F),
                   beta=None if b is None else _raw(b.reshape(-1), F), act=plan.opts.act)]


@LOWERINGS.register("rms_norm")
def _rms_norm(plan, node, name):
    shape, F = node.output.shape, plan.opts.act.frac
    w = _dense(node.inputs[1] if len(node.inputs) > 1 else None, f"node {node.name} weight")
    gamma = None if w is None else _raw(w.reshape(-1) + node.attrs["offset"], F)
    return [L.Norm(name, node.name, [node.inputs[0].name], node.output.name, rows=math.prod(shape[:-1]), n=shape[-1],
                   eps=node.attrs["eps"], rms=True, gamma=gamma, act=plan.opts.act)]


# op -> fn(plan, node, a, b, name, layers) -> (a, b): operands a binary op's rule converts first,
# appending the layers that convert them (logic.py: int operands of div enter as activations)
OPERAND_RULES: dict = {}


def _binary(op):
    def rule(plan, node, name):
        a, b = node.inputs
        kind = op
        if a.is_weight and op in ("add", "mul"):
            a, b = b, a
        if a.is_weight:
            raise BackendError(f"node {node.name} ({node.op}): a constant left operand is not supported by the hls backend")
        pre = []
        if op in OPERAND_RULES:
            a, b = OPERAND_RULES[op](plan, node, a, b, name, pre)
        const = None
        if b.is_weight:
            t = _dense(b, f"node {node.name}")
            if kind == "div" and not _exact_divisor(t, plan.opts):
                t, kind = 1.0 / t, "mul"
            # saturated to the int32 words of the weight memory: a mask's finfo.min stays a value
            # that drives any sum to the activation minimum, as -inf would
            const = E.from_float(t.numpy(), E.Fixed(32, 32 - plan.opts.act.frac))
        elif kind == "div" and plan.opts.act_width + plan.opts.act.frac + 2 > 63:
            raise BackendError(f"node {node.name} (div): raw(a) * 2^F needs act_width + F + 2 <= 63 bits")
        if len(node.output.shape) > 4:
            raise BackendError(f"node {node.name} ({node.op}): rank {len(node.output.shape)} > 4")
        return pre + [L.Binary(name, node.name, [a.name] + ([] if const is not None else [b.name]), node.output.name,
                         op=kind, a_shape=tuple(a.shape), b_shape=tuple(b.shape), out_shape=tuple(node.output.shape),
                         b_const=const, b_frac=plan.opts.act.frac)]
    return rule


def _exact_divisor(t: torch.Tensor, opts: HlsOptions) -> bool:
    """Divide by a constant exactly (one divider) where it is a whole number that is not a power of
    two: a floor or a comparison after x / 3 must see the exact quotient (an integer floor division,
    a histogram's bin), which a product with a rounded 1/3 misses at exact multiples. Powers of two
    and fractions keep the product, which is as exact or cheaper."""
    a = t.abs()
    whole = bool(((t == t.round()) & (a >= 1) & (a < 2.0 ** (31 - opts.act.frac))).all())
    pow2 = bool((a == 2.0 ** a.log2().round()).all())
    return whole and not pow2 and opts.act_width + opts.act.frac + 2 <= 63


for _op in ("add", "sub", "mul", "div"):
    LOWERINGS.register(_op)(_binary(_op))


def _embedding_table(plan, node, table) -> torch.Tensor:
    """The table's float values. An encoded table (an LM head's int8 weight tied to the token
    embedding) is decoded into the activation format, a reported fallback: the embedding unit reads
    raw activation rows, it has no code decoder."""
    cap, why = CAPABILITIES.find("embedding", table.encoding)
    if cap is not None:
        return _dense(table, f"node {node.name} table")
    plan.fallbacks.append(Fallback(f"node {node.name} ({table.name})", f"{table.encoding.describe()} table",
                                   f"decoded into the activation format ({why})"))
    return table.encoding.decode(torch.float64)


@LOWERINGS.register("embedding")
def _embedding(plan, node, name):
    ids, table = node.inputs
    if value_kind(ids) != "int":
        raise BackendError(f"node {node.name} (embedding): ids must be integers, got {ids.dtype.name}")
    t = _embedding_table(plan, node, table)
    if t.dim() != 2:
        raise BackendError(f"node {node.name} (embedding): table must be 2-D, got {list(t.shape)}")
    return [L.Embedding(name, node.name, [ids.name], node.output.name, table=_raw(t, plan.opts.act.frac),
                        n_ids=math.prod(ids.shape))]


def _strided(plan, node, name, shape, strides, offset: int, what: str) -> L.Strided:
    """One nf::permute call for a strided view of the node's input, in at most 4 dims."""
    shape, strides = L.collapse_view(shape, strides)
    if len(shape) > 4:
        raise BackendError(f"node {node.name} ({node.op}): a view of rank {len(shape)} > 4 even with its contiguous "
                           f"dims merged; the hls backend copies views of rank <= 4")
    return L.Strided(name, node.name, [node.inputs[0].name], node.output.name, out_shape=shape, strides=strides,
                     offset=offset, what=what, ctype=plan.ctype(node.output.name))


@LOWERINGS.register("permute")
def _permute(plan, node, name):
    src = L.row_major_strides(node.inputs[0].shape)
    perm = [p % len(src) for p in node.attrs["perm"]]
    return [_strided(plan, node, name, node.output.shape, [src[p] for p in perm], 0, f"permute {perm}")]


@LOWERINGS.register("slice")
def _slice(plan, node, name):
    x, out = node.inputs[0], node.output
    from ...ir.ops.shape import normalize_slice
    axis = node.attrs["axis"] % len(x.shape)
    start, _, step = normalize_slice(x.shape[axis], node.attrs["start"], node.attrs["end"], node.attrs["step"])
    src = L.row_major_strides(x.shape)
    strides = list(src)
    strides[axis] *= step
    return [_strided(plan, node, name, out.shape, strides, start * src[axis], f"slice axis {axis} from {start} step {step}")]


@LOWERINGS.register("concat")
def _concat(plan, node, name):
    """Two inputs: one nf::concat2; more: a chain of them through temporary buffers."""
    xs, out = [v for v in node.inputs], node.output
    axis = node.attrs["axis"] % len(out.shape)
    outer, inner = math.prod(out.shape[:axis]), math.prod(out.shape[axis + 1:])
    kind = plan.kinds[out.name]
    if any(value_kind(v) != kind for v in xs):
        raise BackendError(f"node {node.name} (concat): inputs {', '.join(v.dtype.name for v in xs)} differ in kind")
    if len(xs) == 1:
        return [L.Copy(name, node.name, [xs[0].name], out.name, n=math.prod(out.shape), ctype=CTYPES[kind])]
    layers, acc, n_acc = [], xs[0].name, xs[0].shape[axis]
    for i, v in enumerate(xs[1:], 1):
        n_acc_next = n_acc + v.shape[axis]
        dst = out.name if i == len(xs) - 1 else plan.temp(f"{node.output.name}.part{i}", f"t_{name[2:]}_{i}",
                                                           out.shape[:axis] + (n_acc_next,) + out.shape[axis + 1:], kind)
        layers.append(L.Concat(name if i == 1 else f"{name}_{i}", node.name, [acc, v.name], dst, outer=outer,
                               n_a=n_acc, n_b=v.shape[axis], inner=inner, ctype=CTYPES[kind]))
        acc, n_acc = dst, n_acc_next
    return layers


@LOWERINGS.register("expand")
def _expand(plan, node, name):
    x, out = node.inputs[0], node.output
    return [_strided(plan, node, name, out.shape, L.broadcast_strides(x.shape, out.shape), 0,
                     f"expand to {list(out.shape)}")]


@LOWERINGS.register("clamp")
def _clamp(plan, node, name):
    act = plan.opts.act
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    lo = act.lo if lo is None else int(E.from_float(np.array([lo]), act)[0])
    hi = act.hi if hi is None else int(E.from_float(np.array([hi]), act)[0])
    return [L.Clamp(name, node.name, [node.inputs[0].name], node.output.name, n_in=math.prod(node.output.shape),
                    lo=lo, hi=hi)]


@LOWERINGS.register("full")
def _full(plan, node, name):
    out, value = node.output, float(node.attrs["value"])
    kind = plan.kinds[out.name]
    raw = int(E.from_float(np.array([value]), plan.opts.act)[0]) if kind == "act" else \
        int(E.int_from_float(np.array([value]))[0]) if kind == "int" else int(value != 0)
    return [L.Fill(name, node.name, [], out.name, n=math.prod(out.shape), raw=raw, ctype=plan.ctype(out.name))]


@LOWERINGS.register("reshape")
def _reshape(plan, node, name):
    return [L.Copy(name, node.name, [node.inputs[0].name], node.output.name, n=math.prod(node.output.shape),
                   ctype=plan.ctype(node.output.name))]


def build_plan(graph: Graph, opts: HlsOptions) -> Plan:
    """Fuse the patterns of :mod:`.patterns`, check the graph, lower every node, and place all
    weights in one memory image."""
    graph = fuse_patterns(graph)
    missing = LOWERINGS.missing(n.op for n in graph.nodes)
    if missing:
        nodes = ", ".join(n.name for n in graph.nodes if n.op in missing)
        raise BackendError(f"the hls backend has no lowering for op(s) {', '.join(missing)} (nodes {nodes[:300]}); "
                           f"supported: {', '.join(sorted(LOWERINGS))}")
    for v in list(graph.inputs) + [o for n in graph.nodes for o in n.outputs]:
        if not all(isinstance(d, int) for d in v.shape):
            raise BackendError(f"value {v.name} has shape {list(v.shape)}: the hls backend needs static shapes "
                               f"(export the model with fixed input sizes)")
        if v.dtype.kind not in ("float", "int", "uint", "bool"):
            raise BackendError(f"value {v.name} is {v.dtype.name}: the hls backend takes float, int and bool values")
    for n in graph.nodes:
        odd = [v.name for v in list(n.inputs) + list(n.outputs) if v is not None and not v.is_weight
               and value_kind(v) != "act"]
        if odd and n.op not in MIXED_OPS:
            raise BackendError(f"node {n.name} ({n.op}): int/bool operand(s) {', '.join(odd)}; the hls backend takes "
                               f"int/bool values only in {', '.join(sorted(MIXED_OPS))}")
    for v in graph.outputs:
        if v.producer is None:
            raise BackendError(f"graph output {v.name} is an input or weight; the hls backend outputs computed values")
    if len({v.name for v in graph.outputs}) != len(graph.outputs):
        raise BackendError("the hls backend needs distinct graph outputs")
    names = Names()
    plan = Plan(names("nf_", graph.name, "graph", "_top"), opts, graph=graph)
    _kv_state(graph, plan)
    stateful = {v for pair in plan.state for v in pair}
    outs = {v.name for v in graph.outputs}
    for v in graph.inputs:
        if v.name not in stateful:
            plan.ids[v.name] = names("in_", v.name, "input")
    for v in graph.outputs:
        if v.name not in stateful:
            plan.ids[v.name] = names("out_", v.name, "output")
    for v in list(graph.inputs) + [o for n in graph.nodes for o in n.outputs]:
        plan.kinds[v.name] = value_kind(v)
        plan.shapes[v.name] = tuple(v.shape)
        plan.ids.setdefault(v.name, KV_PORT if v.name in plan.kv else names("v_", v.name, "value"))
        plan.sizes[plan.ids[v.name]] = max(1, math.prod(v.shape))
    plan.sizes[KV_PORT] = max(1, plan.kv_words)
    plan.inputs = [v.name for v in graph.inputs if v.name not in stateful]
    plan.outputs = [v.name for v in graph.outputs if v.name not in stateful]
    for node in graph.nodes:
        name = names("n_", node.name, "node")
        consts = _const_operands(plan, node)
        if node.op == "reshape" and node.output.name not in outs:      # same elements, same order: alias
            plan.ids[node.output.name] = plan.ids[node.inputs[0].name]
            plan.layers.append(L.Alias(name, node.name, [node.inputs[0].name], node.output.name))
            continue
        try:
            layers = LOWERINGS[node.op](plan, node, name)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"hls backend: lowering node {node.name} ({node.op}) failed: {e}") from e
        used = [c for v, c in consts if any(v.name in layer.inputs for layer in layers)]
        for v, c in consts:
            if c in used:
                c.raw = _const_raw(plan, v)
        for c in used:
            c.name = names("k_", c.output, "constant load")
            plan.ids[c.output] = names("c_", c.output, "constant")
            plan.sizes[plan.ids[c.output]] = max(1, c.raw.size)
        layers = used + layers
        for layer in layers:
            if hasattr(layer, "place"):
                layer.place(plan.mem, opts.act)
        plan.layers.extend(layers)
    _check_widths(plan)
    if opts.dataflow:
        if plan.kv_words:
            raise BackendError(f"graph {graph.name}: the dataflow form has no off-chip KV cache; compile this "
                               f"decoder with dataflow = false")
        if any(k != "act" for k in plan.kinds.values()):
            raise BackendError(f"graph {graph.name}: the dataflow form takes activations only; this graph has "
                               f"int/bool values (set dataflow = false)")
        from .dataflow import to_dataflow
        to_dataflow(plan)
    else:
        assign_buffers(plan)
    if opts.onchip_bytes_max and plan.onchip_bytes > opts.onchip_bytes_max:
        raise BackendError(f"graph {graph.name}: its live activations need {plan.onchip_bytes} bytes on chip, more "
                           f"than the device's {opts.onchip_bytes_max} bytes of BRAM + URAM; use shorter inputs "
                           f"or a narrower act_width")
    return plan


def _kv_state(graph: Graph, plan: Plan) -> None:
    """The KV cache: every state input (``X`` with a graph output ``X.next``) gets a region of the
    off-chip kv memory, which the node writing ``X.next`` updates in place: a cache_update of a
    float cache, or a kv_cache_write of a kv8 cache (its codes and scales, each a region in its
    stored form). The value is then no port of the top function, and only those writers,
    attention and kv_cache_read may read it."""
    from ...ir.graph import STATE_NEXT
    from ...ir.ops.kvcache import encoding_of
    values = {v.name: v for v in list(graph.inputs) + list(graph.outputs)}
    shapes = {}
    for name, out in graph.state_pairs():
        v, nxt = values[name], values[out]
        p = nxt.producer
        if p is not None and p.op == "kv_cache_write" and any(s is v for s in p.inputs[2:]):
            kind = encoding_of(p.attrs).kind
            if CAPABILITIES.find("kv_cache_write", kind)[0] is None:
                raise BackendError(f"node {p.name} (kv_cache_write): the {kind} KV-cache encoding is not supported by "
                                   f"the hls backend, which keeps kv8 caches (int8 codes, float16 scales) or float "
                                   f"ones in off-chip memory; encode the cache with kv8, or leave it float")
            plan.kv_forms[v.name] = plan.kv_forms[nxt.name] = "int8" if v.dtype.name == "int8" else "f16"
        elif p is None or p.op != "cache_update" or p.inputs[0] is not v:
            raise BackendError(f"state {v.name}: the hls backend keeps a KV cache in off-chip memory and needs "
                               f"{nxt.name} written by a cache_update of {v.name} (or a kv8 kv_cache_write); it is "
                               f"made by {f'node {p.name} ({p.op})' if p is not None else 'no node'}")
        else:
            plan.kv_forms[v.name] = plan.kv_forms[nxt.name] = "act"
        shapes[v.name] = tuple(v.shape)
        plan.state.append((v.name, nxt.name))
    regions, plan.kv_words = kv_layout(plan.kv_forms, shapes)
    for inp, out in plan.state:
        plan.kv[inp] = plan.kv[out] = regions[inp]
    readers = {"act": ("cache_update", "attention"), "int8": ("kv_cache_write", "kv_cache_read"),
               "f16": ("kv_cache_write", "kv_cache_read")}
    for n in graph.nodes:
        for v in n.inputs:
            if v is not None and v.name in plan.kv and n.op not in readers[plan.kv_forms[v.name]]:
                raise BackendError(f"node {n.name} ({n.op}) reads the KV cache {v.name}; in the hls design only "
                                   f"{' and '.join(readers[plan.kv_forms[v.name]])} reach that cache in off-chip "
                                   f"memory")
        if n.op == "cache_update" and n.inputs[0].name not in plan.kv:
            raise BackendError(f"node {n.name} (cache_update): its cache {n.inputs[0].name} is not a state input "
                               f"with a {n.inputs[0].name}{STATE_NEXT} output; the hls design updates only the KV "
                               f"cache it keeps in off-chip memory")
        if n.op == "kv_cache_write" and any(v.name not in plan.kv for v in n.inputs[2:]):
            raise BackendError(f"node {n.name} (kv_cache_write): its state is not state inputs with .next outputs "
                               f"it writes; the hls design updates only the KV cache it keeps in off-chip memory")
        if n.op == "cache_update":
            plan.kv.setdefault(n.output.name, plan.kv[n.inputs[0].name])


def _const_operands(plan: Plan, node) -> list:
    """Const layers for the node's weight operands not yet loaded; a rule that takes a weight
    as a parameter (linear, norm, binary constant ...) leaves its Const unused and it is dropped."""
    out = []
    for v in node.inputs:
        if v is None or not v.is_weight or v.name in plan.ids:
            continue
        kind = value_kind(v)
        plan.kinds[v.name], plan.shapes[v.name] = kind, tuple(v.shape)
        out.append((v, L.Const("", node.name, [], v.name, ctype=CTYPES[kind])))
    return out


def _const_raw(plan: Plan, v) -> np.ndarray:
    """The raw words of a weight read as a value. An encoded weight (indexed, say) is loaded decoded:
    the matrix unit is what streams codes, a plain buffer holds values."""
    data = v.encoding.decode(torch.float64).numpy().reshape(-1)
    kind = plan.kinds[v.name]
    return E.from_float(data, plan.opts.act) if kind == "act" else E.int_from_float(data) if kind == "int" else \
        (data != 0).astype(np.int64)


def assign_buffers(plan: Plan) -> None:
    """Share on-chip activation buffers between values whose lifetimes do not overlap (greedy best
    fit in layer order), so the on-chip footprint is the peak of live activations, not their sum.
    A layer's output never shares a buffer with its own inputs. Sets ``plan.pool`` (buffer -> elements)."""
    ports = {plan.ids[v] for v in plan.inputs + plan.outputs} | {KV_PORT}
    root: dict[str, str] = {}                       # value -> value that owns its buffer (aliases)
    last: dict[str, int] = {}
    for i, layer in enumerate(plan.layers):
        if isinstance(layer, L.Alias):
            root[layer.output] = root.get(layer.inputs[0], layer.inputs[0])
        for v in layer.inputs:
            last[root.get(v, v)] = i
    for v in plan.outputs:
        last[root.get(v, v)] = len(plan.layers)
    pool: dict[str, int] = {}
    free: list[str] = []
    owner: dict[str, str] = {}                      # value -> pool buffer
    for i, layer in enumerate(plan.layers):
        out = layer.output
        if isinstance(layer, L.Alias):
            if out in plan.ids and plan.ids[out] not in ports and root[out] in owner:
                plan.ids[out] = owner[root[out]]
            continue
        if plan.ids[out] not in ports:
            n, kind = plan.sizes[plan.ids[out]], plan.kinds.get(out, "act")
            same = [b for b in free if plan.buf_kinds[b] == kind]
            fits = sorted((b for b in same if pool[b] >= n), key=lambda b: pool[b])
            if fits:
                buf = fits[0]
            elif same:
                buf = max(same, key=lambda b: pool[b])
                pool[buf] = n
            else:
                buf = f"buf{len(pool)}"
                pool[buf] = n
                plan.buf_kinds[buf] = kind
            if buf in free:
                free.remove(buf)
            owner[out] = buf
            plan.ids[out] = buf
        for v in dict.fromkeys(root.get(v, v) for v in layer.inputs):   # in input order: deterministic
            if last.get(v) == i and v in owner:
                free.append(owner.pop(v))
        if last.get(out, -1) < i and out in owner:   # computed but never read (dead value)
            free.append(owner.pop(out))
    plan.pool = pool
    plan.sizes.update(pool)


def _check_widths(plan: Plan) -> None:
    """Every 64-bit intermediate of the element-wise kernels must provably fit."""
    W = plan.opts.act_width
    for layer in plan.layers:
        n = getattr(layer, "k", None) if isinstance(layer, L.Matmul) else getattr(layer, "n", None)
        if isinstance(layer, (L.Matmul, L.Norm)) and 2 * W + math.ceil(math.log2(max(n, 2))) > 62:
            raise BackendError(f"node {layer.node}: act_width {W} is too wide for a 64-bit sum over {n} products; "
                               f"lower act_width")
