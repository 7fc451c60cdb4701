"""One class per HLS kernel call: its config struct, its call, and its bit-accurate emulation.

Python emits only config structs and calls (as hls4ml's core_templates.py does for nnet_dense.h);
the arithmetic lives in the templates under ``nnforge/hls`` and, identically, in :mod:`.emulate`.
Every layer reads raw activations by value key from ``env`` and writes its output there.
"""
from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch

from . import emulate as E
from .weights import MatWeights, WeightMemory


def comment(text: str) -> str:
    """``text`` made safe inside a ``//`` comment: one line of letters, digits, spaces and
    ``_.,:;+-=<>()[]{}@^%&|~!``; every other character becomes ``_`` (newlines, ``\\`` line splices,
    ``?`` of trigraphs, ``/`` and ``*`` of comment markers, ``#``, quotes, non-ASCII). Model names
    reach the generated C++ only here and as identifiers (``project.Names``)."""
    return re.sub(r"[^A-Za-z0-9 _.,:;+\-=<>()\[\]{}@^%&|~!]", "_", text)


def struct(name: str, doc: str, fields: list[tuple[str, str, object]]) -> str:
    """``struct name { static const T f = v; ... };``"""
    lines = [f"// {comment(doc)}", f"struct {name} {{"]
    for ctype, f, v in fields:
        if isinstance(v, bool):
            v = "true" if v else "false"
        lines.append(f"    static const {ctype} {f} = {v};")
    return "\n".join(lines) + "\n};\n"


@dataclass
class Layer(ABC):
    name: str              # C++ identifier stem (config struct cfg_<name>)
    node: str              # IR node it comes from
    inputs: list[str]
    output: str

    kernel = ""

    @property
    def cfg(self) -> str:
        return f"cfg_{self.name}"

    @abstractmethod
    def config(self) -> str:
        """The layer's config struct (C++)."""

    @abstractmethod
    def call(self, ids: dict[str, str]) -> str:
        """The template call in the top function, ``ids`` mapping values to buffer names."""

    @abstractmethod
    def emulate(self, env: dict, fmt: E.Fixed) -> np.ndarray:
        """The layer's output, computed as the template computes it (bit-exact emulation)."""

    def tables(self) -> str:
        return ""


