"""Passes: the Pass interface and PassManager, cleanup passes, compression passes, recipes."""
from .base import PASSES, LayerSelection, Pass, PassContext, PassError, PassManager, PassRecord, register_pass
from .cleanup import (DeadCodeElimination, FoldConstants, FuseLinear, Simplify, cleanup_passes,
                      eliminate_dead_code, rewrite)
from . import cluster, decompose, kvcache, kvreduce, lowrank, prune, recover, residual_scale, rotate, specialize  # noqa: F401  (registration side effects)
from .quantize import QuantizeGPTQ, QuantizeRTN
from .recipes import PRESETS, resolve_recipe

__all__ = ["PASSES", "LayerSelection", "Pass", "PassContext", "PassError", "PassManager", "PassRecord",
           "register_pass", "DeadCodeElimination", "FoldConstants", "FuseLinear", "Simplify", "cleanup_passes",
           "eliminate_dead_code", "rewrite", "QuantizeGPTQ", "QuantizeRTN", "PRESETS", "resolve_recipe"]
