"""A cycle-approximate model of a FlightLLM-style accelerator: prefill on the matrix-matrix (MM)
engine, decode on the matrix-vector (MV) engine, weights streamed from HBM, activations kept on chip
when they fit, KV cache in HBM. Each op takes max(compute, memory) time (the engines and the HBM
loaders run concurrently, as in FlightLLM's instruction scheduler), plus per-block sync overhead.

    >>> from nnforge.fpga import simulate
    >>> r = simulate("llama2-7b", "alveo-u280", prompt=128, generate=512)
    >>> round(r.decode_tokens_per_s)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .model import Linear, Workload
from .params import FpgaParams, SimulatorError


@dataclass
class OpCost:
    """One op of one phase: MACs actually executed, HBM bytes, and the two times it overlaps."""
    name: str
    kind: str             # linear | attention | misc | sync
    macs: float
    hbm_bytes: float
    compute_s: float
    memory_s: float
    spill_bytes: float = 0.0

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclass
class SimResult:
    workload: str
    target: str
    prompt: int
    generate: int
    prefill_ops: list[OpCost]
    decode_ops: list[OpCost]          # one decode step at the mean context (for the breakdown)
    prefill_s: float
    decode_s: float                   # all `generate` steps together
    resources: dict                   # name -> (used, total)
    energy_j_per_token: float | None
    power_w: float | None
    params: FpgaParams
    notes: list[str] = field(default_factory=list)
    compression: str = ""             # the weight formats assumed (Workload.compression)

    @property
    def decode_latency_s(self) -> float:
        return self.decode_s / max(self.generate, 1)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generate / self.decode_s if self.decode_s else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt / self.prefill_s if self.prefill_s else 0.0

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    def summary(self) -> dict:
        return {"workload": self.workload, "target": self.target, "compression": self.compression,
                "prompt": self.prompt, "generate": self.generate,
                "prefill_ms": 1e3 * self.prefill_s, "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_ms": 1e3 * self.decode_s,
                "decode_ms_per_token": 1e3 * self.decode_latency_s, "decode_tokens_per_s": self.decode_tokens_per_s,
                "energy_j_per_token": self.energy_j_per_token,
                "resources": {k: {"used": u, "total": t} for k, (u, t) in self.resources.items()}}


def _align(n: int, unit: int) -> int:
    return max(unit, -(-n // unit) * unit)


def _macs_per_cycle(p: FpgaParams, engine_macs: float, bits: int) -> float:
    # Low-bit (<= 8) weights are unpacked into the int8 datapath; wider ones lose the DSP packing.
    return engine_macs if bits <= 8 else engine_macs * p.macs_per_dsp_wide / p.macs_per_dsp_int8


def _effective_density(p: FpgaParams, layer: Linear) -> float:
    # The sparse DSP chain skips zeros only for the patterns it supports; others run dense.
    if layer.pattern in p.sparse_patterns:
        return layer.density / p.sparse_chain_efficiency
    return 1.0


def _linear_cost(p: FpgaParams, layer: Linear, tokens: int, engine_macs: float) -> OpCost:
    bw = p.hbm_sustained_bytes_per_s
    n = layer.repeat
    if layer.lookup:        # an embedding: `tokens` rows read, no MACs
        row = layer.bytes / max(layer.rows, 1)
        return OpCost(layer.name, "linear", 0.0, n * tokens * row, 0.0, n * tokens * row / bw)
    macs = n * tokens * layer.params * _effective_density(p, layer)
    compute = macs / (_macs_per_cycle(p, engine_macs, layer.weight_bits) * p.clock_hz)
    hbm = n * layer.bytes   # each weight streamed once per phase step (FlightLLM keeps none resident)
    # activations stay on chip unless one layer's input or output tensor exceeds the activation buffer
    act = tokens * max(layer.rows, layer.cols) * p.act_bits / 8
    spill = 2 * n * act if act > p.act_buffer_bytes else 0.0
    return OpCost(layer.name, "linear", macs, hbm + spill, compute, (hbm + spill) / bw, spill)


def _kv_token_bytes(p: FpgaParams, w: Workload) -> float:
    """K and V bytes of one token, one layer: as the graph's encoded cache stores them, else at the
    design's kv_bits."""
    return w.kv_token_bytes or 2 * w.kv_dim * p.kv_bits / 8


def _attention_cost(p: FpgaParams, w: Workload, tokens: int, past: int, engine_macs: float) -> OpCost:
    """QK^T and PV for `tokens` new tokens attending to `past` cached ones plus themselves (causal)."""
    keys = tokens * past + tokens * (tokens + 1) / 2           # sum over new tokens of visible keys
    macs = 2 * w.layers * keys * w.hidden
    kv_token_bytes = _kv_token_bytes(p, w)
    # the cache of the past is read once per step; the new tokens' K/V are written
    hbm = w.layers * (past + tokens) * kv_token_bytes + w.layers * tokens * kv_token_bytes
    softmax = 2 * w.layers * w.heads * keys                     # two passes (max, then exp/sum)
    compute = macs / (engine_macs * p.clock_hz) + softmax / (p.misc_elems_per_cycle * p.clock_hz)
    return OpCost("attention", "attention", macs, hbm, compute, hbm / p.hbm_sustained_bytes_per_s)


