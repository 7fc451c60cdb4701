"""nnforge's cycle-approximate FPGA simulator (a FlightLLM-style accelerator; every number from the
target's TOML). ``simulate(MODEL, TARGET)`` where MODEL is "llama2-7b" / "opt-6.7b", a bundle
directory, an nnforge Graph or a Workload.

    >>> from nnforge.fpga import simulate, format_table
    >>> print(format_table(simulate("llama2-7b", "alveo-u280")))
"""
from __future__ import annotations

from pathlib import Path

from .model import (DECODERS, FLIGHTLLM_LLAMA2_COMPRESSION, Linear, Workload, bundle_workload,
                    decoder_workload, graph_workload)
from .params import FpgaParams, SimulatorError
from .report import format_table, plot_files, write_plots
from .simulator import OpCost, SimResult, simulate_workload


def workload_for(model, compression: dict | None = None) -> Workload:
    """A Workload from a decoder name, a bundle directory, an nnforge Graph or a Workload."""
    if isinstance(model, Workload):
        return model
    if isinstance(model, str) and model in DECODERS:
        if compression is None and model == "llama2-7b":
            compression = FLIGHTLLM_LLAMA2_COMPRESSION
        return decoder_workload(model, compression)
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        return bundle_workload(model)
    if hasattr(model, "nodes") and hasattr(model, "weights"):
        return graph_workload(model)
    raise SimulatorError(f"cannot simulate {model!r}: give one of {', '.join(DECODERS)}, a bundle directory, "
                         "an nnforge Graph or a Workload")


def simulate(model, target: str = "alveo-u280", *, prompt: int = 128, generate: int = 512,
             compression: dict | None = None) -> SimResult:
    """Simulate prefill of `prompt` tokens and decode of `generate` tokens of `model` on `target`."""
    return simulate_workload(workload_for(model, compression), target, prompt=prompt, generate=generate)


__all__ = ["simulate", "workload_for", "SimResult", "OpCost", "Workload", "Linear", "FpgaParams", "SimulatorError",
           "decoder_workload", "graph_workload", "bundle_workload", "format_table", "plot_files",
           "write_plots", "DECODERS", "FLIGHTLLM_LLAMA2_COMPRESSION"]
