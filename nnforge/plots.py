"""nnforge's figures, drawn with matplotlib: SQNR by layer (``nnforge inspect --compare --plot``),
the FPGA roofline and time breakdown (``nnforge simulate --plots``, every FPGA bundle) and the
size/fidelity Pareto plot (benchmarks/compression.py). Each figure is written as SVG and PNG, the
same bytes on every run, since bundles are hashed and compared. Import it lazily (matplotlib is
slow to import): ``import nnforge`` does not load it.

    >>> from nnforge import plots
    >>> plots.save(plots.roofline_figure([result]), "out/roofline.svg")   # and out/roofline.png
"""
from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter
from matplotlib.transforms import Bbox

from .errors import UsageError

FORMATS = (".svg", ".png")
# svg.hashsalt fixes the ids matplotlib would otherwise draw at random; text stays text in the SVG
# (searchable, small) and falls back to any sans-serif font where DejaVu Sans is missing.
_STYLE = {"svg.hashsalt": "nnforge", "svg.fonttype": "none", "font.family": "sans-serif", "font.size": 9,
          "axes.titlesize": 11, "axes.labelsize": 9, "legend.fontsize": 8, "axes.spines.top": False,
          "axes.spines.right": False, "figure.dpi": 100, "savefig.dpi": 150, "svg.image_inline": True}
# no date, and one fixed producer name, so that a bundle's figures hash the same on every compile
_METADATA = {"svg": {"Date": None, "Creator": "nnforge"}, "png": {"Software": "nnforge"}}
_OTHER = "#9a9a9a"
# tab10 without its grey, which marks "other"
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]


def _styled(fn):
    """Build the figure under nnforge's style (fonts are fixed when text is created)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_STYLE):
            return fn(*args, **kwargs)
    return wrapper


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)                           # the renderer that measures text for label placement
    return fig


# --- writing --------------------------------------------------------------------------------------
def render(fig: Figure) -> dict[str, bytes]:
    """The figure as {".svg": bytes, ".png": bytes}, reproducible byte for byte."""
    out = {}
    with matplotlib.rc_context(_STYLE):
        for suffix in FORMATS:
            buf = io.BytesIO()
            fig.savefig(buf, format=suffix[1:], metadata=_METADATA[suffix[1:]])
            out[suffix] = buf.getvalue()
    return out


def paths(path) -> list[Path]:
    """The two files a figure asked for as ``path`` is written to: ``path`` itself (.svg or .png) and
    the other format beside it; a path without a suffix gets both."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix and suffix not in FORMATS:
        raise UsageError(f"{path}: a figure is written as .svg and .png; give a file name ending in one of "
                         "them (the other is written beside it)")
    first = suffix or FORMATS[0]
    return [path.with_suffix(first)] + [path.with_suffix(s) for s in FORMATS if s != first]


def save(fig: Figure, path) -> list[Path]:
    """Write ``fig`` to ``path`` and, beside it, in the other format (:func:`paths`); returns both."""
    data = render(fig)
    out = paths(path)
    out[0].parent.mkdir(parents=True, exist_ok=True)
    for p in out:
        p.write_bytes(data[p.suffix.lower()])
    return out


