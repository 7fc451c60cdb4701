"""Recipes: which passes to run, as a preset name, a TOML file, or a list of pass configs.

A TOML recipe:

    description = "4-bit weights, attention output kept at 8 bits"
    [[passes]]
    pass = "quantize_rtn"
    format = "int4"
    group_size = 32
    exclude = ["*.attention.output.dense"]

    [[passes]]
    pass = "quantize_rtn"
    format = "int8"
    layers = ["*.attention.output.dense"]

A recipe entry may also start from a preset and change its options, e.g. to raise GPTQ's damping:
``{"preset": "w4-gptq", "damp": 0.1}`` (in TOML, ``preset = "w4-gptq"`` in a [[passes]] table).
Each option is set on every pass of the preset that takes it.

Every key is checked: an unknown top-level key, pass name or option is an error naming it.
"""
from __future__ import annotations

import dataclasses

import re
import tomllib
from pathlib import Path

from .base import PASSES, Pass, PassError

# Presets: name -> (description, list of pass configs)
_GPTQ = {"pass": "quantize_gptq", "act_order": True}
_ROT = [{"pass": "rotate"}]
_W4A4 = [{**_GPTQ, "static_groups": True, "format": "int4", "group_size": 128, "ragged_groups": True},
         {"pass": "quantize_activations", "format": "int4", "dynamic": True, "clip": 0.9}]
_NVFP4_A4 = [{**_GPTQ, "format": "nvfp4"}, {"pass": "quantize_activations", "format": "nvfp4"}]
_W4A8 = [{**_GPTQ, "static_groups": True, "format": "uint4", "group_size": 128, "ragged_groups": True},
         {"pass": "quantize_activations", "format": "int8", "dynamic": True}]


def _mse(configs: list[dict]) -> list[dict]:
    """``configs`` with the weight quantiser's scales fitted by the MSE search (formats.WeightFormat.fit).
    The rotated presets use it: rotated weights are near Gaussian, and clipping their few large
    values pays; unrotated LLM weights keep outliers that matter (on Gemma 3 270M the MSE search made
    plain w4a8 worse and rotated w4a8 better)."""
    return [{**c, "observer": "mse"} if c["pass"] == "quantize_gptq" else c for c in configs]
