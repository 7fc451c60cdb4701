"""Weight quantisation of the default model: nnforge's RTN and GPTQ against ONNX Runtime and Brevitas.

All quantisers run in one process, on the same model, layers and sentences.

Model: the embedded default model (all-MiniLM-L6-v2 + mean pooling + L2 normalisation). Every
method quantises the weights of the same 36 linear layers (weight-only; activations stay fp32) and
is scored against the fp32 torch model on the same 500 evaluation sentences (batches of 32):

- cos mean / cos min: per-sentence cosine similarity of the embeddings to fp32 torch's;
- NN agree: how often each sentence's nearest neighbour (among the 500) is the same as under fp32
  (``nnforge.models.default.evaluate_embeddings``), both sides embedded by the quantised model;
- NN query: the same with quantised-model queries against the fp32 corpus;
- quant s: wall seconds of the quantisation step itself (model loading, export and evaluation not
  included; for Brevitas, swapping in QuantLinear, GPTQ if any, and computing the quantised weights
  once); calibrated methods all use the same 480 calibration sentences, in length-sorted batches of
  32 (``calibration_batches``);
- w MiB / ratio: bytes of the linear layers' weights after quantisation (codes, scales, zero
  points) and the ratio to their fp32 bytes. nnforge: the stored encodings; ONNX Runtime: the
  MatMulNBits initialisers; Brevitas keeps fake-quantised fp32 weights, so its figure (marked ~)
  is the packed size of its format: codes at their bit width plus its scales and zero points.

Peers:
- ONNX Runtime's ``MatMulNBitsQuantizer`` on ``torch.onnx.export(..., dynamo=True)`` of the model,
  run by ONNX Runtime (CPU);
- Brevitas: ``nn.Linear`` replaced by ``brevitas.nn.QuantLinear`` (``layerwise_quantize``) with
  weight quantisers of the matching format, optionally followed by ``brevitas.graph.gptq.gptq_mode``;
  evaluated in torch.

nnforge rows are evaluated on nnforge's reference interpreter, which computes what the exported
ONNX bundle computes. A configuration a peer cannot run is printed as a row with the reason.
All numbers come from the same run, on the same machine and the same sentences. Writes the table
as JSON to benchmarks/out/quantization.json.

    python benchmarks/quantization.py                    # everything (long on a small CPU: GPTQ)
    python benchmarks/quantization.py --quick            # uint4 g128 only: nnforge RTN/GPTQ, ORT, Brevitas RTN
    python benchmarks/quantization.py --only ort         # one peer: nnforge | ort | brevitas
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from nnforge.models import default as dm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_table  # noqa: E402

warnings.filterwarnings("ignore")
OUT = Path(__file__).parent / "out"
MIB = 1024 * 1024


# --- shared data and scoring ----------------------------------------------------------------------
@dataclass
class Setup:
    model: torch.nn.Module
    tok: object
    calib: list          # calibration batches: (input_ids, attention_mask), length-sorted
    evals: list          # evaluation batches
    example: tuple       # example inputs for export / import
    reference: torch.Tensor


@dataclass
class Row:
    peer: str
    method: str
    settings: str = ""
    cosine_mean: float | None = None
    cosine_min: float | None = None
    nn_agreement: float | None = None
    query_agreement: float | None = None
    quant_seconds: float | None = None
    weight_bytes: int | None = None
    fp32_weight_bytes: int | None = None
    bytes_estimated: bool = False
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def score(self, setup: Setup, embeddings: torch.Tensor) -> "Row":
        fid = dm.evaluate_embeddings(setup.reference, embeddings)
        self.cosine_mean, self.cosine_min, self.nn_agreement = fid.cosine_mean, fid.cosine_min, fid.nn_agreement
        self.query_agreement = fid.query_agreement
        return self


def load_setup(n_eval: int = 500) -> Setup:
    model, tok = dm.load_default_model()
    calib, evals = dm.sentence_splits()
    eval_batches = dm.batches(tok, evals[:n_eval], 32)
    with torch.no_grad():
        reference = torch.cat([model(*b) for b in eval_batches])
    return Setup(model, tok, dm.calibration_batches(tok, calib, 32), eval_batches,
                 dm.encode(tok, evals[:8]), reference)


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


@contextlib.contextmanager
def quiet():
    """Silence peers' progress printing (stdout) while they run."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# --- nnforge --------------------------------------------------------------------------------------