def phase_ops(p: FpgaParams, w: Workload, tokens: int, past: int, engine_macs: float) -> list[OpCost]:
    """The ops of one step processing `tokens` new tokens after `past` cached ones."""
    ops = [_linear_cost(p, l, tokens, engine_macs) for l in w.linears]
    if w.layers:
        ops.append(_attention_cost(p, w, tokens, past, engine_macs))
        misc = w.layers * tokens * w.misc_per_token
        ops.append(OpCost("norm/act/eltwise", "misc", 0.0, 0.0, misc / (p.misc_elems_per_cycle * p.clock_hz), 0.0))
    blocks = max(w.layers, 1)
    ops.append(OpCost("sync", "sync", 0.0, 0.0, blocks * p.sync_cycles_per_layer / p.clock_hz, 0.0))
    return ops


def resources(p: FpgaParams) -> dict:
    """Resource use of the design (one MAC array shared by MM and MV modes) against the device."""
    lanes = max(p.mm_macs_per_cycle_per_slr, p.mv_macs_per_cycle_per_slr) * p.slr_count
    dsp = math.ceil(lanes / p.macs_per_dsp_int8)
    uram = bram = 0
    for kib in (p.act_buffer_kib, p.global_buffer_kib, p.weight_buffer_kib, p.meta_buffer_kib):
        if kib >= p.uram_min_buffer_kib:
            uram += math.ceil(kib / p.uram_kib) * p.slr_count
        else:
            bram += math.ceil(kib / p.bram_kib) * p.slr_count
    lut = round(lanes * p.luts_per_mac_lane + p.control_luts)
    ff = round(lanes * p.ffs_per_mac_lane + p.control_ffs)
    return {"DSP": (dsp, p.dsp), "LUT": (lut, p.lut), "FF": (ff, p.ff), "BRAM36": (bram, p.bram_36k),
            "URAM": (uram, p.uram)}


def check_lengths(prompt, generate) -> None:
    """A prompt (the prefill, or an encoder's sequence) is at least one token; generating none is
    a prefill-only run, as for an encoder."""
    if isinstance(prompt, bool) or not isinstance(prompt, int) or prompt < 1:
        raise SimulatorError(f"prompt length (--prompt) must be a whole number of tokens >= 1, got {prompt!r}")
    if isinstance(generate, bool) or not isinstance(generate, int) or generate < 0:
        raise SimulatorError(f"generated tokens (--generate) must be a whole number >= 0 (0: prefill only, as for "
                             f"an encoder), got {generate!r}")


def simulate_workload(w: Workload, target, *, prompt: int = 128, generate: int = 512) -> SimResult:
    """Prefill `prompt` tokens, then decode `generate` tokens one at a time, on `target`."""
    check_lengths(prompt, generate)
    p = target if isinstance(target, FpgaParams) else FpgaParams.from_target(target)
    notes = list(w.notes)
    padded = _align(prompt, p.prefill_align)
    if padded != prompt:
        notes.append(f"prefill padded from {prompt} to {padded} tokens (prefill_align {p.prefill_align})")
    pre = phase_ops(p, w, padded, 0, p.mm_macs_per_cycle) if prompt else []
    prefill_s = sum(o.time_s for o in pre)
    # decode: contexts are bucketed to decode_align, as the released FlightLLM profiler does
    decode_s, buckets = 0.0, {}
    for i in range(generate):
        ctx = _align(prompt + i + 1, p.decode_align)
        if ctx not in buckets:
            buckets[ctx] = sum(o.time_s for o in phase_ops(p, w, 1, ctx - 1, p.mv_macs_per_cycle))
        decode_s += buckets[ctx]
    mid = _align(prompt + max(generate, 1) // 2, p.decode_align)
    dec = phase_ops(p, w, 1, mid - 1, p.mv_macs_per_cycle)
    kv = w.layers * (prompt + generate) * _kv_token_bytes(p, w)
    if w.weight_bytes + kv > p.hbm_capacity_bytes:
        notes.append(f"weights {w.weight_bytes / 1e9:.2f} GB + KV cache {kv / 1e9:.2f} GB exceed the "
                     f"{p.hbm_capacity_bytes / 1e9:.0f} GB of HBM ({p.path})")
    spilled = sum(o.spill_bytes for o in pre)
    if spilled:
        notes.append(f"prefill activations spill {spilled / 1e6:.1f} MB to HBM (activation buffer "
                     f"{p.act_buffer_bytes / 2**20:.0f} MiB)")
    energy = p.board_power_w * (prefill_s + decode_s) / generate if p.board_power_w and generate else None
    if p.board_power_w is None:
        notes.append(f"energy n/a: {p.path} has no [fpga.power] board_power_w (no published figure)")
    # HBM (bytes) holds the weights and the KV cache of the whole sequence
    use = {**resources(p), "HBM": (math.ceil(w.weight_bytes + kv), int(p.hbm_capacity_bytes))}
    return SimResult(w.name, p.target, prompt, generate, pre, dec, prefill_s, decode_s, use, energy,
                     p.board_power_w, p, notes, w.compression)