@dataclass
class MatMat(Layer):
    """linear: y [rows, n_out] = x [rows, n_in] W^T + b on the sparse DSP-chain unit."""
    w: MatWeights = None
    rows: int = 1
    bias: np.ndarray | None = None     # raw at the activation format
    scale_bits: int = 18
    chain: int = 4
    offsets: dict = field(default_factory=dict)
    mant: np.ndarray = None
    shift: int = 0
    acc_bits: int = 64
    x_width: int = 24
    kernel = "matmat"

    def place(self, mem: WeightMemory, act: E.Fixed) -> None:
        """Write codes, indices, scales and bias to the weight memory; size the accumulator."""
        self.x_width = act.width
        self.mant, self.shift = self.w.mantissas(self.scale_bits, f"node {self.node}")
        codes = self.w.code_bytes()
        self.offsets = {"w_off": mem.add(codes.tobytes()), "w_row_bytes": codes.shape[1]}
        idx = self.w.idx_bytes()
        self.offsets.update({"idx_off": mem.add(idx.tobytes()), "idx_row_bytes": idx.shape[1]} if idx is not None
                            else {"idx_off": 0, "idx_row_bytes": 0})
        self.offsets["scale_off"] = mem.add_i32(self.mant)
        self.offsets["bias_off"] = mem.add_i32(self.bias) if self.bias is not None else 0
        self.offsets["lut_off"] = mem.add_i32(self.w.lut) if self.w.lut is not None else 0
        # exact bound of |total| (+ the rounding half): sum |code * m| * max|x| + |bias| << shift
        g = np.arange(self.w.n_kept) // self.w.group
        m = np.broadcast_to(np.abs(self.mant), (self.w.n_out, self.w.n_groups))[:, g]
        row_sum = int((np.abs(self.w.codes) * m).sum(axis=1).max(initial=0))   # < 2^63: 16 + 18 + log2(kept) bits
        bound = row_sum << (act.width - 1)
        if self.bias is not None and len(self.bias):
            bound += int(np.abs(self.bias).max()) << self.shift
        bound += 1 << max(self.shift + 1, 1)
        self.acc_bits = max(bound.bit_length() + 1, 32)

    @property
    def pack2(self) -> bool:
        """Two MACs per DSP (nf::mac2) where the format allows: dense rows, x in the DSP's 18-bit port
        and the packed pair w0 * 2^S + w1 (S = x bits + weight bits) in its 27-bit port."""
        vb = self.w.val_bits
        return self.w.sp_m == 1 and self.x_width <= 18 and self.x_width + 2 * vb <= 27 and self.w.n_out > 1

    @property
    def exact64(self) -> bool:
        return self.acc_bits <= 63

    def config(self) -> str:
        w = self.w
        codes = f"{w.w_bits}-bit LUT-decoded codes" if w.lut is not None else f"int{w.w_bits} codes"
        return struct(self.cfg, f"{self.node}: linear {w.n_in} -> {w.n_out}, {w.sp_n}:{w.sp_m}, {codes}, "
                      f"groups of {w.group}", [
            ("unsigned", "n_rows", self.rows), ("unsigned", "n_in", w.n_in), ("unsigned", "n_out", w.n_out),
            ("unsigned", "sp_n", w.sp_n), ("unsigned", "sp_m", w.sp_m), ("unsigned", "idx_bits", w.idx_bits),
            ("unsigned", "n_kept", w.n_kept), ("unsigned", "w_bits", w.w_bits), ("unsigned", "val_bits", w.val_bits),
            ("bool", "lut_decode", w.lut is not None), ("unsigned long", "lut_off", self.offsets["lut_off"]),
            ("unsigned", "group", w.group),
            ("unsigned", "n_groups", w.n_groups), ("bool", "row_scales", w.scales.shape[0] > 1),
            ("int", "scale_shift", self.shift), ("bool", "has_bias", self.bias is not None),
            ("unsigned", "acc_bits", self.acc_bits), ("unsigned", "chain", self.chain), ("bool", "pack2", self.pack2),
            *[("unsigned long", k, self.offsets[k]) for k in ("w_off", "idx_off", "scale_off", "bias_off")],
            ("unsigned", "w_row_bytes", self.offsets["w_row_bytes"]),
            ("unsigned", "idx_row_bytes", self.offsets["idx_row_bytes"])])

    def call(self, ids):
        return f"nf::matmat<act_t, act_t, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]}, wmem);"

    def emulate(self, env, fmt):
        x = env[self.inputs[0]].reshape(self.rows, self.w.n_in)
        y = E.matmat(x, self.w.w_eff(self.mant), self.bias, self.shift, fmt, fmt, exact64=self.exact64)
        return y


# Functions tabulated by activation_lut: (torch function, table range, saturating tails). Outside the
# range a saturating function is its end value (sigmoid, tanh), the others 0 below and x above.
LUT_FUNCTIONS = {
    "gelu": (lambda x: torch.nn.functional.gelu(x), (-8.0, 8.0), False),
    "gelu_tanh": (lambda x: torch.nn.functional.gelu(x, approximate="tanh"), (-8.0, 8.0), False),
    "silu": (torch.nn.functional.silu, (-16.0, 16.0), False),
    "sigmoid": (torch.sigmoid, (-12.0, 12.0), True),
    "tanh": (torch.tanh, (-8.0, 8.0), True),
}


def lut_table(fn, lo: float, hi: float, step_log2: int, out_frac: int) -> np.ndarray:
    """Raw table entries floor(f(x_k) * 2^F + 1/2) at x_k = lo + k * 2^step_log2, k = 0..n."""
    n = int(round((hi - lo) / 2.0 ** step_log2))
    xs = torch.tensor([lo + k * 2.0 ** step_log2 for k in range(n + 1)], dtype=torch.float64)
    return np.floor(fn(xs).numpy() * 2.0 ** out_frac + 0.5).astype(np.int64)