# (label, pass options shared by RTN and GPTQ)
NNFORGE_FORMATS = [
    ("int8 per-channel", {"format": "int8"}),
    ("uint4 g128", {"format": "uint4", "group_size": 128}),
    ("uint3 g128", {"format": "uint3", "group_size": 128}),
    ("e4m3 per-channel", {"format": "e4m3"}),
    ("e2m1 g32", {"format": "e2m1", "group_size": 32}),
    ("mxfp4", {"format": "mxfp4"}),
    ("nvfp4", {"format": "nvfp4"}),
]
QUICK_FORMATS = {"uint4 g128"}


def nnforge_recipe(algorithm: str, options: dict) -> list[dict]:
    extra = {"act_order": True} if algorithm == "gptq" else {}
    return [{"pass": f"quantize_{algorithm}", **options, **extra}]


def linear_weights(graph):
    from nnforge.ir.ops import WEIGHT_SLOT
    seen = {}
    for node in graph.nodes:
        if node.op == "linear":
            w = node.inputs[WEIGHT_SLOT]
            seen[w.name] = w.encoding
    return seen


def nnforge_base_graph(setup: Setup):
    """The imported graph after nnforge's cleanup passes (which fuse matmul + add into linear)."""
    from nnforge.passes import PassManager, cleanup_passes
    from nnforge.frontend import import_model
    g, _ = import_model(setup.model, setup.example, dynamic_shapes=dm.dynamic_shapes(),
                        input_names=["input_ids", "attention_mask"])
    return PassManager(cleanup_passes()).run(g)


def nnforge_row(setup: Setup, base, label: str, algorithm: str, options: dict) -> Row:
    from nnforge.ir import Interpreter
    from nnforge.passes import PassContext, PassManager, resolve_recipe
    recipe = nnforge_recipe(algorithm, options)
    row = Row("nnforge", f"nnforge {algorithm.upper()} {label}", settings=json.dumps(recipe[0]))
    try:
        _, passes = resolve_recipe(recipe)
        ctx = PassContext(calibration=setup.calib)
        q, row.quant_seconds = timed(PassManager(passes).run, base, ctx)
        interp = Interpreter(q)
        with torch.no_grad():
            got = torch.cat([interp.run(*b)[0] for b in setup.evals])
    except Exception as e:  # a recipe that fails is reported, not hidden
        row.error = short_error(e)
        return row
    row.weight_bytes = sum(enc.nbytes for enc in linear_weights(q).values())
    row.fp32_weight_bytes = sum(enc.nbytes for enc in linear_weights(base).values())
    return row.score(setup, got)


def nnforge_rows(setup: Setup, quick: bool) -> list[Row]:
    base = nnforge_base_graph(setup)
    rows = []
    for label, options in NNFORGE_FORMATS:
        if quick and label not in QUICK_FORMATS:
            continue
        for algorithm in ("rtn", "gptq"):
            rows.append(nnforge_row(setup, base, label, algorithm, options))
            print_progress(rows[-1])
    return rows


# --- ONNX Runtime ---------------------------------------------------------------------------------
ORT_BLOCK = 128


def ort_export(setup: Setup):
    with quiet():
        prog = torch.onnx.export(setup.model, setup.example, dynamo=True, verbose=False,
                                 dynamic_shapes=dm.dynamic_shapes(), input_names=["input_ids", "attention_mask"],
                                 output_names=["embeddings"])
    return prog.model_proto


def ort_embed(setup: Setup, proto) -> torch.Tensor:
    import onnxruntime as ort
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0] for ids, mask in setup.evals]
    return torch.cat([torch.from_numpy(o) for o in outs])