# --- helpers --------------------------------------------------------------------------------------
def _short(name: str, width: int = 36) -> str:
    """A long node name cut in the middle, where names repeat least."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[-(width - 1 - head):]


def _time_unit(seconds: float) -> tuple[float, str]:
    """The scale and unit a duration reads best in."""
    return (1e6, "µs") if seconds < 1e-3 else (1e3, "ms") if seconds < 10 else (1.0, "s")


def _duration(seconds: float) -> str:
    scale, unit = _time_unit(seconds)
    v = scale * seconds
    return f"{v:.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}" if v >= 10 else f"{v:.3g} {unit}"


def _log_label(v: float, _pos=None, unit: str = "") -> str:
    """Tick label on a log axis: 1, 2 and 5 times a power of ten, the rest left blank; with a unit,
    in engineering notation (2 T, 500 G)."""
    if v <= 0:
        return ""
    e = math.floor(math.log10(v) + 1e-9)
    if round(v / 10 ** e, 6) not in (1, 2, 5):
        return ""
    if not unit:
        return f"{v:g}"
    e3 = 3 * math.floor(e / 3)
    return f"{v / 10 ** e3:g}{unit}{dict(zip(range(-12, 16, 3), 'pnµm kMGTP'))[e3]}".rstrip()


def _place_labels(fig: Figure, ax, points: list[tuple[float, float, str]], **text) -> None:
    """Label each (x, y) point with text beside it, trying a few spots around the point and taking
    the first that overlaps no label placed before (a greedy pass: good enough for tens of points)."""
    fig.draw_without_rendering()                   # the layout settles, so display positions hold
    renderer = fig.canvas.get_renderer()
    spots = [(5, 3, "left", "bottom"), (5, -3, "left", "top"), (-5, 3, "right", "bottom"),
             (-5, -3, "right", "top"), (0, 8, "center", "bottom"), (0, -8, "center", "top")]
    spots = [(dx * (1 + far), dy * (1 + 2 * far), ha, va) for far in range(4) for dx, dy, ha, va in spots]
    inside = ax.get_window_extent(renderer)
    r = 4 * fig.dpi / 72                           # the markers, which no label may hide
    taken = [Bbox.from_extents(px - r, py - r, px + r, py + r)
             for px, py in ax.transData.transform([(x, y) for x, y, _ in points])]
    for x, y, label in sorted(points, key=lambda p: (-p[1], p[0])):
        for spot in spots + [None]:                # None: no spot is free, take the first anyway
            dx, dy, ha, va = spot or spots[0]
            ann = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                              bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75}, **text)
            ann.set_in_layout(False)
            box = ann.get_window_extent(renderer)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if spot is None or (fits and not any(box.overlaps(t) for t in taken)):
                break
            ann.remove()
        taken.append(box.expanded(1.04, 1.15))


# --- SQNR by layer --------------------------------------------------------------------------------
@_styled
def sqnr_figure(report) -> Figure:
    """SQNR against fp32 of every value a divergence report compares, in graph order: the
    compressed run (line), each weight layer's own error (dots), the runtime's values where it was
    inspected (dashed) and its first departure from the reference interpreter (red). The x axis is
    labelled with the weight layers' names (thinned to at most 60); exact values (infinite SQNR),
    if any, are drawn on a line at the top marked "exact"; the limits are fitted to the values."""
    rows = report.rows
    layers = [i for i, r in enumerate(rows) if r.weight is not None]
    runtime = [(i, r.backend["sqnr_db_vs_fp32"]) for i, r in enumerate(rows) if r.backend]
    drawn = [r.sqnr_db for r in rows] + [rows[i].own_sqnr_db for i in layers] + [v for _, v in runtime]
    finite = [v for v in drawn if math.isfinite(v)] or [0.0]
    span = max(max(finite) - min(finite), 1.0)
    exact = any(math.isinf(v) for v in drawn)
    top = max(finite) + 0.12 * span               # where exact values are drawn, when there are any

    def cap(v: float) -> float:
        return top if math.isinf(v) else v
    ticks = layers or list(range(len(rows)))
    every = max(1, math.ceil(len(ticks) / 60))
    ticks = ticks[::every]
    fig = _figure(min(20.0, max(8.0, 2.5 + 0.16 * len(ticks))), 5.6)
    ax = fig.add_subplot()
    if exact:
        ax.axhline(top, color="#cccccc", lw=0.8, ls=":")
    ax.plot(range(len(rows)), [cap(r.sqnr_db) for r in rows], color=_PALETTE[0], lw=1.3,
            label="compressed run vs fp32")
    if layers:
        ax.plot(layers, [cap(rows[i].own_sqnr_db) for i in layers], "o", color=_PALETTE[1], ms=4, zorder=3,
                label="weight layer's own error vs fp32")
    if runtime:
        ax.plot([i for i, _ in runtime], [cap(v) for _, v in runtime], color="#555555", lw=1.0, ls="--",
                label=f"runtime ({report.backend.get('name', report.backend_name)}) vs fp32")
    dep = report.first_departure
    if dep is not None:
        ax.axvline(rows.index(dep), color=_PALETTE[3], lw=1.2, label=f"first departure: {_short(dep.node)}")
    ax.set_ylim(min(finite) - 0.06 * span, (top if exact else max(finite)) + 0.06 * span)
    if exact:
        yticks = [t for t in ax.get_yticks() if t < top - 0.06 * span] + [top]
        ax.set_yticks(yticks, [f"{t:g}" for t in yticks[:-1]] + ["exact"])
        ax.set_ylim(min(finite) - 0.06 * span, top + 0.06 * span)
    ax.set_xlim(-0.5, max(len(rows) - 0.5, 0.5))
    ax.set_xticks(ticks, [_short(rows[i].node, 44) for i in ticks], rotation=90, fontsize=7)
    ax.grid(axis="y", color="#e5e5e5", lw=0.6)
    ax.set_ylabel("SQNR vs fp32 (dB, higher is closer)")
    thinned = f", every {every}th named" if every > 1 else ""
    ax.set_xlabel(f"{len(rows)} values in graph order (ticks: {'weight layers' if layers else 'values'}{thinned})")
    ax.set_title(f"SQNR vs fp32 by value: {report.recipe} on {report.target}")
    ax.legend(loc="best", framealpha=0.9)
    return fig


# --- FPGA -----------------------------------------------------------------------------------------
def _phases(result) -> list[tuple[str, list]]:
    out = [(f"prefill of {result.prompt} tokens", result.prefill_ops)]
    if result.generate and result.decode_ops:       # an encoder (generate 0) has no decode phase
        out.append(("one decode step (mean context)", result.decode_ops))
    return out


@_styled
def breakdown_figure(result) -> Figure:
    """Where the FPGA's time goes: one stacked bar per phase (prefill, one decode step), one colour
    per op (the nine that take the largest share of a phase; the rest together as "other"), with
    each phase's total in its panel's title and each op's share on its segment."""
    phases = _phases(result)
    share: dict[str, float] = {}
    for _, ops in phases:
        total = sum(o.time_s for o in ops) or 1.0
        for o in ops:
            share[o.name] = max(share.get(o.name, 0.0), o.time_s / total)
    named = sorted(share, key=lambda n: -share[n])[:len(_PALETTE)]
    colours = {n: _PALETTE[i] for i, n in enumerate(named)}
    fig = _figure(9.0, 1.2 + 1.25 * len(phases))
    axes = fig.subplots(len(phases), 1, squeeze=False)[:, 0]
    for ax, (label, ops) in zip(axes, phases):
        times: dict[str, float] = {}
        for o in ops:
            key = o.name if o.name in colours else "other"
            times[key] = times.get(key, 0.0) + o.time_s
        total = sum(times.values())
        scale, unit = _time_unit(total)
        left = 0.0
        for key in named + ["other"]:
            t = times.get(key, 0.0)
            if t <= 0:
                continue
            ax.barh(0, scale * t, left=scale * left, height=0.6, color=colours.get(key, _OTHER), edgecolor="white",
                    lw=0.6)
            if t >= 0.04 * total:
                ax.text(scale * (left + t / 2), 0, f"{100 * t / total:.0f}%", ha="center", va="center",
                        color="white", fontsize=8, fontweight="bold")
            left += t
        ax.set_xlim(0, scale * total if total else 1.0)
        ax.set_yticks([])
        ax.spines["left"].set_visible(False)
        ax.set_xlabel(unit)
        ax.set_title(f"{label}: {_duration(total)} in all", loc="left", fontsize=9)
    handles = [Patch(color=colours[n], label=n) for n in named]
    if any(o.name not in colours for _, ops in phases for o in ops):
        handles.append(Patch(color=_OTHER, label="other"))
    ncols = math.ceil(len(handles) / math.ceil(len(handles) / 6))
    handles = [handles[i] for c in range(ncols) for i in range(c, len(handles), ncols)]   # filled by columns
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, frameon=False)
    fig.suptitle(f"FPGA time per op: {result.workload} on {result.target}", fontsize=11)
    return fig


