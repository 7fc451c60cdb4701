"""The demo: the embedded default model compiled for one target of each family nnforge has, each
with the recipe that family is known for, in one table of size, fidelity against fp32 torch on
held-out sentences, and speed against torch eager where the target's runtime is native here.

``nnforge demo`` is the short tour (one row per family); ``nnforge demo --full`` compiles every
recipe of every family (``benchmarks/demo.py`` runs it and writes the table in docs/).

Speed is a ratio measured in alternating stretches against torch eager in the same process
(:func:`nnforge.timing.alternating_ms`), with the machine's load per CPU: a row timed while other
work kept the cores busy is marked unreliable rather than printed as if it were a property of
the bundle.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .models import default as dm
from .speed import TORCH
from .timing import LoadMeter, alternating_ms, busy

FP32_COSINE_FLOOR = 0.99999
SPEED_BATCHES = (1, 32)
# calibration sentences (of the 480 set aside) in the short tour and in --full
QUICK_CALIBRATION, FULL_CALIBRATION = 128, 480


@dataclass(frozen=True)
class Family:
    """One kind of hardware nnforge compiles for, the target that stands for it in the demo, the
    recipe it is known for (the short tour's row) and the recipes --full runs."""
    name: str
    target: str
    extra: str | None           # the pyproject extra that installs its backend (None: always installed)
    recipe: str
    recipes: tuple[str, ...]
    sentences: tuple[int, int]  # held-out sentences scored: (short tour, --full)
    fixed_shape: bool = False   # hardware of fixed sizes: every batch padded to one length, one design
    # the runtime already ran the scored sentences in the build's check (slowly): score the checked
    # graph on the reference interpreter rather than run it a second time
    checked_at_build: bool = False


FAMILIES = (
    Family("onnx", "onnx", None, "w4-gptq",
           ("fp32", "w8", "w4-rtn", "w4-gptq", "w3-gptq", "fp8", "mxfp4", "nvfp4", "w8a8", "fp8-w8a8"), (128, 500)),
    # nnforge's own CPU kernels: block-sparse SpMM (fp32 and u8 x s8), int8/int4 weight GEMM
    Family("CPU (TVM)", "cpu", "tvm", "block-sparse-80",
           ("fp32", "w8", "w4-rtn", "block-sparse-80", "block-sparse-80-w8a8"), (128, 500)),
    # built and scored here, run where a CUDA GPU is (Triton's CPU interpreter, which the tests run every
    # kernel under, takes too long over the whole model for a demo)
    Family("GPU (Triton)", "h100", "triton", "fp8", ("fp8", "w4-gptq", "nvfp4", "sparse24-w4"), (128, 500)),
    # Core ML builds and checks its package here; predictions need macOS
    Family("phone (Core ML)", "apple-a17", "coreml", "palettize-4", ("palettize-4", "w4-gptq", "sparse24-w4"),
           (128, 500)),
    # a C-simulation of the fixed-point FPGA design: bit-exact, and slow, so the tour scores one small batch
    Family("FPGA (HLS)", "alveo-u280", "hls", "sparse24-w4", ("sparse24-w4",), (8, 64), fixed_shape=True),
    # torch-mlir's reference JIT runs the exported module at the sizes it was exported for; compiling
    # the module for it is most of the row's time, so it runs once, in the build's check
    Family("MLIR", "mlir", "mlir", "w8", ("fp32", "w8"), (32, 64), fixed_shape=True, checked_at_build=True),
)
# a requirement of a target that an extra installs, by its name in nnforge.targets.REQUIREMENTS
EXTRA_OF_REQUIREMENT = {"tvm": "tvm", "triton": "triton", "coremltools": "coreml", "hls4ml": "hls",
                        "torch-mlir": "mlir"}


@dataclass
class Row:
    family: str
    target: str
    recipe: str
    bundle_mb: float | None = None
    deploy_mb: float | None = None
    sentences: int = 0
    cos_mean: float | None = None
    cos_min: float | None = None
    nn_agree: float | None = None
    query_agree: float | None = None
    # batch size -> {"bundle": ms, "torch eager": ms}, measured in alternating stretches
    ms: dict[int, dict[str, float]] = field(default_factory=dict)
    load: dict | None = None    # timing.LoadMeter's summary of the machine while this row was timed
    unreliable: str = ""        # why its speed ratios mean little (timing.busy), or ""
    notes: list[str] = field(default_factory=list)
    missing: str = ""           # why the family has no bundle here (a package not installed)
    seconds: float = 0.0        # compiling, scoring and timing this row

    def speedup(self, batch: int) -> float | None:
        t = self.ms.get(batch)
        return t[TORCH] / t["bundle"] if t else None


def missing_requirements(target) -> str:
    """What this machine lacks to build (not necessarily run) the target's bundles, and how to get it."""
    from .targets import REQUIREMENTS
    lacking = [r for r in target.requires if (r in EXTRA_OF_REQUIREMENT or r == "g++") and not REQUIREMENTS[r]()[0]]
    extras = sorted({EXTRA_OF_REQUIREMENT[r] for r in lacking if r in EXTRA_OF_REQUIREMENT})
    why = []
    if extras:
        why.append(f"not installed: `make install`, or pip install 'nnforge[{','.join(extras)}]'")
    if "g++" in lacking:
        why.append("needs g++ on PATH")
    return "; ".join(why)


def jobs(full: bool = False, families=None) -> list[tuple[Family, str]]:
    """(family, recipe) pairs: each family's own recipe, or with ``full`` all its recipes."""
    chosen = [f for f in FAMILIES if families is None or f.name in families or f.target in families]
    return [(f, r) for f in chosen for r in (f.recipes if full else (f.recipe,))]


def run_demo(out: str | Path = "bundles/demo", full: bool = False, families=None, sentences: int | None = None,
             calibration: int | None = None, progress: bool = True) -> list[Row]:
    """Compile, score and time the demo's bundles; one Row each (a row saying what is missing for a
    family whose backend is not installed). ``families`` limits it to some (names or targets);
    ``sentences`` caps the held-out sentences of every row."""
    from .pipeline import compile as nf_compile
    from .targets import get_target
    from .backends.base import get_backend
    from .frontend import export_module

    model, tok = dm.load_default_model()
    calib, evals = dm.sentence_splits()
    calib = calib[: calibration or (FULL_CALIBRATION if full else QUICK_CALIBRATION)]
    todo = jobs(full, families)
    most = max([f.sentences[full] for f, _ in todo] + [max(SPEED_BATCHES)])
    evals = evals[: min(most, sentences or most)]
    example = dm.encode(tok, evals[:8])
    with torch.no_grad():
        reference = torch.cat([model(*b) for b in dm.batches(tok, evals, 32)])
    # exported once (torch.export and its decompositions); every compile converts the same program
    program = export_module(model, example, dm.dynamic_shapes())
    calibration_batches = dm.calibration_batches(tok, calib, 32)
    rows = []
    for fam, recipe in tqdm(todo, desc="demo", unit="bundle", disable=not progress):
        start = time.perf_counter()
        tgt = get_target(fam.target)
        missing = missing_requirements(tgt)
        if missing:
            rows.append(Row(fam.name, tgt.name, recipe, missing=missing))
            continue
        n = min(fam.sentences[full], len(evals))
        texts = evals[:n]
        batches = (_padded_batches(tok, texts, min(n, 32)) if fam.fixed_shape else dm.batches(tok, texts, 32))
        bundle = nf_compile(program, tgt.name, None if recipe == "fp32" else recipe, example_inputs=example,
                            check_inputs=batches[0], calibration=calibration_batches,
                            dynamic_shapes=dm.dynamic_shapes(), input_names=["input_ids", "attention_mask"],
                            output_names=["embeddings"], name="minilm", out=Path(out) / f"minilm-{tgt.name}-{recipe}",
                            # the demo times its runners itself, against torch in one table
                            batch_sizes=())
        row = Row(fam.name, tgt.name, recipe, bundle.size_bytes / 1e6, bundle.deploy_bytes / 1e6, n)
        runs, why_not = tgt.can_run()
        if runs and not fam.checked_at_build:
            runner = bundle.load()
            embedded = torch.cat([torch.as_tensor(runner(*b)) for b in batches])
        else:
            # built here but not run (other hardware), or run once already: score the bundle's own
            # graph on the reference interpreter, which the backend is tested against
            from .ir import Interpreter
            interp = Interpreter(bundle.graph())
            embedded = torch.cat([torch.as_tensor(interp.run(*b)[0]) for b in batches])
            row.notes.append(_interpreter_note(bundle.manifest, runs, why_not, len(batches)))
        fid = dm.evaluate_embeddings(reference[:n], embedded)
        row.cos_mean, row.cos_min, row.nn_agree, row.query_agree = (fid.cosine_mean, fid.cosine_min,
                                                                     fid.nn_agreement, fid.query_agreement)
        if fam.fixed_shape:
            row.notes.append(f"fixed sizes: {n} sentences in batches of {batches[0][0].shape[0]} padded to "
                             f"{batches[0][0].shape[1]} tokens")
        timed, why_untimed = get_backend(tgt.backend).times_here(tgt)
        if runs and timed:
            _time_row(row, runner, model, tok, evals)
        elif runs:
            row.notes.append(f"not timed: {why_untimed}{_estimate(bundle.path)}")
        row.seconds = time.perf_counter() - start
        rows.append(row)
    return rows


def _interpreter_note(manifest: dict, runs: bool, why_not: str, batches: int) -> str:
    if not runs:
        return (f"built, not run here ({why_not}); fidelity of the bundle's graph on the reference interpreter, "
                "the oracle its backend is tested against")
    if manifest["numerics"].get("runtime_checked") and batches == 1:
        return ("the runtime ran these sentences in the build's check and matched the reference interpreter within "
                "the bundle's tolerance; scored here on the interpreter's outputs")
    return "fidelity of the bundle's graph on the reference interpreter"


def _time_row(row: Row, runner, model, tok, evals) -> None:
    """Bundle against torch eager at each batch size, alternating in the same stretches."""
    def eager(*xs):
        with torch.no_grad():
            return model(*xs)
    meter = LoadMeter()             # the same rule for "busy" as the bundles' speed records
    for b in SPEED_BATCHES:
        x = dm.encode(tok, evals[:b])
        row.ms[b] = alternating_ms({"bundle": runner, TORCH: eager}, x, rounds=6 if b > 1 else 12, meter=meter)
    row.load = meter.summary()
    row.unreliable = busy(row.load)


def _padded_batches(tok, texts, size: int):
    """``texts`` in batches of ``size``, all padded to the longest of them (one fixed shape; the
    attention mask makes padding exact for this model)."""
    length = max(len(tok(t, truncation=True, max_length=dm.MAX_LEN)["input_ids"]) for t in texts)
    out = []
    for i in range(0, len(texts), size):
        enc = tok(list(texts[i:i + size]), padding="max_length", truncation=True, max_length=length,
                  return_tensors="pt")
        out.append((enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)))
    if out and out[-1][0].shape[0] != size:           # one design per shape: drop a ragged tail
        out.pop()
    return out


