"""GPU architectures: one TOML file per compute capability under ``nnforge/targets/gpu/``, holding
what every GPU of that architecture shares, so that a new GPU target of a known architecture is
one target file naming its ``options.compute_capability`` and nothing else.

Schema (every key is checked; an unknown key is an error naming the file):

    name = "sm_90"                       # "sm_" + the capability's digits; must equal the file name
    description = "NVIDIA Hopper (H100, H200, GH200)"
    compute_capability = "9.0"
    shared_memory_per_block_kb = 227     # the most shared memory one thread block may use
    fp8_tensor_cores = true              # e4m3/e5m2 MMA and conversions (sm_89 and newer)
    [tiles.<kernel family>]              # the triton backend's tile candidates per M bucket,
    decode = [[16, 128, 128, 4, 4], ...] # [block_m, block_n, block_k, num_warps, num_stages], default first

Targets and architectures found through ``NNFORGE_TARGETS_PATH`` (see :mod:`nnforge.targets`) add
to these: an architecture file in a ``gpu/`` folder beside extra target files.

    >>> arch_of(get_target("h100")).fp8_tensor_cores
    True
    >>> arch_for_capability((8, 7)).name          # no sm_87 file: the newest older one
    'sm_86'
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TargetError

GPU_DIR = "gpu"                 # the folder of architecture files, beside target files
_KEYS = {"name", "description", "compute_capability", "shared_memory_per_block_kb", "fp8_tensor_cores", "tiles"}
_TILE_FIELDS = ("block_m", "block_n", "block_k", "num_warps", "num_stages")


def parse_capability(text, where: str) -> tuple[int, int]:
    """``"8.9"`` -> ``(8, 9)``; a TargetError naming ``where`` for anything else."""
    parts = str(text).split(".") if isinstance(text, str) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise TargetError(f"{where}: compute_capability must be a string \"major.minor\" such as \"8.9\", "
                          f"got {text!r}")
    return int(parts[0]), int(parts[1])


def arch_name(capability: tuple[int, int]) -> str:
    """The architecture file's name for a compute capability: (9, 0) -> "sm_90"."""
    return f"sm_{capability[0]}{capability[1]}"


@dataclass(frozen=True)
class GpuArch:
    """One architecture file, parsed and checked (see the module docstring for its keys)."""
    name: str
    description: str
    capability: tuple[int, int]
    shared_memory_per_block_kb: int
    fp8_tensor_cores: bool
    tiles: dict = field(default_factory=dict)      # family -> bucket -> tuple of 5-int tuples
    path: str = ""

    @property
    def sm(self) -> int:
        """The capability as one number, as compilers take it: (8, 9) -> 89."""
        return self.capability[0] * 10 + self.capability[1]


def _power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _check_tile(row, where: str) -> tuple[int, ...]:
    if not isinstance(row, list) or len(row) != 5 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                             for v in row):
        raise TargetError(f"{where}: each tile is 5 integers [{', '.join(_TILE_FIELDS)}], got {row!r}")
    bad = [f"{name} = {v}" for name, v in zip(_TILE_FIELDS[:4], row) if not _power_of_two(v)]
    bad += [f"num_stages = {row[4]}"] if row[4] < 1 else []
    bad += [f"{name} = {v} (tl.dot needs 16 or more)" for name, v in zip(_TILE_FIELDS[:3], row) if v < 16]
    if bad:
        raise TargetError(f"{where}: tile {row}: {'; '.join(bad)} (block sizes and warps are powers of two, "
                          "stages at least 1)")
    return tuple(row)


