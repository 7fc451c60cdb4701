"""The hls backend end to end: nf.compile for alveo-u280 writes a Vitis HLS project, nf.load runs
its C-simulation, which equals the bit-accurate emulation exactly and fp32 within tolerance."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

import nnforge as nf
from nnforge.backends.base import BackendError, get_backend
from nnforge.backends.hls import HlsBackend, csim
from nnforge.backends.hls.project import HlsOptions, build_plan
from nnforge.ir import Graph, tensor

from ...test_plots import PNG_MAGIC, svg_text

# Fixed-point tolerance vs the fp32 reference for this block (ap_fixed<24,8>, int16 weights):
# max abs error <= 1e-3 and cosine >= 0.99999 (measured: 6e-5 and 0.9999999998).
TOL_ABS, TOL_COS = 1e-3, 0.99999


class Block(torch.nn.Module):
    """A small pre-softmax-scaled encoder block: attention (2 heads), residual + layer norm, GELU MLP."""

    def __init__(self, d=32, h=2, f=64):
        super().__init__()
        self.h = h
        self.qkv, self.o = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.f1, self.f2 = torch.nn.Linear(d, f), torch.nn.Linear(f, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q = q.reshape(B, T, self.h, D // self.h).permute(0, 2, 1, 3)
        k = k.reshape(B, T, self.h, D // self.h).permute(0, 2, 3, 1)
        v = v.reshape(B, T, self.h, D // self.h).permute(0, 2, 1, 3)
        a = torch.softmax(q @ k / (D // self.h) ** 0.5, dim=-1) @ v
        x = self.ln1(x + self.o(a.permute(0, 2, 1, 3).reshape(B, T, D)))
        return self.ln2(x + self.f2(torch.nn.functional.gelu(self.f1(x))))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NNFORGE_HLS_CACHE", str(tmp_path_factory.mktemp("hls-cache")))
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(1, 8, 32)
    b = nf.compile(model, target="alveo-u280", example_inputs=(x,), dynamic_shapes="static", out=tmp_path_factory.mktemp("b") / "block")
    yield model, x, b
    mp.undo()


def test_simulation_report_is_in_the_bundle(bundle):
    """The accelerator simulation of the block (nnforge.fpga) is written with the project and
    listed (and hashed) in the manifest."""
    import json
    _, _, b = bundle
    report = json.loads((b.path / "fpga" / "simulation.json").read_text())
    assert report["target"] == "alveo-u280" and report["tokens_per_inference"] == 8
    assert report["prefill_ms"] > 0 and report["resources"]["DSP"]["total"] == 9024
    text = (b.path / "fpga" / "simulation.txt").read_text()
    assert "prefill latency" in text and "decode throughput" not in text      # an encoder: no decode phase
    est = json.loads((b.path / "fpga" / "resources.json").read_text())
    assert est["total"]["dsp"] > 0 and b.manifest["backend"]["entry"]["resource_estimate"]["dsp"] == est["total"]["dsp"]
    for name in ("simulation.json", "simulation.txt", "roofline.svg", "roofline.png", "breakdown.svg",
                 "breakdown.png", "resources.json", "resources.txt"):
        assert f"fpga/{name}" in b.manifest["files"]
    assert "Roofline: " in svg_text(b.path / "fpga" / "roofline.svg")
    assert "FPGA time per op: " in svg_text(b.path / "fpga" / "breakdown.svg")
    assert (b.path / "fpga" / "breakdown.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow  # compiles the design twice
def test_figures_are_the_same_bytes_on_every_compile(bundle, tmp_path):
    """Bundles are hashed and compared: compiling the same model again gives the same figures."""
    model, x, b = bundle
    again = nf.compile(model, target="alveo-u280", example_inputs=(x,), out=tmp_path / "again")
    for name in ("roofline.svg", "roofline.png", "breakdown.svg", "breakdown.png"):
        assert again.manifest["files"][f"fpga/{name}"] == b.manifest["files"][f"fpga/{name}"], name


def test_registry_and_target():
    assert isinstance(get_backend("hls"), HlsBackend)
    t = nf.target("alveo-u280")
    assert t.backend == "hls"
    assert HlsOptions.from_target(t).act_width == t.options["act_width"]


def test_compile_load_run_matches_fp32(bundle):
    model, x, b = bundle
    assert b.manifest["backend"]["name"] == "hls"
    assert b.manifest["numerics"]["runtime_checked"] is True
    assert any("int16" in f["action"] for f in b.manifest["fallbacks"])       # fp32 weights: reported
    files = b.manifest["backend"]["files"]
    for want in ("hls/build_prj.tcl", "hls/weights.bin", "hls/tb/tb.cpp", "hls/src/parameters.h",
                 "hls/src/nf/nf_matvec.h"):
        assert want in files
    runner = nf.load(b.path)
    y = runner(x)
    ref = model(x).detach()
    assert (y - ref).abs().max().item() < TOL_ABS
    assert torch.nn.functional.cosine_similarity(y.reshape(1, -1), ref.reshape(1, -1)).item() >= TOL_COS
    # the C-simulation equals the emulation of the same fixed-point arithmetic exactly
    emu = runner.plan.emulate([x.numpy()])[0]
    assert np.array_equal(y.numpy(), emu)
    assert nf.verify(b.path)["passed"]


def test_activations_share_onchip_buffers(bundle):
    _, _, b = bundle
    runner = nf.load(b.path)
    plan = runner.plan
    every_value = sum(n for buf, n in plan.sizes.items() if buf.startswith("v_"))
    assert 0 < sum(plan.pool.values()) < every_value / 2
    assert b.manifest["backend"]["entry"]["onchip_activation_bytes"] == plan.onchip_bytes
    tight = HlsOptions.from_dict({**b.manifest["backend"]["entry"]["options"], "onchip_bytes_max": 1000})
    from nnforge.ir.serialize import load_graph
    with pytest.raises(BackendError, match="on chip"):
        build_plan(load_graph(b.path / "graph.json", b.path / "weights.safetensors"), tight)


def test_dataflow_form_of_the_block(bundle):
    """dataflow = true: one DATAFLOW region, every channel single-writer single-reader, same numbers."""
    from nnforge.ir.serialize import load_graph
    from tests.hls.test_kernels import channels_are_single_writer_single_reader
    _, x, b = bundle
    graph = load_graph(b.path / "graph.json", b.path / "weights.safetensors")
    seq = build_plan(graph, HlsOptions())
    df = build_plan(graph, HlsOptions(dataflow=True))
    assert channels_are_single_writer_single_reader(df)
    assert np.array_equal(seq.emulate([x.numpy()])[0], df.emulate([x.numpy()])[0])
    assert df.onchip_bytes > seq.onchip_bytes          # channels are not shared across lifetimes


def test_testbench_compiles_and_passes(bundle, tmp_path):
    _, _, b = bundle
    prj = tmp_path / "hls"
    shutil.copytree(b.path / "hls", prj)
    top = b.manifest["backend"]["entry"]["top"]
    cmd = ["g++", "-std=c++14", "-O1", "-w", "-Isrc", "-Isrc/nf", f"-I{csim.ap_types_dir()}", "tb/tb.cpp",
           "src/host.cpp", f"src/{top}.cpp", "-o", "tb_run"]
    r = subprocess.run(cmd, cwd=prj, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(["./tb_run"], cwd=prj, capture_output=True, text=True)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout
    tcl = (prj / "build_prj.tcl").read_text()
    assert f"set_top {top}" in tcl and "csim_design" in tcl and "xcu280" in tcl


def test_load_refuses_edited_sources(bundle, tmp_path):
    _, _, b = bundle
    copy = tmp_path / "edited"
    shutil.copytree(b.path, copy)
    p = copy / "hls" / "src" / "parameters.h"
    p.write_text(p.read_text().replace("scale_shift = ", "scale_shift = 1 + "))
    with pytest.raises(BackendError, match="parameters.h differs"):
        HlsBackend().load(copy, b.manifest["backend"]["entry"])


def _graph(op="gelu", names=("x", "y")):
    g = Graph("g")
    x = g.add_input(names[0], tensor("f32", 2, 8))
    y = g.op(op, x, name=names[1])
    g.set_outputs([y])
    return g


def test_unsupported_ops_are_named():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 8))
    g.set_outputs([g.op("exp", g.op("erf", x, name="t1"), name="e1")])
    with pytest.raises(BackendError, match=r"no lowering for op\(s\) erf, exp \(nodes t1, e1\)"):
        build_plan(g, HlsOptions())


def test_dynamic_quant_is_refused_naming_the_node():
    # per-token scales need a division per row and rounding per element in float32, which the
    # fixed-point dataflow cannot reproduce: its activations are ap_fixed, not the float32 quotients
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 64))
    g.set_outputs([g.op("dynamic_quant", x, format="int8", name="act")])
    with pytest.raises(BackendError, match=r"no lowering for op\(s\) dynamic_quant \(nodes act\)"):
        build_plan(g, HlsOptions())


def test_name_collision_is_an_error():
    g = Graph("g")
    x = g.add_input("a.b", tensor("f32", 2, 8))
    g.set_outputs([g.op("relu", g.op("relu", x, name="a_b"), name="out")])
    with pytest.raises(BackendError, match="both become the C\\+\\+ identifier"):
        build_plan(g, HlsOptions())


def test_symbolic_shapes_and_bad_options_are_errors():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", "batch", 8))
    g.set_outputs([g.op("relu", x, name="r")])
    with pytest.raises(BackendError, match="static shapes"):     # the plan takes specialised graphs only
        build_plan(g, HlsOptions())
    with pytest.raises(BackendError, match="act_int"):
        HlsOptions.from_dict({"act_width": 16, "act_int": 16})
    with pytest.raises(BackendError, match="unknown hls option.*act_widht"):
        HlsOptions.from_dict({"act_widht": 16})
    with pytest.raises(BackendError, match="act_width must be int"):
        HlsOptions.from_dict({"act_width": "16"})


def test_quantised_recipe_lowers_natively(tmp_path):
    """w8 (int8 per channel) keeps its codes: no fallback for the linears, bit-exact C-sim."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 16)).eval()
    x = torch.randn(4, 64)
    b = nf.compile(model, target="versal-vhk158", recipe="w8", example_inputs=(x,), out=tmp_path / "mlp")
    assert not b.manifest["fallbacks"]
    runner = nf.load(b.path)
    y = runner(x)
    assert np.array_equal(y.numpy(), runner.plan.emulate([x.numpy()])[0])
    assert torch.nn.functional.cosine_similarity(y.reshape(1, -1), model(x).reshape(1, -1)).item() > 0.999


