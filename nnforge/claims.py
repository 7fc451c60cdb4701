"""What a bundle's manifest claims that the bundle's own files confirm, recomputed by ``nf.verify``.

The file table catches a changed file, but the manifest itself is only protected by a signature:
edited by hand, its recipe, compression figures or fidelity would pass for true. So verify
recomputes what the files determine and names every field that disagrees:

- ``signature``: the graph's inputs and outputs, and the guards on their sizes;
- ``compression``: every weight layer's encoding, bits and bytes, and the totals (the graph alone
  fixes them; only ``bytes_before`` needs the original model, and the ratio must agree with it);
- ``numerics.fidelity_vs_fp32`` and ``numerics.held_out``: the compressed graph re-run on the
  stored held-out inputs against their stored fp32 outputs;
- ``recipe`` and ``passes``: a preset's passes and options as this nnforge resolves them, the
  pass records in the recipe's order, and no compressed weight under a recipe without passes.

What only the original model could confirm (bytes before, per-layer SQNR against fp32) is not
checked here; a signed bundle (``nf.sign``) covers the rest.
"""
from __future__ import annotations

import math

import torch

from .numerics import fidelity, json_safe

# how far a recomputed figure may move: float sums in another order, JSON rounding
REL_TOLERANCE = 1e-5
DB_TOLERANCE = 0.05
# an SQNR this high is float32 rounding alone (its 24-bit significand is about 144 dB): a claim of
# outputs equal bit for bit (inf) and a recomputation whose float sums ran in another order (another
# thread count, another CPU's kernels) both mean "the same up to rounding"
ROUNDING_DB = 120.0


def disagreements(manifest: dict, graph, outputs_per_batch: list, fp32_per_batch: list) -> list[str]:
    """One message per manifest field that the bundle's files contradict."""
    out = []
    out += _signature(manifest, graph)
    out += _compression(manifest, graph)
    out += _fidelity(manifest, outputs_per_batch, fp32_per_batch)
    out += _recipe(manifest, graph)
    return out


def _signature(manifest: dict, graph) -> list[str]:
    want = {"inputs": [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)} for v in graph.inputs],
            "outputs": [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)} for v in graph.outputs]}
    if graph.meta.get("shape_guards"):
        want["guards"] = list(graph.meta["shape_guards"])
    got = manifest.get("signature")
    return [] if got == want else [f"signature: the manifest says {got}, graph.json has {want}"]


def _compression(manifest: dict, graph) -> list[str]:
    from .figures import graph_compression
    want = graph_compression(graph)
    got = manifest.get("compression") or {}
    out = []
    for key in ("bytes_after", "model_bits_per_weight", "layer_bits_per_weight", "compressed_layers",
                "weight_layers", "compressed_bits_per_weight"):
        if got.get(key) != want[key]:
            out.append(f"compression.{key}: the manifest says {got.get(key)!r}, the graph gives {want[key]!r}")
    before = got.get("bytes_before")
    if isinstance(before, (int, float)) and got.get("ratio") != round(before / max(want["bytes_after"], 1), 4):
        out.append(f"compression.ratio: the manifest says {got.get('ratio')!r}, bytes_before / bytes_after gives "
                   f"{round(before / max(want['bytes_after'], 1), 4)!r}")
    layers = got.get("layers")
    if not isinstance(layers, list) or len(layers) != len(want["layers"]):
        out.append(f"compression.layers: the manifest lists {len(layers) if isinstance(layers, list) else layers!r} "
                   f"weight layers, the graph has {len(want['layers'])}")
        return out
    for i, (g, w) in enumerate(zip(layers, want["layers"])):
        for key, value in w.items():
            if not isinstance(g, dict) or g.get(key) != value:
                name = w["layer"]
                out.append(f"compression.layers[{i}] ({name}).{key}: the manifest says "
                           f"{g.get(key) if isinstance(g, dict) else g!r}, the graph gives {value!r}")
    return out


