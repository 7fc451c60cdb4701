"""The op registry: every op's reference kernel against its own shape/dtype inference, numerics of
a representative subset against independent torch computations, symbolic shapes through the
interpreter, pooling/conv output sizes against torch, and schema errors.

``EXAMPLES`` holds at least one small example per op; ``test_every_op_has_an_example`` iterates the
registry, so an op added without an example here fails loudly instead of going untested.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnforge.ir import OPS, Dense, Graph, GraphError, Interpreter, TensorType, dtype, get_op, tensor
from nnforge.ir.ops import RunContext


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed))


def positive(*shape, seed=0):
    return torch.rand(*shape, generator=_g(seed)) + 0.5


def ints(lo, hi, *shape, dtype=torch.int64, seed=0):
    return torch.randint(lo, hi, shape, generator=_g(seed)).to(dtype)


def bools(*shape, seed=0):
    return torch.rand(*shape, generator=_g(seed)) > 0.5


def ex(*inputs, **attrs):
    return list(inputs), attrs


FLOAT_UNARY = ["exp", "log", "sqrt", "rsqrt", "reciprocal", "sigmoid", "tanh", "erf", "silu", "sin", "cos",
               "floor", "ceil", "hardswish", "hardsigmoid"]

EXAMPLES: dict[str, list] = {
    **{op: [ex(positive(2, 3, 4))] for op in FLOAT_UNARY},
    **{op: [ex(randn(2, 3, 4)), ex(ints(-5, 5, 3, 2))] for op in ("neg", "abs", "relu")},
    "not": [ex(bools(3, 4))],
    "gelu": [ex(randn(2, 5)), ex(randn(2, 5), approximate="tanh")],
    "leaky_relu": [ex(randn(2, 5), negative_slope=0.2)],
    "clamp": [ex(randn(3, 4), min=-0.5, max=0.5), ex(randn(3, 4), min=0.0), ex(ints(-9, 9, 5), max=3)],
    "cast": [ex(randn(3, 4), dtype="int32"), ex(ints(0, 3, 4), dtype="bool"), ex(ints(-4, 4, 2, 2), dtype="f32"),
             ex(randn(2), dtype="float16")],
    **{op: [ex(randn(2, 3, 4), randn(3, 1, seed=1)), ex(ints(-5, 5, 2, 3), ints(-5, 5, 3, seed=1))]
       for op in ("add", "sub", "mul", "maximum", "minimum")},
    "pow": [ex(positive(2, 3), randn(3, seed=1))],
    "div": [ex(randn(2, 3, 4), positive(4, seed=1)), ex(ints(-9, 9, 2, 3), ints(1, 5, 3, seed=1))],
    **{op: [ex(randn(2, 3, 4), randn(3, 1, seed=1)), ex(ints(0, 3, 5), ints(0, 3, 5, seed=1))]
       for op in ("eq", "ne", "lt", "le", "gt", "ge")},
    **{op: [ex(bools(2, 3), bools(3, seed=1))] for op in ("and", "or", "xor")},
    "where": [ex(bools(2, 1, 4), randn(3, 4), randn(2, 3, 4, seed=1))],
    # linalg
    "linear": [ex(randn(2, 3, 6), randn(4, 6, seed=1), randn(4, seed=2)), ex(randn(5, 6), randn(4, 6, seed=1), None),
               ex(randn(5, 6), randn(4, 6, seed=1))],
    "matmul": [ex(randn(2, 3, 4), randn(4, 5, seed=1)), ex(randn(2, 1, 3, 4), randn(5, 4, 6, seed=1))],
    "conv": [
        ex(randn(2, 3, 9), randn(4, 3, 3, seed=1), randn(4, seed=2), stride=[2], padding=[1, 1], dilation=[1]),
        ex(randn(1, 4, 7, 6), randn(6, 2, 3, 2, seed=1), None, stride=[1, 2], padding=[0, 1, 2, 0],
           dilation=[1, 1], groups=2),
        ex(randn(1, 2, 5, 6, 7), randn(3, 2, 2, 3, 2, seed=1), stride=[1, 2, 1], padding=[1, 0, 1, 1, 0, 0],
           dilation=[2, 1, 1]),
    ],
    "embedding": [ex(ints(0, 10, 2, 3), randn(10, 4, seed=1)), ex(ints(0, 10, 5, dtype=torch.int32), randn(10, 4))],
    "hadamard": [ex(randn(2, 3, 24), block=24), ex(randn(5, 40), block=20), ex(randn(4, 64), block=16)],
    "dynamic_quant": [ex(randn(2, 3, 64), format="int8"), ex(randn(5, 64), format="int4", group=16, clip=0.9),
                      ex(randn(4, 64), format="nvfp4"), ex(randn(4, 64), format="nvfp4", global_scale=0.01),
                      ex(randn(2, 64), format="mxfp4"), ex(randn(2, 2, 64), format="e4m3")],
    # nn
    "softmax": [ex(randn(2, 3, 4), axis=-1), ex(randn(2, 3, 4), axis=1)],
    "log_softmax": [ex(randn(2, 3, 4), axis=0)],
    "layer_norm": [ex(randn(2, 3, 4), positive(4, seed=1), randn(4, seed=2)),
                   ex(randn(2, 3, 4), positive(3, 4), None, axis=-2, eps=1e-3), ex(randn(2, 5))],
    "batch_norm": [ex(randn(2, 3, 4, 4), randn(3, seed=1), positive(3, seed=2), positive(3, seed=3), randn(3, seed=4)),
                   ex(randn(4, 3), randn(3, seed=1), positive(3, seed=2), eps=0.1)],
    "max_pool": [
        ex(randn(1, 2, 7, 7), kernel=[3, 3], stride=[2, 2], padding=[1, 1, 1, 1], dilation=[1, 1]),
        ex(randn(1, 2, 8, 7), kernel=[2, 3], stride=[2, 2], padding=[0, 0, 1, 2], dilation=[1, 1], ceil_mode=True),
        ex(randn(2, 3, 10), kernel=[3], stride=[1], padding=[0, 0], dilation=[2]),
    ],
    "avg_pool": [
        ex(randn(1, 2, 7, 7), kernel=[3, 3], stride=[2, 2], padding=[1, 1, 1, 1]),
        ex(randn(1, 2, 7, 6), kernel=[3, 2], stride=[2, 2], padding=[2, 0, 0, 1], count_include_pad=False),
        ex(randn(1, 2, 8, 8), kernel=[3, 3], stride=[2, 2], padding=[0, 0, 0, 0], ceil_mode=True),
        ex(randn(1, 1, 4, 4, 4), kernel=[2, 2, 2], stride=[2, 2, 2], padding=[0] * 6),
    ],
    "adaptive_avg_pool": [ex(randn(2, 3, 8, 6), output_size=[4, 3]), ex(randn(2, 3, 7), output_size=[1])],
    # decoder
    "rms_norm": [ex(randn(2, 3, 8), positive(8, seed=1), eps=1e-6), ex(randn(2, 5), eps=1e-5),
                 ex(randn(2, 3, 8), randn(8, seed=1), eps=1e-6, offset=1.0)],
    "rope": [ex(randn(2, 3, 4, 8), ints(0, 16, 2, 4, seed=1), positive(4, seed=2)),
             ex(randn(1, 2, 3, 10), ints(0, 9, 1, 3, dtype=torch.int32), positive(3, seed=2), scale=1.2,
                style="interleaved", rotary_dim=6)],
    "cache_update": [ex(randn(2, 2, 8, 4), randn(2, 2, 3, 4, seed=1), torch.tensor([[0, 1, 2], [5, 3, 7]]))],
    "kv_cache_write": [ex(randn(1, 2, 3, 4), torch.tensor([[0, 1, 2]]), torch.zeros(1, 2, 8, 4, dtype=torch.int8),
                          torch.zeros(1, 2, 8, 1, dtype=torch.float16), encoding="kv8", role="k", max_len=8, head_dim=4),
                       ex(randn(1, 2, 3, 4), torch.tensor([[4, 5, 6]]), torch.zeros(1, 2, 8, 2, dtype=torch.uint8),
                          torch.zeros(1, 2, 4, 4, dtype=torch.float16), torch.zeros(1, 2, 4, 4, dtype=torch.float16),
                          torch.zeros(1, 2, 3, 4), encoding="kv4", role="k", max_len=8, head_dim=4, group=2,
                          residual=2)],
    "kv_cache_read": [ex(torch.tensor([[3]]), torch.ones(1, 2, 8, 4, dtype=torch.uint8),
                         torch.ones(1, 2, 8, 1, dtype=torch.float16), encoding="kv-fp8", role="v", max_len=8,
                         head_dim=4)],
    "attention": [ex(randn(2, 4, 3, 8), randn(2, 2, 6, 8, seed=1), randn(2, 2, 6, 8, seed=2),
                     torch.tensor([[0, 1, 2], [3, 4, 5]]), scale=8 ** -0.5),
                  ex(randn(1, 2, 2, 4), randn(1, 1, 5, 4, seed=1), randn(1, 1, 5, 4, seed=2), torch.tensor([[3, 4]]),
                     scale=0.5, window=2, softcap=5.0)],
    # reductions
    **{f"reduce_{k}": [ex(randn(2, 3, 4), axes=[1]), ex(randn(2, 3, 4), axes=[0, -1], keepdim=True)]
       for k in ("sum", "mean", "max", "min", "prod")},
    **{f"reduce_{k}": [ex(bools(2, 3, 4), axes=[2]), ex(bools(2, 3), axes=[0, 1], keepdim=True)]
       for k in ("any", "all")},
    "argmax": [ex(randn(2, 3, 4), axis=1), ex(randn(2, 3, 4), axis=-1, keepdim=True)],
    "cumsum": [ex(randn(2, 3, 4), axis=1), ex(ints(0, 5, 6), axis=0)],
    "topk_indices": [ex(randn(2, 3, 5), k=2), ex(ints(0, 4, 7), k=7, axis=0, largest=False)],
    # shape
    "reshape": [ex(randn(2, 3, 4), shape=[6, -1]), ex(randn(2, 3, 4), shape=[4, 3, 2]), ex(randn(6), shape=[1, 6, 1])],
    "permute": [ex(randn(2, 3, 4), perm=[2, 0, 1])],
    "expand": [ex(randn(3, 1), shape=[2, 3, 4]), ex(randn(1, 4), shape=[5, 4])],
    "slice": [ex(randn(4, 10), axis=1, start=1, end=9, step=3), ex(randn(4, 10), axis=0, start=2, end=2),
              ex(randn(4, 10), axis=-1, end=5)],
    "concat": [ex(randn(2, 3), randn(2, 1, seed=1), randn(2, 4, seed=2), axis=1), ex(randn(1, 3), axis=0)],
    "gather": [ex(randn(5, 4), torch.tensor([[0, -1], [2, 4]]), axis=0),
               ex(randn(2, 5, 3), torch.tensor([1, -2, 0], dtype=torch.int32), axis=1)],
    "gather_elements": [ex(randn(3, 4), ints(0, 3, 2, 4), axis=0)],
    "fake_quant": [ex(randn(3, 4), format="int8", scale=0.02), ex(randn(2, 5), format="uint8", scale=0.03, zero_point=100),
                   ex(randn(3, 4), format="float8_e4m3fn", scale=0.01)],
    "index": [ex(randn(4, 5, 6), torch.tensor([[0], [3]]), torch.tensor([1, 2, 4])), ex(randn(4, 5), ints(0, 4, 3))],
    "index_put": [ex(randn(5, 3), randn(4, 3, seed=1), ints(0, 5, 4), accumulate=True),
                  ex(randn(4, 5), randn(2, seed=1), torch.tensor([0, 3]), torch.tensor([4, 1]))],
    "pad": [ex(randn(2, 3), pads=[1, 0, 2, 3], value=-1.0), ex(ints(0, 4, 2, 2), pads=[0, 1, 0, 1], value=7)],
    # creation
    "arange": [ex(end=5, dtype="int64"), ex(start=1, end=8, step=3, dtype="int32")],
    "full": [ex(shape=[2, 3], value=1.5, dtype="f32"), ex(shape=[4], value=3, dtype="int64"),
             ex(shape=[2, 2], value=True, dtype="bool")],
}


def test_every_op_has_an_example():
    missing = sorted(set(OPS) - set(EXAMPLES))
    assert not missing, f"ops without an example in tests/ir/test_ops.py EXAMPLES: {missing}"
    assert not set(EXAMPLES) - set(OPS), "examples for ops that are not registered"


def _type_of(t: torch.Tensor | None) -> TensorType | None:
    return None if t is None else TensorType(dtype(t.dtype), tuple(t.shape))


def run_example(name: str, inputs, attrs, float_dtype=torch.float32):
    op = get_op(name)
    where = f"example of {name}"
    attrs = op.check_attrs(attrs, where)
    inferred = op.infer_types([_type_of(t) for t in inputs], attrs, where)
    ctx = RunContext(float_dtype=float_dtype)
    args = [None if t is None else (t.to(float_dtype) if t.is_floating_point() else t) for t in inputs]
    outs = op.run(ctx, args, attrs)
    return ctx, inferred, outs


@pytest.mark.parametrize("name", sorted(OPS))
def test_kernel_agrees_with_inference(name):
    """Every example: the kernel returns as many outputs as inferred, each of the inferred shape,
    and of the inferred dtype (float types follow the interpreter's compute precision)."""
    assert name in EXAMPLES, f"add an example for op {name} to EXAMPLES"
    for i, (inputs, attrs) in enumerate(EXAMPLES[name]):
        ctx, inferred, outs = run_example(name, inputs, attrs)
        assert len(outs) == len(inferred), f"{name} example {i}"
        for out, t in zip(outs, inferred):
            assert tuple(out.shape) == tuple(t.shape), f"{name} example {i}: {tuple(out.shape)} vs {t}"
            assert out.dtype == ctx.torch_dtype(t.dtype), f"{name} example {i}: {out.dtype} vs {t}"


@pytest.mark.parametrize("name", sorted(OPS))
def test_ops_have_schema_docs(name):
    op = OPS[name]
    assert op.name == name and op.family, f"{name} has no family"
    assert all(isinstance(s, str) and s.rstrip("?*").isidentifier() for s in op.inputs)
    assert sum(s.endswith("*") for s in op.inputs) <= 1 and (not op.variadic or op.inputs[-1].endswith("*"))


def test_int_division_follows_fp64_compute_precision():
    """BUG: ``div`` of integer operands is typed float32 (so the interpreter computes it in its float
    precision, like ``cast`` to a float type, see RunContext.torch_dtype), but its kernel always
    returns float32 (``_div_ref`` does ``.to(torch.float32)``): in a float64 interpreter every other
    float value is float64 while integer divisions silently drop to float32."""
    ctx, inferred, outs = run_example("div", [ints(-9, 9, 2, 3), ints(1, 5, 3, seed=1)], {}, torch.float64)
    assert inferred[0].dtype.name == "float32"
    assert outs[0].dtype == ctx.torch_dtype(inferred[0].dtype) == torch.float64


def test_kernels_follow_fp64_compute_precision():
    """Float results are float64 in a float64 RunContext (ops other than integer div)."""
    for name in ["linear", "conv", "layer_norm", "softmax", "avg_pool", "cast", "full", "reduce_mean", "gelu"]:
        for i, (inputs, attrs) in enumerate(EXAMPLES[name]):
            ctx, inferred, outs = run_example(name, inputs, attrs, torch.float64)
            for out, t in zip(outs, inferred):
                assert out.dtype == ctx.torch_dtype(t.dtype), f"{name} example {i}: {out.dtype}"


@pytest.mark.parametrize("name", ["reduce_sum", "reduce_prod"])
def test_integer_reductions_keep_their_dtype(name):
    """BUG: reduce_sum / reduce_prod infer the input dtype (int32 in, int32 out) but the reference
    kernels call torch.sum / torch.prod, which promote int32 (and bool) to int64. The interpreter
    then produces values whose dtype contradicts the verified graph's types (and a following op
    typed for int32 gets int64)."""
    for inputs in ([ints(-3, 3, 2, 3, dtype=torch.int32)], [bools(2, 3)]):
        if name == "reduce_prod" and inputs[0].dtype == torch.bool:
            continue
        ctx, inferred, outs = run_example(name, inputs, {"axes": [1]})
        assert outs[0].dtype == ctx.torch_dtype(inferred[0].dtype), f"{inputs[0].dtype}: {outs[0].dtype} vs {inferred[0]}"


# --- numerics against independent torch computations ------------------------------------------------
def run1(name, *inputs, **attrs):
    return run_example(name, list(inputs), attrs)[2][0]


def test_linear_matches_nn_linear():
    lin = torch.nn.Linear(6, 4)
    x = randn(2, 3, 6)
    with torch.no_grad():
        want = lin(x)
    torch.testing.assert_close(run1("linear", x, lin.weight.detach(), lin.bias.detach()), want)
    torch.testing.assert_close(run1("linear", x, lin.weight.detach(), None), want - lin.bias.detach())


def test_matmul_broadcast_matches_einsum():
    a, b = randn(2, 1, 3, 4), randn(5, 4, 6, seed=1)
    want = torch.einsum("xyik,ykj->xyij", a.expand(2, 5, 3, 4), b)
    torch.testing.assert_close(run1("matmul", a, b), want)


def test_conv_asymmetric_padding_and_groups_match_nn_conv():
    x, w = randn(1, 4, 7, 6), randn(6, 2, 3, 2, seed=1)
    conv = torch.nn.Conv2d(4, 6, (3, 2), stride=(1, 2), groups=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w)
        want = conv(F.pad(x, (1, 0, 0, 2)))                  # begins [0, 1], ends [2, 0]: (W_l, W_r, H_t, H_b)
    got = run1("conv", x, w, None, stride=[1, 2], padding=[0, 1, 2, 0], dilation=[1, 1], groups=2)
    torch.testing.assert_close(got, want)


def test_conv1d_symmetric_padding_matches_nn_conv():
    conv = torch.nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=1)
    x = randn(2, 3, 9)
    with torch.no_grad():
        want = conv(x)
    got = run1("conv", x, conv.weight.detach(), conv.bias.detach(), stride=[2], padding=[1, 1], dilation=[1])
    torch.testing.assert_close(got, want)


