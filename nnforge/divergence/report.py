"""The divergence report as people read it: the terminal table of ``nnforge inspect --compare``
and the SVG of SQNR by value (:func:`nnforge.divergence.compare_layers` makes the report)."""
from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Report


def _db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}"


def format_table(report: Report, top: int = 10) -> str:
    e = report.end_to_end
    lines = [f"divergence of {report.bundle} ({report.recipe}, target {report.target}) on inputs "
             f"{report.inputs}: end-to-end cosine {e['cosine_min']:.6f}, SQNR {_db(e['sqnr_db'])} dB",
             f"  {len(report.rows)} values compared, {len(report.layers)} weight layers; "
             f"the {min(top, len(report.layers))} that lose the most on their own:",
             f"  {'node':<44} {'op':<10} {'encoding':<24} {'SQNR':>6} {'own':>6} {'inher.':>6} {'cosine':>9} "
             f"{'share':>7}"]
    for r in report.worst(top):
        share = "" if r.share is None else f"{100 * r.share:6.1f}%"
        lines.append(f"  {r.node[:44]:<44} {r.op:<10} {(r.encoding or '')[:24]:<24} {_db(r.sqnr_db):>6} "
                     f"{_db(r.own_sqnr_db):>6} {_db(r.inherited_sqnr_db):>6} {r.cosine:9.6f} {share:>7}")
    a = report.attribution
    if a is not None:
        most = report.worst(min(top, 5), by="share")
        lines.append(f"  the {len(most)} with the largest shares of the end-to-end error: "
                     + ", ".join(f"{r.node} {100 * r.share:.1f}%" for r in most))
        lines.append(f"  shares of the end-to-end error: weights {100 * sum(s['share'] for s in a['weights']):.1f}%, "
                     f"not in the weights (activations, structure) {100 * a['residual']:.1f}%")
    b = report.backend
    if not b.get("inspected"):
        lines.append(f"  runtime ({b.get('name', report.backend_name)}): not inspected: {b.get('why')}")
    else:
        dep = report.first_departure
        seen = sum(1 for r in report.rows if r.backend)
        where = "none" if dep is None else (f"{dep.node} ({dep.op}): cosine vs reference "
                                            f"{dep.backend['cosine_vs_reference']:.6f}")
        lines.append(f"  runtime ({b['name']}): {seen} values compared with the reference interpreter "
                     f"(tolerance {b['tolerance']}); first departure: {where}")
        if b.get("outputs_only"):
            lines.append(f"    ({b['outputs_only']})")
    return "\n".join(lines)


def sqnr_svg(report: Report) -> str:
    """SQNR against fp32 by value in graph order: the compressed run (line), each weight layer's own
    (dots), the runtime's (grey line, where inspected) and its first departure (red)."""
    rows = report.rows
    w, h, left, right, top, bottom = 900, 360, 50, 20, 30, 40
    finite = [x for r in rows for x in (r.sqnr_db, r.own_sqnr_db) if not math.isinf(x)] or [0.0]
    hi = max(finite) + 5
    lo = min(min(finite) - 5, 0.0)

    def xy(i, db):
        db = hi if math.isinf(db) else min(db, hi)
        return (left + (w - left - right) * i / max(len(rows) - 1, 1),
                top + (h - top - bottom) * (hi - db) / max(hi - lo, 1e-9))

    def line(key, colour):
        pts = [xy(i, key(r)) for i, r in enumerate(rows) if key(r) is not None]
        return f'<polyline fill="none" stroke="{colour}" stroke-width="1.2" points="' + \
            " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>'
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             'font-size="11">', f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="18" text-anchor="middle">SQNR vs fp32 by value: {html.escape(report.recipe)} '
             f'({html.escape(report.target)})</text>']
    for tick in range(int(math.floor(lo / 10) * 10), int(hi) + 1, 10):
        _, y = xy(0, tick)
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>')
    parts.append(f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" text-anchor="middle">dB</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">value (graph order; dots: weight layers, '
                 'own error)</text>')
    parts.append(line(lambda r: r.sqnr_db, "#1f77b4"))
    if any(r.backend for r in rows):
        parts.append(line(lambda r: r.backend["sqnr_db_vs_fp32"] if r.backend else None, "#999"))
    for i, r in enumerate(rows):
        if r.weight is not None:
            x, y = xy(i, r.own_sqnr_db)
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#ff7f0e"><title>{r.node}: own '
                         f'{_db(r.own_sqnr_db)} dB</title></circle>')
    dep = report.first_departure
    if dep is not None:
        x, _ = xy(rows.index(dep), 0)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{h - bottom}" stroke="red"/>'
                     f'<text x="{x + 3:.1f}" y="{top + 10}" fill="red">{dep.node}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