@_styled
def roofline_figure(results) -> Figure:
    """Log-log roofline of simulation results: each phase's linear and attention ops as one point
    (MAC per HBM byte against MAC/s), under the sustained-HBM slope and the MM (prefill) and MV
    (decode) engine ceilings of the first result's target. The limits are fitted to the points and
    the ceilings' knees, so no decade is empty."""
    results = list(results)
    targets = sorted({r.target for r in results})
    if len(targets) > 1:
        raise ValueError(f"a roofline is drawn under one target's ceilings; got results on {', '.join(targets)}: "
                         "draw one figure per target")
    p = results[0].params
    names = [r.workload for r in results]
    if len(set(names)) < len(names):               # the same model twice: its lengths tell them apart
        names = [f"{r.workload} ({r.prompt}+{r.generate} tokens)" for r in results]
    bw = p.hbm_sustained_bytes_per_s
    peaks = [("MM engine (prefill)", p.mm_macs_per_cycle * p.clock_hz, _PALETTE[3]),
             ("MV engine (decode)", p.mv_macs_per_cycle * p.clock_hz, _PALETTE[0])]
    points = []
    for r, workload in zip(results, names):
        for (label, ops), phase in zip(_phases(r), ("prefill", "decode")):
            mm = [o for o in ops if o.kind in ("linear", "attention")]
            macs, hbm, t = sum(o.macs for o in mm), sum(o.hbm_bytes for o in mm), sum(o.time_s for o in ops)
            if macs and hbm and t:
                name = phase if len(results) == 1 else f"{workload} {phase}"
                points.append((macs / hbm, macs / t, name))
    xs = [x for x, _, _ in points] + [peak / bw for _, peak, _ in peaks]
    x0, x1 = min(xs) / 2.5, max(xs) * 2.5
    y0 = min([y for _, y, _ in points] + [bw * x0 * 2]) / 2.5
    y1 = max(peak for _, peak, _ in peaks) * 1.8
    fig = _figure(7.5, 5.0)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    top_knee = max(peak for _, peak, _ in peaks) / bw
    ax.plot([x0, top_knee], [bw * x0, bw * top_knee], color="#555555", lw=1.2, ls="--",
            label=f"HBM sustained {bw / 1e9:.0f} GB/s")
    for label, peak, colour in peaks:
        knee = peak / bw
        ax.plot([knee, x1], [peak, peak], color=colour, lw=1.6, label=f"{label} {peak / 1e12:.2f} TMAC/s")
    for x, y, name in points:
        ax.plot([x], [y], "o", color="#222222", ms=6, zorder=3)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    for axis, unit in ((ax.xaxis, ""), (ax.yaxis, " ")):
        axis.set_major_formatter(FuncFormatter(functools.partial(_log_label, unit=unit)))
        axis.set_minor_formatter(FuncFormatter(functools.partial(_log_label, unit=unit)))
    ax.grid(which="both", color="#ececec", lw=0.5)
    ax.set_xlabel("arithmetic intensity (MAC per HBM byte)")
    ax.set_ylabel("attained MAC/s")
    ax.set_title(f"Roofline: {', '.join(dict.fromkeys(r.workload for r in results))} on {p.target}")
    ax.legend(loc="lower right", framealpha=0.9)
    _place_labels(fig, ax, [(x, y, f"{name}: {y / 1e12:.2f} TMAC/s") for x, y, name in points], fontsize=8)
    return fig


