"""The demo's table: measured rows and simulated rows (FPGA C-simulation: no latency, a footnote)."""
from nnforge.demo import DEMO_RECIPES, Row, check_rows, format_table


def test_simulated_rows_have_no_latency_and_a_footnote():
    rows = [Row("onnx", "fp32", 90.7, 90.3, 1.0, 1.0, 1.0, 1.0, 2.6, 85.4, 6.1, 167.8, n_eval=500),
            Row("alveo-u280", "sparse24-w4", 60.0, 30.0, 0.88, 0.7, 0.6, 0.6, None, None, 6.1, 167.8, n_eval=64,
                note="alveo-u280 sparse24-w4: C-simulation ...")]
    text = format_table(rows, 500)
    onnx, fpga = [line for line in text.splitlines() if line.startswith(("onnx", "alveo"))]
    assert "2.35" in onnx and fpga.split()[-6:] == ["-", "6.10", "-", "-", "167.80", "-"]
    assert "0.700000*" in fpga and text.splitlines()[-1].startswith("* alveo-u280 sparse24-w4: C-simulation")
    assert len(onnx) == len(fpga)
    assert check_rows(rows) == []
    assert DEMO_RECIPES["hls"] == ["sparse24-w4"]
