"""Recovery: tuning what compression left free to bring a compressed model back towards the
original: block reconstruction (:mod:`.reconstruct`) and end-to-end distillation (:mod:`.distill`)."""
from .distill import Distill
from .free import Tunable, free_fields
from .reconstruct import Reconstruct

__all__ = ["Distill", "Reconstruct", "Tunable", "free_fields"]
