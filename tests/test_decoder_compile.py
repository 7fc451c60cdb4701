"""A causal LM through nf.compile and `nnforge compile`: the decoder bundle (graph, manifest decoder
section, tokenizer), text calibration and held-out text windows, the import check against
transformers, and the errors of the decoder front door."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

import nnforge as nf
from nnforge.cli import main
from nnforge.frontend import FrontendError
from nnforge.passes import PassError
from tests.frontend.decoders.families import llama_directory, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved as a transformers model directory with a word-level tokenizer, and text."""
    root = llama_directory(tmp_path_factory.mktemp("llm"))
    r = random.Random(1)
    (root / "check.txt").write_text(" ".join(f"w{r.randrange(4, 128)}" for _ in range(300)))
    return root


def test_module_compiles_to_a_decoder_bundle(tmp_path):
    model = tiny_model("gemma3")
    bundle = nf.compile(model, "onnx", out=tmp_path / "b", max_len=40)
    m = bundle.manifest
    d = m["decoder"]
    assert (d["family"], d["max_len"], d["tied_embeddings"], d["windows"]) == ("gemma3", 40, True, [0, 16])
    assert [(s["input"], s["output"]) for s in d["state"]] == [(f"cache.{i}.{k}", f"cache.{i}.{k}.next")
                                                                for i in range(4) for k in "kv"]
    assert d["state"][0]["shape"] == ["batch", 1, 40, 32]
    assert d["generation"]["eos_token_ids"] == [2] and d["tokenizer"] is None
    assert m["model"]["frontend_check"]["checked"] and m["model"]["frontend_check"]["cosine_min"] > 0.99999
    assert m["numerics"]["runtime_checked"] and m["numerics"]["held_out"]["source"].startswith("the example inputs")
    assert m["speed"]["why"].startswith("a decoder is timed in tokens/s")
    assert [i["name"] for i in m["signature"]["inputs"]][:2] == ["input_ids", "positions"]


@pytest.mark.parametrize("target,recipe", [("mlir", "kv-fp8"), ("mlir", "w8+kv4"), ("mlir", "kv-gear4"), ("h100", "kv4")])
def test_an_encoded_kv_cache_is_refused_before_a_bundle_is_written(tmp_path, target, recipe):
    from nnforge.backends.base import BackendError
    with pytest.raises(BackendError) as e:
        nf.compile(tiny_model("llama"), target, recipe, out=tmp_path / "b", max_len=16)
    backend = {"onnx": "onnx", "cpu": "tvm", "mlir": "mlir", "h100": "triton"}[target]
    encoding = recipe.rsplit("+", 1)[-1]
    assert f"the {backend} backend cannot run the encoded KV cache of 4 cache(s) on {target}" in str(e.value)
    assert f"cache.1.v of layer model.layers.1.self_attn ({encoding}: " in str(e.value)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("method", ["evict", "merge"])
def test_a_reduced_kv_cache_compiles_and_its_bundle_generates_past_the_budget(tmp_path, method):
    """kv-evict / kv-merge on onnx: the check batches feed slots = positions (a sequence that lost no
    token), the bundle verifies, and its runner keeps the cache within the budget while it generates
    past it; with a budget the sequence fits in, the tokens are the unreduced bundle's."""
    from nnforge.generation import generate
    model = tiny_model("llama")
    plain = nf.compile(model, "onnx", None, out=tmp_path / "plain", max_len=64).load()
    roomy = nf.compile(model, "onnx", f"kv-{method}-60", out=tmp_path / "roomy", max_len=64)
    tight = nf.compile(model, "onnx", f"kv-{method}-16", out=tmp_path / "tight", max_len=64)
    assert tight.manifest["decoder"]["kv_reduce"]["budget"] == 16 and nf.verify(tight.path)["passed"]
    prompt = IDS[0, :6]
    want = generate(plain.decoder(), prompt, 40, stop_tokens=[]).tokens
    assert generate(roomy.load().decoder(), prompt, 40, stop_tokens=[]).tokens == want
    decoder = tight.load().decoder()
    got = generate(decoder, prompt, 40, stop_tokens=[])
    assert len(got.tokens) == 40 and got.tokens[:8] == want[:8]       # the budget binds only past 16 tokens
    # a fork past the budget: each copy keeps its slots' statistics, so it reduces as the original does
    one, two = tight.load().decoder(), tight.load().decoder()
    one.prefill(prompt)
    two.prefill(prompt)
    for token in got.tokens[:20]:
        one.step(torch.tensor([token]))
        two.step(torch.tensor([token]))
    two.fork(2)
    for token in got.tokens[20:30]:
        want_logits = one.step(torch.tensor([token]))
        both = two.step(torch.tensor([token, token]))
        torch.testing.assert_close(both, want_logits.expand(2, -1), rtol=0, atol=0)