def _table_cpp(name: str, t: np.ndarray) -> str:
    body = ",".join(str(int(v)) for v in t)
    return f"static const int {name}[{len(t)}] = {{{body}}};\n"


@dataclass
class Lut(Layer):
    """gelu / silu / sigmoid / tanh through an interpolated table."""
    fn: str = "gelu"
    n_in: int = 0
    step_log2: int = -6
    act: E.Fixed = None
    kernel = "activation_lut"

    def _params(self):
        fn, (lo, hi), _ = LUT_FUNCTIONS[self.fn]
        step_shift = self.act.frac + self.step_log2
        if step_shift < 0:
            raise ValueError(f"table step 2^{self.step_log2} is finer than the activations' {self.act.frac} "
                             f"fractional bits")
        return lut_table(fn, lo, hi, self.step_log2, self.act.frac), int(lo * 2 ** self.act.frac), step_shift

    def tables(self):
        return _table_cpp(f"tbl_{self.name}", self._params()[0])

    def _tails(self, t) -> tuple[int, bool]:
        """(raw y below the table, whether y = x past its end)."""
        return (int(t[0]), False) if LUT_FUNCTIONS[self.fn][2] else (0, True)

    def config(self):
        t, lo, s = self._params()
        below, identity = self._tails(t)
        return struct(self.cfg, f"{self.node}: {self.fn} by table, {len(t)} entries", [
            ("unsigned", "n_in", self.n_in), ("long", "lut_lo", lo), ("unsigned", "step_shift", s),
            ("unsigned", "lut_n", len(t) - 1), ("int", "below", below), ("bool", "identity_above", identity)])

    def call(self, ids):
        return f"nf::activation_lut<act_t, act_t, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]}, tbl_{self.name});"

    def emulate(self, env, fmt):
        t, lo, s = self._params()
        return E.activation_lut(env[self.inputs[0]], t, lo, s, len(t) - 1, *self._tails(t), fmt, fmt)


@dataclass
class Relu(Layer):
    n_in: int = 0

    def config(self):
        return struct(self.cfg, f"{self.node}: relu", [("unsigned", "n_in", self.n_in)])

    def call(self, ids):
        return f"nf::relu<act_t, act_t, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]});"

    def emulate(self, env, fmt):
        return E.relu(env[self.inputs[0]], fmt, fmt)


@dataclass
class Clamp(Layer):
    n_in: int = 0
    lo: int = 0          # raw bounds at the activation format
    hi: int = 0

    def config(self):
        return struct(self.cfg, f"{self.node}: clamp", [("unsigned", "n_in", self.n_in), ("long", "lo", self.lo),
                                                        ("long", "hi", self.hi)])

    def call(self, ids):
        return f"nf::clamp<act_t, act_t, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]});"

    def emulate(self, env, fmt):
        return E.round_to(np.clip(env[self.inputs[0]], self.lo, self.hi), 0, fmt)


@dataclass
class Softmax(Layer):
    rows: int = 1
    n: int = 0
    step_log2: int = -6
    exp_range: float = 16.0
    e_frac: int = 20
    act: E.Fixed = None

    def _params(self):
        t = lut_table(torch.exp, -self.exp_range, 0.0, self.step_log2, self.e_frac)
        return t, int(-self.exp_range * 2 ** self.act.frac), self.act.frac + self.step_log2

    def tables(self):
        return _table_cpp(f"tbl_{self.name}", self._params()[0])

    def config(self):
        t, lo, s = self._params()
        return struct(self.cfg, f"{self.node}: softmax over {self.n}", [
            ("unsigned", "n_rows", self.rows), ("unsigned", "n", self.n), ("long", "lut_lo", lo),
            ("unsigned", "step_shift", s), ("unsigned", "lut_n", len(t) - 1), ("unsigned", "e_frac", self.e_frac)])

    def call(self, ids):
        return f"nf::softmax<act_t, act_t, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]}, tbl_{self.name});"

    def emulate(self, env, fmt):
        t, lo, s = self._params()
        return E.softmax(env[self.inputs[0]].reshape(self.rows, self.n), t, lo, s, self.e_frac, fmt)


