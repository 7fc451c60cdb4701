"""The graph IR: types, values, nodes, weight encodings, ops, verifier, printer, serializer,
reference interpreter."""
from . import symbolic
from .dtypes import DType, DTYPES, dtype
from .encodings import ENCODINGS, Dense, Encoding, EncodingError, IntQuant, MiniFloat, register_encoding
from .graph import Graph, GraphError, Node, Value, sanitize_name
from .interpreter import Interpreter, InterpreterError, run_graph
from .lowrank import LowRank
from .ops import OPS, WEIGHT_OPS, get_op
from .palette import Palettized
from .sparse import Sparse
from .printer import format_graph
from .specialize import bind_symbols, specialize
from .serialize import SerializationError, graph_from_dict, graph_to_dict, load_graph, save_graph
from .types import TensorType, tensor
from .verifier import check, verify

__all__ = [
    "symbolic", "DType", "DTYPES", "dtype", "ENCODINGS", "Dense", "Encoding", "EncodingError", "IntQuant", "MiniFloat",
    "LowRank", "Palettized", "Sparse", "register_encoding", "Graph", "GraphError", "Node", "Value", "sanitize_name", "Interpreter",
    "InterpreterError", "run_graph", "OPS", "WEIGHT_OPS", "get_op", "format_graph", "SerializationError",
    "graph_from_dict", "graph_to_dict", "load_graph", "save_graph", "bind_symbols", "specialize", "TensorType", "tensor", "check", "verify",
]
