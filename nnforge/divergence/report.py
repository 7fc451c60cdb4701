"""The divergence report as people read it: the terminal table of ``nnforge inspect --compare``
(:func:`nnforge.divergence.compare_layers` makes the report; nnforge.plots draws its figure)."""
from __future__ import annotations

import math


def _db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}"


def format_table(report, top: int = 10) -> str:
    """The terminal table of a :class:`nnforge.divergence.Report`: the ``top`` weight layers that lose
    the most on their own, the shares of the end-to-end error, and the runtime's first departure."""
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


def format_before_after(before, after, top: int = 10) -> str:
    """Two reports of the same model on the same inputs side by side (``inspect --compare
    --before``): end to end, then the ``top`` weight layers that moved the most (by their own SQNR,
    the loss the layer adds on the inputs it got), e.g. a one-shot bundle and its recovered one."""
    mine = {r.node: r for r in after.layers}
    theirs = {r.node: r for r in before.layers}
    missing = [n for n in mine if n not in theirs]
    if missing:
        raise ValueError(f"the bundles' graphs differ: weight layer {missing[0]} of {after.bundle} is not in "
                         f"{before.bundle}; compare bundles of the same model")
    e0, e1 = before.end_to_end, after.end_to_end
    lines = [f"{before.bundle} ({before.recipe}) -> {after.bundle} ({after.recipe}), target {after.target}, inputs "
             f"{after.inputs}",
             f"  end to end: cosine {e0['cosine_min']:.6f} -> {e1['cosine_min']:.6f}, SQNR {_db(e0['sqnr_db'])} -> "
             f"{_db(e1['sqnr_db'])} dB"]
    pairs = [(theirs[n], r) for n, r in mine.items()]

    def moved(pair):
        b, a = pair
        if math.isinf(b.own_sqnr_db) and math.isinf(a.own_sqnr_db):
            return 0.0
        return abs(a.own_sqnr_db - b.own_sqnr_db)
    better = sum(1 for b, a in pairs if a.own_sqnr_db > b.own_sqnr_db)
    lines.append(f"  {len(pairs)} weight layers, {better} with less loss of their own after; the {min(top, len(pairs))} "
                 "that moved the most (SQNR in dB, before -> after):")
    lines.append(f"  {'node':<44} {'encoding':<24} {'own before':>10} {'own after':>10} {'SQNR before':>11} "
                 f"{'SQNR after':>10}")
    for b, a in sorted(pairs, key=moved, reverse=True)[:top]:
        lines.append(f"  {a.node[:44]:<44} {(a.encoding or '')[:24]:<24} {_db(b.own_sqnr_db):>10} "
                     f"{_db(a.own_sqnr_db):>10} {_db(b.sqnr_db):>11} {_db(a.sqnr_db):>10}")
    return "\n".join(lines)
