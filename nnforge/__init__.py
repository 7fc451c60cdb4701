"""nnforge: a hardware-targeted model compression compiler and export pipeline.

    >>> import nnforge as nf
    >>> bundle = nf.compile(model, target="onnx", recipe="w4-rtn", example_inputs=(x,))
    >>> y = nf.load(bundle.path)(x)
"""
from .version import __version__  # noqa: F401

from .api import compile, load, load_state_dict, sign, target, targets, verify  # noqa: E402
from .bundle import Bundle, BundleError  # noqa: E402
from .divergence import compare_layers  # noqa: E402
from .errors import NnforgeError  # noqa: E402

__all__ = ["__version__", "compile", "load", "load_state_dict", "sign", "targets", "verify", "target", "Bundle", "BundleError",
           "compare_layers", "NnforgeError"]