def test_layer_norm_over_two_axes_by_hand():
    x, w, b = randn(2, 3, 4), positive(3, 4, seed=1), randn(3, 4, seed=2)
    mu = x.mean(dim=(-2, -1), keepdim=True)
    var = x.var(dim=(-2, -1), unbiased=False, keepdim=True)
    want = (x - mu) / torch.sqrt(var + 1e-3) * w + b
    torch.testing.assert_close(run1("layer_norm", x, w, b, axis=-2, eps=1e-3), want)


def test_batch_norm_by_hand():
    x, m, v, w, b = randn(2, 3, 4, 4), randn(3, seed=1), positive(3, seed=2), positive(3, seed=3), randn(3, seed=4)
    r = (lambda t: t.reshape(1, 3, 1, 1))
    want = (x - r(m)) / torch.sqrt(r(v) + 1e-5) * r(w) + r(b)
    torch.testing.assert_close(run1("batch_norm", x, m, v, w, b), want)


def test_softmax_and_log_softmax_by_hand():
    x = randn(2, 3, 4)
    e = torch.exp(x - x.amax(1, keepdim=True))
    torch.testing.assert_close(run1("softmax", x, axis=1), e / e.sum(1, keepdim=True))
    torch.testing.assert_close(run1("log_softmax", x, axis=1), torch.log(e / e.sum(1, keepdim=True)))