PRESETS: dict[str, tuple[str, list[dict]]] = {
    "fp32": ("no compression", []),
    "w8": ("int8 weights, per-channel scales, round-to-nearest",
           [{"pass": "quantize_rtn", "format": "int8"}]),
    "w4-rtn": ("int4 weights with zero points, groups of 128, round-to-nearest",
               [{"pass": "quantize_rtn", "format": "uint4", "group_size": 128, "ragged_groups": True}]),
    # static groups: act-order decides the order GPTQ visits columns, but each group's scale is
    # fixed up front on the original column order, so no permutation is stored and ONNX Runtime
    # runs MatMulNBits directly (no Gather of the activations per call); same fidelity here.
    "w4-gptq": ("int4 weights with zero points, groups of 128, GPTQ with act-order and static groups "
                "(needs calibration)",
                [{**_GPTQ, "static_groups": True, "format": "uint4", "group_size": 128, "ragged_groups": True}]),
    # groups of 32 with fp16 scales (as llama.cpp's 3-bit formats): at 3 bits a group of 128 spans
    # too wide a range for eight levels, and half-width scales pay for most of the finer groups
    # AWQ's search simulates the grid the quantiser after it uses: w4-rtn's
    "w4-awq": ("int4 weights with zero points, groups of 128: AWQ's activation-aware channel scales and clipping "
               "ranges, then round-to-nearest (needs calibration)",
               [{"pass": "awq", "format": "uint4", "group_size": 128},
                {"pass": "quantize_rtn", "format": "uint4", "group_size": 128, "ragged_groups": True}]),
    "w3-gptq": ("int3 weights with zero points, groups of 32 with fp16 scales, GPTQ with act-order "
                "(needs calibration)",
                [{**_GPTQ, "format": "uint3", "group_size": 32, "scale_dtype": "float16", "ragged_groups": True}]),
    # SpQR: at 3 bits the few weights a group cannot hold are most of the error; kept exact (CSR,
    # fp32 values, about 1% of each layer) they no longer widen their group's range
    "w3-spqr": ("int3 weights with zero points, groups of 32 with fp16 scales, GPTQ with act-order, 1% of each "
                "layer's weights (the costliest to round) kept exact in a sparse linear beside it (needs calibration)",
                [{**_GPTQ, "format": "uint3", "group_size": 32, "scale_dtype": "float16", "ragged_groups": True,
                  "outliers": 0.01}]),
    "fp8": ("FP8 E4M3 weights, per-channel scales, round-to-nearest",
            [{"pass": "quantize_rtn", "format": "e4m3"}]),
    "mxfp4": ("OCP MXFP4 weights (E2M1, blocks of 32 with E8M0 scales), GPTQ (needs calibration)",
              [{**_GPTQ, "format": "mxfp4"}]),
    "nvfp4": ("NVFP4 weights (E2M1, blocks of 16 with E4M3 scales and an fp32 tensor scale), GPTQ "
              "(needs calibration)", [{**_GPTQ, "format": "nvfp4"}]),
    # SmoothQuant with a per-layer alpha: a single alpha of 0.5 hurts the default model (see
    # passes/quantize/activations.py); FP8 activations have the range to need none.
    "w8a8": ("SmoothQuant (alpha per layer), int8 weights (per-channel) and int8 activations (static "
             "per-tensor) (needs calibration)",
             [{"pass": "smooth_quant"}, {"pass": "quantize_rtn", "format": "int8"},
              {"pass": "quantize_activations", "format": "int8"}]),
    "fp8-w8a8": ("FP8 E4M3 weights (per-channel) and FP8 E4M3 activations (static per-tensor) "
                 "(needs calibration)",
                 [{"pass": "quantize_rtn", "format": "e4m3"}, {"pass": "quantize_activations", "format": "e4m3"}]),
    # dynamic activations (passes/quantize/activations.py); a decoder's LM head keeps float inputs, as
    # every pass that selects layers leaves the head to its own format (with_head_format)
    "w4a8": ("w4-gptq's int4 weights and int8 activations, dynamic per token (needs calibration)", _W4A8),
    "w4a4": ("int4 weights (symmetric, groups of 128, GPTQ) and int4 activations, dynamic per token with "
             "ranges clipped to 0.9 (needs calibration; made for rotated models: w4a4-rot)",
             _W4A4),
    "nvfp4-a4": ("NVFP4 weights (GPTQ) and NVFP4 activations (blocks of 16 scaled at run time, the tensor "
                 "scale calibrated) (needs calibration; made for rotated models: nvfp4-a4-rot)",
                 _NVFP4_A4),
    "sparse24": ("2:4 sparsity (2-bit in-group indices), SparseGPT mask and update (needs calibration)",
                 [{"pass": "prune_sparsegpt", "pattern": "2:4"}]),
    "sparse24-w4": ("2:4 sparsity with the kept values in int4 (zero points, groups of 128), SparseGPT with "
                    "joint quantisation (needs calibration)",
                    [{"pass": "prune_sparsegpt", "pattern": "2:4", "format": "uint4", "group_size": 128}]),
    # one LUT per output channel: a LUT shared by several rows fits none of them well, and one fp16
    # LUT per row costs a fraction of a bit per weight
    "w4-gptq+eora": ("w4-gptq's grid (GPTQ act-order, int4 g128) plus an EoRA rank-32 low-rank branch per layer "
                     "with int8 factors, fitted in the activation eigenspace (needs calibration)",
                     [{"pass": "quantize_eora", "format": "uint4", "group_size": 128, "ragged_groups": True,
                       "act_order": True, "rank": 32, "factor_format": "int8"}]),
    "palettize-4": ("4-bit palettes (k-means++ with Hessian-diagonal weights), one fp16 LUT per output "
                    "channel (needs calibration)",
                    [{"pass": "palettize", "bits": 4, "group_size": 1, "weighting": "hessian"}]),
    "palettize-3": ("3-bit palettes (k-means++ with Hessian-diagonal weights), one fp16 LUT per output "
                    "channel (needs calibration)",
                    [{"pass": "palettize", "bits": 3, "group_size": 1, "weighting": "hessian"}]),
    # QuaRot's rotations (passes/rotate.py): the same function in fp32 with flatter weights and
    # activations; joined before a weight preset ('rot+w4-gptq'), which then sees the rotated weights
    "rot": ("rotations, QuaRot style: a randomised Hadamard folded into the residual stream and per attention "
            "head, online Hadamards before the linears still unrotated (the MLP down projections) and on queries "
            "and keys; the fp32 function unchanged", _ROT),
    "w4a8-rot": ("rot, then w4a8 with the weight scales fitted by the MSE search (observer mse) (needs calibration)",
                 _ROT + _mse(_W4A8)),
    "w4a4-rot": ("rot, then w4a4 with the weight scales fitted by the MSE search: QuaRot's W4A4 (needs calibration)",
                 _ROT + _mse(_W4A4)),
    # rotations of NVFP4's own scale block (MR-GPTQ): a whole-width one spreads a block's outliers
    # into every block
    "nvfp4-a4-rot": ("rot in blocks of 16, then nvfp4-a4 with the weight scales fitted by the MSE search "
                     "(needs calibration)", [{"pass": "rotate", "block": 16}] + _mse(_NVFP4_A4)),
    # recovery (passes/recover): after the presets it recovers, joined with '+' ('w3-gptq+rec')
    "rec": ("block reconstruction after the presets before it: each transformer block's free parameters (scales, "
            "LUT entries, kept sparse values, low-rank factors, norms and biases) tuned to match the model before "
            "compression for 400 steps, integer codes moving at most one step (learned rounding), masks kept "
            "(needs calibration)", [{"pass": "reconstruct", "steps": 400, "rounding": True}]),
    "distill": ("knowledge distillation after the presets before it: the free parameters tuned end to end to match "
                "the model before compression (outputs, or a decoder's logits, and every block's hidden states); "
                "sparsity in blocks reached gradually from the dense weights, oBERT style (needs calibration)",
                [{"pass": "distill", "gradual": 4}]),
    # KV-cache encodings (docs/kv_cache.md): alone they leave the weights as they are; after a
    # weight preset with '+' they run after its passes (w4-gptq+kv4)
    "kv8": ("int8 KV cache, symmetric, a float16 scale per token and group of 64 channels",
            [{"pass": "kv_cache", "encoding": "kv8"}]),
    "kv4": ("KIVI 4-bit KV cache: keys per channel in groups of 64 tokens, values per token, the 64 most "
            "recent tokens (up to 127) in float32", [{"pass": "kv_cache", "encoding": "kv4"}]),
    "kv-fp8": ("FP8 E4M3 KV cache, one float16 scale per token and head",
               [{"pass": "kv_cache", "encoding": "kv-fp8"}]),
    "kv-nvfp4": ("NVFP4 KV cache: E2M1 codes, an E4M3 scale per 16 values, a float16 scale per token and head",
                 [{"pass": "kv_cache", "encoding": "kv-nvfp4"}]),
    "kv-gear4": ("GEAR KV cache: KIVI 4-bit in groups of 64 tokens (the 64 most recent, up to 127, in float32), "
                 "per token 2 float16 outliers, per group a rank-2 float16 approximation of the quantisation error",
                 [{"pass": "kv_cache", "encoding": "kv-gear4"}]),
    "kv-f16": ("float16 KV cache, each value rounded to float16 (the float cache decoders usually keep)",
               [{"pass": "kv_cache", "encoding": "kv-f16"}]),
}
# Presets with a number in their name: name -> (regex, description, builder of the pass configs).
PARAMETRIC: dict[str, tuple[str, str, object]] = {
    "mixed-<bits>": (r"mixed-(\d+(?:\.\d+)?)", "int8 / int4 g128 / int3 g128 per layer, GPTQ, at most <bits> "
                     "bits per weight (needs calibration)",
                     lambda v: [{"pass": "mixed_precision", "bits": float(v)}]),
    # 4x1 blocks (4 output rows share a kept column): finer than 16x1, so SparseGPT keeps more of
    # what matters, and still one vector load a block for the kernel
    "block-sparse-<pct>": (r"block-sparse-(\d+)", "<pct>% sparsity in 4x1 blocks (BSR, for CPU SpMM), SparseGPT "
                           "(needs calibration)",
                           lambda v: [{"pass": "prune_sparsegpt", "pattern": "block4x1", "sparsity": int(v) / 100}]),
    "block-sparse-<pct>-w8": (r"block-sparse-(\d+)-w8", "<pct>% sparsity in 4x1 blocks with the kept values in int8, "
                              "one scale per output row (for int8 CPU SpMM), SparseGPT with joint quantisation "
                              "(needs calibration)",
                              lambda v: [{"pass": "prune_sparsegpt", "pattern": "block4x1", "sparsity": int(v) / 100,
                                          "format": "int8"}]),
    "block-sparse-<pct>-w8a8": (r"block-sparse-(\d+)-w8a8", "SmoothQuant, <pct>% sparsity in 4x1 blocks with int8 "
                                "kept values (one scale per output row), int8 activations (static per-tensor): the "
                                "u8 x s8 SpMM of the cpu target (needs calibration)",
                                lambda v: [{"pass": "smooth_quant"},
                                           {"pass": "prune_sparsegpt", "pattern": "block4x1",
                                            "sparsity": int(v) / 100, "format": "int8"},
                                           {"pass": "quantize_activations", "format": "int8"}]),
    "lowrank-<pct>": (r"lowrank-(\d+)", "activation-aware SVD keeping <pct>% of the linear layers' parameters, "
                      "one rank ratio for every layer (needs calibration)",
                      lambda v: [{"pass": "lowrank_asvd", "param_budget": int(v) / 100}]),
    "prune-mlp-<pct>": (r"prune-mlp-(\d+)", "<pct>% of each MLP's intermediate channels removed (the weights "
                        "shrink), OBS choice and least-squares update of the next layer, ZipLM-style (needs "
                        "calibration)",
                        lambda v: [{"pass": "prune_mlp", "fraction": int(v) / 100}]),
    # token reduction (docs/kv_cache.md): the runner keeps the cache within <budget> tokens
    "kv-evict-<budget>": (r"kv-evict-(\d+)", "KV cache kept within <budget> tokens by evicting all but the most "
                          "attended older tokens (by the largest attention weight each got, as H2O "
                          "ranks by attention) and the budget/2 most recent tokens",
                          lambda v: [{"pass": "kv_reduce", "method": "evict", "budget": int(v)}]),
    "kv-merge-<budget>": (r"kv-merge-(\d+)", "KV cache kept within <budget> tokens by merging adjacent similar "
                          "keys and their values, weighted by attention (KVMerger), the budget/2 most recent "
                          "tokens kept as they are",
                          lambda v: [{"pass": "kv_reduce", "method": "merge", "budget": int(v)}]),
    # SliceGPT (passes/prune/slicegpt.py): a smaller residual stream on RMS-norm decoders
    "slice-<pct>": (r"slice-(\d+)", "SliceGPT: the residual stream rotated onto its principal components (one "
                    "basis per layer) and <pct>% of its width deleted: every hidden dimension shrinks (needs "
                    "calibration; RMS-norm decoders)",
                    lambda v: [{"pass": "slicegpt", "fraction": int(v) / 100}]),
    "slice-untie-<pct>": (r"slice-untie-(\d+)", "slice-<pct> with a tied LM head given its own sliced matrix "
                          "(SliceGPT's way: closer to the original, one more vocabulary-sized matrix)",
                          lambda v: [{"pass": "slicegpt", "fraction": int(v) / 100, "head": "untie"}]),
    "prune-heads-<pct>": (r"prune-heads-(\d+)", "<pct>% of each attention layer's heads removed (the weights "
                          "shrink), OBS choice and least-squares update of the output projection (needs "
                          "calibration)",
                          lambda v: [{"pass": "prune_heads", "fraction": int(v) / 100}]),
}
_TOP_KEYS = {"description", "passes"}


