"""The divergence locator: per-layer figures that add up to the end-to-end ones, and planted faults
(one layer's scales x1.5, in the graph or in the runtime's model) found at the right layer."""
from __future__ import annotations

import dataclasses
import json
import math

import onnx
import pytest
import torch
from onnx import numpy_helper

import nnforge as nf
from nnforge.bundle import Bundle, write_manifest
from nnforge.divergence import DivergenceError, compare_layers
from nnforge.ir import save_graph
from nnforge.numerics import compare
from nnforge.frontend import import_model

from .backends.tiny_encoder import TinyEncoder, encoder_inputs
from .test_plots import PNG_MAGIC, svg_text

PLANTED = "v_2"             # the middle linear layer of the MLP below


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.GELU(),
                               torch.nn.Linear(32, 8)).eval()


@pytest.fixture(scope="module")
def mlp_case(tmp_path_factory):
    """(bundle path, fp32 graph) of the MLP compiled with int8 weights for onnx."""
    model, x = mlp(), torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    out = tmp_path_factory.mktemp("div") / "mlp-w8"
    nf.compile(model, "onnx", "w8", example_inputs=(x,), out=out)
    return out, import_model(model, (x,))[0]


def plant_in_graph(src, dst, layer: str = PLANTED, factor: float = 1.5) -> None:
    """A copy of the bundle whose graph has ``layer``'s int8 scales times ``factor`` (its ONNX model,
    which holds these small scales inline, is left as compiled); the manifest is re-hashed."""
    import shutil
    shutil.copytree(src, dst)
    b = Bundle.open(dst)
    g = b.graph()
    w = g.weights[f"{layer}.weight"]
    w.encoding = dataclasses.replace(w.encoding, scale=w.encoding.scale * factor)
    save_graph(g, dst / "graph.json", dst / "weights.safetensors")
    write_manifest(dst, b.manifest)


def plant_in_runtime(src, dst, layer: str = PLANTED, factor: float = 1.5) -> None:
    """A copy of the bundle whose model.onnx has ``layer``'s scale initializer times ``factor``."""
    import shutil
    shutil.copytree(src, dst)
    m = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    (init,) = [t for t in m.graph.initializer if t.name == f"{layer}.weight.scale"]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
    onnx.save_model(m, str(dst / "model.onnx"))
    write_manifest(dst, Bundle.open(dst, check=False).manifest)


def test_figures_add_up(mlp_case):
    path, fp32 = mlp_case
    r = compare_layers(path, original=fp32)
    bundle = Bundle.open(path)
    _, expected, ref_fp32 = bundle.reference()
    # the last value is the graph output: its figures are the end-to-end ones, and those are the
    # manifest's (up to the last bits of float32 sums, which vary between runs of the same graph)
    fidelity = bundle.manifest["numerics"]["fidelity_vs_fp32"]
    last = r.rows[-1]
    assert last.value == bundle.graph().outputs[0].name
    assert last.cosine == pytest.approx(r.end_to_end["cosine_min"], abs=1e-12)
    assert last.sqnr_db == pytest.approx(r.end_to_end["sqnr_db"], abs=1e-9)
    assert last.cosine == pytest.approx(fidelity["cosine_min"], abs=1e-9)
    assert last.sqnr_db == pytest.approx(fidelity["sqnr_db"], abs=1e-3)
    assert r.end_to_end["cosine_min"] == pytest.approx(compare(expected, ref_fp32)["cosine_min"], abs=1e-9)
    for row in r.rows:           # C - F = (L - F) + (C - L): noise powers add up with the cross term
        assert row.noise == pytest.approx(row.own_noise + row.inherited_noise + row.cross_noise, rel=1e-9, abs=1e-18)
        assert row.noise == pytest.approx(10 ** (-row.sqnr_db / 10), rel=1e-9)
    # the first layer reads the graph input: it inherits nothing; ops without weights add nothing
    assert r.rows[0].inherited_noise == 0 and math.isinf(r.rows[0].inherited_sqnr_db)
    assert all(row.own_noise == 0 for row in r.rows if row.weight is None)
    # weights' shares and the residual sum to the whole end-to-end error
    a = r.attribution
    assert [s["weight"] for s in a["weights"]] == ["v_0.weight", "v_2.weight", "v_4.weight"]
    assert sum(s["share"] for s in a["weights"]) + a["residual"] == pytest.approx(1.0, abs=1e-9)
    assert a["residual"] == pytest.approx(0.0, abs=1e-12)     # weight-only recipe
    assert a["end_to_end_noise"] == pytest.approx(10 ** (-r.end_to_end["sqnr_db"] / 10), rel=1e-9)
    # the runtime agrees with the reference everywhere, and exposing its values changed nothing
    assert r.backend["inspected"] and r.first_departure is None
    assert all(row.backend and row.backend["within"] for row in r.rows)
    assert r.backend["exposed_vs_bundle"]["max_abs_error"] == 0.0