def test_activations_by_formula():
    x = randn(50)
    torch.testing.assert_close(run1("gelu", x, approximate="tanh"),
                               0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))))
    torch.testing.assert_close(run1("gelu", x), 0.5 * x * (1 + torch.erf(x / math.sqrt(2))))
    torch.testing.assert_close(run1("silu", x), x * torch.sigmoid(x))
    torch.testing.assert_close(run1("hardsigmoid", x), torch.clamp(x / 6 + 0.5, 0, 1))
    torch.testing.assert_close(run1("hardswish", x), x * torch.clamp(x + 3, 0, 6) / 6)
    torch.testing.assert_close(run1("leaky_relu", x, negative_slope=0.1), torch.where(x > 0, x, 0.1 * x))
    torch.testing.assert_close(run1("clamp", x, min=-0.5, max=0.25), x.clamp(-0.5, 0.25))


def _pool_reference(x, kernel, stride, pb, pe, dilation, out_len, mode, count_include_pad=True):
    """Direct definition of 1-D/2-D pooling over the last len(kernel) axes of x [N, C, ...]."""
    nd = len(kernel)
    sizes = x.shape[2:]
    out = torch.empty(x.shape[:2] + tuple(out_len), dtype=x.dtype)
    for pos in itertools.product(*[range(n) for n in out_len]):
        idx_lists, padded_counts = [], 1
        for a in range(nd):
            start = pos[a] * stride[a] - pb[a]
            taps = [start + k * dilation[a] for k in range(kernel[a])]
            idx_lists.append([t for t in taps if 0 <= t < sizes[a]])
            padded_counts *= sum(1 for t in taps if -pb[a] <= t < sizes[a] + pe[a])
        window = x[(Ellipsis, *[torch.tensor(ix) for ix in idx_lists])] if nd == 1 else \
            x[:, :, idx_lists[0]][:, :, :, idx_lists[1]]
        flat = window.reshape(x.shape[0], x.shape[1], -1)
        if mode == "max":
            val = flat.amax(-1)
        else:
            val = flat.sum(-1) / (padded_counts if count_include_pad else flat.shape[-1])
        out[(slice(None), slice(None), *pos)] = val
    return out


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_asymmetric_padding_matches_definition(ceil_mode):
    x = randn(1, 2, 8, 7)
    kernel, stride, padding, dil = [2, 3], [2, 2], [0, 1, 1, 2], [1, 2]
    got = run1("max_pool", x, kernel=kernel, stride=stride, padding=padding, dilation=dil, ceil_mode=ceil_mode)
    want = _pool_reference(x, kernel, stride, padding[:2], padding[2:], dil, got.shape[2:], "max")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_avg_pool_asymmetric_padding_matches_definition(ceil_mode, count_include_pad):
    x = randn(1, 2, 7, 6)
    kernel, stride, padding = [3, 2], [2, 2], [2, 0, 0, 1]
    got = run1("avg_pool", x, kernel=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode,
               count_include_pad=count_include_pad)
    want = _pool_reference(x, kernel, stride, padding[:2], padding[2:], [1, 1], got.shape[2:], "avg",
                           count_include_pad)
    torch.testing.assert_close(got, want)