def _estimate(path: Path) -> str:
    """The FPGA accelerator model's latency estimate, where the bundle has one."""
    sim = Path(path) / "fpga" / "simulation.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        return f"; the accelerator model estimates {json.loads(sim.read_text())['prefill_ms']:.2f} ms per batch " \
               "(fpga/simulation.txt)"
    return ""


def format_table(rows: list[Row], full: bool = False) -> str:
    """The demo's table, its footnotes (why a row is not timed, fixed sizes, unreliable timings) and a legend."""
    rw = max([8] + [len(r.recipe) for r in rows])
    fw = max([6] + [len(r.family) for r in rows])
    head = (f"{'family':<{fw}} {'target':<10} {'recipe':<{rw}} {'MB':>6} {'sent.':>5} {'cos mean':>8} {'cos min':>8} "
            f"{'NN agree':>8} {'ms b=1':>7} {'torch':>7} {'x':>5} {'ms b=32':>8} {'torch':>8} {'x':>5}  notes")
    lines = [head, "-" * len(head)]
    notes: list[str] = []

    def mark(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return str(notes.index(text) + 1)

    for r in rows:
        if r.missing:
            lines.append(f"{r.family:<{fw}} {r.target:<10} {r.recipe:<{rw}} {r.missing}")
            continue
        speed = []
        for b, (w1, w2) in zip(SPEED_BATCHES, ((7, 7), (8, 8))):
            t = r.ms.get(b)
            speed += ([f"{t['bundle']:>{w1}.2f}", f"{t[TORCH]:>{w2}.2f}", f"{r.speedup(b):>5.2f}"] if t else
                      [f"{'-':>{w1}}", f"{'-':>{w2}}", f"{'-':>5}"])
        marks = [mark(f"{r.target} {r.recipe}: {n}") for n in r.notes]
        if r.unreliable:
            marks.append(mark(f"{r.unreliable}: the speed ratios of this row are unreliable; rerun on a quiet "
                              "machine"))
        lines.append(f"{r.family:<{fw}} {r.target:<10} {r.recipe:<{rw}} {r.bundle_mb:>6.1f} {r.sentences:>5} "
                     f"{r.cos_mean:>8.4f} {r.cos_min:>8.4f} {r.nn_agree:>8.1%} {' '.join(speed)}  "
                     f"{','.join(marks)}")
    lines.append("all-MiniLM-L6-v2 + mean pooling; fidelity against fp32 torch on the first 'sent.' held-out sentences "
                 f"(cosine of the embeddings; NN agree: same nearest neighbour among them); calibration: "
                 f"{FULL_CALIBRATION if full else QUICK_CALIBRATION} other sentences; x = torch ms / bundle ms, "
                 "timed alternately in the same stretches of this run"
                 + ("" if full else "; every recipe of every family: nnforge demo --full"))
    return "\n".join(lines + [f"[{i}] {n}" for i, n in enumerate(notes, 1)])


def check_rows(rows: list[Row]) -> list[str]:
    """The demo's own acceptance: fp32 bundles must match torch to cosine >= 0.99999."""
    return [f"{r.target} fp32: min cosine {r.cos_min:.6f} < {FP32_COSINE_FLOOR}" for r in rows
            if r.recipe == "fp32" and not r.missing and r.cos_min < FP32_COSINE_FLOOR]


def rows_json(rows: list[Row]) -> list[dict]:
    """The rows as JSON-ready dicts (benchmarks/demo.py writes them to benchmarks/out/demo.json)."""
    return [{**asdict(r), "ms": {str(b): v for b, v in r.ms.items()}} for r in rows]
