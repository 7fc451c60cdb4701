"""The small real LLM (Gemma 3 270M, the package the demo uses) compiled with w4-gptq for the
targets that do not run here as their hardware would: the FPGA design, the Core ML package and the
Triton bundle. For each: how long the compile took on this machine, what the bundle's own check
measured, whether greedy tokens through what can run here (the Core ML package's MIL program in
numpy) are the reference interpreter's, and for the FPGA the accelerator model's prefill and decode rates and
resources for this graph (simulated, not measured). The cpu, onnx and mlir rows of the same model
are in docs/measured/llm.md and tests/test_demo_llm.py.

Writes benchmarks/out/llm_targets.json and the table in docs/measured/llm_targets.md.

    python benchmarks/llm_targets.py [--targets alveo-u280 apple-m2 h100] [--tokens 8] [--max-len 64]

Each compile takes minutes and 8-10 GB on a 2-core machine; the targets run one after another.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _names(m: dict) -> tuple[list[str], list[str]]:
    return [i["name"] for i in m["signature"]["inputs"]], [o["name"] for o in m["signature"]["outputs"]]


def runnable_here(bundle):
    """A decoder runner over what runs on this machine for the bundle's target (None: nothing does),
    and what it is."""
    backend = bundle.manifest["backend"]["name"]
    if backend == "hls":
        # the compile's runtime check ran the C-simulation on the check batch; generating through
        # the emulation (int64 arrays of every weight and activation) or a fresh load of the design
        # went past a 24 GB machine for this model
        return None, "the compile's check only (C-simulation of the check batch)"
    if backend == "coreml":
        from nnforge.backends.coreml.mil_numpy import program_runner
        return program_runner(bundle.path).decoder(), "the package's MIL program in numpy"
    return None, "nothing (needs the target's hardware)"


def measure(target: str, recipe: str, tokens: int, max_len: int, work: Path) -> dict:
    import nnforge as nf
    from nnforge.frontend.decoders.importer import CHECK_TEXT
    from nnforge.generation import DecoderRunner, generate
    from nnforge.ir import Interpreter
    from nnforge.models.llm import load_small_llm, small_llm_directory, text_split
    _, tokenizer, _ = load_small_llm()
    calibration = tokenizer.decode(tokenizer(text_split()[0])["input_ids"][:1024])
    start = time.perf_counter()
    bundle = nf.compile(small_llm_directory(work), target, recipe, max_len=max_len, calibration=calibration,
                        out=work / "b", progress=False)
    row = {"target": target, "recipe": recipe, "compile_s": time.perf_counter() - start}
    m = bundle.manifest
    entry = m["backend"]["entry"]
    numerics = m["numerics"]
    check = entry.get("verify", {}).get("program_check") if isinstance(entry.get("verify"), dict) else None
    if numerics.get("runtime_checked"):
        row["check"] = f"runtime cosine min {numerics['backend_vs_reference']['cosine_min']:.5f}"
    elif check:
        row["check"] = f"MIL program cosine min {check['cosine_min']:.5f}"
    else:
        row["check"] = "not run here"
    fit = entry.get("activation_fit")
    if fit:
        row["activation_fit"] = {"residual_scale": fit.get("residual_scale"), "format": fit["format"]}
    sim = entry.get("simulation")
    if sim and "prefill_tokens_per_s" in sim:
        row["simulation"] = {k: sim[k] for k in ("prompt", "generate", "prefill_tokens_per_s", "decode_tokens_per_s",
                                                 "resources") if k in sim}
    decoder, what = runnable_here(bundle)
    row["ran"] = what
    if decoder is not None:
        graph = bundle.graph()
        reference = DecoderRunner(lambda *xs: Interpreter(graph).run(*xs), m["decoder"], *_names(m))
        prompt = bundle.tokenizer()(CHECK_TEXT)["input_ids"][:24]
        want = generate(reference.decoder(resident=False), prompt, tokens, stop_tokens=[]).tokens
        got = generate(decoder, prompt, tokens, stop_tokens=[]).tokens
        row["tokens_equal"] = got == want
        row["text"] = tokenizer.decode(want)
    return row


def _resources(sim: dict) -> str:
    """"DSP 1234 of 9024 (14%), ..." from the simulation summary's {name: {used, total}}."""
    parts = []
    for k in ("DSP", "BRAM", "URAM", "HBM"):
        v = sim.get("resources", {}).get(k)
        if v:
            used, total = v["used"], v["total"]
            if k == "HBM":
                parts.append(f"HBM {used / 2**20:.0f} MiB of {total / 2**30:.0f} GiB ({used / total:.1%})")
            else:
                parts.append(f"{k} {used} of {total} ({used / total:.0%})")
    return ", ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", default=["alveo-u280", "apple-m2", "h100"])
    p.add_argument("--recipe", default="w4-gptq")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--max-len", type=int, default=64)
    args = p.parse_args(argv)
    rows = []
    for target in args.targets:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                row = measure(target, args.recipe, args.tokens, args.max_len, Path(tmp))
            except Exception as e:          # one target's failure is a row, not the end of the others
                row = {"target": target, "recipe": args.recipe, "compile_s": float("nan"),
                       "check": f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}", "ran": "-"}
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "llm_targets.json").write_text(json.dumps(rows, indent=1, default=str))
    import docs_table
    table = []
    for r in rows:
        sim = r.get("simulation") or {}
        table.append([r["target"], r["recipe"], f"{r['compile_s']:.0f}", r["check"], r["ran"],
                      {True: f"yes ({args.tokens})", False: "no"}.get(r.get("tokens_equal"), "-"),
                      f"{sim['prefill_tokens_per_s']:.0f} / {sim['decode_tokens_per_s']:.0f}" if sim else None,
                      _resources(sim) if sim else None])
    docs_table.write("measured/llm_targets.md", "llm_targets",
                     ["target", "recipe", "compile s", "bundle's check", "runs here as", "greedy tokens = interpreter's",
                      "simulated prefill / decode tokens/s", "simulated resources"], table,
                     source="benchmarks/out/llm_targets.json",
                     notes=[f"Gemma 3 270M at max_len {args.max_len}, calibrated on 1024 tokens of the package's "
                            "calibration text; the greedy tokens follow the first 24 tokens of the decoder check "
                            "text. FPGA rates and resources are the accelerator model's (nnforge.fpga) for the "
                            "bundle's own graph, a prompt of half the cache then decode steps to fill it: "
                            "simulated, not measured. Compile seconds are this machine's, with the check inside."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
