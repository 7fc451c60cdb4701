"""Recovery: tuning what compression left free to bring a compressed model back towards the
original (block reconstruction; see :mod:`.reconstruct`)."""
from .free import Tunable, free_fields
from .reconstruct import Reconstruct

__all__ = ["Reconstruct", "Tunable", "free_fields"]