KV4_SMALL = [{"pass": "kv_cache", "encoding": "kv4", "group_size": 8, "residual": 12}]
# layer 1's in place; layer 0's kv8 in groups of 8 channels, two scales a token of the 16-channel heads
KV8_BUT_LAYER_1 = [{"pass": "kv_cache", "encoding": "kv8", "group_size": 8, "exclude": ["cache.1.*"]}]


@pytest.mark.parametrize("recipe", ["kv8", "kv-fp8", "kv4", "kv-nvfp4", "kv-gear4", "kv-f16", "w4-gptq+kv8",
                                    KV4_SMALL, KV8_BUT_LAYER_1],
                         ids=["kv8", "kv-fp8", "kv4", "kv-nvfp4", "kv-gear4", "kv-f16", "w4-gptq+kv8", "kv4-g8-r12",
                              "kv8-g8-but-layer-1"])
def test_an_encoded_kv_cache_generates_on_onnx_as_on_the_interpreter(model_dir, tmp_path, recipe):
    """32 greedy tokens after a short prompt and after one longer than kv4's window (128 + 32 - 1
    tokens; kv-gear4's is 64 + 64 - 1), equal on ONNX Runtime and on the reference interpreter, the state fed back through
    numpy in its stored dtypes (or, beside float caches GroupQueryAttention writes in place, kept in
ONNX Runtime's memory); the manifest's bytes per token are those of the real state arrays,
    and the fidelity against fp32 compares the outputs both graphs have."""
    from nnforge.generation import DecoderRunner, generate
    from nnforge.ir import Interpreter
    calibration = model_dir / "calib.txt" if recipe == "w4-gptq+kv8" else None
    bundle = nf.compile(model_dir / "model", "onnx", recipe, calibration=calibration, out=tmp_path / "b", max_len=224)
    m = bundle.manifest
    kept = ["cache.1.k.next", "cache.1.v.next"] if recipe is KV8_BUT_LAYER_1 else []     # float caches left as they were
    assert m["numerics"]["runtime_checked"] and m["numerics"]["compared_outputs"] == ["logits", *kept]
    assert nf.verify(bundle.path)["passed"]
    lm = bundle.load()
    sig = m["signature"]
    graph = bundle.graph()
    reference = DecoderRunner(lambda *xs: Interpreter(graph).run(*xs), m["decoder"], [i["name"] for i in sig["inputs"]],
                              [o["name"] for o in sig["outputs"]])
    for prompt in (IDS[0, :6], torch.randint(4, 128, (170,), generator=torch.Generator().manual_seed(8))):
        onnx_decoder = lm.decoder()
        got = generate(onnx_decoder, prompt, 32, stop_tokens=[])
        want = generate(reference.decoder(resident=False), prompt, 32, stop_tokens=[])
        assert got.tokens == want.tokens
    declared = {i["name"]: i["dtype"] for i in sig["inputs"]}
    state = onnx_decoder.cache
    assert all(str(a.dtype).removeprefix("torch.") == declared[name] for name, a in state.items())
    per_sequence = sum(a.element_size() * a[0].numel() for a in state.values())
    assert m["decoder"]["kv_cache"]["bytes_per_token"] == per_sequence / 224


# kv8 and kv-fp8 share their kernels' shape with kv-nvfp4 (per-token codes and scales), kv-gear4's
# read and write are kv4's plus its own kernels, and all their kernels are checked against the
# interpreter in tests/backends/tvm/test_kv_cache_kernels.py: their whole-decoder runs go under
# -m slow to keep the default suite in its budget
@pytest.mark.parametrize("recipe", ["kv4", pytest.param("kv8", marks=pytest.mark.slow),
                                    pytest.param([{"pass": "kv_cache", "encoding": "kv8", "group_size": 8}],
                                                 marks=pytest.mark.slow, id="kv8-g8"),
                                    pytest.param("kv-fp8", marks=pytest.mark.slow),
                                    pytest.param("kv-nvfp4", marks=pytest.mark.slow),
                                    pytest.param("kv-gear4", marks=pytest.mark.slow), "kv-f16"])