def test_adaptive_avg_pool_divisible_is_block_mean():
    x = randn(2, 3, 8, 6)
    want = x.reshape(2, 3, 4, 2, 3, 2).mean(dim=(3, 5))
    torch.testing.assert_close(run1("adaptive_avg_pool", x, output_size=[4, 3]), want)


def test_gather_embedding_index_by_hand():
    x = randn(5, 4)
    idx = torch.tensor([[0, -1], [2, 4]])
    torch.testing.assert_close(run1("gather", x, idx, axis=0), x[idx % 5])
    y = randn(2, 5, 3)
    torch.testing.assert_close(run1("gather", y, torch.tensor([1, -2]), axis=1), y[:, [1, 3], :])
    w = randn(10, 4)
    ids = ints(0, 10, 2, 3)
    torch.testing.assert_close(run1("embedding", ids, w), w[ids])
    z = randn(4, 5, 6)
    i0, i1 = torch.tensor([[0], [3]]), torch.tensor([1, 2, 4])
    got = run1("index", z, i0, i1)
    want = torch.stack([torch.stack([z[int(a), int(b)] for b in i1]) for a in i0[:, 0]])
    torch.testing.assert_close(got, want)
    e = randn(3, 4)
    gi = ints(0, 3, 2, 4)
    torch.testing.assert_close(run1("gather_elements", e, gi, axis=0),
                               torch.stack([torch.stack([e[gi[r, c], c] for c in range(4)]) for r in range(2)]))