def _initializer_bytes(proto) -> dict[str, int]:
    from onnx import numpy_helper
    return {i.name: numpy_helper.to_array(i).nbytes for i in proto.graph.initializer}


def ort_weight_bytes(proto) -> tuple[int, int]:
    """(bytes of MatMulNBits weights, scales and zero points; bytes of float MatMul weights)."""
    sizes = _initializer_bytes(proto)
    q = sum(sizes.get(name, 0) for n in proto.graph.node if n.op_type == "MatMulNBits" for name in n.input[1:4])
    f = sum(sizes[n.input[1]] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in sizes)
    return q, f


class BatchReader:
    """ORT CalibrationDataReader over the shared calibration batches."""

    def __init__(self, batches):
        self._items = iter([{"input_ids": a.numpy(), "attention_mask": b.numpy()} for a, b in batches])

    def get_next(self):
        return next(self._items, None)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def ort_quantize(proto, *, symmetric: bool, algo: str, calib=None):
    from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    config = GPTQWeightOnlyQuantConfig(calibration_data_reader=BatchReader(calib)) if algo == "gptq" else None
    q = MatMulNBitsQuantizer(copy.deepcopy(proto), bits=4, block_size=ORT_BLOCK, is_symmetric=symmetric,
                             algo_config=config)
    with quiet():
        q.process()
    return q.model.model


def ort_row(setup: Setup, fp32_proto, method: str, settings: str, **kw) -> Row:
    row = Row("onnxruntime", method, settings)
    try:
        proto, row.quant_seconds = timed(ort_quantize, fp32_proto, calib=setup.calib, **kw)
        got = ort_embed(setup, proto)
    except Exception as e:
        row.error = short_error(e)
        if isinstance(e, ValueError) and "reshape" in str(e):
            row.notes.append("ORT's MatMulNBits packing of 4-bit zero points (neural_compressor/weight_only.py, "
                             "make_matmul_weight_only_node) needs an even number of blocks per column; "
                             "K=384 with block 128 gives 3")
        return row
    row.weight_bytes = ort_weight_bytes(proto)[0]
    row.fp32_weight_bytes = ort_weight_bytes(fp32_proto)[1]
    return row.score(setup, got)


def ort_rows(setup: Setup, quick: bool) -> list[Row]:
    import onnxruntime as ort
    proto = ort_export(setup)
    base = Row("onnxruntime", "ORT fp32 (torch.onnx.export)", "no quantisation: the export's own error")
    base.score(setup, ort_embed(setup, proto))
    base.weight_bytes = base.fp32_weight_bytes = ort_weight_bytes(proto)[1]
    print_progress(base)
    block = f"bits=4, block_size={ORT_BLOCK}"
    specs = [
        ("ORT MatMulNBits RTN uint4 g128", f"default algorithm (DEFAULT, round-to-nearest), {block}, "
         "is_symmetric=False (uint4 + zero point per block)", {"symmetric": False, "algo": "rtn"}),
        ("ORT GPTQ uint4 g128", f"GPTQWeightOnlyQuantConfig (percdamp=0.01, actorder=False), {block}, "
         "is_symmetric=False", {"symmetric": False, "algo": "gptq"}),
        ("ORT GPTQ uint4 g128 sym", f"GPTQWeightOnlyQuantConfig (percdamp=0.01, actorder=False), {block}, "
         "is_symmetric=True (zero point fixed at 8)", {"symmetric": True, "algo": "gptq"}),
    ]
    rows = [base]
    for method, settings, kw in specs:
        rows.append(ort_row(setup, proto, method, settings, **kw))
        print_progress(rows[-1])
    for r in rows[1:]:
        r.notes.append(f"onnxruntime {ort.__version__}; model from torch.onnx.export(dynamo=True), "
                       "36 MatMul weights quantised; export time not counted")
    gptq = [r for r in rows if "GPTQ" in r.method and r.error is None]
    for r in gptq:
        r.notes.append("ORT GPTQ takes Hessians from the fp32 model (not layer by layer) and re-quantises "
                       "GPTQ's output with fresh round-to-nearest block scales when packing MatMulNBits")
    return rows


