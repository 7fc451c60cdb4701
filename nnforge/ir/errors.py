"""GraphError, apart from graph.py so the op registry, which graph.py uses, can raise it without importing graph.py."""
from __future__ import annotations

from ..errors import NnforgeError


class GraphError(NnforgeError, ValueError):
    """A graph is malformed, or an edit would make it so. The message names what is at fault."""