@pytest.mark.slow  # builds several sizes
def test_dynamic_model_is_specialised_to_its_check_inputs_and_other_sizes_build(tmp_path, monkeypatch):
    """Symbols (batch, seq) take the check inputs' sizes for the bundle's design, or the target
    option dims; the runner builds a design for other sizes on first use, each bit-exact."""
    monkeypatch.setenv("NNFORGE_HLS_CACHE", str(tmp_path / "cache"))
    from torch.export import Dim
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(2, 5, 16)
    dyn = ({0: Dim("batch", max=64), 1: Dim("seq", max=64)},)
    b = nf.compile(model, "alveo-u280", example_inputs=(x,), dynamic_shapes=dyn, out=tmp_path / "dyn")
    entry = b.manifest["backend"]["entry"]
    assert entry["dims"] == {"batch": 2, "seq": 5}
    assert b.manifest["signature"]["inputs"][0]["shape"] == ["batch", "seq", 16]
    runner = nf.load(b.path)
    for shape in [(2, 5, 16), (1, 3, 16)]:
        xs = torch.randn(*shape)
        y = runner(xs)
        assert tuple(y.shape) == shape[:-1] + (8,)
        assert np.array_equal(y.numpy(), runner.emulate([xs.numpy()])[0])
        with torch.no_grad():
            assert torch.nn.functional.cosine_similarity(y.flatten(), model(xs).flatten(), dim=0) > 0.999
    tgt = nf.target("alveo-u280").with_options(dims={"seq": 3})
    b = nf.compile(model, tgt, example_inputs=(x,), check_inputs=(torch.randn(2, 3, 16),), dynamic_shapes=dyn,
                   out=tmp_path / "dims")
    assert b.manifest["backend"]["entry"]["dims"] == {"batch": 2, "seq": 3}