def test_topk_indices_match_torch_topk_and_a_stable_sort():
    x = randn(3, 7)
    for largest in (True, False):
        want = torch.topk(x, 3, dim=1, largest=largest).indices
        assert torch.equal(run1("topk_indices", x, k=3, axis=1, largest=largest), want)
    ids = torch.tensor([2, 0, 3, 0, 2, 1, 3, 0])                 # ties: lower index first, like a stable sort
    assert torch.equal(run1("topk_indices", ids, k=8, largest=False), torch.sort(ids, stable=True).indices)
    assert torch.equal(run1("topk_indices", ids, k=3), torch.tensor([2, 6, 0]))


def test_index_put_writes_and_accumulates_like_a_loop():
    x, v = randn(5, 3), randn(4, 3, seed=1)
    idx = torch.tensor([4, 1, 4, 0])
    added, written = x.clone(), x.clone()
    for i, r in enumerate(idx.tolist()):
        added[r] += v[i]
    for i, r in enumerate(idx.tolist()[:2]):
        written[r] = v[i]
    torch.testing.assert_close(run1("index_put", x, v, idx, accumulate=True), added)
    torch.testing.assert_close(run1("index_put", x, v[:2], idx[:2]), written)
    grid = run1("index_put", torch.zeros(3, 4), torch.tensor(7.0), torch.tensor([0, 2]), torch.tensor([3, 1]))
    assert grid[0, 3] == 7 and grid[2, 1] == 7 and grid.sum() == 14