@dataclass
class Norm(Layer):
    rows: int = 1
    n: int = 0
    eps: float = 1e-5
    rms: bool = False
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    offsets: dict = field(default_factory=dict)
    act: E.Fixed = None

    @property
    def eps_raw(self) -> int:
        return max(1, int(math.floor(self.eps * 2.0 ** (2 * self.act.frac) + 0.5)))

    def place(self, mem: WeightMemory, act: E.Fixed) -> None:
        self.offsets = {"gamma_off": mem.add_i32(self.gamma) if self.gamma is not None else 0,
                        "beta_off": mem.add_i32(self.beta) if self.beta is not None else 0}

    def config(self):
        return struct(self.cfg, f"{self.node}: {'rms' if self.rms else 'layer'} norm over {self.n}", [
            ("unsigned", "n_rows", self.rows), ("unsigned", "n", self.n), ("bool", "rms", self.rms),
            ("long", "eps_raw", self.eps_raw), ("bool", "has_gamma", self.gamma is not None),
            ("bool", "has_beta", self.beta is not None),
            ("unsigned long", "gamma_off", self.offsets["gamma_off"]),
            ("unsigned long", "beta_off", self.offsets["beta_off"])])

    def call(self, ids):
        return f"nf::layer_norm<act_t, act_t, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]}, wmem);"

    def emulate(self, env, fmt):
        return E.layer_norm(env[self.inputs[0]].reshape(self.rows, self.n), self.gamma, self.beta, self.eps_raw,
                            self.rms, fmt, fmt)


def pad4(shape, strides=None):
    shape = list(shape)
    strides = list(strides) if strides is not None else None
    while len(shape) < 4:
        shape.insert(0, 1)
        if strides is not None:
            strides.insert(0, 0)
    return shape, strides


def broadcast_strides(in_shape, out_shape) -> list[int]:
    """Element strides of a row-major ``in_shape`` tensor for each dim of ``out_shape`` (0 = broadcast)."""
    in_shape = [1] * (len(out_shape) - len(in_shape)) + list(in_shape)
    strides, acc = [0] * len(in_shape), 1
    for i in range(len(in_shape) - 1, -1, -1):
        strides[i] = 0 if in_shape[i] == 1 and out_shape[i] != 1 else acc
        acc *= in_shape[i]
    return strides


@dataclass
class Binary(Layer):
    """add / sub / mul with broadcasting, div of two activations; b may be a constant (a weight, raw at b_frac)."""
    op: str = "add"
    a_shape: tuple = ()
    b_shape: tuple = ()
    out_shape: tuple = ()
    b_const: np.ndarray | None = None
    b_frac: int = 0
    b_off: int = 0

    def place(self, mem: WeightMemory, act: E.Fixed) -> None:
        if self.b_const is not None:
            self.b_off = mem.add_i32(self.b_const)

    def config(self):
        d, _ = pad4(self.out_shape)
        _, sa = pad4(self.out_shape, broadcast_strides(self.a_shape, self.out_shape))
        _, sb = pad4(self.out_shape, broadcast_strides(self.b_shape, self.out_shape))
        return struct(self.cfg, f"{self.node}: {self.op} {list(self.a_shape)} {list(self.b_shape)}",
                      [("unsigned", f"d{i}", d[i]) for i in range(4)]
                      + [("unsigned", f"a_s{i}", sa[i]) for i in range(4)]
                      + [("unsigned", f"b_s{i}", sb[i]) for i in range(4)]
                      + [("bool", "b_const", self.b_const is not None), ("unsigned long", "b_off", self.b_off),
                         ("int", "b_frac", self.b_frac)])

    def call(self, ids):
        b = "(const act_t *)0" if self.b_const is not None else ids[self.inputs[1]]
        op = {"add": "nf::OP_ADD", "sub": "nf::OP_SUB", "mul": "nf::OP_MUL", "div": "nf::OP_DIV"}[self.op]
        return f"nf::binary<act_t, act_t, act_t, {self.cfg}, {op}>({ids[self.inputs[0]]}, {b}, {ids[self.output]}, wmem);"

    def emulate(self, env, fmt):
        a = env[self.inputs[0]].reshape(self.a_shape)
        if self.b_const is not None:
            b, fb = np.asarray(self.b_const, np.int64).reshape(self.b_shape), self.b_frac
        else:
            b, fb = env[self.inputs[1]].reshape(self.b_shape), fmt.frac
        return E.binary(a, b, self.op, fmt.frac, fb, fmt)


