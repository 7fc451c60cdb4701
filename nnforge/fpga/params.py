"""The simulator's parameters, read from a target's TOML and nowhere else.

Device numbers come from ``[fpga]`` / ``[memory]``; the accelerator design (engine sizes, buffers,
efficiencies) from ``[fpga.design]``; power from ``[fpga.power]``. A missing key is an error naming
the file and the key, so a number can never silently fall back to a default written in code.

    >>> from nnforge.fpga.params import FpgaParams
    >>> p = FpgaParams.from_target("alveo-u280")
    >>> p.mv_macs_per_cycle
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import NnforgeError
from ..targets import Target, TargetError, get_target


class SimulatorError(NnforgeError, ValueError):
    """Bad input to the FPGA simulator: a missing target key, an unknown model, an unreadable bundle."""


def _need(table: dict, key: str, where: str, path: str, kind=(int, float)):
    if key not in table:
        raise SimulatorError(f"{path}: [{where}] has no '{key}', which the FPGA simulator needs; "
                             f"add it with its source in a comment")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SimulatorError(f"{path}: [{where}] {key} = {value!r} has the wrong type for the FPGA simulator")
    return value


@dataclass(frozen=True)
class FpgaParams:
    """Every number the cost model uses, each from the target file ``path``."""
    target: str
    path: str
    clock_hz: float
    hbm_bytes_per_s: float          # peak
    hbm_channels: int
    hbm_capacity_bytes: float
    dsp: int
    lut: int
    ff: int
    bram_36k: int
    uram: int
    slr_count: int
    mm_macs_per_cycle_per_slr: int
    mv_macs_per_cycle_per_slr: int
    misc_elems_per_cycle_per_slr: int
    engine_efficiency: float
    hbm_efficiency: float
    macs_per_dsp_int8: int
    macs_per_dsp_wide: int
    sparse_patterns: tuple[str, ...]
    sparse_chain_efficiency: float
    act_bits: int
    kv_bits: int
    act_buffer_kib: float
    global_buffer_kib: float
    weight_buffer_kib: float
    meta_buffer_kib: float
    uram_kib: float
    bram_kib: float
    uram_min_buffer_kib: float
    sync_cycles_per_layer: int
    prefill_align: int
    decode_align: int
    luts_per_mac_lane: float
    ffs_per_mac_lane: float
    control_luts: int
    control_ffs: int
    board_power_w: float | None     # None: the TOML says deliberately that no source was found

    # The engines' sustained MACs per cycle, all SLRs together (the authors' own efficiency applied).
    @property
    def mm_macs_per_cycle(self) -> float:
        return self.mm_macs_per_cycle_per_slr * self.slr_count * self.engine_efficiency

    @property
    def mv_macs_per_cycle(self) -> float:
        return self.mv_macs_per_cycle_per_slr * self.slr_count * self.engine_efficiency

    @property
    def misc_elems_per_cycle(self) -> float:
        return self.misc_elems_per_cycle_per_slr * self.slr_count * self.engine_efficiency

    @property
    def hbm_sustained_bytes_per_s(self) -> float:
        return self.hbm_bytes_per_s * self.hbm_efficiency

    @property
    def act_buffer_bytes(self) -> float:
        return self.act_buffer_kib * 1024 * self.slr_count

    @classmethod
    def from_target(cls, target: str | Target) -> "FpgaParams":
        """Read a target's simulator parameters; SimulatorError naming file and key if one is missing."""
        try:
            t = get_target(target)
        except TargetError as e:
            raise SimulatorError(str(e)) from None
        path = t.path or f"{t.name}.toml"
        if t.kind != "fpga":
            raise SimulatorError(f"{path}: target {t.name!r} is a {t.kind} target; the FPGA simulator needs an fpga one")
        f = t.fpga
        d = f.get("design")
        if not isinstance(d, dict):
            raise SimulatorError(f"{path}: no [fpga.design] table (the accelerator's engines and buffers); "
                                 "see alveo-u280.toml for the keys")
        power = f.get("power", {})
        num = lambda k: _need(d, k, "fpga.design", path)        # noqa: E731
        ints = lambda k: _need(d, k, "fpga.design", path, int)  # noqa: E731
        patterns = _need(d, "sparse_patterns", "fpga.design", path, list)
        return cls(
            target=t.name, path=path,
            clock_hz=_need(f, "clock_mhz", "fpga", path) * 1e6,
            hbm_bytes_per_s=_need(f, "hbm_bandwidth_gbps", "fpga", path) * 1e9,
            hbm_channels=_need(f, "hbm_channels", "fpga", path, int),
            hbm_capacity_bytes=_need(f, "hbm_capacity_gb", "fpga", path) * 1e9,
            dsp=_need(f, "dsp", "fpga", path, int), lut=_need(f, "lut", "fpga", path, int),
            ff=_need(f, "ff", "fpga", path, int), bram_36k=_need(f, "bram_36k", "fpga", path, int),
            uram=_need(f, "uram", "fpga", path, int),
            slr_count=ints("slr_count"), mm_macs_per_cycle_per_slr=ints("mm_macs_per_cycle_per_slr"),
            mv_macs_per_cycle_per_slr=ints("mv_macs_per_cycle_per_slr"),
            misc_elems_per_cycle_per_slr=ints("misc_elems_per_cycle_per_slr"),
            engine_efficiency=num("engine_efficiency"), hbm_efficiency=num("hbm_efficiency"),
            macs_per_dsp_int8=ints("macs_per_dsp_int8"), macs_per_dsp_wide=ints("macs_per_dsp_wide"),
            sparse_patterns=tuple(patterns), sparse_chain_efficiency=num("sparse_chain_efficiency"),
            act_bits=ints("act_bits"), kv_bits=ints("kv_bits"),
            act_buffer_kib=num("act_buffer_kib"), global_buffer_kib=num("global_buffer_kib"),
            weight_buffer_kib=num("weight_buffer_kib"), meta_buffer_kib=num("meta_buffer_kib"),
            uram_kib=num("uram_kib"), bram_kib=num("bram_kib"), uram_min_buffer_kib=num("uram_min_buffer_kib"),
            sync_cycles_per_layer=ints("sync_cycles_per_layer"), prefill_align=ints("prefill_align"),
            decode_align=ints("decode_align"), luts_per_mac_lane=num("luts_per_mac_lane"),
            ffs_per_mac_lane=num("ffs_per_mac_lane"), control_luts=ints("control_luts"),
            control_ffs=ints("control_ffs"),
            board_power_w=(_need(power, "board_power_w", "fpga.power", path) if "board_power_w" in power else None),
        )