def _build(entry, where: str, defaults: dict | None = None) -> Pass:
    if isinstance(entry, Pass):
        return entry
    if not isinstance(entry, dict):
        raise PassError(f"{where}: a pass config must be a table/dict with a 'pass' key, got {entry!r}")
    options = dict(entry)
    name = options.pop("pass", None)
    if name is None:
        raise PassError(f"{where}: missing the 'pass' key (one of {', '.join(sorted(PASSES))})")
    if name not in PASSES:
        raise PassError(f"{where}: unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
    fields = {f.name for f in dataclasses.fields(PASSES[name])} if dataclasses.is_dataclass(PASSES[name]) else set()
    for key, value in (defaults or {}).items():
        if key in fields and key not in options:       # the recipe's own setting wins
            options[key] = value
    return PASSES[name].from_options(options, where=f"{where} ({name})")


def _preset_configs(name: str) -> list[dict] | None:
    """The pass configs of preset ``name`` (plain, parametric, or presets joined by '+', each
    one's passes after the previous one's), or None when it is not one."""
    if name in PRESETS:
        return PRESETS[name][1]
    for pattern, _, configs in PARAMETRIC.values():
        m = re.fullmatch(pattern, name)
        if m:
            return configs(m.group(1))
    if "+" in name:
        parts = [_preset_configs(part) if part else None for part in name.split("+")]
        if any(p is None for p in parts):
            return None
        configs = [c for p in parts for c in p]
        _check_state_last(configs, name)
        _check_recovery_after(configs, name)
        return configs
    return None


RECOVERY_PASSES = ("reconstruct", "distill")


def _check_recovery_after(configs: list[dict], name: str) -> None:
    """A recovery pass tunes what the passes before it compressed: a compression pass after it
    would undo its work, and one with nothing before it has nothing to recover."""
    at = [i for i, c in enumerate(configs) if c["pass"] in RECOVERY_PASSES]
    if not at:
        return
    later = [c["pass"] for c in configs[at[0] + 1:] if c["pass"] not in RECOVERY_PASSES
             and not getattr(PASSES.get(c["pass"]), "rewrites_state", False)]
    if at[0] == 0 or later:
        raise PassError(f"recipe {name!r}: a recovery preset goes after the presets it recovers (e.g. "
                        f"'w3-gptq+rec'){': ' + ', '.join(later) + ' would come after it' if later else ''}")


def _check_state_last(configs: list[dict], name: str) -> None:
    """A pass that re-encodes the state (the KV cache) changes the graph inputs calibration data
    is made for, so it comes after every weight pass."""
    state = [i for i, c in enumerate(configs) if getattr(PASSES.get(c["pass"]), "rewrites_state", False)]
    if state and any(not getattr(PASSES.get(c["pass"]), "rewrites_state", False) for c in configs[state[0]:]):
        raise PassError(f"recipe {name!r}: a KV-cache preset goes after the weight presets (e.g. 'w4-gptq+kv4', "
                        "not 'kv4+w4-gptq'): it changes the cache state that calibration data is made for")


def _expand(entry, where: str, defaults: dict | None = None) -> list[Pass]:
    """The passes of one recipe entry: a pass config, a Pass, or ``{"preset": NAME, option: value,
    ...}``, the preset's passes with each option set on every one of them that takes it."""
    if not (isinstance(entry, dict) and "preset" in entry):
        return [_build(entry, where, defaults)]
    options = dict(entry)
    name = options.pop("preset")
    if "pass" in options:
        raise PassError(f"{where}: give 'pass' or 'preset', not both")
    configs = _preset_configs(name) if isinstance(name, str) else None
    if configs is None:
        raise PassError(f"{where}: unknown preset {name!r}; presets: {', '.join(PRESETS)}, {', '.join(PARAMETRIC)}")
    if not configs:
        raise PassError(f"{where}: preset {name!r} runs no pass, so it has no option to set")
    taken = [{f.name for f in dataclasses.fields(PASSES[c["pass"]])} for c in configs]
    unknown = sorted(k for k in options if not any(k in t for t in taken))
    if unknown:
        valid = ", ".join(sorted(set().union(*taken)))
        raise PassError(f"{where}: unknown option(s) {', '.join(unknown)} for preset {name} (passes "
                        f"{', '.join(c['pass'] for c in configs)}); valid options: {valid}")
    return [_build({**c, **{k: v for k, v in options.items() if k in t}}, f"{where} (preset {name})", defaults)
            for c, t in zip(configs, taken)]


def load_recipe_file(path: str | Path, defaults: dict | None = None) -> tuple[str, list[Pass]]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise PassError(f"cannot read recipe {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise PassError(f"recipe {path} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise PassError(f"recipe {path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    entries = data.get("passes")
    if entries is None or entries == []:
        raise PassError(f"recipe {path} has no passes: add at least one [[passes]] table (for no compression, "
                        "compile without a recipe)")
    if not isinstance(entries, list):
        raise PassError(f"recipe {path}: 'passes' must be an array of tables ([[passes]])")
    return path.stem, [p for i, e in enumerate(entries) for p in _expand(e, f"recipe {path}, pass {i}", defaults)]


def _json_list(text: str, where: str) -> list:
    import json
    try:
        data = json.loads(text)
    except ValueError as e:
        raise PassError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise PassError(f"{where}: a JSON recipe is a list of pass configs, got {type(data).__name__}")
    return data


def _build_list(entries, where: str, defaults: dict | None) -> list[Pass]:
    if not entries:
        raise PassError(f"{where} has no passes: give at least one pass config (for no compression, pass no recipe)")
    return [p for i, e in enumerate(entries) for p in _expand(e, f"{where} entry {i}", defaults)]


def describe_recipes() -> str:
    """What ``recipe=`` takes: the presets, the parametric presets, the file formats and every
    pass with its options (``nnforge compile --recipe help`` prints it)."""
    lines = ["Presets (recipe=NAME):"]
    width = max(len(n) for n in list(PRESETS) + list(PARAMETRIC))
    lines += [f"  {name:<{width}}  {desc}" for name, (desc, _) in PRESETS.items()]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc, _) in PARAMETRIC.items()]
    lines += ["", "A recipe file (recipe=PATH.toml): an optional description and one [[passes]] table per pass,",
              "each with a 'pass' key naming the pass and its options:", "",
              '  description = "4-bit weights, attention output kept at 8 bits"',
              "  [[passes]]", '  pass = "quantize_rtn"', '  format = "uint4"', "  group_size = 128",
              '  exclude = ["*.attention.output.dense"]', "",
              "The same list as JSON (recipe=PATH.json, or the text itself on the command line):",
              '  \'[{"pass": "quantize_rtn", "format": "uint4", "group_size": 128}]\'', "",
              "A preset with some options changed (each set on every pass of the preset that takes it):",
              '  \'[{"preset": "w4-gptq", "damp": 0.1}]\'', "",
              "Layer selection (passes that take it): layers = [fnmatch patterns on node or weight names],",
              "exclude = [...], ops = [linear, conv, ...]; a pattern that matches no layer is an error.", "",
              "Passes and their options (defaults):"]
    for name in sorted(PASSES):
        cls = PASSES[name]
        opts = []
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                if not f.init:
                    continue
                default = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
                opts.append(f"{f.name}={default!r}")
        calib = " (reads calibration data)" if getattr(cls, "needs_calibration", False) is True else ""
        lines.append(f"  {name}{calib}: " + (", ".join(opts) or "no options"))
    return "\n".join(lines)


PRESET_SCALES = ("per_channel",)


def per_channel_scales(configs: list[dict], how: str) -> list[dict]:
    """A preset's pass configs with each weight grid that sets a ``group_size`` (a quantiser's
    codes, a pruner's quantised kept values) at one scale per output channel instead: what a target whose
    runtime runs per-block scales badly asks for (Core ML on the Neural Engine, docs/targets.md).
    Formats whose blocks are part of the format (MXFP4, NVFP4) set no group size and keep them.

        >>> per_channel_scales([{"pass": "quantize_rtn", "format": "uint4", "group_size": 128}], "per_channel")
        [{'pass': 'quantize_rtn', 'format': 'uint4', 'group_size': None}]
    """
    if how not in PRESET_SCALES:
        raise PassError(f"target option preset_scales must be one of {', '.join(PRESET_SCALES)}, got {how!r}")
    # a grid format with a group size: the quantisers' and a pruner's quantised kept values (a
    # palette's group_size counts rows per LUT, and palettes give no format)
    out = [{**c, "group_size": None} if "group_size" in c and "format" in c else c for c in configs]
    return out


def resolve_recipe(recipe, defaults: dict | None = None, preset_scales: str | None = None) -> tuple[str, list[Pass]]:
    """(recipe name, passes) for a preset name, TOML path, list of configs/passes, or None.
    ``defaults`` (a target's ``pass_defaults`` option, e.g. ``{"scale_dtype": "float16"}`` for Core
    ML, whose quantised constants hold fp16 scales) fill the options a pass config has and the
    recipe leaves unset; Pass objects are taken as they are. ``preset_scales`` (a target's option
    of that name): ``"per_channel"`` gives a preset's grouped weight quantisers one scale per output
    channel (:func:`per_channel_scales`); a recipe that lists its own pass configs keeps its groups."""
    if recipe is None:
        return "fp32", []
    if isinstance(recipe, str) and recipe.lstrip().startswith("["):
        recipe = _json_list(recipe, "the recipe")
    elif isinstance(recipe, (str, Path)) and str(recipe).lower().endswith(".json"):
        try:
            text = Path(recipe).read_text()
        except OSError as e:
            raise PassError(f"cannot read recipe {recipe}: {e.strerror}") from None
        return Path(recipe).stem, _build_list(_json_list(text, f"recipe {recipe}"), f"recipe {recipe}", defaults)
    if isinstance(recipe, (str, Path)):
        text = str(recipe)
        configs = _preset_configs(text)
        if configs is not None:
            if preset_scales is not None:
                configs = per_channel_scales(configs, preset_scales)
            return text, [_build(e, f"preset {text}", defaults) for e in configs]
        if text.endswith(".toml") or Path(text).exists():
            return load_recipe_file(text, defaults)
        raise PassError(f"unknown recipe {text!r}: not a preset ({', '.join(PRESETS)}, {', '.join(PARAMETRIC)}; "
                        "presets joined by '+', e.g. w4-gptq+kv4) nor a .toml file")
    if isinstance(recipe, (list, tuple)):
        return "custom", _build_list(recipe, "recipe", defaults)
    if isinstance(recipe, Pass):
        return recipe.name, [recipe]
    raise PassError(f"a recipe is a preset name, a .toml path or a list of pass configs, got {type(recipe).__name__}")


# A decoder's LM head (with the token embedding when they are tied) in its own format, as llama.cpp
# keeps output and token-embedding tensors at 6-8 bits: the head maps every hidden state to the whole
# vocabulary, so its error reaches every logit. "recipe": the recipe's passes treat it as any layer.
HEAD_FORMATS = {"w8": ("int8 per output channel, round-to-nearest", [{"pass": "quantize_rtn", "format": "int8"}]),
                "w4-g32": ("int4 with zero points in groups of 32 and float16 scales, GPTQ with act-order and "
                           "static groups (needs calibration)",
                           [{**_GPTQ, "static_groups": True, "format": "uint4", "group_size": 32,
                             "ragged_groups": True, "scale_dtype": "float16"}]),
                "fp32": ("left as it is", []), "recipe": ("as the recipe's layers", None)}


def with_head_format(passes: list[Pass], head: str, layer: str, defaults: dict | None = None) -> list[Pass]:
    """``passes`` for a decoder whose LM head is the linear node ``layer``: unless ``head`` is
    "recipe", every pass that selects layers leaves it out, and ``head``'s passes (HEAD_FORMATS)
    run on it alone."""
    if head not in HEAD_FORMATS:
        raise PassError(f"head format {head!r}: choose from {', '.join(HEAD_FORMATS)} "
                        f"({'; '.join(f'{k}: {v[0]}' for k, v in HEAD_FORMATS.items())})")
    configs = HEAD_FORMATS[head][1]
    # a recipe that only encodes the KV cache leaves every weight, the head's too, as it is
    if configs is None or all(p.rewrites_state for p in passes):
        return list(passes)
    out = []
    for p in passes:
        if isinstance(getattr(p, "exclude", None), list) and not p.rewrites_state:
            p = dataclasses.replace(p, exclude=[*p.exclude, layer])
        out.append(p)
    return out + [_build({**c, "layers": [layer]}, f"head format {head}", defaults) for c in configs]


def recipe_record(name: str, passes) -> dict:
    """The manifest's ``recipe``: its name and each pass with its options, as JSON reads them back."""
    import json
    return json.loads(json.dumps({"name": name, "passes": [{"pass": p.name, **_jsonable(p.options())} for p in passes]},
                                 default=str))


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, list, dict, type(None))) else str(v)) for k, v in d.items()}
