"""The op registry. Importing this package registers every op."""
from . import creation, decoder, elementwise, kvcache, linalg, nn, quant, reduce, shape  # noqa: F401  (registration side effects)
from .linalg import WEIGHT_OPS, WEIGHT_SLOT
from .registry import OPS, Attr, OpDef, RunContext, get_op

__all__ = ["OPS", "Attr", "OpDef", "RunContext", "get_op", "WEIGHT_OPS", "WEIGHT_SLOT"]
