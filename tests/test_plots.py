"""nnforge's figures: each one drawn from a small hand-made report or result, written as a valid SVG
(text kept as text, so its title and labels can be read back) and PNG, the same bytes every time."""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from nnforge import plots
from nnforge.divergence import Report, Row
from nnforge.fpga import FpgaParams, OpCost, SimResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def svg_text(path) -> str:
    """Every piece of text drawn in an SVG, joined (ET.parse fails on XML that does not parse)."""
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return "\n".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))


def check_written(files, tmp_path, *texts: str) -> str:
    """Both files exist and are valid, the SVG holds every text in `texts`; returns its text."""
    svg, png = sorted(files, key=lambda p: p.suffix != ".svg")
    assert svg.suffix == ".svg" and png.suffix == ".png" and svg.parent == png.parent == tmp_path
    assert png.read_bytes().startswith(PNG_MAGIC)
    text = svg_text(svg)
    for t in texts:
        assert t in text, f"{t!r} not drawn in {svg}"
    return text


def check_reproducible(make) -> None:
    """Two figures built the same way render to the same bytes (bundle files are hashed)."""
    first, second = plots.render(make()), plots.render(make())
    assert set(first) == {".svg", ".png"} and first == second


# --- hand-made inputs -----------------------------------------------------------------------------
def row(i: int, node: str, sqnr: float, own: float, weight: bool, backend: dict | None = None) -> Row:
    noise = 10 ** (-sqnr / 10) if math.isfinite(sqnr) else 0.0
    return Row(i, node, "linear" if weight else "relu", node + "_out", node + ".weight" if weight else None,
               "int8/channel" if weight else None, sqnr, 1.0, own, 1.0, math.inf, noise, noise, 0.0, 0.0,
               backend=backend)


def small_report(departure: bool = True) -> Report:
    def rt(sqnr, within=True):
        return {"sqnr_db_vs_fp32": sqnr, "within": within, "cosine_vs_reference": 1.0}
    rows = [row(0, "embed_tokens", math.inf, math.inf, False, rt(math.inf)),
            row(1, "encoder_layer_0_attention_self_query_projection_node", 48.0, 48.0, True, rt(48.0)),
            row(2, "relu_1", 47.5, math.inf, False, rt(47.5)),
            row(3, "encoder_layer_0_output_dense", 41.0, 44.0, True, rt(30.0, within=not departure)),
            row(4, "classifier", 39.0, 52.0, True, rt(29.0, within=not departure))]
    return Report("bundles/tiny", "onnx", "onnx", "w8", [[2, 16]], {"cosine_min": 0.9999, "sqnr_db": 39.0}, rows,
                  backend={"name": "onnx", "inspected": True, "tolerance": {}})


def small_result(generate: int = 4) -> SimResult:
    p = FpgaParams.from_target("alveo-u280")
    prefill = [OpCost("q_proj", "linear", 4e9, 3e7, 2e-3, 1e-4), OpCost("up_proj", "linear", 1e10, 8e7, 5e-3, 3e-4),
               OpCost("attention", "attention", 2e8, 1e6, 3e-4, 1e-5), OpCost("norm/act", "misc", 0, 0, 4e-4, 0)]
    decode = [OpCost("q_proj", "linear", 3e7, 3e7, 1e-5, 1e-4), OpCost("up_proj", "linear", 8e7, 8e7, 3e-5, 3e-4),
              OpCost("attention", "attention", 2e6, 1e6, 2e-6, 5e-6), OpCost("norm/act", "misc", 0, 0, 1e-5, 0)]
    return SimResult("tiny-decoder", "alveo-u280", 128, generate, prefill, decode if generate else [],
                     sum(o.time_s for o in prefill), generate * sum(o.time_s for o in decode),
                     {"DSP": (10, 100)}, None, None, p)


def pareto_rows() -> list[dict]:
    rows = [{"recipe": "fp32", "ratio": 1.0, "cosine_mean": 1.0, "pareto": True},
            {"recipe": "w8", "ratio": 0.25, "cosine_mean": 0.99995, "pareto": True},
            {"recipe": "w4-rtn", "ratio": 0.14, "cosine_mean": 0.9991, "pareto": True},
            {"recipe": "sparse24", "ratio": 0.56, "cosine_mean": 0.97, "pareto": False},
            {"recipe": "[long json]", "label": "lowrank_svd param_budget=0.5", "ratio": 0.5, "cosine_mean": 0.91,
             "pareto": False}]
    return rows


# --- the figures ----------------------------------------------------------------------------------
def test_sqnr_figure(tmp_path):
    files = plots.save(plots.sqnr_figure(small_report()), tmp_path / "sqnr.svg")
    text = check_written(files, tmp_path, "SQNR vs fp32 by value: w8 on onnx", "compressed run vs fp32",
                         "weight layer's own error vs fp32", "runtime (onnx) vs fp32", "exact")
    assert "first departure: encoder_layer_0_output_dense" in text
    # the x axis names the weight layers (long names cut in the middle), not the other values
    assert "classifier" in text and "encoder_layer_0_atten…_query_projection_node" in text and "relu_1" not in text
    check_reproducible(lambda: plots.sqnr_figure(small_report()))