# --- Pareto ---------------------------------------------------------------------------------------
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
_ROUNDING = 1e-7          # 1 - cosine below this is float32 rounding: the point is drawn as exact


class _Nines:
    """The cosine axis of the Pareto plot: c drawn at -log10(1 - c), so that 0.9, 0.99, 0.999 are
    evenly spaced; exact points (1 - c under float32 rounding) one step above the closest other."""

    def __init__(self, cosines: list[float]):
        import numpy as np
        self.np = np
        inexact = [-math.log10(1 - c) for c in cosines if 1 - c >= _ROUNDING]
        self.exact = math.floor(max(inexact, default=0.0)) + 1

    def __call__(self, c):
        return -self.np.log10(self.np.maximum(1.0 - self.np.asarray(c, dtype=float), 10.0 ** -self.exact))

    def inverse(self, y):
        return 1.0 - 10.0 ** (-self.np.asarray(y, dtype=float))

    def ticks(self, lo: float, hi: float) -> list[tuple[float, str]]:
        """(cosine, label) between the drawn limits lo..hi: 0.9, 0.99, ..., the 0.97s between them
        when few decades are shown, and "exact" at the top."""
        out = [(float(self.inverse(self.exact)), "exact")]
        for k in range(math.floor(lo), self.exact):
            for m in (1, 3) if hi - lo < 4 and k > 0 else (1,):
                c = 1 - m * 10.0 ** -k
                label = f"{c:.{k}f}" if 1 <= k <= 5 else f"{c:g}" if k <= 0 else \
                    f"1 − {f'{m}·' if m > 1 else ''}10{str(-k).translate(_SUPERSCRIPT)}"
                if lo <= float(self(c)) <= hi:
                    out.append((c, label))
        if lo <= float(self(0.5)) <= hi and hi - lo < 4:
            out.append((0.5, "0.5"))
        return sorted(out)