@dataclass
class Strided(Layer):
    """A strided copy (permute, slice): out[i] = x[offset + sum_d i_d * strides[d]]."""
    out_shape: tuple = ()
    strides: tuple = ()
    offset: int = 0
    what: str = "permute"
    ctype: str = "act_t"      # element type: act_t, int_t or bool_t

    def config(self):
        d, s = pad4(self.out_shape, self.strides)
        return struct(self.cfg, f"{self.node}: {self.what}",
                      [("unsigned", f"d{i}", d[i]) for i in range(4)] + [("unsigned", f"s{i}", s[i]) for i in range(4)]
                      + [("unsigned long", "off", self.offset)])

    def call(self, ids):
        return f"nf::permute<{self.ctype}, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]});"

    def emulate(self, env, fmt):
        idx = np.full(self.out_shape, self.offset, np.int64)
        for axis, (n, s) in enumerate(zip(self.out_shape, self.strides)):
            shape = [1] * len(self.out_shape)
            shape[axis] = n
            idx = idx + (np.arange(n, dtype=np.int64) * s).reshape(shape)
        return env[self.inputs[0]].reshape(-1)[idx.reshape(-1)]


@dataclass
class Concat(Layer):
    """Two values along one axis: a [outer, n_a, inner] and b [outer, n_b, inner] (nf::concat2)."""
    outer: int = 1
    n_a: int = 0
    n_b: int = 0
    inner: int = 1
    ctype: str = "act_t"

    def config(self):
        return struct(self.cfg, f"{self.node}: concat {self.n_a} + {self.n_b} ([{self.outer}, n, {self.inner}])", [
            ("unsigned", "outer", self.outer), ("unsigned", "n_a", self.n_a), ("unsigned", "n_b", self.n_b),
            ("unsigned", "inner", self.inner)])

    def call(self, ids):
        return f"nf::concat2<{self.ctype}, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.inputs[1]]}, {ids[self.output]});"

    def emulate(self, env, fmt):
        a = env[self.inputs[0]].reshape(self.outer, self.n_a * self.inner)
        b = env[self.inputs[1]].reshape(self.outer, self.n_b * self.inner)
        return np.concatenate([a, b], axis=1)


def collapse_view(shape, strides) -> tuple[tuple, tuple]:
    """The same strided view in the fewest dims: size-1 dims dropped, and a dim merged into the one
    before it where the input steps over it contiguously (a rank-5 GQA expand becomes rank 4)."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    out: list[list[int]] = []
    for n, s in dims:
        if out and out[-1][1] == s * n:
            out[-1] = [out[-1][0] * n, s]
        else:
            out.append([n, s])
    return tuple(n for n, _ in out) or (1,), tuple(s for _, s in out) or (0,)


def row_major_strides(shape) -> list[int]:
    return [int(np.prod(shape[i + 1:])) for i in range(len(shape))]


@dataclass
class Alias(Layer):
    """reshape inside the graph: the same buffer under a new name (no code)."""

    def config(self):
        return ""

    def call(self, ids):
        return ""

    def emulate(self, env, fmt):
        return env[self.inputs[0]]


@dataclass
class Copy(Layer):
    n: int = 0
    ctype: str = "act_t"

    def config(self):
        return ""

    def call(self, ids):
        return f"nf::copy<{self.ctype}, {self.n}>({ids[self.inputs[0]]}, {ids[self.output]});"

    def emulate(self, env, fmt):
        return env[self.inputs[0]].copy()


@dataclass
class Const(Layer):
    """A constant operand (a dense weight read as a value, e.g. folded position ids or masks), loaded
    from weight memory into a buffer: ``raw`` in the value's own format (activation raw, int, 0/1)."""
    raw: np.ndarray = None
    ctype: str = "act_t"
    off: int = 0

    def place(self, mem: WeightMemory, act: E.Fixed) -> None:
        self.off = mem.add_i32(self.raw)

    def config(self):
        return ""

    def call(self, ids):
        fn = "load_const" if self.ctype == "act_t" else "load_const_int"
        return f"nf::{fn}<{self.ctype}, {self.raw.size}>(wmem + {self.off}ul, {ids[self.output]});"

    def emulate(self, env, fmt):
        return self.raw.reshape(-1).copy()