def test_sqnr_figure_without_runtime_or_departure(tmp_path):
    report = small_report(departure=False)
    for r in report.rows:
        r.backend = None
    text = check_written(plots.save(plots.sqnr_figure(report), tmp_path / "s.png"), tmp_path)
    assert "runtime" not in text and "first departure" not in text


def test_sqnr_axis_fits_the_values():
    """No exact value: no "exact" line, and the axis ends near the lowest and highest SQNR."""
    report = small_report()
    report.rows = [r for r in report.rows if r.weight is not None]
    for r in report.rows:
        r.backend = None
    ax = plots.sqnr_figure(report).axes[0]
    lo, hi = ax.get_ylim()
    assert 36 < lo < 39 and 52 < hi < 55
    assert "exact" not in [t.get_text() for t in ax.get_yticklabels()]


def test_breakdown_figure(tmp_path):
    files = plots.save(plots.breakdown_figure(small_result()), tmp_path / "breakdown.png")
    assert [p.suffix for p in files] == [".png", ".svg"]      # the one asked for first
    check_written(files, tmp_path, "FPGA time per op: tiny-decoder on alveo-u280",
                  "prefill of 128 tokens: 7.7 ms in all",
                  "one decode step (mean context): 415 µs in all", "q_proj", "up_proj", "attention", "norm/act")
    check_reproducible(lambda: plots.breakdown_figure(small_result()))


def test_breakdown_of_an_encoder_has_no_decode_panel(tmp_path):
    text = check_written(plots.save(plots.breakdown_figure(small_result(generate=0)), tmp_path / "b"), tmp_path,
                         "prefill of 128 tokens")
    assert "one decode step" not in text


def test_breakdown_colours_are_distinct():
    fig = plots.breakdown_figure(small_result())
    colours = [tuple(bar.get_facecolor()) for bar in fig.axes[0].patches]
    assert len(colours) == 4 and len(set(colours)) == 4


def test_roofline_figure(tmp_path):
    files = plots.save(plots.roofline_figure([small_result()]), tmp_path / "roofline.svg")
    check_written(files, tmp_path, "Roofline: tiny-decoder on alveo-u280", "HBM sustained", "MM engine (prefill)",
                  "MV engine (decode)", "prefill: ", "decode: ", "arithmetic intensity (MAC per HBM byte)")
    check_reproducible(lambda: plots.roofline_figure([small_result()]))


def test_roofline_limits_fit_the_points_and_ceilings():
    """No empty decades: the axes end within a factor of a few of the outermost point or knee."""
    r = small_result()
    ax = plots.roofline_figure([r]).axes[0]
    p = r.params
    knees = [p.mm_macs_per_cycle * p.clock_hz / p.hbm_sustained_bytes_per_s,
             p.mv_macs_per_cycle * p.clock_hz / p.hbm_sustained_bytes_per_s]
    intensities = [sum(o.macs for o in ops) / sum(o.hbm_bytes for o in ops)
                   for ops in (r.prefill_ops, r.decode_ops)]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x0 < min(intensities + knees) < 10 * x0 and x1 / 10 < max(intensities + knees) < x1
    assert y1 / 10 < p.mm_macs_per_cycle * p.clock_hz < y1 and math.log10(y1 / y0) < 3


def test_roofline_refuses_two_targets():
    other = small_result()
    other.target = "versal-vhk158"
    with pytest.raises(ValueError, match="one target"):
        plots.roofline_figure([small_result(), other])


def test_pareto_figure(tmp_path):
    files = plots.save(plots.pareto_figure(pareto_rows(), title="Size against fidelity: test"), tmp_path / "p.svg")
    check_written(files, tmp_path, "Size against fidelity: test", "compressed layer bytes / fp32 bytes",
                  "mean cosine vs fp32", "on the Pareto front", "dominated", "fp32", "w8", "w4-rtn", "sparse24",
                  "lowrank_svd param_budget=0.5", "exact", "0.99", "0.999")
    check_reproducible(lambda: plots.pareto_figure(pareto_rows(), title="t"))


def test_pareto_axes_fit_the_data():
    ax = plots.pareto_figure(pareto_rows(), title="t").axes[0]
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    assert 0.05 < x0 < 0.14 and 1.0 < x1 < 1.1
    assert 0.8 < y0 < 0.91 and y1 > 0.99995


def test_paths_want_svg_or_png(tmp_path):
    assert plots.paths(tmp_path / "a.png") == [tmp_path / "a.png", tmp_path / "a.svg"]
    assert plots.paths(tmp_path / "a") == [tmp_path / "a.svg", tmp_path / "a.png"]
    with pytest.raises(ValueError, match=r"a\.pdf: .*\.svg and \.png"):
        plots.paths(tmp_path / "a.pdf")


def test_import_nnforge_does_not_load_matplotlib():
    import subprocess
    import sys
    code = "import sys, nnforge, nnforge.fpga, nnforge.divergence; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_same_bytes_in_another_process():
    """What a later compile (a new process) writes hashes the same as what this one wrote."""
    import hashlib
    import subprocess
    import sys
    from pathlib import Path
    code = ("import hashlib; from tests.test_plots import small_result; from nnforge import plots; "
            "d = plots.render(plots.breakdown_figure(small_result())); print(hashlib.sha256(d['.svg'] + d['.png'])"
            ".hexdigest())")
    here = plots.render(plots.breakdown_figure(small_result()))
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert there == hashlib.sha256(here[".svg"] + here[".png"]).hexdigest()