@_styled
def pareto_figure(rows: list[dict], *, title: str, xlabel: str = "compressed layer bytes / fp32 bytes",
                  ylabel: str = "mean cosine vs fp32") -> Figure:
    """Size against fidelity: each row (``label`` or ``recipe``, ``ratio``, ``cosine_mean``,
    ``pareto``) a labelled point, the Pareto front joined. The cosine axis is in nines (0.9,
    0.99, ...) so that the close recipes do not pile up at the top; both axes are fitted to the data."""
    nines = _Nines([r["cosine_mean"] for r in rows])
    xs = [r["ratio"] for r in rows]
    ys = [float(nines(r["cosine_mean"])) for r in rows]
    xpad, ypad = 0.06 * ((max(xs) - min(xs)) or 1.0), 0.08 * ((max(ys) - min(ys)) or 1.0)
    fig = _figure(9.0, 6.0)
    ax = fig.add_subplot()
    ax.set_yscale("function", functions=(nines, nines.inverse))
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["ratio"])
    if len(front) > 1:
        ax.plot([r["ratio"] for r in front], [r["cosine_mean"] for r in front], color=_PALETTE[3], lw=1.2,
                ls="--", zorder=1)
    for on, colour, label in ((True, _PALETTE[3], "on the Pareto front"), (False, _PALETTE[0], "dominated")):
        pts = [r for r in rows if bool(r.get("pareto")) == on]
        if pts:
            ax.plot([r["ratio"] for r in pts], [r["cosine_mean"] for r in pts], "o", color=colour, ms=6,
                    zorder=3, label=label)
    lo, hi = min(ys) - ypad, max(ys) + ypad
    ax.set_xlim(min(xs) - xpad, max(xs) + xpad)
    ax.set_ylim(float(nines.inverse(lo)), float(nines.inverse(hi)))
    ticks = nines.ticks(lo, hi)
    ax.set_yticks([c for c, _ in ticks], [label for _, label in ticks])
    ax.yaxis.set_minor_locator(FixedLocator([]))
    ax.grid(color="#ececec", lw=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{ylabel} (axis in nines: 0.9, 0.99, 0.999, …)")
    ax.set_title(title)
    ax.legend(loc="best", framealpha=0.9)
    _place_labels(fig, ax, [(r["ratio"], r["cosine_mean"], _short(r.get("label", r["recipe"]), 36)) for r in rows],
                  fontsize=7.5)
    return fig