# --- Brevitas -------------------------------------------------------------------------------------
@dataclass
class BrevitasSpec:
    label: str
    bits: int            # code bits, for the packed-size estimate
    scale_bytes: int     # bytes per stored scale (fp32 scales; E8M0 for MX)
    make_quant: object   # () -> Brevitas weight quantiser (an injector class)
    gptq: bool = False
    error: str | None = None


def _uint_group(bits: int, group: int):
    from brevitas.quant.shifted_scaled_int import ShiftedUint8WeightGroupQuantFloat
    return ShiftedUint8WeightGroupQuantFloat.let(bit_width=bits, group_size=group)


def _int8_channel():
    from brevitas.quant.scaled_int import Int8WeightPerChannelFloat
    return Int8WeightPerChannelFloat


def _e4m3_channel():
    from brevitas.quant.float_quant_ocp import Fp8e4m3OCPWeightPerChannelFloat
    return Fp8e4m3OCPWeightPerChannelFloat


def _e2m1_group(group: int):
    from brevitas.inject.enum import ScalingPerOutputType
    from brevitas.proxy.groupwise_float_parameter_quant import GroupwiseWeightFloatQuantProxyFromInjector
    from brevitas.quant.float_quant_ocp import Fp8e4m3OCPWeightPerChannelFloat
    return Fp8e4m3OCPWeightPerChannelFloat.let(
        proxy_class=GroupwiseWeightFloatQuantProxyFromInjector, scaling_per_output_type=ScalingPerOutputType.GROUP,
        group_size=group, bit_width=4, exponent_bit_width=2, mantissa_bit_width=1)


def _mxfp4():
    from brevitas.quant.mx_quant_ocp import MXFloat8e4m3Weight
    return MXFloat8e4m3Weight.let(bit_width=4, exponent_bit_width=2, mantissa_bit_width=1)


def brevitas_specs(quick: bool) -> list[BrevitasSpec]:
    specs = [
        BrevitasSpec("int8 per-channel", 8, 4, _int8_channel),
        BrevitasSpec("uint4 g128", 4, 4, lambda: _uint_group(4, 128), gptq=True),
        BrevitasSpec("uint3 g128", 3, 4, lambda: _uint_group(3, 128)),
        BrevitasSpec("e4m3 per-channel", 8, 4, _e4m3_channel),
        BrevitasSpec("e2m1 g32", 4, 4, lambda: _e2m1_group(32)),
        BrevitasSpec("mxfp4", 4, 1, _mxfp4, gptq=True),
        BrevitasSpec("nvfp4", 4, 1, None, error="not available: Brevitas has no NVFP4 weight quantiser "
                     "(E2M1 with E4M3 block scales and a tensor scale)"),
    ]
    if quick:
        return [replace(s, gptq=False) for s in specs if s.label in QUICK_FORMATS]
    return specs


def brevitas_quantize(model, weight_quant):
    """Every nn.Linear as a weight-only QuantLinear, except BERT's pooler: computed but unused by the
    mean-pooled embedding (nnforge and torch.onnx.export drop it), so it is left out here too."""
    import brevitas.nn as qnn
    from brevitas.graph.quantize import layerwise_quantize
    kwargs = {"weight_quant": weight_quant, "input_quant": None, "output_quant": None, "bias_quant": None,
              "return_quant_tensor": False}
    return layerwise_quantize(copy.deepcopy(model), compute_layer_map={torch.nn.Linear: (qnn.QuantLinear, kwargs)},
                              name_blacklist=["bert.pooler", "bert.pooler.dense"]).eval()


def qkv_groups(model) -> list[list[str]]:
    """Q, K and V read the same input: Brevitas may run GPTQ on them together (same Hessians)."""
    names = [n for n, _ in model.named_modules()]
    return [[f"{p}.{m}" for m in ("query", "key", "value")] for p in names if p.endswith("attention.self")]