def test_shape_ops_by_hand():
    x = randn(4, 10)
    torch.testing.assert_close(run1("slice", x, axis=1, start=1, end=9, step=3), x[:, 1:9:3])
    torch.testing.assert_close(run1("pad", x[:2, :3], pads=[1, 0, 2, 3], value=-1.0),
                               torch.from_numpy(np.pad(x[:2, :3].numpy(), ((1, 2), (0, 3)), constant_values=-1.0)))
    torch.testing.assert_close(run1("permute", randn(2, 3, 4), perm=[2, 0, 1]), randn(2, 3, 4).permute(2, 0, 1))
    torch.testing.assert_close(run1("reshape", randn(2, 3, 4), shape=[6, -1]), randn(2, 3, 4).reshape(6, 4))
    torch.testing.assert_close(run1("expand", randn(3, 1), shape=[2, 3, 4]), randn(3, 1).expand(2, 3, 4))
    parts = [randn(2, 3), randn(2, 1, seed=1)]
    torch.testing.assert_close(run1("concat", *parts, axis=1), torch.from_numpy(np.concatenate(parts, 1)))


def test_reductions_by_hand():
    x = randn(2, 3, 4)
    torch.testing.assert_close(run1("reduce_prod", x, axes=[0, 2]), torch.from_numpy(x.numpy().prod(axis=(0, 2))))
    torch.testing.assert_close(run1("reduce_mean", x, axes=[0, -1], keepdim=True), x.mean(dim=(0, 2), keepdim=True))
    torch.testing.assert_close(run1("reduce_max", x, axes=[1]), torch.from_numpy(x.numpy().max(axis=1)))
    torch.testing.assert_close(run1("cumsum", x, axis=1), torch.from_numpy(np.cumsum(x.numpy(), axis=1)))
    assert torch.equal(run1("argmax", x, axis=1), torch.from_numpy(x.numpy().argmax(axis=1)))
    b = bools(2, 3, 4)
    assert torch.equal(run1("reduce_any", b, axes=[2]), torch.from_numpy(b.numpy().any(axis=2)))
    assert torch.equal(run1("reduce_all", b, axes=[2]), torch.from_numpy(b.numpy().all(axis=2)))


def test_arithmetic_and_creation_by_hand():
    a, b = ints(-9, 9, 2, 3), ints(1, 5, 3, seed=1)
    torch.testing.assert_close(run1("div", a, b), a.float() / b.float())
    assert run1("arange", start=1, end=8, step=3, dtype="int32").tolist() == [1, 4, 7]
    assert run1("full", shape=[2, 3], value=1.5, dtype="f32").tolist() == [[1.5] * 3] * 2
    assert torch.equal(run1("where", torch.tensor([True, False]), torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])),
                       torch.tensor([1.0, 4.0]))


# --- symbolic shapes through the interpreter -----------------------------------------------------------
def test_symbolic_shapes_run_at_every_size():
    g = Graph("sym")
    x = g.add_input("x", tensor("f32", "b", "s", 4))
    w = g.add_weight("w", Dense(randn(6, 4)))
    ker = g.add_weight("k", Dense(randn(6, 6, 3)))
    h = g.op("linear", x, w, None, name="lin")                                # [b, s, 6]
    flat = g.op("reshape", h, shape=[-1, 6], name="flat")                     # [b*s, 6]
    head = g.op("slice", h, axis=1, start=1, end="s", name="tail")            # [b, s - 1, 6]
    cat = g.op("concat", h, head, axis=1, name="cat")                         # [b, 2*s - 1, 6]
    conv = g.op("conv", g.op("permute", cat, perm=[0, 2, 1], name="t"), ker, None, stride=[2], padding=[1, 1],
                dilation=[1], name="conv")                                    # [b, 6, (2s - 1 + 2 - 3)//2 + 1]
    pos = g.op("arange", end="s", dtype="int64", name="pos")                                 # [s]
    ones = g.op("full", shape=["b", 2], value=1.0, dtype="f32", name="ones")  # [b, 2]
    big = g.op("expand", g.op("reshape", ones, shape=["b", 2, 1], name="o3"), shape=["b", 2, "s"], name="big")
    g.set_outputs([flat, cat, conv, pos, big])
    assert str(flat.type) == "f32[b*s, 6]" and str(cat.type) == "f32[b, 2*s - 1, 6]"
    interp = Interpreter(g)
    for env in ({"b": 1, "s": 3}, {"b": 3, "s": 8}):
        outs = interp.run(randn(env["b"], env["s"], 4))
        for v, t in zip(g.outputs, outs):
            assert tuple(t.shape) == v.type.concrete(env), (v.name, env)
            assert t.dtype == v.dtype.torch_dtype