def _fidelity(manifest: dict, outputs_per_batch: list, fp32_per_batch: list) -> list[str]:
    numerics = manifest.get("numerics") or {}
    got = numerics.get("fidelity_vs_fp32") or {}
    want = json_safe(fidelity(outputs_per_batch, fp32_per_batch))
    out = []
    for key in ("cosine_min", "cosine_mean", "sqnr_db", "max_abs_error", "rows"):
        if key in got and not _close(got[key], want[key], db=key == "sqnr_db"):
            out.append(f"numerics.fidelity_vs_fp32.{key}: the manifest says {got[key]!r}, the held-out inputs give "
                       f"{want[key]!r}")
    held = numerics.get("held_out")
    if isinstance(held, dict):
        # rows of the batches, read off the first output (the fidelity's own "rows" counts every
        # output's rows: a decoder's caches too)
        rows = sum(int(o[0].shape[0]) if torch.as_tensor(o[0]).dim() else 1 for o in outputs_per_batch)
        for key, value in (("batches", len(outputs_per_batch)), ("rows", rows)):
            if key in held and held[key] != value:
                out.append(f"numerics.held_out.{key}: the manifest says {held[key]!r}, the bundle stores {value!r}")
    return out


def _close(a, b, db: bool = False) -> bool:
    a, b = (float(x) if x in ("inf", "-inf") else x for x in (a, b))      # json_safe writes infinities so
    if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        return a == b
    if db and a >= ROUNDING_DB and b >= ROUNDING_DB:
        return True
    if math.isinf(a) or math.isinf(b) or math.isnan(a) or math.isnan(b):
        return a == b
    if db:
        return abs(a - b) <= DB_TOLERANCE
    return abs(a - b) <= REL_TOLERANCE * max(1.0, abs(a), abs(b))


def _recipe(manifest: dict, graph) -> list[str]:
    import re
    from .passes import PassError, resolve_recipe
    from .frontend.decoders.builder import HEAD_LAYER
    from .passes.recipes import PARAMETRIC, PRESETS, with_head_format
    recipe = manifest.get("recipe") or {}
    name, recorded = recipe.get("name"), recipe.get("passes")
    out = []
    if not isinstance(recorded, list):
        return [f"recipe.passes: the manifest says {recorded!r}, not a list of passes"]
    names = [p.get("pass") for p in recorded if isinstance(p, dict)]
    preset = isinstance(name, str) and (name in PRESETS or any(re.fullmatch(p, name) for p, _, _ in PARAMETRIC.values()))
    if preset:
        try:
            options = (manifest.get("target") or {}).get("options", {})
            defaults = options.get("pass_defaults")
            _, passes = resolve_recipe(name, defaults, options.get("preset_scales"))
            head = ((manifest.get("decoder") or {}).get("head") or {}).get("format")
            if head is not None:                # a decoder's LM head format joins the preset
                passes = with_head_format(passes, head, HEAD_LAYER, defaults)
        except PassError as e:
            return [f"recipe.name: {name!r} does not resolve here: {e}"]
        from .passes.recipes import recipe_record
        want = recipe_record(name, passes)["passes"]
        if want != recorded:
            out.append(f"recipe.passes: preset {name} runs {want}, the manifest says {recorded}")
    ran = [r.get("name") for r in manifest.get("passes") or [] if isinstance(r, dict)]
    if names and ran[len(ran) - len(names):] != names:
        out.append(f"passes: the pass records end with {ran[len(ran) - len(names):]}, the recipe names {names}")
    encoded = sorted(n for n, v in graph.weights.items() if v.encoding.kind != "dense")
    if not names and encoded:
        out.append(f"recipe: {name!r} runs no pass, but graph.json holds {len(encoded)} compressed weight(s) "
                   f"({', '.join(encoded[:3])}{', ...' if len(encoded) > 3 else ''})")
    return out
