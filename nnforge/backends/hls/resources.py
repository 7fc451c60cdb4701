"""Static resource estimate of a generated HLS project: DSP, BRAM36, LUT and FF per kernel call and in
total, computed from a :class:`~.project.Plan`'s layer configs by the rules below.

THIS IS AN ANALYTIC ESTIMATE, NOT A SYNTHESIS REPORT. It counts what the templates in ``nnforge/hls``
ask for (multipliers, arrays, dividers) as their code is written; Vitis HLS and Vivado may share,
narrow, retime or re-map any of it. DSP and BRAM follow explicit counting rules and should be close
to what synthesis reports for these templates; LUT and FF are rough, order-of-magnitude figures
built from labelled constants that were not calibrated against a synthesis run. Only
``vitis_hls -f build_prj.tcl`` (csynth) gives real figures.

    >>> est = estimate(runner.plan)   # runner = nf.load(bundle.path)
    >>> est["total"]             # {"dsp": ..., "bram36": ..., "lut": ..., "ff": ..., "macs_per_cycle": ...}
    >>> print(format_estimate(est))

DSP (per kernel call; every call is its own function instance, so nothing is shared across calls)
    A product of an a-bit by a b-bit signed operand takes one DSP when it fits the slice's multiplier
    ports: 27 x 18 for DSP48E2 (UltraScale+, e.g. the U280), 27 x 24 for DSP58 (Versal). A wider one
    is split into slices (the low ones unsigned, port - 1 bits; the top one signed) and takes one DSP
    per pair of slices that reaches the bits the result keeps (24 x 24 on DSP48E2: 2 cascaded DSPs;
    64 x 64 kept to 64 bits: 8). Operand widths are those the template declares, except where it
    builds an operand from a narrower value by sign extension or masking, which HLS narrows: raw()
    activations (act_width bits), table entries (32 bits, a difference of two: 33), masked
    fractions (step_shift bits). Products by compile-time constants (addresses) are shift-adds: 0.

    matmat (linear)   ``chain`` multipliers (the unroll of the reduction), each val_bits x act_width
                      (decoded weight x activation); with ``pack2`` each multiplier is the packed
                      (act_width + 2 val_bits) x act_width product of nf::mac2 and does 2 MACs (one DSP,
                      WP486); plus one group-scale multiplier acc_bits x 32 (part * scale, once per group).
    conv              as matmat without pack2 (one filter row at a time): ``chain`` multipliers
                      val_bits x act_width and one group-scale multiplier acc_bits x 32.
    matmul            ``chain`` multipliers act_width x act_width (activation x activation).
    activation_lut    one interpolation product 33 x step_shift.
    softmax           one interpolation product 33 x step_shift, one 64 x 64 -> 64 (e * recip); one divider.
    layer_norm        three 64 x 64 -> 64 products (d^2, d * rcp, z * gamma); three dividers (mean,
                      variance: by the constant n, which HLS may turn into a multiply-high instead;
                      2^62 / sqrt) and one isqrt.
    binary            mul: one 64 x 64 -> 64; div: one divider; add / sub: none.
    pow_int           one act_width x act_width product (reused for each of the k - 1 steps).
    rsqrt             one divider (2^62 / sqrt) and one isqrt.
    everything else   (max_pool, pad, relu, neg, clamp, copies, permutes, concat, gathers, embedding, logic, reduce, sqrt,
                      top-k, cumsum, floor, gathers and scatters by computed indices): no DSP.

BRAM36 (on-chip arrays; the weights are off chip behind the m_axi port ``wmem``: 0 BRAM for them,
    and the graph's input / output ports are m_axi too)
    An array bank of depth d and width w takes the fewest BRAM36 over the block's shapes 32K x 1,
    16K x 2, 8K x 4, 4K x 9, 2K x 18, 1K x 36, 512 x 72: min ceil(d / D) * ceil(w / W), which is at
    least ceil(d * w / 36864). ASSUMPTION (the tools' own heuristic is not documented): a bank of at
    most 1024 bits, or at most 64 deep, goes to LUTRAM / registers instead (0 BRAM, LUTs below).
    Arrays counted: the top function's activation buffers ``plan.pool`` (one bank each, act_width /
    32 / 1 bits for act / int / bool values; x2 in the dataflow form, whose channels are ping-pong
    buffers); matmat's decoded rows ``wrow[2][n_kept]`` and columns ``col[n_kept]`` (16 bits), split
    into ``chain`` banks by their ARRAY_PARTITION cyclic factor=chain, its scales ``[2][n_groups]``
    (32 bits) and, for LUT-decoded codes, ``lut[2^w_bits]`` (32 bits); conv's the same for one row
    plus its line buffer (one bank per image row it holds, scan width x channels deep, act_width
    bits) and window ``win[n_in]``; softmax's ``e[n]`` (64 bits);
    the function tables of activation_lut / softmax (ROMs of lut_n + 1 x 32 bits). Interface
    adapters' burst FIFOs are not counted.

LUT / FF (ROUGH; labelled constants below, not calibrated)
    per MAC: an accumulator adder of acc bits (1 LUT per bit) and its register (acc FFs) plus the
    operand registers (a + b FFs); a product split over k DSPs adds (k - 1) adders of the kept width
    (LUT and FF); a divider of n bits (pipelined, one subtract per stage): n^2 LUT, 2 n^2 FF; isqrt:
    3 x 64 LUT and FF; LUTRAM: 1 LUT per 64 x 1 bits; a fixed control share per call (loop counters,
    address generation, FSM: ``CONTROL``) and for the top's interfaces (``INTERFACE``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import conv as C
from . import decoder as D
from . import decoder_kv8 as K
from . import layers as L
from . import logic as G
from . import pointwise as P
from . import routing as R

# Multiplier ports (signed a x b) of one DSP slice: AMD UG579 (DSP48E2: 27 x 18), AM004 (DSP58: 27 x 24).
DSP_PORTS = {"dsp48e2": (27, 18), "dsp58": (27, 24)}
# Versal part prefixes (AI Core / Edge / HBM / Prime / Premium): DSP58; every other part: DSP48E2.
VERSAL_PREFIXES = ("xcvc", "xcve", "xcvh", "xcvm", "xcvp")
# BRAM36 aspect ratios (depth, width): AMD UG573 (UltraScale memory resources), same on Versal (AM007).
BRAM36_SHAPES = ((32768, 1), (16384, 2), (8192, 4), (4096, 9), (2048, 18), (1024, 36), (512, 72))
LUTRAM_MAX_BITS = 1024         # ASSUMPTION: smaller banks map to LUTRAM / registers
LUTRAM_MAX_DEPTH = 64          # ASSUMPTION: one LUT6 is a 64 x 1 RAM; such shallow banks stay in LUTRAM
WIDE = 64                      # the templates' wide_t / uwide_t
TABLE_BITS = 32                # function tables are int arrays

# ROUGH constants (LUT, FF), not calibrated against a synthesis report:
CONTROL = {"matmat": (600, 800), "conv": (800, 1000), "matmul": (300, 400)}   # weight-field decode, addresses, nested loops
CONTROL_DEFAULT = (150, 200)                             # one pipelined loop nest, its counters and FSM
INTERFACE = {"m_axi bundle": (1500, 2000), "s_axilite": (300, 400)}


def dsp_family(part: str) -> str:
    """``dsp58`` for Versal parts, ``dsp48e2`` otherwise."""
    return "dsp58" if part.lower().startswith(VERSAL_PREFIXES) else "dsp48e2"


def _slices(bits: int, port: int) -> list[int]:
    """Lowest bit of each slice of a signed ``bits``-bit operand on a ``port``-bit signed port."""
    n = 1 if bits <= port else 1 + math.ceil((bits - port) / (port - 1))
    return [i * (port - 1) for i in range(n)]


def mult_dsps(a: int, b: int, family: str = "dsp48e2", keep: int | None = None) -> int:
    """DSP slices for a signed a x b product whose low ``keep`` bits are used (default all).

        >>> mult_dsps(17, 24), mult_dsps(24, 24), mult_dsps(64, 64, keep=64)
        (1, 2, 8)
    """
    p, q = DSP_PORTS[family]
    if (a <= p and b <= q) or (a <= q and b <= p):
        return 1
    keep = a + b if keep is None else keep

    def pairs(x, y):
        return sum(1 for i in _slices(x, p) for j in _slices(y, q) if i + j < keep)
    return min(pairs(a, b), pairs(b, a))


def bram36(depth: int, width: int) -> int:
    """BRAM36 blocks for one array bank (0: LUTRAM / registers by the size assumption).

        >>> bram36(32768, 24), bram36(64, 17), bram36(1025, 32)
        (24, 0, 2)
    """
    if depth <= 0 or width <= 0 or depth * width <= LUTRAM_MAX_BITS or depth <= LUTRAM_MAX_DEPTH:
        return 0
    return min(math.ceil(depth / d) * math.ceil(width / w) for d, w in BRAM36_SHAPES)


@dataclass
class Cost:
    """One row of the estimate, built up item by item; ``items`` says why each count is there."""
    dsp: int = 0
    bram36: int = 0
    uram: int = 0
    lut: int = 0
    ff: int = 0
    macs_per_cycle: int = 0
    items: list = field(default_factory=list)

    def mult(self, n: int, a: int, b: int, family: str, what: str, keep: int | None = None, acc: int = 0,
             macs: int = 1) -> None:
        """n multipliers a x b (each doing ``macs`` MACs into an ``acc``-bit accumulator when acc > 0)."""
        k = mult_dsps(a, b, family, keep)
        kept = min(keep or a + b, a + b)
        self.dsp += n * k
        self.lut += n * ((k - 1) * kept + macs * acc)
        self.ff += n * ((k - 1) * kept + a + b + macs * acc)
        if acc:
            self.macs_per_cycle += n * macs
        self.items.append(f"{n} x {what} {a}x{b}{f'->{keep}' if keep else ''}: {k} DSP each")

    def array(self, what: str, depth: int, width: int, banks: int = 1) -> None:
        per = bram36(depth, width)
        self.bram36 += banks * per
        if per == 0:
            self.lut += banks * math.ceil(depth / 64) * width
        self.items.append(f"{what} {banks} x [{depth} x {width}b]: "
                          + (f"{per} BRAM36 each" if per else "LUTRAM"))

    def uram_array(self, what: str, depth: int, width: int) -> None:
        """An array bound to UltraRAM (BIND_STORAGE impl=uram): blocks of 4K x 72 bits."""
        n = math.ceil(depth / 4096) * math.ceil(width / 72)
        self.uram += n
        self.items.append(f"{what} [{depth} x {width}b]: {n} URAM288")

    def divider(self, n: int, bits: int, what: str) -> None:
        self.lut += n * bits * bits
        self.ff += n * 2 * bits * bits
        self.items.append(f"{n} x {bits}-bit divider ({what}): LUT")

    def logic(self, lut: int, ff: int, what: str) -> None:
        self.lut += lut
        self.ff += ff
        self.items.append(what)


@dataclass(frozen=True)
class Ctx:
    family: str        # dsp48e2 | dsp58
    act_width: int


# --- per-kernel rules: (layer, ctx) -> Cost --------------------------------------------------------
def _matmat(layer: L.MatMat, ctx: Ctx) -> Cost:
    c, w, xw, fam = Cost(), layer.w, layer.x_width, ctx.family
    if layer.pack2:
        c.mult(layer.chain, xw + 2 * w.val_bits, xw, fam, "packed weight pair x activation (mac2)",
               acc=layer.acc_bits, macs=2)
    else:
        c.mult(layer.chain, w.val_bits, xw, fam, "weight x activation", acc=layer.acc_bits)
    c.mult(1, layer.acc_bits, 32, fam, "group sum x scale", keep=layer.acc_bits)
    banks = min(layer.chain, w.n_kept)
    c.array("wrow", 2 * math.ceil(w.n_kept / banks), w.val_bits, banks)
    c.array("col", math.ceil(w.n_kept / banks), 16, banks)
    c.array("scale", 2 * w.n_groups, 32)
    if w.lut is not None:
        c.array("code lut", 1 << w.w_bits, 32)
    return c


def _conv(layer: C.Conv, ctx: Ctx) -> Cost:
    c, w, xw, fam = Cost(), layer.w, layer.x_width, ctx.family
    c.mult(layer.chain, w.val_bits, xw, fam, "weight x window element", acc=layer.acc_bits)
    c.mult(1, layer.acc_bits, 32, fam, "group sum x scale", keep=layer.acc_bits)
    banks = min(layer.chain, w.n_kept)
    c.array("wrow", math.ceil(w.n_kept / banks), w.val_bits, banks)
    c.array("col", math.ceil(w.n_kept / banks), 16, banks)
    c.array("scale", w.n_groups, 32)
    if w.lut is not None:
        c.array("code lut", 1 << w.w_bits, 32)
    span_h = (layer.filt[0] - 1) * layer.dil[0] + 1
    scan_w = (layer.out_hw[1] - 1) * layer.stride[1] + (layer.filt[1] - 1) * layer.dil[1] + 1
    c.array("line buffer", scan_w * (layer.shape[1] // layer.groups), xw, span_h)
    c.array("window", w.n_in, xw)
    return c


def _matmul(layer: L.Matmul, ctx: Ctx) -> Cost:
    c = Cost()
    c.mult(layer.chain, ctx.act_width, ctx.act_width, ctx.family, "activation x activation", acc=WIDE)
    return c


def _table(layer, c: Cost, fam: str) -> None:
    t, _, step_shift = layer._params()
    c.mult(1, TABLE_BITS + 1, max(step_shift, 1), fam, "table interpolation")
    c.array("table ROM", len(t), TABLE_BITS)


def _lut(layer: L.Lut, ctx: Ctx) -> Cost:
    c, fam = Cost(), ctx.family
    _table(layer, c, fam)
    return c


def _softmax(layer: L.Softmax, ctx: Ctx) -> Cost:
    c, fam = Cost(), ctx.family
    _table(layer, c, fam)
    c.mult(1, WIDE, WIDE, fam, "e * recip", keep=WIDE)
    c.divider(1, WIDE, "2^62 / sum")
    c.array("e", layer.n, WIDE)
    return c


def _norm(layer: L.Norm, ctx: Ctx) -> Cost:
    c, fam = Cost(), ctx.family
    c.mult(3, WIDE, WIDE, fam, "d^2, d*rcp, z*gamma", keep=WIDE)
    c.divider(3, WIDE, "sum / n, sum_sq / n, 2^62 / sqrt")
    c.logic(3 * WIDE, 3 * WIDE, "isqrt64: 64-bit compare-subtract")
    return c


def _binary(layer: L.Binary, ctx: Ctx) -> Cost:
    c, fam = Cost(), ctx.family
    if layer.op == "mul":
        c.mult(1, WIDE, WIDE, fam, "a * b", keep=WIDE)
    elif layer.op == "div":
        c.divider(1, WIDE, "a / b")
    else:
        c.logic(WIDE, WIDE, f"{layer.op}: one 64-bit adder")
    return c


def _moves(layer, ctx: Ctx) -> Cost:
    """Data movement, compares and adders only."""
    return Cost()


def _pow(layer: P.PowInt, ctx: Ctx) -> Cost:
    c = Cost()
    c.mult(1, ctx.act_width, ctx.act_width, ctx.family, f"x^{layer.exponent}: one product per step")
    return c


def _rsqrt(layer, ctx: Ctx) -> Cost:
    c = Cost()
    c.divider(1, WIDE, "2^62 / sqrt")
    c.logic(3 * WIDE, 3 * WIDE, "isqrt64: 64-bit compare-subtract")
    return c


def _sqrt(layer, ctx: Ctx) -> Cost:
    c = Cost()
    c.logic(3 * WIDE, 3 * WIDE, "isqrt64: 64-bit compare-subtract")
    return c


def _topk(layer: R.TopK, ctx: Ctx) -> Cost:
    c = Cost()
    c.logic(2 * WIDE, WIDE + 32, "top-k: one 64-bit compare pair (beats, ties) and a rank counter")
    return c


def _running_sum(layer, ctx: Ctx) -> Cost:
    c = Cost()
    if not isinstance(layer, R.ScatterRows) or layer.accumulate:
        c.logic(WIDE, WIDE, "one 64-bit adder and its register")
    return c


def _rope(layer: D.Rope, ctx: Ctx) -> Cost:
    c = Cost()
    c.mult(2, ctx.act_width, ctx.act_width, ctx.family, "x cos and its partner's sin, a channel a cycle", keep=WIDE)
    return c


def _attention(layer: D.Attention, ctx: Ctx) -> Cost:
    """A key row a cycle (q . k over every channel at once), then the softmax of nf::softmax over
    the visible slots, then one product a cycle for the weighted sum of value rows."""
    c, fam, d = Cost(), ctx.family, layer.shape[3]
    c.mult(d, ctx.act_width, ctx.act_width, fam, "q x k, every channel of a key row", acc=WIDE)
    c.mult(1, WIDE, WIDE, fam, "score x scale", keep=WIDE)
    _table(layer, c, fam)
    c.mult(1, WIDE, WIDE, fam, "e * recip", keep=WIDE)
    c.divider(1, WIDE, "2^62 / sum")
    c.mult(1, WIDE, ctx.act_width, fam, "p x v", acc=WIDE)
    c.array("scores", layer.max_len, WIDE)
    c.array("probabilities", layer.max_len, WIDE)
    c.logic(d * WIDE, d * WIDE, "the query row in registers")
    return c


def _kv8_write(layer: K.Kv8Write, ctx: Ctx) -> Cost:
    """A channel a cycle: its |x| into the group max, then its code by the group's reciprocal; per
    group the float16 scale (a leading-one count and a division by 127) and the reciprocal."""
    c, fam = Cost(), ctx.family
    c.mult(1, ctx.act_width, 31, fam, "|x| x the group's reciprocal", keep=WIDE)
    c.divider(1, WIDE, "the scale's mantissa: n 2^s / 127, once per group")
    c.divider(1, 41, "2^40 / m, the group's reciprocal")
    c.logic(2 * WIDE, 2 * WIDE, "group max and leading-one count")
    c.array("a row's codes", layer.shape[3], 8)
    return c


def _kv8_attention(layer: K.Kv8Attention, ctx: Ctx) -> Cost:
    """nf::attention's datapath, each key and value first multiplied out of its code and its
    group's float16 mantissa (8 x 11 bits) and shifted by the exponent."""
    c, d = _attention(layer, ctx), layer.shape[3]
    c.mult(d, 8, 11, ctx.family, "code x scale mantissa, every channel of a key row")
    c.mult(1, 8, 11, ctx.family, "code x scale mantissa, a value a cycle")
    c.logic(2 * (d + 1) * WIDE, 0, "a shifter per dequantised value (the scale's exponent)")
    return c