def test_planted_fault_in_the_graph(mlp_case, tmp_path):
    path, fp32 = mlp_case
    plant_in_graph(path, tmp_path / "faulty")
    r = compare_layers(tmp_path / "faulty", original=fp32)
    assert r.worst(1)[0].node == PLANTED                     # the layer that loses the most on its own
    assert r.worst(1, by="share")[0].node == PLANTED         # and causes most of the output error
    clean = compare_layers(path, original=fp32, backends=False)
    before = {row.node: row for row in clean.layers}
    for row in r.layers:                                     # the other layers add what they did before
        if row.node != PLANTED:
            assert row.own_sqnr_db == pytest.approx(before[row.node].own_sqnr_db, abs=1e-6)
    # the runtime kept the correct (inline) scales: it departs from the faulty graph at that layer
    assert r.first_departure is not None and r.first_departure.node == PLANTED


def test_planted_fault_in_the_runtime(mlp_case, tmp_path):
    path, fp32 = mlp_case
    plant_in_runtime(path, tmp_path / "faulty")
    r = compare_layers(tmp_path / "faulty", original=fp32, attribute=False)
    dep = r.first_departure
    assert dep is not None and dep.node == PLANTED and dep.backend["cosine_vs_reference"] < 0.9999
    assert all(row.backend["within"] for row in r.rows[: r.rows.index(dep)])
    assert r.backend["first_departure"] == PLANTED
    assert r.attribution is None


def test_an_original_that_is_not_the_bundles_model_is_refused(mlp_case):
    path, _ = mlp_case
    x = torch.randn(6, 16)
    with pytest.raises(DivergenceError, match="not the one it was compiled from"):
        compare_layers(path, original=import_model(mlp(seed=5), (x,))[0])
    with pytest.raises(DivergenceError, match="not a zoo model"):
        compare_layers(path)


def test_other_inputs(mlp_case):
    path, fp32 = mlp_case
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(7))
    r = compare_layers(path, {"input": x}, original=fp32, attribute=False)
    assert r.inputs == [[6, 16]] and len(r.layers) == 3
    got = nf.load(path)(x)
    assert r.end_to_end["cosine_min"] == pytest.approx(compare([got], [fp32_out(fp32, x)])["cosine_min"], abs=1e-5)


def fp32_out(graph, x):
    from nnforge.ir import Interpreter
    return Interpreter(graph).run(x)[0]


def test_encoder_with_rounded_activations(tmp_path):
    # w8a8 inserts activation rounding (fake_quant) and rescales weights (SmoothQuant): values fp32
    # lacks are followed on the fp32 inputs' path, and the error outside the weights is the residual
    model = TinyEncoder().eval()
    ids, mask = encoder_inputs(2, 8, seed=0)
    calib = [encoder_inputs(2, 8, seed=s) for s in range(1, 4)]
    nf.compile(model, "onnx", "w8a8", example_inputs=(ids, mask), calibration=calib, out=tmp_path / "enc")
    fp32 = import_model(model, (ids, mask))[0]
    r = compare_layers(tmp_path / "enc", original=fp32)
    ops = {row.op for row in r.layers}
    assert {"linear", "embedding"} <= ops
    a = r.attribution
    assert sum(s["share"] for s in a["weights"]) + a["residual"] == pytest.approx(1.0, abs=1e-9)
    assert a["residual"] != 0.0
    assert r.rows[-1].cosine == pytest.approx(r.end_to_end["cosine_min"], abs=1e-12)
    assert r.backend["inspected"] and r.first_departure is None
    masked = [row for row in r.rows if row.op == "where"]     # -inf at padded keys, in both runs
    assert masked and all(row.nonfinite == 0 and math.isfinite(row.sqnr_db) for row in masked)


