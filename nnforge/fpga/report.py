"""Tables and plots of a simulation. Plots are plain SVG written by hand (no plotting library is a
dependency of nnforge; benchmarks/compression.py does the same).

    >>> print(format_table(result)); write_plots(result, "out/")
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path


def format_table(r) -> str:
    """Latency, throughput, resources and energy of one SimResult, as aligned text."""
    p = r.params
    lines = [f"{r.workload} on {r.target} ({p.clock_hz / 1e6:.0f} MHz, HBM {p.hbm_bytes_per_s / 1e9:.0f} GB/s x "
             f"{p.hbm_efficiency:.2f}; parameters from {p.path})",
             f"  prompt {r.prompt} tokens, generate {r.generate} tokens",
             f"  compression assumed: {r.compression or 'not stated'}",
             f"  {'prefill latency':<28}{1e3 * r.prefill_s:>12.3f} ms"]
    if r.generate:          # an encoder (generate 0) has no decode phase to report
        lines += [f"  {'decode latency per token':<28}{1e3 * r.decode_latency_s:>12.2f} ms",
                  f"  {'decode throughput':<28}{r.decode_tokens_per_s:>12.1f} tokens/s"]
    lines.append(f"  {'end-to-end':<28}{1e3 * r.total_s:>12.3f} ms")
    e = r.energy_j_per_token
    lines.append(f"  {'energy per generated token':<28}" + (f"{e:>12.3f} J  (board power {r.power_w:g} W)"
                                                              if e is not None else f"{'n/a':>12}"))
    lines.append(f"  {'resource':<10}{'used':>12}{'device':>12}{'use':>8}")
    for name, (used, total) in r.resources.items():
        lines.append(f"  {name:<10}{used:>12,}{total:>12,}{100 * used / total:>7.1f}%")
    lines.append(f"  {'phase':<8}{'op':<22}{'GMAC':>10}{'MB HBM':>10}{'ms':>10}  bound")
    for phase, ops in (("prefill", r.prefill_ops), ("decode", r.decode_ops if r.generate else [])):
        for name, (macs, hbm, t, bound) in _by_name(ops).items():
            lines.append(f"  {phase:<8}{name:<22}{macs / 1e9:>10.2f}{hbm / 1e6:>10.1f}{1e3 * t:>10.3f}  {bound}")
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)


def _by_name(ops) -> dict:
    """Ops grouped by layer name (repeats already summed): (MACs, bytes, time, dominant bound)."""
    out = {}
    for o in ops:
        m, b, t, _ = out.get(o.name, (0.0, 0.0, 0.0, ""))
        out[o.name] = (m + o.macs, b + o.hbm_bytes, t + o.time_s, o.bound if o.kind in ("linear", "attention") else "-")
    return out


def _svg_head(w: int, h: int) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
            f'font-size="11">', f'<rect width="{w}" height="{h}" fill="white"/>']


def roofline_svg(results) -> str:
    """Log-log roofline (MAC/byte against GMAC/s) of each result's ops, with the MM and MV ceilings
    and the sustained-HBM slope of the first result's target."""
    results = list(results)
    p = results[0].params
    w, h, m = 760, 480, 70
    bw = p.hbm_sustained_bytes_per_s
    peaks = {"MM (prefill)": p.mm_macs_per_cycle * p.clock_hz, "MV (decode)": p.mv_macs_per_cycle * p.clock_hz}
    pts = []
    for r in results:
        for phase, ops in (("prefill", r.prefill_ops), ("decode", r.decode_ops if r.generate else [])):
            macs = sum(o.macs for o in ops if o.kind in ("linear", "attention"))
            hbm = sum(o.hbm_bytes for o in ops if o.kind in ("linear", "attention"))
            t = sum(o.time_s for o in ops)
            if macs and hbm and t:
                pts.append((f"{r.workload} {phase}", macs / hbm, macs / t))
    xs = [x for _, x, _ in pts] + [0.1, 1e4]
    x0, x1 = math.log10(min(xs)), math.log10(max(xs))
    y1 = math.log10(max(peaks.values()) * 2)
    y0 = y1 - 5

    def xy(ai, perf):
        return (m + (w - 2 * m) * (math.log10(ai) - x0) / (x1 - x0),
                h - m - (h - 2 * m) * (math.log10(max(perf, 10 ** y0)) - y0) / (y1 - y0))

    parts = _svg_head(w, h) + [
        f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
        f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
        f'<text x="{w / 2}" y="{h - 25}" text-anchor="middle">arithmetic intensity (MAC per HBM byte, log)</text>',
        f'<text x="16" y="{h / 2}" transform="rotate(-90 16 {h / 2})" text-anchor="middle">MAC/s (log)</text>',
        f'<text x="{w / 2}" y="20" text-anchor="middle">roofline: {p.target} (sustained HBM {bw / 1e9:.0f} GB/s)</text>']
    for e in range(math.ceil(x0), math.floor(x1) + 1):
        x, _ = xy(10 ** e, 1)
        parts.append(f'<text x="{x:.0f}" y="{h - m + 15}" text-anchor="middle">1e{e}</text>')
    for e in range(math.ceil(y0), math.floor(y1) + 1):
        _, y = xy(1, 10 ** e)
        parts.append(f'<text x="{m - 5}" y="{y + 4:.0f}" text-anchor="end">1e{e}</text>')
    for i, (label, peak) in enumerate(peaks.items()):
        knee = peak / bw
        (ax, ay), (kx, ky), (ex, ey) = xy(10 ** x0, 10 ** x0 * bw), xy(knee, peak), xy(10 ** x1, peak)
        colour = ("#c33", "#369")[i]
        parts.append(f'<polyline points="{ax:.1f},{ay:.1f} {kx:.1f},{ky:.1f} {ex:.1f},{ey:.1f}" fill="none" '
                     f'stroke="{colour}"/>')
        parts.append(f'<text x="{ex - 4:.0f}" y="{ey - 5:.0f}" text-anchor="end" fill="{colour}">{label} '
                     f'{peak / 1e12:.2f} TMAC/s</text>')
    for label, ai, perf in pts:
        x, y = xy(ai, perf)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#333"/>')
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 12:.1f}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def breakdown_svg(r) -> str:
    """Horizontal bars: share of prefill and of one decode step taken by each op kind / layer name."""
    w, h = 760, 120 + 30 * 2
    parts = _svg_head(w, h) + [f'<text x="{w / 2}" y="20" text-anchor="middle">time per op: {r.workload} on '
                               f'{r.target}</text>']
    palette = ["#369", "#c33", "#393", "#963", "#639", "#399", "#933", "#669", "#996", "#666"]
    names = defaultdict(int)
    for o in r.prefill_ops + r.decode_ops:
        names[o.name if o.kind != "linear" or len(names) < 8 else "other linears"] += 0
    colours = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    left, width = 80, w - 120
    for row, (phase, ops) in enumerate((("prefill", r.prefill_ops), ("decode", r.decode_ops))):
        total = sum(o.time_s for o in ops) or 1.0
        y, x = 40 + 40 * row, float(left)
        parts.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{phase}</text>')
        for o in ops:
            dx = width * o.time_s / total
            key = o.name if o.name in colours else "other linears"
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{dx:.1f}" height="22" fill="{colours[key]}">'
                         f'<title>{o.name}: {1e3 * o.time_s:.3f} ms ({o.bound})</title></rect>')
            x += dx
        parts.append(f'<text x="{left + width + 4}" y="{y + 15}">{1e3 * total:.1f} ms</text>')
    for i, (n, c) in enumerate(colours.items()):
        x, y = left + (i % 5) * 130, 130 + 18 * (i // 5)
        parts.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{c}"/><text x="{x + 14}" y="{y}">{n}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_plots(r, out) -> list[Path]:
    """Write roofline.svg and breakdown.svg for one result into `out`; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{r.workload}-{r.target}".replace("/", "_")
    paths = [out / f"{stem}-roofline.svg", out / f"{stem}-breakdown.svg"]
    paths[0].write_text(roofline_svg([r]))
    paths[1].write_text(breakdown_svg(r))
    return paths