RESOURCE_COSTS = {
    D.Rope: _rope, D.KvWrite: _moves, D.Attention: _attention, K.Kv8Write: _kv8_write,
    K.Kv8Attention: _kv8_attention,
    L.MatMat: _matmat, L.Matmul: _matmul, L.Lut: _lut, L.Softmax: _softmax, L.Norm: _norm, L.Binary: _binary,
    L.Relu: _moves, L.Clamp: _moves, L.Strided: _moves, L.Copy: _moves, L.Fanout2: _moves,
    L.Embedding: _moves, L.Fill: _moves, L.Const: _moves, G.Ewise: _moves, G.Reduce: _moves, G.Gather: _moves, G.Sqrt: _sqrt,
    R.TopK: _topk, R.Cumsum: _running_sum, R.ScatterRows: _running_sum, R.Floor: _moves, R.TakeRows: _moves,
    R.GatherAxis: _moves,
    L.Concat: _moves, P.Neg: _moves, P.PowInt: _pow, P.Rsqrt: _rsqrt, C.Conv: _conv, C.MaxPool: _moves, C.Pad: _moves,
}
KERNELS = {L.MatMat: "matmat", C.Conv: "conv", L.Matmul: "matmul"}


def _layer_cost(layer, ctx: Ctx) -> tuple[Cost, bool]:
    """(cost, has a rule); Alias emits no code; a layer type without a rule counts control only."""
    if isinstance(layer, L.Alias):
        return Cost(), True
    kernel = KERNELS.get(type(layer), "")
    if type(layer) in RESOURCE_COSTS:
        c, known = RESOURCE_COSTS[type(layer)](layer, ctx), True
    else:
        c, known = Cost(items=["no rule: control share only"]), False
    c.logic(*CONTROL.get(kernel, CONTROL_DEFAULT), "control (rough)")
    return c, known


