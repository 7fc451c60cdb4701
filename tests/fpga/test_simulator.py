"""The FPGA simulator: sanity and monotonicity of the cost model, every number from the TOML, the
CLI table, and the FlightLLM validation rows (hardware-free, a few seconds)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from nnforge import cli
from nnforge.fpga import (FLIGHTLLM_LLAMA2_COMPRESSION, FpgaParams, Linear, SimulatorError, Workload,
                          decoder_workload, simulate, write_plots)
from nnforge.fpga.model import describe_compression, describe_layers
from nnforge.fpga.simulator import simulate_workload
from nnforge.targets import get_target

from ..test_plots import PNG_MAGIC, svg_text

ROOT = Path(__file__).resolve().parents[2]


def one_layer(**kw) -> Workload:
    return Workload("one", (Linear("fc", 4096, 4096, repeat=32, **kw),))


@pytest.fixture(scope="module")
def u280():
    return FpgaParams.from_target("alveo-u280")


def test_more_sparsity_fewer_cycles(u280):
    times = [simulate_workload(one_layer(density=d, pattern="nm"), u280, prompt=512, generate=4).prefill_s
             for d in (1.0, 0.75, 0.5, 0.25)]
    assert times == sorted(times, reverse=True) and times[-1] < 0.5 * times[0]


def test_unsupported_pattern_is_computed_dense(u280):
    dense = simulate_workload(one_layer(), u280, prompt=512, generate=1).prefill_ops[0].compute_s
    unstructured = simulate_workload(one_layer(density=0.5, pattern="unstructured"), u280, prompt=512,
                                     generate=1).prefill_ops[0].compute_s
    assert unstructured == pytest.approx(dense)


def test_int4_less_hbm_traffic_and_faster_decode(u280):
    r8 = simulate_workload(one_layer(weight_bits=8), u280, prompt=16, generate=8)
    r4 = simulate_workload(one_layer(weight_bits=4), u280, prompt=16, generate=8)
    assert r4.decode_ops[0].hbm_bytes < 0.6 * r8.decode_ops[0].hbm_bytes
    assert r4.decode_s < r8.decode_s


def test_wide_weights_lose_dsp_packing(u280):
    c8 = simulate_workload(one_layer(weight_bits=8), u280, prompt=512, generate=1).prefill_ops[0].compute_s
    c16 = simulate_workload(one_layer(weight_bits=16), u280, prompt=512, generate=1).prefill_ops[0].compute_s
    assert c16 == pytest.approx(c8 * u280.macs_per_dsp_int8 / u280.macs_per_dsp_wide)


@pytest.mark.parametrize("target", ["alveo-u280", "versal-vhk158"])
def test_decode_latency_is_bytes_over_bandwidth(target):
    p = FpgaParams.from_target(target)
    w = decoder_workload("llama2-7b", FLIGHTLLM_LLAMA2_COMPRESSION)
    r = simulate_workload(w, p, prompt=128, generate=64)
    floor = w.weight_bytes / p.hbm_bytes_per_s            # peak bandwidth, weights only
    assert floor < r.decode_latency_s < 1.15 * floor / p.hbm_efficiency
    assert r.prefill_s > 128 * w.params * 0.9 / (p.mm_macs_per_cycle * p.clock_hz)   # compute-bound prefill


def test_longer_context_slower_decode(u280):
    short = simulate("llama2-7b", u280, prompt=128, generate=64).decode_latency_s
    long = simulate("llama2-7b", u280, prompt=1536, generate=64).decode_latency_s
    assert long > short


def test_resources_within_device():
    for t in ("alveo-u280", "versal-vhk158"):
        r = simulate("llama2-7b", t, prompt=128, generate=4)
        assert set(r.resources) == {"DSP", "LUT", "FF", "BRAM36", "URAM", "HBM"}
        for used, total in r.resources.values():
            assert 0 < used <= total


def test_energy_from_board_power_or_na():
    r = simulate("llama2-7b", "alveo-u280", prompt=128, generate=16)
    assert r.energy_j_per_token == pytest.approx(r.power_w * r.total_s / 16)
    v = simulate("llama2-7b", "versal-vhk158", prompt=128, generate=16)
    assert v.energy_j_per_token is None and any("board_power_w" in n for n in v.notes)


def test_every_parameter_comes_from_the_toml(tmp_path, monkeypatch):
    """Change a design number in a copy of the TOML: the simulation must follow it."""
    base = FpgaParams.from_target("alveo-u280")
    faster = dataclasses.replace(base, hbm_efficiency=base.hbm_efficiency * 2)
    w = decoder_workload("llama2-7b")
    assert simulate_workload(w, faster, prompt=128, generate=8).decode_s < \
        simulate_workload(w, base, prompt=128, generate=8).decode_s
    src = Path(get_target("alveo-u280").path).read_text()
    assert "mv_macs_per_cycle_per_slr" in src and "board_power_w" in src


def _target_without(tmp_path, key: str) -> str:
    from nnforge.targets import _parse
    src = Path(get_target("alveo-u280").path).read_text()
    lines = [l for l in src.splitlines() if not l.startswith(f"{key} =")]
    path = tmp_path / "alveo-u280.toml"
    path.write_text("\n".join(lines))
    return _parse(path)


@pytest.mark.parametrize("key", ["mm_macs_per_cycle_per_slr", "hbm_efficiency", "clock_mhz", "sparse_patterns"])
def test_missing_key_is_a_clear_error(tmp_path, key):
    t = _target_without(tmp_path, key)
    with pytest.raises(SimulatorError, match=key) as e:
        FpgaParams.from_target(t)
    assert str(tmp_path / "alveo-u280.toml") in str(e.value)


def test_non_fpga_target_and_unknown_model_are_errors():
    with pytest.raises(SimulatorError, match="cpu"):
        simulate("llama2-7b", "cpu")
    with pytest.raises(SimulatorError, match="gpt-9"):
        simulate("gpt-9", "alveo-u280")


def test_bundle_workload_reads_encodings(tmp_path):
    bundles = sorted((ROOT / "bundles" / "demo").glob("minilm-*block-sparse*"))
    if not bundles:
        pytest.skip("no demo bundle built here (make demo)")
    r = simulate(bundles[0], "alveo-u280", prompt=128, generate=1)
    sparse = [o for o in r.prefill_ops if o.kind == "linear" and o.macs]
    assert sparse and r.prefill_s > 0


def test_cli_prints_a_table(capsys, tmp_path):
    assert cli.main(["simulate", "opt-6.7b", "--target", "versal-vhk158", "--generate", "8",
                     "--plots", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "decode throughput" in out and "tokens/s" in out and "URAM" in out
    assert len(list(tmp_path.glob("*.svg"))) == 2 and len(list(tmp_path.glob("*.png"))) == 2
    assert out.count("wrote ") == 4
    assert cli.main(["simulate", "nope-model"]) == cli.EXIT_BAD_INPUT


def test_plots_are_svg_and_png(tmp_path):
    written = write_plots(simulate("llama2-7b", "alveo-u280", prompt=128, generate=4), tmp_path)
    assert sorted(p.name for p in written) == [f"llama2-7b-alveo-u280-{n}" for n in
                                               ("breakdown.png", "breakdown.svg", "roofline.png", "roofline.svg")]
    assert "Roofline: llama2-7b on alveo-u280" in svg_text(tmp_path / "llama2-7b-alveo-u280-roofline.svg")
    assert "FPGA time per op" in svg_text(tmp_path / "llama2-7b-alveo-u280-breakdown.svg")
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in written if p.suffix == ".png")


def test_flightllm_rows_within_25_percent():
    spec = importlib.util.spec_from_file_location("fpga_flightllm", ROOT / "benchmarks" / "fpga_flightllm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [r for r in mod.rows() if r["reported"] is not None]
    assert len(rows) == 19
    bad = [(r["target"], r["prompt"], r["generate"], r["metric"], r["error"]) for r in rows if not r["within_25pct"]]
    assert not bad, bad


@pytest.mark.parametrize("prompt, generate, message", [
    (-3, 8, "prompt length (--prompt) must be a whole number of tokens >= 1, got -3"),
    (0, 8, "prompt length (--prompt) must be a whole number of tokens >= 1, got 0"),
    (128, -1, "generated tokens (--generate) must be a whole number >= 0 (0: prefill only, as for an encoder), got -1"),
], ids=["negative-prompt", "empty-prompt", "negative-generate"])
def test_lengths_that_mean_nothing_are_refused(capsys, prompt, generate, message):
    with pytest.raises(SimulatorError) as e:
        simulate("opt-6.7b", "alveo-u280", prompt=prompt, generate=generate)
    assert str(e.value) == message
    capsys.readouterr()
    assert cli.main(["simulate", "opt-6.7b", "--prompt", str(prompt), "--generate", str(generate)]) == 2
    assert capsys.readouterr().err == f"nnforge: error: {message}\n"


def test_generating_nothing_is_a_prefill_only_run():
    r = simulate("opt-6.7b", "alveo-u280", prompt=64, generate=0)
    assert r.prefill_s > 0 and r.decode_s == 0 and r.energy_j_per_token is None


FLIGHTLLM = ("FlightLLM's released Llama-2 configuration (q_proj, k_proj: 8-bit block-sparse keeping 70%; every "
             "other layer: 8-bit dense)")


@pytest.mark.parametrize("model, stated", [
    ("llama2-7b", FLIGHTLLM),
    ("opt-6.7b", "nnforge's default for a decoder: 8-bit dense weights everywhere"),
])
def test_table_and_json_say_which_compression_was_assumed(capsys, model, stated):
    capsys.readouterr()
    assert cli.main(["simulate", model, "--generate", "4"]) == 0
    assert f"\n  compression assumed: {stated}\n" in capsys.readouterr().out
    assert cli.main(["simulate", model, "--generate", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compression"] == stated


def test_a_graph_is_simulated_with_its_own_encodings_stated():
    import torch
    from nnforge.frontend import from_torch
    from tests.conftest import tiny_mlp
    graph = from_torch(tiny_mlp(), (torch.randn(2, 16),), name="mlp")
    r = simulate(graph, "alveo-u280", prompt=16, generate=0)
    assert r.summary()["compression"] == "the weight encodings of mlp: 2 layers 32-bit dense"
    w = Workload("g", (Linear("a", 8, 8, weight_bits=4), Linear("b", 8, 8, weight_bits=4),
                       Linear("c", 8, 8, weight_bits=8, density=0.5, pattern="nm"),
                       Linear("emb", 100, 8, weight_bits=32, lookup=True)))
    assert describe_layers(w.linears) == "2 layers 4-bit dense, 1 layer 8-bit N:M-sparse keeping 50%, 1 embedding 32-bit dense"
    assert describe_compression({"q_proj": dict(weight_bits=4, density=0.5, pattern="nm")}) == \
        "q_proj: 4-bit N:M-sparse keeping 50%; every other layer: 8-bit dense"


def test_a_decoder_graph_is_simulated_with_its_attention_and_kv_cache():
    """A decoder bundle's graph (here as imported) names its attention: the workload has its blocks,
    heads and KV width, so decode slows with the context and the KV cache takes HBM."""
    from nnforge.fpga import graph_workload
    from nnforge.frontend.decoders.importer import import_decoder
    from tests.frontend.decoders.families import tiny_model
    w = graph_workload(import_decoder(tiny_model("llama"), max_len=32).graph, name="tiny-llama")
    assert (w.layers, w.heads, w.hidden, w.kv_dim) == (2, 4, 64, 32) and w.misc_per_token > 0
    short, long = (simulate(w, "alveo-u280", prompt=p, generate=8) for p in (16, 4000))
    assert long.decode_latency_s > short.decode_latency_s
    assert short.prefill_tokens_per_s == 16 / short.prefill_s
    hbm, capacity = short.resources["HBM"]
    assert w.weight_bytes < hbm < capacity and short.summary()["prefill_tokens_per_s"] > 0
