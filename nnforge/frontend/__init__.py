"""Frontends: torch.export and ONNX to the IR. Nothing else in nnforge reads fx graphs or ONNX protos."""
from .errors import FrontendError, UnsupportedError, UnsupportedOpsError
from .torch_export import export_module, from_exported_program, from_torch

__all__ = ["FrontendError", "UnsupportedError", "UnsupportedOpsError", "export_module", "from_exported_program",
           "from_torch"]
