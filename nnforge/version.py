"""nnforge's version, in a module of its own that imports nothing (bundles record it)."""
__version__ = "0.1.0"
