"""Tables and plots of a simulation (the plots are drawn by nnforge.plots).

    >>> print(format_table(result)); write_plots(result, "out/")
"""
from __future__ import annotations

from pathlib import Path


def format_table(r) -> str:
    """Latency, throughput, resources and energy of one SimResult, as aligned text."""
    p = r.params
    lines = [f"{r.workload} on {r.target} ({p.clock_hz / 1e6:.0f} MHz, HBM {p.hbm_bytes_per_s / 1e9:.0f} GB/s x "
             f"{p.hbm_efficiency:.2f}; parameters from {p.path})",
             f"  prompt {r.prompt} tokens, generate {r.generate} tokens",
             f"  compression assumed: {r.compression or 'not stated'}",
             f"  {'prefill latency':<28}{1e3 * r.prefill_s:>12.3f} ms",
             f"  {'prefill throughput':<28}{r.prefill_tokens_per_s:>12.1f} tokens/s"]
    if r.generate:          # an encoder (generate 0) has no decode phase to report
        lines += [f"  {'decode latency per token':<28}{1e3 * r.decode_latency_s:>12.2f} ms",
                  f"  {'decode throughput':<28}{r.decode_tokens_per_s:>12.1f} tokens/s"]
    lines.append(f"  {'end-to-end':<28}{1e3 * r.total_s:>12.3f} ms")
    e = r.energy_j_per_token
    lines.append(f"  {'energy per generated token':<28}" + (f"{e:>12.3f} J  (board power {r.power_w:g} W)"
                                                              if e is not None else f"{'n/a':>12}"))
    lines.append(f"  {'resource':<10}{'used':>16}{'device':>16}{'use':>8}")
    for name, (used, total) in r.resources.items():
        lines.append(f"  {name:<10}{used:>16,}{total:>16,}{100 * used / total:>7.1f}%")
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


def plot_files(r) -> dict[str, bytes]:
    """The roofline and time-breakdown figures of one result (nnforge.plots), as
    {"roofline.svg": bytes, "roofline.png": ..., "breakdown.svg": ..., "breakdown.png": ...}."""
    from .. import plots
    figures = {"roofline": plots.roofline_figure([r]), "breakdown": plots.breakdown_figure(r)}
    return {name + suffix: data for name, fig in figures.items() for suffix, data in plots.render(fig).items()}


def write_plots(r, out) -> list[Path]:
    """Write the roofline and breakdown figures of one result into `out`, each as .svg and .png,
    named after the workload and target; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{r.workload}-{r.target}".replace("/", "_")
    paths = []
    for name, data in plot_files(r).items():
        paths.append(out / f"{stem}-{name}")
        paths[-1].write_bytes(data)
    return paths
