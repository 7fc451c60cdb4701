"""Random compression pipelines: presets and randomly configured passes, in random order.

A pipeline is a list of pass configs (what ``resolve_recipe`` takes), run after the cleanup
passes most of the time (``nnforge.compile`` always runs them; graphs handed to a backend
directly need not have been cleaned). A config that does not apply to a graph (a group size that
does not divide its layers, nothing to prune) raises :class:`~nnforge.passes.PassError`; the
runner counts such pipelines as not applicable.

    >>> p = random_pipeline(random.Random(0))
    >>> p.name, p.configs, p.cleanup
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..passes import PRESETS, cleanup_passes, resolve_recipe

# Presets that run on small random graphs (the structured pruners look for transformer blocks and
# rarely find one; they are drawn anyway, now and then).
PRESET_NAMES = [p for p in PRESETS] + ["mixed-5", "block-sparse-50", "block-sparse-50-w8", "block-sparse-50-w8a8",
                                      "lowrank-50", "prune-mlp-25", "prune-heads-25"]
INT_FORMATS = [f"{s}{b}" for s in ("int", "uint") for b in range(2, 9)]
FLOAT_FORMATS = ["e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "mxfp8", "mxfp8_e5m2", "mxfp6", "mxfp6_e2m3", "mxfp4", "nvfp4"]
WEIGHT_OPS = [["linear", "conv"], ["linear"], ["linear", "conv", "embedding"], ["embedding"], ["conv"]]


@dataclass
class Pipeline:
    name: str
    configs: list[dict] = field(default_factory=list)
    cleanup: bool = True

    def passes(self):
        """The Pass objects: cleanup first (when on), then the configs in order."""
        passes = []
        for c in self.configs:
            passes += resolve_recipe(c["preset"])[1] if "preset" in c else resolve_recipe([c])[1]
        return (cleanup_passes() if self.cleanup else []) + passes

    def to_dict(self) -> dict:
        return {"name": self.name, "configs": self.configs, "cleanup": self.cleanup}

    @classmethod
    def from_dict(cls, d: dict) -> "Pipeline":
        return cls(d["name"], list(d["configs"]), bool(d["cleanup"]))


def _group(rng, fmt: str):
    if fmt.startswith(("mx", "nv")):
        return None                 # MX and NVFP4 fix their own blocks
    return rng.choice([None, None, 4, 8, 16, 32, 128])


def _rtn(rng):
    fmt = rng.choice(INT_FORMATS + FLOAT_FORMATS)
    c = {"pass": "quantize_rtn", "format": fmt, "group_size": _group(rng, fmt), "ragged_groups": rng.random() < 0.7,
         "ops": rng.choice(WEIGHT_OPS)}
    if rng.random() < 0.15:
        c["per_tensor"], c["group_size"] = True, None
    if rng.random() < 0.2:
        c["scale_dtype"] = "float16"
    return c


def _gptq(rng):
    fmt = rng.choice(INT_FORMATS + ["e4m3", "mxfp4", "nvfp4"])
    return {"pass": "quantize_gptq", "format": fmt, "group_size": _group(rng, fmt), "ragged_groups": True, "act_order": rng.random() < 0.5,
            "static_groups": rng.random() < 0.5, "ops": rng.choice(WEIGHT_OPS[:2])}


def _prune(rng):
    pattern = rng.choice(["2:4", "4:8", "1:2", "block4x1", "block1x4", "block2x2", "unstructured"])
    joint = rng.random() < 0.3          # SparseGPT quantising the kept weights as it prunes
    c = {"pass": "prune_sparsegpt" if joint else rng.choice(["prune_magnitude", "prune_sparsegpt"]), "pattern": pattern}
    if joint:
        c["format"] = rng.choice(["int8", "uint4", "int4"])
    if ":" not in pattern:
        c["sparsity"] = rng.choice([0.25, 0.5, 0.75])
    return c


def _palettize(rng):
    return {"pass": "palettize", "bits": rng.choice([1, 2, 3, 4]), "group_size": rng.choice([None, 1, 2, 4]),
            "ops": rng.choice(WEIGHT_OPS), "weighting": rng.choice(["none", "none", "hessian"]),
            "lut_dtype": rng.choice(["float16", "float32"])}


def _lowrank(rng):
    return {"pass": "lowrank_svd", "rank_ratio": rng.choice([0.25, 0.5, 0.9])}


def _activations(rng):
    return {"pass": "quantize_activations", "format": rng.choice(["int8", "uint8", "e4m3", "e5m2"])}


def _smooth(rng):
    return {"pass": "smooth_quant"}


MAKERS = [(_rtn, 4.0), (_gptq, 1.0), (_prune, 1.5), (_palettize, 1.0), (_lowrank, 0.7), (_activations, 1.0),
          (_smooth, 0.3)]


def random_pipeline(rng: random.Random) -> Pipeline:
    """fp32 now and then; else one preset, or one to three random pass configs."""
    r = rng.random()
    cleanup = rng.random() < 0.8
    if r < 0.08:
        return Pipeline("fp32", [], cleanup)
    if r < 0.5:
        preset = rng.choice(PRESET_NAMES)
        return Pipeline(preset, [{"preset": preset}], cleanup)
    makers, weights = zip(*MAKERS)
    configs = [rng.choices(makers, weights)[0](rng) for _ in range(rng.choice([1, 1, 2, 3]))]
    return Pipeline("+".join(c["pass"] for c in configs), configs, cleanup)