def brevitas_gptq(qmodel, calib) -> None:
    from brevitas.graph.gptq import gptq_mode
    with torch.no_grad(), gptq_mode(qmodel, group_of_parallel_layers=qkv_groups(qmodel),
                                    use_quant_activations=False, act_order=True) as gptq:
        for _ in range(gptq.num_layers):
            for batch in calib:
                gptq.model(*batch)
            gptq.update()


def materialise(model, qmodel):
    """A float copy of ``model`` whose linear weights are ``qmodel``'s quantised weights (weight-only
    quantisation, so outputs are the same; evaluating it avoids re-quantising on every forward).
    Returns (float model, packed-size inputs: [(numel, n_scales, has_zero_point)])."""
    import brevitas.nn as qnn
    out = copy.deepcopy(model)
    parts, linears = [], dict(out.named_modules())
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if isinstance(m, qnn.QuantLinear):
                qt = m.quant_weight()
                linears[name].weight.copy_(qt.value)
                scale = qt.scale_ if hasattr(qt, "scale_") else qt.scale
                zp = getattr(qt, "zero_point_", getattr(qt, "zero_point", None))
                has_zp = zp is not None and bool((torch.as_tensor(zp) != 0).any())
                parts.append((m.weight.numel(), scale.numel(), has_zp))
    return out.eval(), parts


def brevitas_row(setup: Setup, spec: BrevitasSpec, gptq: bool) -> Row:
    import brevitas
    algorithm = "GPTQ" if gptq else "RTN"
    settings = "QuantLinear weight-only via layerwise_quantize"
    if gptq:
        settings += "; gptq_mode(act_order=True, Q/K/V as parallel layers, use_quant_activations=False)"
    row = Row("brevitas", f"Brevitas {algorithm} {spec.label}", settings, bytes_estimated=True)
    row.notes.append(f"brevitas {brevitas.__version__}")
    if spec.error:
        row.error = spec.error
        return row
    try:
        t0 = time.perf_counter()
        qmodel = brevitas_quantize(setup.model, spec.make_quant())
        if gptq:
            brevitas_gptq(qmodel, setup.calib)
        fmodel, parts = materialise(setup.model, qmodel)
        row.quant_seconds = time.perf_counter() - t0
        with torch.no_grad():
            got = torch.cat([fmodel(*b) for b in setup.evals])
    except Exception as e:
        row.error = short_error(e)
        return row
    row.weight_bytes = sum(math.ceil(n * spec.bits / 8) + s * (spec.scale_bytes + zp) for n, s, zp in parts)
    row.fp32_weight_bytes = 4 * sum(n for n, _, _ in parts)
    return row.score(setup, got)


def brevitas_rows(setup: Setup, quick: bool) -> list[Row]:
    rows = []
    for spec in brevitas_specs(quick):
        for gptq in (False, True) if spec.gptq else (False,):
            rows.append(brevitas_row(setup, spec, gptq))
            print_progress(rows[-1])
    return rows


# --- output ---------------------------------------------------------------------------------------
HEADER = f"{'method':<34} {'cos mean':>8} {'cos min':>8} {'NN agree':>8} {'NN query':>8} {'quant s':>8} {'w MiB':>8} {'ratio':>6}"


def format_row(r: Row) -> str:
    if r.error:
        return f"{r.method:<34} not run: {r.error}"
    mib = f"{'~' if r.bytes_estimated else ''}{r.weight_bytes / MIB:.2f}" if r.weight_bytes is not None else "-"
    ratio = f"{r.weight_bytes / r.fp32_weight_bytes:.3f}" if r.weight_bytes and r.fp32_weight_bytes else "-"
    secs = f"{r.quant_seconds:.1f}" if r.quant_seconds is not None else "-"
    return (f"{r.method:<34} {r.cosine_mean:>8.5f} {r.cosine_min:>8.5f} {r.nn_agreement:>8.3f} {r.query_agreement:>8.3f} {secs:>8} "
            f"{mib:>8} {ratio:>6}")