def _row(name: str, kind: str, c: Cost, **extra) -> dict:
    return {"name": name, "kind": kind, **extra, "dsp": c.dsp, "bram36": c.bram36, "uram": c.uram, "lut": c.lut, "ff": c.ff,
            "macs_per_cycle": c.macs_per_cycle, "why": "; ".join(c.items)}


def estimate(plan, family: str | None = None, device: dict | None = None) -> dict:
    """Per-layer, per-buffer, interface and total DSP / BRAM36 / LUT / FF of the project ``plan`` makes.

    ``family``: ``dsp48e2`` or ``dsp58`` (default: from ``plan.opts.part``). ``device``: a target's
    ``[fpga]`` table (dsp, bram_36k, lut, ff) to add utilisation fractions.

        >>> est = estimate(nf.load(bundle.path).plan, device=nf.target("alveo-u280").fpga)
    """
    opts = plan.opts
    fam = family or dsp_family(opts.part)
    if fam not in DSP_PORTS:
        raise ValueError(f"unknown DSP family {fam!r}; known: {', '.join(DSP_PORTS)}")
    layers, unrated = [], []
    for layer in plan.layers:
        c, known = _layer_cost(layer, Ctx(fam, opts.act_width))
        if not known:
            unrated.append(f"{layer.name} ({type(layer).__name__})")
        layers.append(_row(layer.name, type(layer).__name__, c, node=layer.node))
    width = {"act": opts.act_width, "int": 32, "bool": 1}
    copies = 2 if opts.dataflow else 1
    buffers = []
    for buf, n in plan.pool.items():
        c = Cost()
        if plan.in_uram(buf):
            c.uram_array("buffer (BIND_STORAGE impl=uram)", n, width[plan.buf_kinds.get(buf, "act")])
        else:
            c.array("ping-pong channel" if opts.dataflow else "buffer", n, width[plan.buf_kinds.get(buf, "act")], copies)
        buffers.append(_row(buf, "buffer", c, elements=n))
    c = Cost()
    bundles = 3 if plan.kv else 2          # gmem2: a decoder's KV cache memory
    c.logic(bundles * INTERFACE["m_axi bundle"][0] + INTERFACE["s_axilite"][0],
            bundles * INTERFACE["m_axi bundle"][1] + INTERFACE["s_axilite"][1],
            "m_axi gmem0 (weights) + gmem1 (ports)" + (" + gmem2 (KV cache)" if bundles == 3 else "")
            + " + s_axilite control (rough); burst FIFOs not counted")
    interface = _row("interface", "interface", c)
    rows = layers + buffers + [interface]
    total = {k: sum(r[k] for r in rows) for k in ("dsp", "bram36", "uram", "lut", "ff", "macs_per_cycle")}
    out = {"method": "analytic estimate from the layer configs (nnforge.backends.hls.resources); not a synthesis "
                     "report: DSP and BRAM by explicit counting rules, LUT and FF rough",
           "part": opts.part, "dsp_family": fam, "dsp_ports": list(DSP_PORTS[fam]),
           "layers": layers, "buffers": buffers, "interface": interface, "total": total, "unrated": unrated}
    if device:
        keys = {"dsp": "dsp", "bram36": "bram_36k", "uram": "uram", "lut": "lut", "ff": "ff"}
        out["utilisation"] = {k: total[k] / device[d] for k, d in keys.items() if device.get(d)}
    return out