@dataclass
class Fill(Layer):
    """A constant buffer (IR ``full``): ``raw`` in the value's own format (activation raw, int, 0/1)."""
    n: int = 0
    raw: int = 0
    ctype: str = "act_t"

    def config(self):
        return ""

    def call(self, ids):
        value = f"nf::from_raw<act_t>({self.raw})" if self.ctype == "act_t" else f"{self.ctype}({self.raw})"
        return f"nf::fill<{self.ctype}, {self.n}>({value}, {ids[self.output]});"

    def emulate(self, env, fmt):
        return np.full(self.n, self.raw, dtype=np.int64)


@dataclass
class Fanout2(Layer):
    """One value into two channels (dataflow: every buffer has one writer and one reader)."""
    n: int = 0
    output2: str = ""

    def config(self):
        return ""

    def call(self, ids):
        return f"nf::fanout2<act_t, {self.n}>({ids[self.inputs[0]]}, {ids[self.output]}, {ids[self.output2]});"

    def emulate(self, env, fmt):
        env[self.output2] = env[self.inputs[0]].copy()
        return env[self.inputs[0]].copy()


@dataclass
class Matmul(Layer):
    """activation @ activation (attention scores and context)."""
    batch: int = 1
    m: int = 0
    k: int = 0
    n: int = 0
    a_bcast: bool = False
    b_bcast: bool = False
    chain: int = 4

    def config(self):
        return struct(self.cfg, f"{self.node}: matmul {self.batch} x ({self.m} x {self.k}) @ ({self.k} x {self.n})", [
            ("unsigned", "batch", self.batch), ("unsigned", "m", self.m), ("unsigned", "k", self.k),
            ("unsigned", "n", self.n), ("bool", "a_bcast", self.a_bcast), ("bool", "b_bcast", self.b_bcast),
            ("unsigned", "chain", self.chain)])

    def call(self, ids):
        return (f"nf::matmul<act_t, act_t, act_t, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.inputs[1]]}, "
                f"{ids[self.output]});")

    def emulate(self, env, fmt):
        a = env[self.inputs[0]].reshape((1 if self.a_bcast else self.batch), self.m, self.k)
        b = env[self.inputs[1]].reshape((1 if self.b_bcast else self.batch), self.k, self.n)
        return E.matmul(a, b, fmt, fmt, fmt)


@dataclass
class Embedding(Layer):
    """y [n_ids, dim] = table[ids]: int ids in, table rows from weight memory (raw at the activation format)."""
    table: np.ndarray = None          # raw int [n_rows, dim], saturated to the activation format
    n_ids: int = 0
    table_off: int = 0

    def place(self, mem: WeightMemory, act: E.Fixed) -> None:
        self.table = E.saturate(self.table, act)
        self.table_off = mem.add_i32(self.table)

    def config(self):
        r, d = self.table.shape
        return struct(self.cfg, f"{self.node}: embedding of {self.n_ids} ids in a {r} x {d} table", [
            ("unsigned", "n_ids", self.n_ids), ("unsigned", "n_rows", r), ("unsigned", "dim", d),
            ("unsigned long", "table_off", self.table_off)])

    def call(self, ids):
        return f"nf::embedding<int_t, act_t, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]}, wmem);"

    def emulate(self, env, fmt):
        return E.embedding(env[self.inputs[0]], self.table)