def print_progress(r: Row) -> None:
    print("  " + format_row(r), flush=True)


def print_table(rows: list[Row]) -> None:
    print()
    print(HEADER)
    peer = None
    for r in rows:
        if r.peer != peer and peer is not None:
            print()
        peer = r.peer
        print(format_row(r))
    fp32 = next((r.fp32_weight_bytes for r in rows if r.fp32_weight_bytes), None)
    if fp32:
        print(f"\nfp32 linear weights: {fp32 / MIB:.2f} MiB. ~: packed size estimated from the format "
              "(Brevitas stores fake-quantised fp32 weights).")
    print("\nsettings and notes:")
    for r in rows:
        extra = "; ".join(([r.settings] if r.settings else []) + r.notes)
        if extra:
            print(f"  {r.method}: {extra}")


def docs_rows(report: dict) -> tuple[list[str], list[list]]:
    """The docs table of quantization.json: one line per method, a row that did not run says why."""
    columns = ["method", "mean cos", "min cos", "NN agree", "NN query", "linear bytes vs fp32", "seconds"]
    rows = []
    for r in report["rows"]:
        if r.get("error"):
            rows.append([r["method"], f"not run: {r['error']}", None, None, None, None, None])
            continue
        ratio = (f"{'~' if r['bytes_estimated'] else ''}{r['weight_bytes'] / r['fp32_weight_bytes']:.3f}x"
                 if r.get("weight_bytes") and r.get("fp32_weight_bytes") else None)
        rows.append([r["method"], docs_table.fmt(r["cosine_mean"]), docs_table.fmt(r["cosine_min"]),
                     docs_table.fmt(r["nn_agreement"], ".1%"), docs_table.fmt(r["query_agreement"], ".1%"), ratio,
                     docs_table.fmt(r["quant_seconds"], ".1f")])
    return columns, rows


def write_docs(report: dict) -> None:
    m = report["meta"]
    columns, rows = docs_rows(report)
    docs_table.write("measured/quantization.md", "quantization", columns, rows,
                     source="benchmarks/out/quantization.json",
                     notes=[f"{m['eval_sentences']} held-out sentences, {m['calibration_sentences']} calibration "
                            f"sentences; versions {json.dumps(m['versions'])}. ~: packed size estimated from the "
                            "format (Brevitas stores fake-quantised fp32 weights). Seconds: the quantisation step "
                            "alone, on a machine that may have been shared."])


def meta(args, seconds: float, setup: Setup) -> dict:
    import onnxruntime
    versions = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    with contextlib.suppress(ImportError):
        import brevitas
        versions["brevitas"] = brevitas.__version__
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch threads {torch.get_num_threads()}",
            "versions": versions, "quick": args.quick, "only": args.only,
            "eval_sentences": int(setup.reference.shape[0]), "calibration_sentences": sum(len(b[0]) for b in setup.calib),
            "total_seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="uint4 g128 only (nnforge RTN/GPTQ, ORT, Brevitas RTN)")
    ap.add_argument("--only", choices=["nnforge", "ort", "brevitas"], help="run one peer only")
    args = ap.parse_args()
    t0 = time.perf_counter()
    setup = load_setup()
    runners = {"nnforge": nnforge_rows, "ort": ort_rows, "brevitas": brevitas_rows}
    rows: list[Row] = []
    for name, run in runners.items():
        if args.only in (None, name):
            print(f"{name} ...", flush=True)
            try:
                rows += run(setup, args.quick)
            except Exception as e:  # e.g. the export or import itself failed: say so, go on with the others
                rows.append(Row(name, f"{name} (every row)", error=short_error(e)))
    seconds = time.perf_counter() - t0
    print_table(rows)
    print(f"\ntotal {seconds:.0f} s")
    OUT.mkdir(exist_ok=True)
    path = OUT / "quantization.json"
    report = {"meta": meta(args, seconds, setup), "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    write_docs(report)


if __name__ == "__main__":
    main()