def format_estimate(est: dict) -> str:
    """The estimate as a text table (one line per layer call, buffer and the interface, then the total)."""
    head = f"{'name':<24} {'kind':<10} {'DSP':>6} {'BRAM36':>7} {'URAM':>5} {'LUT~':>9} {'FF~':>9} {'MAC/cyc':>8}"
    lines = [f"resource estimate ({est['dsp_family']}, {est['part']}): {est['method']}", head, "-" * len(head)]
    for r in est["layers"] + est["buffers"] + [est["interface"]]:
        lines.append(f"{r['name'][:24]:<24} {r['kind'][:10]:<10} {r['dsp']:>6} {r['bram36']:>7} {r['uram']:>5} {r['lut']:>9} "
                     f"{r['ff']:>9} {r['macs_per_cycle']:>8}")
    t = est["total"]
    lines += ["-" * len(head), f"{'total':<24} {'':<10} {t['dsp']:>6} {t['bram36']:>7} {t['uram']:>5} {t['lut']:>9} {t['ff']:>9} "
                                f"{t['macs_per_cycle']:>8}"]
    if "utilisation" in est:
        lines.append("utilisation: " + ", ".join(f"{k} {v:.2%}" for k, v in est["utilisation"].items()))
    if est["unrated"]:
        lines.append("no rule (control share only): " + ", ".join(est["unrated"]))
    lines.append("LUT~ / FF~: rough (uncalibrated constants); only csynth gives real figures")
    return "\n".join(lines)