def test_report_files(mlp_case, tmp_path):
    path, fp32 = mlp_case
    r = compare_layers(path, original=fp32)
    data = json.loads(r.write_json(tmp_path / "r.json").read_text())
    assert data["first_departure"] is None and len(data["rows"]) == len(r.rows)
    assert data["rows"][0]["inherited_sqnr_db"] == "inf"
    assert r.write_plot(tmp_path / "r.svg") == [tmp_path / "r.svg", tmp_path / "r.png"]
    text = svg_text(tmp_path / "r.svg")
    assert "SQNR vs fp32 by value: w8 on onnx" in text
    assert all(layer.node in text for layer in r.layers)           # the three linears name the x axis
    assert (tmp_path / "r.png").read_bytes().startswith(PNG_MAGIC)
    text = r.format_table(2)
    assert "end-to-end cosine" in text and "first departure: none" in text
    assert len([line for line in text.splitlines() if "linear" in line]) == 2


def test_exported_from_the_package():
    assert nf.compare_layers is compare_layers and "compare_layers" in nf.__all__


@pytest.mark.slow
def test_default_model_w3_gptq(tmp_path):
    """The default model with w3-gptq: the worst layers are named, and the figures add up."""
    from nnforge.models import default as dm, zoo_model
    model, example, dyn, ins, outs = zoo_model("minilm")
    _, tok = dm.load_default_model()
    calib, _ = dm.sentence_splits()
    calibration = dm.calibration_batches(tok, calib[:64], 32)
    nf.compile(model, "onnx", "w3-gptq", example_inputs=example, calibration=calibration, dynamic_shapes=dyn,
               input_names=ins, output_names=outs, out=tmp_path / "w3")
    r = compare_layers(tmp_path / "w3")                # the fp32 model is rebuilt from the zoo
    assert len(r.layers) >= 36
    worst = r.worst(5)
    assert all(w.encoding.startswith("u3") for w in worst)
    assert worst[0].own_sqnr_db < r.layers[0].own_sqnr_db or worst[0] is r.layers[0]
    a = r.attribution
    assert sum(s["share"] for s in a["weights"]) + a["residual"] == pytest.approx(1.0, abs=1e-6)
    fidelity = Bundle.open(tmp_path / "w3").manifest["numerics"]["fidelity_vs_fp32"]
    assert r.rows[-1].cosine == pytest.approx(fidelity["cosine_min"], abs=1e-9)
    assert r.backend["inspected"] and r.first_departure is None


# --- the command line -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_case(tmp_path_factory):
    """(bundle, .onnx model) from `nnforge compile mlp.onnx --recipe w8`."""
    from torch.export import Dim

    from nnforge.cli import main
    from tests.conftest import tiny_mlp
    root = tmp_path_factory.mktemp("div_cli")
    model = root / "mlp.onnx"
    torch.onnx.export(tiny_mlp(), (torch.randn(2, 16),), str(model), dynamo=True,
                      dynamic_shapes=({0: Dim("batch")},), input_names=["x"], output_names=["y"], verbose=False)
    assert main(["compile", str(model), "--target", "onnx", "--recipe", "w8", "--out", str(root / "b"),
                 "--dim", "batch=3"]) == 0
    return root / "b", model