def test_specialise_errors_name_the_symbol():
    from nnforge.backends.hls import static_graph
    g = Graph("g")
    x = g.add_input("x", tensor("f32", "batch", "seq"))
    y = g.add_input("y", tensor("f32", "batch", 4))
    g.set_outputs([g.op("relu", x, name="r"), g.op("relu", y, name="s")])
    with pytest.raises(BackendError, match="no size for dimension symbol.*seq.*option dims"):
        static_graph(g, None, {"x": None, "y": [2, 4]})
    with pytest.raises(BackendError, match="batch is 3 in input y but 2 in x"):
        static_graph(g, None, {"x": [2, 7], "y": [3, 4]})
    with pytest.raises(BackendError, match="no dimension symbol.*sequence"):
        static_graph(g, {"sequence": 8}, {})
    with pytest.raises(BackendError, match="integers >= 1.*seq=0"):
        static_graph(g, {"seq": 0, "batch": 1})
    static, env = static_graph(g, {"seq": 6}, {"x": [2, 9], "y": [2, 4]})
    assert env == {"batch": 2, "seq": 6} and static.outputs[0].shape == (2, 6)


@pytest.mark.slow  # builds two designs
def test_two_designs_with_the_same_layer_names_in_one_process(tmp_path, monkeypatch):
    """Two C-simulation libraries instantiate the same templates with same-named config structs of
    other sizes; each must run its own code (hidden visibility), not the first-loaded library's."""
    monkeypatch.setenv("NNFORGE_HLS_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    runners, xs = [], []
    for width in (8, 24):
        model = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
        x = torch.randn(3, width)
        b = nf.compile(model, "alveo-u280", example_inputs=(x,), out=tmp_path / f"w{width}")
        runners.append((nf.load(b.path), model))
        xs.append(x)
    for (runner, model), x in zip(runners * 2, xs * 2):        # interleaved calls
        y = runner(x)
        assert np.array_equal(y.numpy(), runner.emulate([x.numpy()])[0])
        with torch.no_grad():
            assert np.abs(y.numpy() - model(x).numpy()).max() < TOL_ABS