def parse_arch(path: Path) -> GpuArch:
    """One architecture file, checked; a TargetError naming the file and the key at fault."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TargetError(f"{path}: cannot read GPU architecture file: {e}") from None
    unknown = sorted(set(data) - _KEYS)
    missing = sorted(_KEYS - set(data))
    if unknown or missing:
        raise TargetError(f"{path}: " + "; ".join(
            ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) +
            ([f"missing key(s) {', '.join(missing)}"] if missing else [])) + f" (keys: {', '.join(sorted(_KEYS))})")
    cap = parse_capability(data["compute_capability"], str(path))
    if data["name"] != Path(path).stem or data["name"] != arch_name(cap):
        raise TargetError(f"{path}: name {data['name']!r} must be {arch_name(cap)!r} (from compute_capability "
                          f"{data['compute_capability']}) and equal the file name")
    smem = data["shared_memory_per_block_kb"]
    if not isinstance(smem, int) or isinstance(smem, bool) or smem <= 0:
        raise TargetError(f"{path}: shared_memory_per_block_kb must be a positive integer, got {smem!r}")
    if not isinstance(data["fp8_tensor_cores"], bool):
        raise TargetError(f"{path}: fp8_tensor_cores must be true or false, got {data['fp8_tensor_cores']!r}")
    if not isinstance(data["description"], str):
        raise TargetError(f"{path}: description must be a string")
    tiles = {}
    if not isinstance(data["tiles"], dict):
        raise TargetError(f"{path}: [tiles] must be a table of kernel families")
    for family, buckets in data["tiles"].items():
        if not isinstance(buckets, dict):
            raise TargetError(f"{path}: [tiles.{family}] must be a table of M buckets")
        tiles[family] = {}
        for bucket, rows in buckets.items():
            where = f"{path}: [tiles.{family}] {bucket}"
            if not isinstance(rows, list) or not rows:
                raise TargetError(f"{where}: must be a non-empty list of tiles, the default first")
            tiles[family][bucket] = tuple(_check_tile(r, where) for r in rows)
    return GpuArch(data["name"], data["description"], cap, smem, data["fp8_tensor_cores"], tiles, str(path))


def load_archs(dirs: list[Path]) -> dict[tuple[int, int], GpuArch]:
    """The architecture files of every ``<dir>/gpu/`` in ``dirs``, by capability; one capability
    in two files is an error naming both."""
    out: dict[tuple[int, int], GpuArch] = {}
    for d in dirs:
        for p in sorted((Path(d) / GPU_DIR).glob("*.toml")):
            arch = parse_arch(p)
            if arch.capability in out:
                raise TargetError(f"{p}: compute capability {arch.capability[0]}.{arch.capability[1]} is already "
                                  f"described by {out[arch.capability].path}; keep one file per architecture")
            out[arch.capability] = arch
    return dict(sorted(out.items()))


# The known architectures when a caller names none: the catalogue (nnforge.targets) sets this when
# it is imported, so that this module, which the catalogue's loader uses, does not import it back.
catalogue = None


def _known(archs: dict | None) -> dict:
    if archs is not None:
        return archs
    return catalogue()


def gpu_archs() -> list[GpuArch]:
    """Every known GPU architecture, oldest first."""
    return list(_known(None).values())


def arch_for_capability(capability: tuple[int, int], *, exact: bool = False,
                        archs: dict | None = None) -> GpuArch | None:
    """The architecture file of ``capability``; without ``exact``, for a GPU whose own
    capability has no file, the newest older one (whose code such a GPU runs); None if none."""
    archs = _known(archs)
    if tuple(capability) in archs or exact:
        return archs.get(tuple(capability))
    older = [a for cap, a in archs.items() if cap <= tuple(capability)]
    return older[-1] if older else None


def arch_of(target, archs: dict | None = None) -> GpuArch:
    """The architecture of a GPU target, from its ``options.compute_capability``; a TargetError
    naming the target file when it states none or no architecture file describes it."""
    where = target.path or target.name
    cap_text = target.options.get("compute_capability")
    if cap_text is None:
        raise TargetError(f"{where}: target {target.name} states no options.compute_capability (\"major.minor\"), "
                          "which picks its GPU architecture file")
    archs = _known(archs)
    cap = parse_capability(cap_text, where)
    if cap not in archs:
        known = ", ".join(a.name for a in archs.values())
        raise TargetError(f"{where}: compute capability {cap_text} has no architecture file {GPU_DIR}/{arch_name(cap)}"
                          f".toml (known: {known}); add one beside the others, or in a {GPU_DIR}/ folder on "
                          "NNFORGE_TARGETS_PATH")
    return archs[cap]


def check_gpu_target(target, archs: dict | None = None) -> None:
    """A GPU target agrees with its architecture file: the file exists, and ``formats.native``
    lists fp8 exactly where the architecture has fp8 tensor cores."""
    arch = arch_of(target, archs)
    fp8 = sorted(f for f in target.native_formats if f.startswith("fp8"))
    if arch.fp8_tensor_cores and not fp8:
        raise TargetError(f"{target.path}: {arch.name} ({arch.path}) has fp8 tensor cores, but [formats] native "
                          "lists no fp8_e4m3 / fp8_e5m2")
    if fp8 and not arch.fp8_tensor_cores:
        raise TargetError(f"{target.path}: [formats] native lists {', '.join(fp8)}, but {arch.name} ({arch.path}) "
                          "has no fp8 tensor cores")


__all__ = ["GpuArch", "GPU_DIR", "parse_arch", "parse_capability", "arch_name", "gpu_archs", "arch_for_capability",
           "arch_of", "check_gpu_target", "load_archs"]