def test_an_encoded_kv_cache_generates_on_cpu_as_on_the_interpreter(model_dir, tmp_path, recipe):
    """The tvm backend runs the encoded caches natively: 32 greedy tokens after a short prompt and
    after one longer than kv4's window, equal to the reference interpreter's, the resident state
    held between steps as TVM tensors of the encoded dtypes (no float cache) and equal to the state
    passed through numpy (kv-gear4: its reads dequantised for the float attention kernel)."""
    from nnforge.backends.tvm.ops_kvcache import FUSED
    from nnforge.generation import DecoderRunner, generate
    from nnforge.ir import Interpreter
    bundle = nf.compile(model_dir / "model", "cpu", recipe, out=tmp_path / "b", max_len=224)
    m = bundle.manifest
    assert m["numerics"]["runtime_checked"] and m["numerics"]["compared_outputs"] == ["logits"]
    library = (bundle.path / "model.so").read_bytes()
    kind = recipe if isinstance(recipe, str) else recipe[0]["encoding"]
    if kind in FUSED:
        assert f"nf_{kind.replace('-', '_')}_attention".encode() in library and b"nf_attention" not in library
    else:
        assert f"nf_{kind.replace('-', '_')}_read".encode() in library and b"nf_attention" in library
    sig = m["signature"]
    graph = bundle.graph()
    reference = DecoderRunner(lambda *xs: Interpreter(graph).run(*xs), m["decoder"], [i["name"] for i in sig["inputs"]],
                              [o["name"] for o in sig["outputs"]])
    lm = bundle.load()
    for prompt in (IDS[0, :6], torch.randint(4, 128, (170,), generator=torch.Generator().manual_seed(8))):
        cpu_decoder = lm.decoder()
        got = generate(cpu_decoder, prompt, 32, stop_tokens=[])
        want = generate(reference.decoder(resident=False), prompt, 32, stop_tokens=[])
        assert got.tokens == want.tokens
    assert cpu_decoder._resident is not None
    declared = {i["name"]: i["dtype"] for i in sig["inputs"]}
    held = cpu_decoder._resident.state
    assert sorted(held) == sorted(s["input"] for s in m["decoder"]["state"])
    assert {str(t.dtype) for t in held.values()} == {declared[name] for name in held} >= {"float16"}
    assert all(str(t.dtype) == declared[name] for name, t in held.items())
    assert_resident_agrees(lm)          # in place in TVM's memory as through numpy, bit for bit


def test_directory_with_text_calibration_on_cpu(model_dir, tmp_path):
    bundle = nf.compile(model_dir / "model", "cpu", "w4-gptq", calibration=model_dir / "calib.txt",
                        check_inputs=str(model_dir / "check.txt"), out=tmp_path / "b", max_len=64)
    m = bundle.manifest
    assert m["calibration"]["source"] == f"text: {model_dir / 'calib.txt'}"
    assert m["model"]["frontend_check"]["checked"] and m["model"]["frontend_check"]["max_abs_error"] < 1e-4
    assert m["calibration"]["batches"] == len(range(0, 1199, 64))            # 64-token windows (max_len caps 128)
    assert m["numerics"]["held_out"]["source"] == "check_inputs= (from the user)"
    assert m["decoder"]["tokenizer"] == "tokenizer" and (bundle.path / "tokenizer" / "tokenizer.json").is_file()
    assert "tokenizer/tokenizer.json" in m["files"]
    assert 0.9 < m["numerics"]["fidelity_vs_fp32"]["cosine_mean"] < 1.0
    assert m["numerics"]["runtime_checked"]


