"""Frontends: torch.export and ONNX to the IR, and reading model files (with their safety checks).
Nothing else in nnforge reads fx graphs, ONNX protos or torch checkpoints."""
from .errors import FrontendError, ShapeRuleError, UnsupportedError, UnsupportedOpsError
from .torch_export import export_module, from_exported_program, from_torch
from .model_files import MODEL_FILES, as_tuple, check_import, import_model, load_state_dict, read_torch_file

__all__ = ["FrontendError", "ShapeRuleError", "UnsupportedError", "UnsupportedOpsError", "export_module",
           "from_exported_program", "from_torch", "MODEL_FILES", "as_tuple", "check_import", "import_model",
           "load_state_dict", "read_torch_file"]