def test_cli_compare(capsys, cli_case, tmp_path):
    from nnforge.cli import main
    bundle, model = cli_case
    np_inputs = tmp_path / "in.npz"
    import numpy as np
    np.savez(np_inputs, x=np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32))
    capsys.readouterr()
    rc = main(["inspect", str(bundle), "--compare", "--model", str(model), "--inputs", str(np_inputs),
               "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.svg"), "--top", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "end-to-end cosine" in out and "first departure: none" in out
    assert f"wrote {tmp_path / 'r.json'}" in out and f"wrote {tmp_path / 'r.svg'}" in out
    assert f"wrote {tmp_path / 'r.png'}" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["inputs"] == [[5, 16]] and data["first_departure"] is None
    assert "SQNR vs fp32 by value" in svg_text(tmp_path / "r.svg")
    assert (tmp_path / "r.png").read_bytes().startswith(PNG_MAGIC)
    rc = main(["inspect", str(bundle), "--compare", "--model", str(model), "--json", "--no-shares", "--no-runtime"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["attribution"] is None and data["backend"]["inspected"] is False


def test_cli_compare_needs_the_fp32_model(capsys, cli_case):
    from nnforge.cli import main
    bundle, _ = cli_case
    capsys.readouterr()
    rc = main(["inspect", str(bundle), "--compare"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("nnforge: error: ") and "--model MODEL" in err[0]


def test_cli_compare_before_and_after_recovery(capsys, cli_case, tmp_path):
    """A one-shot bundle and its recovered one, layer by layer on the same inputs."""
    from nnforge.cli import main
    _, model = cli_case
    calibration = [(torch.randn(16, 16, generator=torch.Generator().manual_seed(i)),) for i in range(6)]
    kw = {"calibration": calibration, "example_inputs": calibration[0]}
    one = nf.compile(str(model), "onnx", "w3-gptq", **kw, out=tmp_path / "one")
    rec = nf.compile(str(model), "onnx", [{"preset": "w3-gptq"}, {"preset": "rec", "steps": 40, "lr": 3e-3}],
                     **kw, out=tmp_path / "rec")
    capsys.readouterr()
    rc = main(["inspect", str(rec.path), "--compare", "--model", str(model), "--before", str(one.path)])
    out = capsys.readouterr().out
    assert rc == 0 and "-> " + str(rec.path) in out and "end to end: cosine" in out
    assert "weight layers," in out and "own before" in out and "own after" in out
    before, after = (float(x) for x in out.split("SQNR ")[1].split(" dB")[0].split(" -> "))
    assert after > before                           # reconstruction took error back on these inputs too
    rc = main(["inspect", str(rec.path), "--compare", "--before", str(one.path), "--json", str(tmp_path / "r.json")])
    assert rc != 0 and "--before prints a table; --json and --plot go with --compare" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    rc = main(["inspect", str(rec.path), "--compare", "--model", str(model), "--before", str(tmp_path / "none")])
    assert rc != 0 and f"--before needs a bundle directory, got {tmp_path / 'none'}" in capsys.readouterr().err
    from types import SimpleNamespace

    from nnforge.cli import UsageError, _bundle_before
    with pytest.raises(UsageError, match="a bundle for onnx, not cpu; compare bundles of one model and target"):
        _bundle_before(str(one.path), SimpleNamespace(target="cpu"))


def test_before_and_after_of_different_graphs_is_refused_naming_the_layer():
    from types import SimpleNamespace

    from nnforge.divergence.report import format_before_after
    layer = SimpleNamespace(node="fc2", own_sqnr_db=10.0, sqnr_db=9.0, encoding="u3")
    after = SimpleNamespace(bundle="b/rec", layers=[layer])
    before = SimpleNamespace(bundle="b/one", layers=[SimpleNamespace(node="fc1")])
    with pytest.raises(ValueError, match="weight layer fc2 of b/rec is not in b/one; compare bundles of the same"):
        format_before_after(before, after)


def test_fpga_design_layer_by_layer(tmp_path):
    """An FPGA bundle: every activation of the design, from its bit-accurate emulation (checked equal
    to the C-simulation on the outputs), against the reference interpreter."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 16)).eval()
    x = torch.randn(4, 64)
    nf.compile(model, "versal-vhk158", "w8", example_inputs=(x,), out=tmp_path / "fpga")
    r = compare_layers(tmp_path / "fpga", original=import_model(model, (x,))[0])
    assert r.backend["inspected"] and r.backend["emulation_equals_csim"] is True
    assert [row.node for row in r.rows if row.backend] == ["v_0", "gelu", "v_2"]
    assert r.first_departure is None
    assert all(row.backend["cosine_vs_reference"] > 0.9999 for row in r.rows)


def test_an_uncompressed_bundle_is_its_own_fp32_model(tmp_path):
    model, x = mlp(), torch.randn(6, 16)
    nf.compile(model, "onnx", example_inputs=(x,), out=tmp_path / "fp32")
    r = compare_layers(tmp_path / "fp32")                   # no original needed
    assert all(row.noise == 0 and math.isinf(row.sqnr_db) for row in r.rows)
    assert r.attribution["weights"] == [] and r.first_departure is None
    assert all(row.backend["within"] for row in r.rows)


def test_cli_plot_wants_svg_or_png(capsys, cli_case, tmp_path):
    """A figure file name that is neither .svg nor .png is refused before the comparison runs."""
    from nnforge.cli import EXIT_BAD_INPUT, main
    bundle, model = cli_case
    capsys.readouterr()
    rc = main(["inspect", str(bundle), "--compare", "--model", str(model), "--plot", str(tmp_path / "r.pdf")])
    captured = capsys.readouterr()
    assert rc == EXIT_BAD_INPUT and "end-to-end cosine" not in captured.out
    assert f"{tmp_path / 'r.pdf'}: a figure is written as .svg and .png" in captured.err
    assert list(tmp_path.iterdir()) == []
