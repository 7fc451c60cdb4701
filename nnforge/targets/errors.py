"""The targets' error, in a module of its own so that the target files' parsers below the
catalogue (:mod:`.architectures`) can raise it without importing the catalogue."""
from __future__ import annotations

from ..errors import NnforgeError


class TargetError(NnforgeError, ValueError):
    """An unknown target name or a malformed target file."""