# --- output sizes against torch's own --------------------------------------------------------------------
def test_pool_output_sizes_match_torch():
    """conv_out_dim (with ceil_mode's last-window rule) against torch for every small configuration
    torch accepts with symmetric padding."""
    checked = 0
    for size, k, s, p, d, ceil in itertools.product(range(3, 10), (1, 2, 3), (1, 2, 3), (0, 1), (1, 2), (False, True)):
        if p > k // 2 or d * (k - 1) + 1 > size + 2 * p:
            continue
        x = torch.zeros(1, 1, size)
        want = F.max_pool1d(x, k, s, p, d, ceil_mode=ceil).shape[-1]
        t = get_op("max_pool").infer_types([TensorType("f32", (1, 1, size))],
                                           get_op("max_pool").check_attrs(
                                               {"kernel": [k], "stride": [s], "padding": [p, p], "dilation": [d],
                                                "ceil_mode": ceil}, "p"), "p")[0]
        assert t.shape[-1] == want, (size, k, s, p, d, ceil)
        got = run1("max_pool", torch.randn(1, 1, size), kernel=[k], stride=[s], padding=[p, p], dilation=[d],
                   ceil_mode=ceil)
        assert got.shape[-1] == want
        if d == 1:
            avg = run1("avg_pool", torch.randn(1, 1, size), kernel=[k], stride=[s], padding=[p, p], ceil_mode=ceil)
            assert avg.shape[-1] == F.avg_pool1d(x, k, s, p, ceil_mode=ceil).shape[-1]
        checked += 1
    assert checked > 200


# --- schema and inference errors ------------------------------------------------------------------------------
def _graph_with(*shapes_dtypes):
    g = Graph("g")
    vals = [g.add_input(f"in{i}", tensor(dt, *shape)) for i, (dt, shape) in enumerate(shapes_dtypes)]
    return g, vals


@pytest.mark.parametrize("op, specs, attrs, message", [
    ("add", [("f32", (2, 3)), ("f32", (4, 3))], {}, "cannot broadcast dimensions 2 and 4"),
    ("add", [("f32", (2,)), ("i64", (2,))], {}, "inputs must share one dtype, got float32, int64"),
    ("exp", [("i64", (2,))], {}, "exp needs a float input, got int64"),
    ("not", [("f32", (2,))], {}, "not needs a bool input"),
    ("matmul", [("f32", (2, 3)), ("f32", (4, 5))], {}, "matmul inner dimensions differ"),
    ("topk_indices", [("f32", (2, 3))], {"k": 4}, "topk_indices k=4 is outside \\[0, 3\\]"),
    ("index_put", [("f32", (4, 3)), ("f32", (2, 5)), ("i64", (2,))], {},
     "values .* do not broadcast to the indexed shape \\[2, 3\\]"),
    ("matmul", [("f32", (3,)), ("f32", (3, 5))], {}, "matmul needs operands of rank >= 2"),
    ("linear", [("f32", (2, 3)), ("f32", (4, 5))], {}, "last dim must be 5"),
    ("softmax", [("f32", (2, 3))], {"axis": 2}, "axis 2 out of range for rank 2"),
    ("reshape", [("f32", (2, 3))], {"shape": [4, -1]}, "cannot reshape \\[2, 3\\] \\(6 elements\\) to \\[4, -1\\]"),
    ("reshape", [("f32", (2, 3))], {"shape": [-1, -1]}, "more than one -1"),
    ("permute", [("f32", (2, 3))], {"perm": [0, 0]}, "is not a permutation"),
    ("expand", [("f32", (2, 3))], {"shape": [4, 3]}, "cannot broadcast dimensions 2 and 4"),
    ("slice", [("f32", (5,))], {"axis": 0, "start": -1, "end": 5}, "slice bounds must be normalised"),
    ("concat", [("f32", (2, 3)), ("f32", (3, 3))], {"axis": 1}, "concat inputs differ outside axis 1"),
    ("gather", [("f32", (2, 3)), ("f32", (2,))], {"axis": 0}, "indices must be int64 or int32, got float32"),
    ("pad", [("f32", (2, 3))], {"pads": [1, 1]}, "pad needs 4 non-negative amounts"),
    ("reduce_sum", [("f32", (2, 3))], {"axes": []}, "reduction needs at least one axis"),
    ("reduce_sum", [("f32", (2, 3))], {"axes": [1, -1]}, "repeated axis"),
    ("reduce_mean", [("i64", (2, 3))], {"axes": [1]}, "mean needs a float input"),
    ("conv", [("f32", (1, 3, 8)), ("f32", (4, 2, 3))], {"stride": [1], "padding": [0, 0], "dilation": [1]},
     "with groups=1 expects 2 input channels, input has 3"),
    ("conv", [("f32", (1, 2, 8)), ("f32", (4, 2, 3))], {"stride": [1], "padding": [0], "dilation": [1]},
     "padding of length 2"),
    ("max_pool", [("f32", (1, 2, 2))], {"kernel": [5], "stride": [1], "padding": [0, 0], "dilation": [1]},
     "window of 5 does not fit an input of 2"),
    ("embedding", [("f32", (2,)), ("f32", (4, 3))], {}, "embedding indices must be int64 or int32"),
    ("layer_norm", [("f32", (2, 3)), ("f32", (2,))], {}, "layer_norm weight f32\\[2\\] must have the normalised shape"),
    ("where", [("f32", (2,)), ("f32", (2,)), ("f32", (2,))], {}, "where needs a bool condition"),
    ("arange", [], {"end": 4, "dtype": "f32"}, "symbolic arange produces integers"),
])
def test_inference_errors_name_the_node(op, specs, attrs, message):
    g, vals = _graph_with(*specs)
    with pytest.raises(GraphError, match=f"node bad \\({op}\\): .*{message}"):
        g.add_node(op, vals, attrs, name="bad")