def test_cli_compiles_a_model_directory(model_dir, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["compile", str(model_dir / "model"), "--target", "onnx", "--recipe", "w4-rtn", "--max-len", "48",
                 "--check-inputs", str(model_dir / "check.txt"), "--head", "fp32", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decoder"]["max_len"] == 48 and manifest["decoder"]["head"]["format"] == "fp32"
    assert "a decoder is timed in tokens/s" in capsys.readouterr().out


def test_errors_of_the_decoder_front_door(model_dir, tmp_path, capsys):
    with pytest.raises(PassError, match="runs quantize_gptq, which needs calibration data"):
        nf.compile(model_dir / "model", "onnx", "w4-gptq", out=tmp_path / "a")
    with pytest.raises(FrontendError, match="came without a tokenizer, so text cannot be read"):
        nf.compile(tiny_model("llama"), "onnx", "w4-gptq", calibration=["w5 w6 w7"], out=tmp_path / "b")
    with pytest.raises(FrontendError, match="max_len must be an integer >= 2"):
        nf.compile(tiny_model("llama"), "onnx", max_len=1, out=tmp_path / "c")
    with pytest.raises(FrontendError, match="example_inputs is required"):
        nf.compile(torch.nn.Linear(4, 4), "onnx", out=tmp_path / "d")
    assert main(["compile", str(model_dir / "model"), "--target", "onnx", "--calibration",
                 str(model_dir / "model" / "config.json"), "--recipe", "w4-gptq"]) == 2
    assert "takes its calibration and check data as text, a .txt file" in capsys.readouterr().err
    assert main(["compile", "default", "--target", "onnx", "--max-len", "64"]) == 2
    assert "--max-len is the KV cache length of a causal LM" in capsys.readouterr().err
    assert main(["compile", "default", "--target", "onnx", "--head", "fp32"]) == 2
    assert "--head is the format of a causal LM's LM head" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_state_pairs_follow_the_graph(tmp_path):
    bundle = nf.compile(tiny_model("gpt2"), "onnx", out=tmp_path / "b", max_len=32)
    graph = bundle.graph()
    pairs = [(s["input"], s["output"]) for s in bundle.manifest["decoder"]["state"]]
    assert pairs == state_pairs_of(graph)


def state_pairs_of(graph):
    outs = {v.name for v in graph.outputs}
    return [(v.name, v.name + ".next") for v in graph.inputs if v.name + ".next" in outs]


# on cpu, mistral, qwen2, gemma2 and phi3 add no kernel that llama, qwen3, gemma3 and gpt2 do not
# run (the families differ in the graph, which onnx checks for all): their cpu runs go under -m slow
CPU_BY_DEFAULT = {"llama", "gemma3"}      # the other families on cpu under -m slow (the suite's budget); onnx runs all


@pytest.mark.parametrize("family, target", [
    pytest.param(f, t, marks=() if t == "onnx" or f in CPU_BY_DEFAULT else (pytest.mark.slow,), id=f"{f}-{t}")
    for f in ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2"] for t in ["onnx", "cpu"]])
def test_fp32_bundle_generates_and_scores_like_transformers(tmp_path, family, target):
    """64 greedy tokens equal to transformers' generate (past every sliding window of the
    configs), and the perplexity of its loss."""
    model = tiny_model(family, **({"n_positions": 96} if family == "gpt2" else {}))
    lm = nf.compile(model, target, out=tmp_path / "b", max_len=80).load()
    prompt = torch.tensor([[1, 17, 42, 99, 5, 23]])
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)[0, 6:].tolist()
    pieces = []
    result = lm.generate(prompt, 64, stop_tokens=[], on_token=lambda t, s: pieces.append(t))
    assert result.tokens == want and pieces == want
    assert result.decode_steps == 63 and result.decode_tokens_per_s > 0
    ids = torch.randint(4, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss = float(model(ids, labels=ids).loss)
    got = lm.perplexity(ids[0], window=48)
    assert got.tokens == 39 and got.nll == pytest.approx(loss, rel=1e-4)


IDS = torch.randint(4, 128, (2, 30), generator=torch.Generator().manual_seed(5))


def assert_resident_agrees(lm):
    """The decoder keeping its cache in the runtime's memory gives exactly the logits and caches of
    the one passing them through numpy, over a batch of 2: prefill, then five steps."""
    kept, plain = lm.decoder(), lm.decoder(resident=False)
    assert kept._resident is not None and plain._resident is None
    torch.testing.assert_close(kept.prefill(IDS), plain.prefill(IDS), rtol=0, atol=0)
    for token in (7, 99, 3, 42, 11):
        torch.testing.assert_close(kept.step(torch.tensor([token, token + 1])),
                                   plain.step(torch.tensor([token, token + 1])), rtol=0, atol=0)
    kept.fork(2)                                            # the state written back into the runtime
    plain.fork(2)
    torch.testing.assert_close(kept.step(torch.tensor([5, 6, 7, 8])), plain.step(torch.tensor([5, 6, 7, 8])),
                               rtol=0, atol=0)
    assert sorted(kept.cache) == sorted(plain.cache)
    for name, value in plain.cache.items():
        torch.testing.assert_close(kept.cache[name], value, rtol=0, atol=0)
    return plain


def test_cpu_keeps_the_cache_in_tvm_memory_and_agrees_with_numpy_steps(tmp_path):
    assert_resident_agrees(nf.compile(tiny_model("gemma3"), "cpu", out=tmp_path / "b", max_len=48).load())


def test_onnx_keeps_the_cache_in_ort_memory_and_agrees_with_numpy_steps(tmp_path):
    """GroupQueryAttention writes every layer's caches in place: the resident decoder binds them
    between steps, the numpy steps bind copies; both agree, also for a batch of 2 prefilled in
    chunks (several tokens per row after a prefix: run row by row)."""
    bundle = nf.compile(tiny_model("gemma3"), "onnx", out=tmp_path / "b", max_len=48)
    state = bundle.manifest["decoder"]["state"]
    assert bundle.manifest["backend"]["entry"]["kv_cache"]["shared_buffers"] == {s["output"]: s["input"] for s in state}
    lm = bundle.load()
    assert_resident_agrees(lm)
    chunked, plain = lm.decoder(prefill_chunk=7), lm.decoder(resident=False)
    torch.testing.assert_close(chunked.prefill(IDS), plain.prefill(IDS), rtol=1e-5, atol=1e-5)


def test_cli_generate_and_eval(model_dir, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["compile", str(model_dir / "model"), "--target", "onnx", "--max-len", "64", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "w5 w6 w7", "--max-new-tokens", "6"]) == 0
    got = capsys.readouterr()
    lm = nf.load(out)
    want = lm.generate("w5 w6 w7", 6)
    assert got.out.strip() == want.text.strip() and want.text
    assert "prefill: 3 tokens at" in got.err and "decode: " in got.err and "tokens/s" in got.err
    assert main(["generate", str(out), "4 5 6", "--ids", "--max-new-tokens", "3", "--temperature", "0.7",
                 "--seed", "1"]) == 0
    assert main(["eval", str(out), "--perplexity", str(model_dir / "check.txt"), "--window", "32",
                 "--stride", "16"]) == 0
    line = capsys.readouterr().out
    ppl = lm.perplexity((model_dir / "check.txt").read_text(), window=32, stride=16)
    assert f"perplexity {ppl.perplexity:.4f}" in line and f"on {ppl.tokens} tokens" in line
    assert main(["generate", str(out), " ".join(["w5"] * 60), "--max-new-tokens", "10"]) == 2
    assert "need 69 cache positions, but the decoder was compiled with max_len 64" in capsys.readouterr().err


def test_generate_refuses_a_bundle_that_is_not_a_decoder(tmp_path, capsys):
    from tests.conftest import tiny_mlp
    nf.compile(tiny_mlp(), "onnx", example_inputs=(torch.randn(2, 16),), out=tmp_path / "b", batch_sizes=())
    assert main(["generate", str(tmp_path / "b"), "hi"]) == 2
    assert "is not a decoder bundle" in capsys.readouterr().err


@pytest.mark.parametrize("head,want", [("w8", "i8 per-channel sym"), ("fp32", "dense"), ("recipe", "u4 per-channel asym")])
def test_the_head_has_its_own_format(tmp_path, head, want):
    bundle = nf.compile(tiny_model("llama"), "onnx", "w4-rtn", out=tmp_path / "b", max_len=32, head=head)
    graph = bundle.graph()
    assert graph.node("lm_head").inputs[1].encoding.describe().startswith(want)
    assert graph.node("model.layers.0.mlp.up_proj").inputs[1].encoding.describe() == "u4 per-channel asym"
    d = bundle.manifest["decoder"]["head"]
    assert d["format"] == head and d["embedding"].startswith("tied: the token embedding reads the head's weight")
    passes = bundle.manifest["recipe"]["passes"]
    if head == "w8":
        assert passes[-1]["layers"] == ["lm_head"] and "lm_head" in passes[0]["exclude"]


def test_an_int4_head_runs_natively_on_cpu_and_keeps_float16_scales(model_dir, tmp_path):
    """head="w4-g32": GPTQ on the head's own calibration inputs, float16 scales kept as stored by the
    cpu kernel (no fallback for the head or the tied embedding), and the bundle verified."""
    bundle = nf.compile(model_dir / "model", "cpu", "w4-rtn", calibration=model_dir / "calib.txt",
                        out=tmp_path / "b", max_len=64, head="w4-g32")
    enc = bundle.graph().node("lm_head").inputs[1].encoding
    assert (enc.bits, enc.group_size, str(enc.scale.dtype)) == (4, 32, "torch.float16")
    m = bundle.manifest
    assert m["decoder"]["head"]["format"] == "w4-g32" and not m["fallbacks"] and m["numerics"]["runtime_checked"]
    assert m["recipe"]["passes"][-1]["pass"] == "quantize_gptq" and m["recipe"]["passes"][-1]["layers"] == ["lm_head"]
    lm = bundle.load()
    assert len(lm.generate("w1 w2 w3", max_new_tokens=4).tokens) == 4


def test_an_unknown_head_format_is_refused(tmp_path):
    with pytest.raises(PassError, match=r"head format 'w4': choose from w8, w4-g32, fp32, recipe"):
        nf.compile(tiny_model("llama"), "onnx", "w4-rtn", out=tmp_path / "b", max_len=32, head="w4")
    assert not (tmp_path / "b").exists()


def baseline_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_the_manifest_records_peak_memory_and_pass_time(tmp_path):
    import numpy as np
    before = baseline_rss()
    earlier = np.ones(2 << 30, np.uint8)          # a 2 GiB peak before the compile, in the same process
    del earlier
    m = nf.compile(tiny_model("llama"), "onnx", "w4-rtn", out=tmp_path / "b", max_len=32).manifest
    peaks = m["memory"]["peak_rss_bytes"]
    if m["memory"]["what"].endswith("since this compile started"):      # (Linux: the compile's own peak)
        assert peaks["after_lowering"] < before + (1 << 30)             # a tiny model's compile adds less
    assert list(peaks) == ["after_import", "after_passes", "after_lowering"]
    assert 0 < peaks["after_import"] <= peaks["after_passes"] <= peaks["after_lowering"]
    assert m["timings"]["passes_s"] > 0


def test_verify_confirms_a_decoder_bundles_claims(tmp_path):
    bundle = nf.compile(tiny_model("llama"), "onnx", "w4-rtn", out=tmp_path / "b", max_len=512)
    assert nf.verify(bundle.path)["claims"].startswith("recomputed and confirmed")
    # the reference files hold the slots the check windows wrote, not every cache's max_len
    cache_bytes = sum(4 * math.prod([1, *s["shape"][1:]]) for s in bundle.manifest["decoder"]["state"])
    ref = bundle.path / "reference"
    assert sum(f.stat().st_size for f in ref.iterdir()) < cache_bytes
    inputs, _, fp32 = bundle.reference()
    assert list(inputs[2].shape) == [1, *bundle.manifest["decoder"]["state"][0]["shape"][1:]]
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    manifest["decoder"]["head"]["format"] = "fp32"
    (bundle.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="recipe.passes: preset w4-rtn runs"):
        nf.verify(bundle.path)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma2", "phi3", "phi3-plain", "gpt2", "llama-yarn"])
def test_every_family_generates_like_transformers_on_onnx(tmp_path, family):
    model = tiny_model(family)
    lm = nf.compile(model, "onnx", out=tmp_path / "b", max_len=48).load()
    prompt = torch.tensor([[1, 17, 42, 99, 5, 23, 8, 61, 30, 12, 77, 45, 9, 100, 3, 66, 21, 90]])    # past the windows
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, 18:].tolist()
    assert lm.generate(prompt, 16, stop_tokens=[]).tokens == want


def test_text_and_token_input_errors(tmp_path, capsys):
    from nnforge.frontend.decoders.importer import import_decoder, read_text
    with pytest.raises(FrontendError, match=r"missing.txt: cannot read the text file"):
        read_text(str(tmp_path / "missing.txt"))
    with pytest.raises(FrontendError, match="a .txt path, a string or a list of strings, not int"):
        read_text(3)
    imp = import_decoder(tiny_model("llama"), max_len=16)
    with pytest.raises(FrontendError, match="17 tokens do not fit the cache of 16"):
        imp.inputs(torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(FrontendError, match=r"token ids must be \[batch, tokens\]"):
        imp.inputs(torch.zeros(5, dtype=torch.int64))
    out = tmp_path / "b"
    nf.compile(tiny_model("llama"), "onnx", out=out, max_len=16)
    (tmp_path / "t.txt").write_text("w5 w6")
    assert main(["eval", str(out), "--perplexity", str(tmp_path / "t.txt")]) == 2
    assert "has no tokenizer, so it cannot read" in capsys.readouterr().err
    assert main(["generate", str(out), "hi"]) == 2
    assert "give the prompt as token ids with --ids" in capsys.readouterr().err


def test_a_causal_lm_of_an_unknown_family_compiles_as_a_stateless_graph_of_its_logits(tmp_path):
    from tests.architectures import ARCHITECTURES
    arch = ARCHITECTURES["mixtral"]
    lm = arch.build().lm                                        # MixtralForCausalLM itself, no wrapper
    with pytest.raises(FrontendError, match=r"model_type 'mixtral'\) is not a decoder family nnforge knows; .*"
                                            r"To compile it as a stateless graph of its logits \(no KV cache, no "
                                            r"generate\(\)\), give example_inputs=\(input_ids,\)"):
        nf.compile(lm, "onnx", out=tmp_path / "refused")
    with pytest.warns(UserWarning, match=r"MixtralForCausalLM: .*compiling it as a stateless graph of its logits"):
        bundle = nf.compile(lm, "onnx", example_inputs=arch.inputs(batch=1, size=8, seed=0), out=tmp_path / "b")
    assert bundle.manifest["model"]["name"] == "MixtralForCausalLM"
    ids = arch.inputs(batch=1, size=8, seed=3)[0]
    with torch.no_grad():
        want = lm(ids, use_cache=False).logits
    torch.testing.assert_close(nf.load(bundle.path)(ids), want, rtol=1e-4, atol=1e-4)


def test_an_encoded_cache_is_held_to_rounding_where_codes_flip_in_cascade(model_dir, tmp_path, monkeypatch):
    """In a deep decoder, a key the backend computes a last bit away from the interpreter's flips
    a code, and later layers see the flipped value: codes then differ in more than
    ENCODED_STATE_TOLERANCE's share while the logits stay as close to fp32 as the reference's.
    The runtime check (compile and nf.verify) then holds the backend to fp32 as for rounded
    activations, and refuses a runtime that drifts further."""
    from nnforge.backends.base import BackendError, get_backend
    from nnforge.ir import Interpreter
    from nnforge.pipeline import runtime_check
    from nnforge.targets import get_target
    bundle = nf.compile(model_dir / "model", "onnx", "kv8", out=tmp_path / "b", max_len=64)
    graph, tgt = bundle.graph(), get_target("onnx")
    inputs, expected, fp32 = bundle.reference()
    runner = bundle.load()
    names = [v.name for v in graph.outputs]
    codes = names.index("cache.0.k.codes.next")

    def flipping(scale):
        def run(*xs):
            out = [torch.as_tensor(o).clone() for o in runner(*xs)]
            c = out[codes]
            mask = torch.rand(c.shape, generator=torch.Generator().manual_seed(0)) < 0.05
            c[mask] = (c[mask].to(torch.int16) + 1).clamp(-127, 127).to(c.dtype)
            out[0] = out[0] + scale * out[0].std() * torch.randn(out[0].shape, generator=torch.Generator().manual_seed(1))
            return tuple(out)
        return run

    reference = Interpreter(graph).run(*inputs)
    got = runtime_check(flipping(0.0), graph, get_backend("onnx"), tgt, inputs, reference, [fp32[0]],
                        compared=[0])
    assert got["backend_vs_reference"]["exact_match"] < 0.99 and "rounded at run time" in got["check"]
    with pytest.raises(BackendError, match="drifts from fp32 further than rounding explains"):
        runtime_check(flipping(0.2), graph, get_backend("onnx"), tgt, inputs, reference, [fp32[0]], compared=[0])
    from nnforge.bundle import Bundle
    from nnforge.bundle.store import BundleError
    monkeypatch.setattr(Bundle, "load", lambda self: flipping(0.0))
    assert nf.verify(bundle.path)["passed"]
    monkeypatch.setattr(Bundle, "load", lambda self: flipping(0.2))
    with pytest.raises(BundleError, match="drifts from fp32 further than rounding explains"):
        nf.verify(bundle.path)
