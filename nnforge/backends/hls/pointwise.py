"""Element-wise ops of language models for the hls backend: neg, integer powers, rsqrt (templates in
``nnforge/hls/nf_activation.h`` and ``nf_reduce.h``) and sigmoid / tanh (the function-table kernel),
with their lowering rules. Where torch traces a whole RMSNorm, tanh-GELU or SiLU, :mod:`.patterns`
fuses it first and these rules see only the primitives left over.

    >>> LOWERINGS["pow"](plan, node, "n_pow")       # [PowInt(exponent=3, ...)] for x ** 3
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..base import BackendError
from . import emulate as E
from .layers import Copy, Fill, Layer, Lut, struct
from .project import LOWERINGS, _dense

MAX_EXPONENT = 64          # beyond this x^k saturates or vanishes for every fixed-point x but 0 and +-1


@dataclass
class Neg(Layer):
    n_in: int = 0

    def config(self):
        return struct(self.cfg, f"{self.node}: neg", [("unsigned", "n_in", self.n_in)])

    def call(self, ids):
        return f"nf::neg<act_t, act_t, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]});"

    def emulate(self, env, fmt):
        return E.neg(env[self.inputs[0]], fmt, fmt)


@dataclass
class PowInt(Layer):
    """x ** k for an integer k >= 2 (nf::pow_int)."""
    n_in: int = 0
    exponent: int = 2

    def config(self):
        return struct(self.cfg, f"{self.node}: x ** {self.exponent}", [("unsigned", "n_in", self.n_in),
                                                                      ("unsigned", "exponent", self.exponent)])

    def call(self, ids):
        return f"nf::pow_int<act_t, act_t, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]});"

    def emulate(self, env, fmt):
        return E.pow_int(env[self.inputs[0]], self.exponent, fmt, fmt)


@dataclass
class Rsqrt(Layer):
    """nf::rsqrt_fixed: 1 / sqrt(x) in the activation format (x <= 0 -> the format's maximum)."""
    n: int = 0

    def config(self):
        return ""

    def call(self, ids):
        return f"nf::rsqrt_fixed<act_t, {self.n}>({ids[self.inputs[0]]}, {ids[self.output]});"

    def emulate(self, env, fmt):
        return E.rsqrt_fixed(env[self.inputs[0]], fmt)


@LOWERINGS.register("neg")
def _neg(plan, node, name):
    return [Neg(name, node.name, [node.inputs[0].name], node.output.name, n_in=math.prod(node.output.shape))]


@LOWERINGS.register("pow")
def _pow(plan, node, name):
    x, e = node.inputs
    n = math.prod(node.output.shape)
    if x.is_weight or not e.is_weight or math.prod(e.shape) != 1:
        raise BackendError(f"node {node.name} (pow): the hls backend raises an activation to a constant scalar "
                           f"exponent; got base {x.name} and exponent {e.name} {list(e.shape)}")
    k = float(_dense(e, f"node {node.name} exponent").reshape(()))
    if k != int(k) or not 0 <= k <= MAX_EXPONENT:
        raise BackendError(f"node {node.name} (pow): exponent {k:g} is not an integer in 0..{MAX_EXPONENT}; the hls "
                           f"backend computes integer powers as products (write sqrt, rsqrt or a division instead)")
    if k == 0:
        one = int(E.from_float(np.array([1.0]), plan.opts.act)[0])
        return [Fill(name, node.name, [], node.output.name, n=n, raw=one)]
    if k == 1:
        return [Copy(name, node.name, [x.name], node.output.name, n=n)]
    if 2 * plan.opts.act_width > 63:
        raise BackendError(f"node {node.name} (pow): a product of two activations needs 2 * act_width <= 63 bits")
    return [PowInt(name, node.name, [x.name], node.output.name, n_in=n, exponent=int(k))]


@LOWERINGS.register("rsqrt")
def _rsqrt(plan, node, name):
    return [Rsqrt(name, node.name, [node.inputs[0].name], node.output.name, n=math.prod(node.output.shape))]


def _table(fn):
    def rule(plan, node, name):
        return [Lut(name, node.name, [node.inputs[0].name], node.output.name, fn=fn,
                    n_in=math.prod(node.output.shape), step_log2=plan.opts.lut_step_log2, act=plan.opts.act)]
    return rule


for _fn in ("sigmoid", "tanh"):
    LOWERINGS.register(_fn)(_table(_fn))
