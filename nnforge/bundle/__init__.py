"""Bundles: one directory per compile, with ``manifest.json``, the compressed graph, the backend's
artifacts and reference inputs/outputs.

- :mod:`.format`: names, manifest, checksums, safe paths, tensor files, the writer. Imports no
  backend; backends and the pipeline write through it.
- :mod:`.store`: opening (``Bundle``), verifying files, packing and extracting. It finds a
  bundle's runtime through its backend, so it sits above the backends.
- :mod:`.signing`: Ed25519 signatures of a manifest.

The format's names are here; the others are imported from their modules on first use, so that a
backend importing the format does not import what opens bundles (and, through it, the backends).

    >>> from nnforge.bundle import Bundle, BundleError, safe_join
"""
from __future__ import annotations

import importlib

from .format import *  # noqa: F401,F403
from .format import __all__ as _format_names

_LAZY = {"Bundle": "store", "read_manifest": "store", "check_versions": "store", "runtime_problems": "store",
         "pack": "store", "extract": "store", "sign": "signing", "check_signature": "signing"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_format_names) + list(_LAZY)