@pytest.mark.parametrize("op, inputs, attrs, message", [
    ("softmax", 1, {"axis": "1"}, "attribute axis must be of kind int, got '1'"),
    ("softmax", 1, {"axis": True}, "attribute axis must be of kind int, got True"),
    ("gelu", 1, {"approximate": "fast"}, "attribute approximate must be one of none, tanh, got 'fast'"),
    ("reshape", 1, {"shape": [2, "__import__('os')"]}, "attribute shape: dimension .* uses unsupported syntax"),
    ("reshape", 1, {"shape": 6}, "attribute shape must be of kind dims, got 6"),
    ("cast", 1, {"dtype": "float128"}, "attribute dtype must be of kind dtype, got 'float128'"),
    ("relu", 2, {}, "takes 1 inputs \\(x\\), got 2"),
    ("linear", 1, {}, "takes 2 to 3 inputs \\(x, weight, bias\\?\\), got 1"),
    ("concat", 0, {"axis": 0}, "takes at least 1 inputs \\(xs\\*\\), got 0"),
])
def test_schema_errors_name_the_node(op, inputs, attrs, message):
    g, vals = _graph_with(*[("f32", (2, 3))] * inputs)
    with pytest.raises(GraphError, match=f"node bad \\({op}\\)(: | ){message}"):
        g.add_node(op, vals, attrs, name="bad")


def test_required_input_missing():
    g, (x,) = _graph_with(("f32", (2, 3)))
    with pytest.raises(GraphError, match="node bad \\(linear\\): required input weight is missing"):
        g.add_node("linear", [x, None], name="bad")


def test_attrs_are_canonicalised():
    g, (x,) = _graph_with(("f32", (2, 3)))
    n = g.add_node("reshape", [x], {"shape": (3, "2 * 1")}, name="r")
    assert n.attrs == {"shape": [3, 2]}
    n = g.add_node("cast", [x], {"dtype": "f16"}, name="c")
    assert n.attrs["dtype"] is dtype("float16")
    n = g.add_node("gelu", [x], name="ge")
    assert n.attrs == {"approximate": "none"}
    n = g.add_node("leaky_relu", [x], {"negative_slope": 1}, name="lr")
    assert n.attrs["negative_slope"] == 1.0 and isinstance(n.attrs["negative_slope"], float)


def test_arange_default_dtype():
    """BUG: arange's ``dtype`` attribute defaults to the *string* "int64" (Attr("dtype", "int64")),
    and OpDef.check_attrs copies defaults without normalising them, so ``g.op("arange", end="s")``
    crashes in inference with ``AttributeError: 'str' object has no attribute 'is_integer'``
    instead of producing i64[s]. (Defaults should go through _normalize_attr too.)"""
    g = Graph("g")
    g.add_input("x", tensor("f32", "s"))
    v = g.op("arange", end="s", name="pos")
    assert str(v.type) == "i64[s]"
    assert v.producer.attrs["dtype"] is dtype("int64")


def test_unknown_op_lists_registry():
    with pytest.raises(GraphError, match="unknown op 'nope'; known: abs, "):
        get_op("nope")


def test_conv_stride_zero_names_node():
    """BUG: a conv (or pooling) with stride 0 makes shape inference raise a bare
    ZeroDivisionError from ``conv_out_dim`` (``... // stride`` on ints, via symbolic.floordiv's int
    path); OpDef.infer_types only converts GraphError/DimError/ValueError/TypeError/IndexError, so
    the error escapes without naming the node. Strides must be validated (>= 1)."""
    g, (x, w) = _graph_with(("f32", (1, 2, 8, 8)), ("f32", (3, 2, 3, 3)))
    with pytest.raises(GraphError, match="node bad \\(conv\\)"):
        g.add_node("conv", [x, w], {"stride": [0, 0], "padding": [0, 0, 0, 0], "dilation": [1, 1]}, name="bad")
    g2, (y,) = _graph_with(("f32", (1, 2, 8, 8)))
    with pytest.raises(GraphError, match="node badpool \\(max_pool\\)"):
        g2.add_node("max_pool", [y], {"kernel": [2, 2], "stride": [0, 0], "padding": [0, 0, 0, 0],
                                      "dilation": [1, 1]}, name="badpool")


def test_slice_end_beyond_dimension_is_refused():
    """BUG: _slice_infer never compares ``end`` with the dimension: slice(x[4], start=0, end=10)
    is typed f32[10] and verifies, while the kernel returns 4 elements, so the interpreter's value
    contradicts the verified type. Its own error message says bounds must satisfy
    0 <= start <= end <= size; static bounds past the size should be refused (or clipped)."""
    g, (x,) = _graph_with(("f32", (4,)))
    try:
        v = g.op("slice", x, axis=0, start=0, end=10, name="s")
    except GraphError as e:
        assert "node s (slice)" in str(e)
        return
    out = get_op("slice").run(RunContext(), [torch.zeros(4)], v.producer.attrs)[0]
    assert tuple(out.shape) == tuple(v.shape), f"typed {v.type}, kernel gives {tuple(out.shape)}"
