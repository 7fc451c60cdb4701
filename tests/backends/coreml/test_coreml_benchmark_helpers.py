"""The pure helpers of benchmarks/coreml.py: weight matching between a package's linears and torch."""
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[3] / "benchmarks" / "coreml.py"
_spec = importlib.util.spec_from_file_location("bench_coreml", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

PARAMS = {f"bert.encoder.layer.{i}.{k}.weight": (4, 4) for i in (1, 10) for k in ("q", "out")}


def test_match_by_name_with_optimize_suffixes_and_prefix_safety():
    ops = [("bert_encoder_layer_10_q_weight_to_fp16_palettized", (4, 4)),
           ("bert_encoder_layer_1_q_weight_to_fp16", (4, 4)),
           ("bert_encoder_layer_1_out_weight", (4, 4)),
           ("bert_encoder_layer_10_out_weight_to_fp16_quantized", (4, 4))]
    names, by_shape = bench.match_linears(ops, PARAMS)
    assert names == ["bert.encoder.layer.10.q.weight", "bert.encoder.layer.1.q.weight",
                     "bert.encoder.layer.1.out.weight", "bert.encoder.layer.10.out.weight"]
    assert by_shape == 0


def test_unnamed_ops_fall_back_to_shape_in_order():
    params = {"a.weight": (2, 3), "b.weight": (3, 2), "c.weight": (2, 3)}
    names, by_shape = bench.match_linears([("x", (2, 3)), ("c_weight", (2, 3)), ("y", (3, 2))], params)
    assert names == ["a.weight", "c.weight", "b.weight"] and by_shape == 2


def test_bad_matches_are_refused():
    with pytest.raises(ValueError, match="more than one"):
        bench.match_linears([("a_weight", (2, 3)), ("a_weight_1", (2, 3))], {"a.weight": (2, 3), "b.weight": (2, 3)})
    with pytest.raises(ValueError, match="shape"):
        bench.match_linears([("a_weight", (3, 2))], {"a.weight": (2, 3)})
    with pytest.raises(ValueError, match="no linear op"):
        bench.match_linears([("a_weight", (2, 3))], {"a.weight": (2, 3), "b.weight": (2, 3)})


def test_package_bytes_sums_nested_files(tmp_path):
    (tmp_path / "p" / "Data").mkdir(parents=True)
    (tmp_path / "p" / "Manifest.json").write_bytes(b"12345")
    (tmp_path / "p" / "Data" / "w.bin").write_bytes(b"1" * 100)
    assert bench.package_bytes(tmp_path / "p") == 105
