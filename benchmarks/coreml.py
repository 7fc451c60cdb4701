"""Core ML packages of the default model for `apple-a17`: nnforge's compressed packages against what
coremltools.optimize produces for the same model and settings, in the same run. Size and fidelity.

Settings (ours = the nnforge preset, theirs = the coremltools.optimize.coreml call on the fp16
mlprogram that ct.convert gives for the same fp32 torch model):

    fp16         no recipe                       | ct.convert alone (mlprogram, iOS18, FLOAT16)
    palettize-4  k-means, Hessian-weighted, one  | palettize_weights: OpPalettizerConfig(mode="kmeans", nbits=4,
                 fp16 LUT per output channel     |   granularity="per_grouped_channel", group_size=1) -> one LUT
                                                 |   per output channel (channel_axis 0 of the [out, in] weight)
    w4-gptq      GPTQ (act-order, static groups) | linear_quantize_weights: OpLinearQuantizerConfig(mode="linear"
                 uint4 + zero points, g128       |   (asymmetric: int4 + offsets), dtype="int4",
                                                 |   granularity="per_block", block_size=128) -> blocks along K
    sparse24-w4  SparseGPT 2:4 jointly with      | prune_weights: OpMagnitudePrunerConfig(n_m_ratio=(2, 4)), then
                 uint4 g128                      |   linear_quantize_weights(<the w4 config>, joint_compression=True)
                                                 |   -> constexpr_sparse_blockwise_shift_scale + sparse_to_dense

Both sides compress the same layers: the 36 nn.Linear weights of the encoder. nnforge's passes touch
linear/conv weights only, so coremltools gets its config through ``op_type_configs={"linear": ...}``
(its default global config would also compress the 30522x384 word embedding, which is half of the
model's bytes, and the comparison would no longer be about the same settings). Everything else stays
fp16 in both packages.

Size: bytes of every file of the saved ``.mlpackage`` (weights, program, manifest), against the fp16
package of the same side. Ours is the ``model.mlpackage`` of the bundle ``nf.compile(model,
"apple-a17", recipe)`` writes (calibration: the 480 calibration sentences, length-sorted batches
of 32).

Fidelity: mean / min cosine and nearest-neighbour agreement of the embeddings against fp32 torch on
the 500 held-out evaluation sentences (``evaluate_embeddings``). Core ML cannot predict on Linux, so
neither package is run by Core ML; both are evaluated with fp32 arithmetic on their decoded weights:

- ours: the bundle's graph (``bundle.graph()``, whose encodings the backend checked bit for bit
  against the package when it wrote it) run by nnforge's reference interpreter in fp32;
- theirs: the saved package's MIL program is read back (``verify.load_program``), the weight of each
  ``linear`` op is decoded from its stored constexpr chain with ``weights.decode_op`` (fp16 values),
  and those dense weights replace the weights of a copy of the fp32 torch model, run in fp32.
  Weights are matched by name: coremltools names a weight const after its torch parameter
  (``bert.encoder.layer.0.attention.self.query.weight`` -> ``bert_encoder_layer_0_attention_self_
  query_weight_to_fp16``, plus suffixes the optimize passes add), so the longest sanitised parameter
  name that prefixes the weight's var name wins; a linear whose name matches none would be matched
  by shape in program order (the count of such matches is reported, 0 in practice). Every torch
  linear must be matched exactly once and shapes must agree, else the script stops.
- cross-check "ours (pkg)": our own package decoded exactly the same way as theirs and run in torch,
  so both sides can also be compared through one identical path (differs from the interpreter
  column only by the fp16 rounding of decoded weights).

Non-linear weights (embeddings, LayerNorm, biases) are fp32 in both evaluations.

    python benchmarks/coreml.py                       # everything: 500 eval sentences (~10-20 min)
    python benchmarks/coreml.py --quick               # 64 eval / 96 calibration sentences
    python benchmarks/coreml.py --settings w4-gptq --eval-sentences 200

Writes benchmarks/out/coreml.json and the table in docs/measured/coreml.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_table  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("coremltools").setLevel(logging.ERROR)

OUT = Path(__file__).parent / "out"
SETTINGS = ["palettize-4", "w4-gptq", "sparse24-w4"]
INPUT_NAMES = ["input_ids", "attention_mask"]


# --- helpers (pure; tested in tests/backends/coreml/test_coreml_benchmark_helpers.py) -------------
def package_bytes(path) -> int:
    """Bytes of every file under a saved .mlpackage directory (what ships to the device)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def sanitise(name: str) -> str:
    """A torch parameter name as coremltools spells it in MIL names ("." and others -> "_")."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def match_linears(ops: list[tuple[str, tuple]], params: dict[str, tuple]) -> tuple[list[str], int]:
    """Pair MIL linear weights with torch parameters.

    ops: (weight var name, shape) per linear op, in program order. params: torch weight name ->
    shape, in module order. Returns (parameter name per op, how many were matched by shape rather
    than by name). Name rule: the longest sanitised parameter name that equals the var name or
    prefixes it followed by "_" (so layer_1 never claims layer_10's weight). Ops with no name match
    take the first unclaimed parameter of the same shape in module order. Raises ValueError when a
    parameter is claimed twice, a shape disagrees, or some parameter is left unmatched."""
    keys = sorted(((sanitise(p), p) for p in params), key=lambda kp: -len(kp[0]))
    out: list[str | None] = []
    for var, shape in ops:
        hit = next((p for k, p in keys if var == k or var.startswith(k + "_")), None)
        out.append(hit)
    claimed = [p for p in out if p is not None]
    if len(set(claimed)) != len(claimed):
        dup = sorted({p for p in claimed if claimed.count(p) > 1})
        raise ValueError(f"parameter(s) {dup} matched by more than one linear op")
    by_shape = 0
    for i, (var, shape) in enumerate(ops):
        if out[i] is None:
            free = [p for p in params if p not in out and tuple(params[p]) == tuple(shape)]
            if not free:
                raise ValueError(f"linear weight {var} {tuple(shape)}: no torch parameter of that name or shape left")
            out[i] = free[0]
            by_shape += 1
        if tuple(params[out[i]]) != tuple(shape):
            raise ValueError(f"linear weight {var}: shape {tuple(shape)} but torch {out[i]} is {tuple(params[out[i]])}")
    missing = [p for p in params if p not in out]
    if missing:
        raise ValueError(f"torch linear weight(s) with no linear op in the package: {missing[:4]}...")
    return out, by_shape


# --- coremltools side -----------------------------------------------------------------------------
class ConvertibleModel(torch.nn.Module):
    """The default model's forward written with ops ct.convert knows. transformers 5 builds the
    attention mask with ``new_ones``, which coremltools 9 cannot convert (TorchScript or
    torch.export alike), so this builds the additive mask itself and calls the same embedding and
    encoder-layer modules; outputs equal DefaultModel's bit for bit (checked at run time). Its
    parameters are the original ones, so the converted program's weight names are the original
    parameter names."""

    def __init__(self, model):
        super().__init__()
        self.bert = model.bert

    def forward(self, input_ids, attention_mask):
        m = attention_mask.to(torch.float32)
        additive = (1.0 - m[:, None, None, :]) * -1e4
        h = self.bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        for layer in self.bert.encoder.layer:
            h = layer(h, attention_mask=additive)
            h = h[0] if isinstance(h, tuple) else h
        mk = m.unsqueeze(-1)
        pooled = (h * mk).sum(1) / mk.sum(1).clamp(min=1e-9)
        return pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def convert_fp16(model, example):
    """ct.convert of the traced fp32 model: mlprogram, iOS18, fp16 compute, flexible batch/seq."""
    import coremltools as ct
    wrapped = ConvertibleModel(model).eval()
    with torch.no_grad():
        if not torch.equal(wrapped(*example), model(*example)):
            raise RuntimeError("ConvertibleModel no longer matches the default model; fix its forward")
        traced = torch.jit.trace(wrapped, example, strict=False)
    dims = ct.Shape((ct.RangeDim(1, 4096, default=1), ct.RangeDim(1, 512, default=16)))
    return ct.convert(traced, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                      inputs=[ct.TensorType(name=n, shape=dims, dtype=np.int32) for n in INPUT_NAMES],
                      compute_precision=ct.precision.FLOAT16, skip_model_load=True)


def optimize_theirs(mlmodel, setting: str):
    """coremltools.optimize.coreml for one setting, linear ops only (see the module docstring)."""
    import coremltools.optimize.coreml as cto

    def only_linear(op_config):
        return cto.OptimizationConfig(op_type_configs={"linear": op_config})

    w4 = cto.OpLinearQuantizerConfig(mode="linear", dtype="int4", granularity="per_block", block_size=128)
    if setting == "palettize-4":
        # one k-means worker: with more, coremltools forks a process pool after torch has started
        # its threads, and the forked workers deadlocked here (futex wait, no progress in minutes)
        cfg = cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=1,
                                     num_kmeans_workers=1)
        return cto.palettize_weights(mlmodel, only_linear(cfg))
    if setting == "w4-gptq":
        return cto.linear_quantize_weights(mlmodel, only_linear(w4))
    if setting == "sparse24-w4":
        pruned = cto.prune_weights(mlmodel, only_linear(cto.OpMagnitudePrunerConfig(n_m_ratio=(2, 4))))
        return cto.linear_quantize_weights(pruned, only_linear(w4), joint_compression=True)
    raise ValueError(f"no coremltools counterpart for setting {setting!r}; choose from {SETTINGS}")


def decoded_linears(package, model) -> tuple[dict[str, torch.Tensor], dict]:
    """(torch parameter name -> decoded dense weight, info) for every linear op of a saved package."""
    from nnforge.backends.coreml.verify import _ops, load_program
    from nnforge.backends.coreml.weights import decode_op
    prog = load_program(package)
    ops, vals, chains = [], [], {}
    for op in _ops(prog):
        if op.op_type != "linear":
            continue
        w = op.inputs["weight"]
        if w.op is None:
            raise RuntimeError(f"{package}: linear {op.name} has a non-constant weight {w.name}")
        ops.append((w.name, tuple(int(d) for d in w.shape)))
        vals.append(decode_op(w.op))
        chains[w.op.op_type] = chains.get(w.op.op_type, 0) + 1
        if len(ops) == 1:       # the first layer's stored tensors show the granularity each side used
            first = _chain_shapes(w.op)
    # the encoder's linears: BERT's pooler is a linear too, but mean pooling never calls it
    params = {f"{n}.weight": tuple(m.weight.shape) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".encoder." in f".{n}."}
    names, by_shape = match_linears(ops, params)
    return ({p: torch.from_numpy(np.asarray(v, np.float32)) for p, v in zip(names, vals)},
            {"linear_ops": len(ops), "matched_by_shape": by_shape, "weight_ops": chains,
             "first_layer_tensors": first if ops else {}})


def _chain_shapes(op) -> dict[str, list[int]]:
    """op_type.input -> shape of every constant tensor in the constexpr chain ending at ``op``."""
    out, todo = {}, [op]
    while todo:
        o = todo.pop()
        for key, var in o.inputs.items():
            if var.op is not None and var.op.op_type != "const":
                todo.append(var.op)
            else:
                out[f"{o.op_type}.{key}"] = [int(d) for d in getattr(var, "shape", ())]
    return out


def torch_with(model, weights: dict[str, torch.Tensor]):
    """A copy of the fp32 model with the given linear weights (fp32 arithmetic throughout)."""
    m = copy.deepcopy(model)
    state = m.state_dict()
    for name, w in weights.items():
        state[name] = w.to(state[name].dtype)
    m.load_state_dict(state)
    return m.eval()


def embed_torch(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(*b) for b in batches])


# --- the run --------------------------------------------------------------------------------------
def docs_rows(report: dict) -> tuple[list[str], list[list]]:
    """The docs table of coreml.json: per setting, package size as a fraction of the fp16 package,
    mean cosine and NN agreement, ours and coremltools.optimize's."""
    columns = ["setting", "ours: x fp16, mean cos, NN agree", "coremltools.optimize: x fp16, mean cos, NN agree"]

    def cell(r, side):
        f = r[side]
        return f"{r[side + '_x_fp16']:.3f}x, {f['cosine_mean']:.4f}, {f['nn_agreement']:.1%}"
    return columns, [[f"`{r['setting']}`", cell(r, "ours"), cell(r, "theirs")] for r in report["rows"]
                     if r["setting"] != "fp16"]


def write_docs(report: dict, source: str) -> None:
    m = report["meta"]
    columns, rows = docs_rows(report)
    docs_table.write("measured/coreml.md", "coreml", columns, rows, source=source,
                     notes=[f"{m['eval_sentences']} held-out sentences, {m['calibration_sentences']} calibration "
                            f"sentences, {m['layers_compressed']}; both sides' weights decoded from their saved "
                            f"packages and run in fp32; coremltools {m['coremltools']}."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS,
                    help="compressed settings to run (the fp16 baselines always run)")
    ap.add_argument("--eval-sentences", type=int, default=None, help="held-out sentences scored (default 500)")
    ap.add_argument("--calibration-sentences", type=int, default=None, help="default 480 (all)")
    ap.add_argument("--quick", action="store_true", help="64 eval and 96 calibration sentences, for development")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    n_eval = args.eval_sentences or (64 if args.quick else 500)
    n_cal = args.calibration_sentences or (96 if args.quick else 480)

    import coremltools as ct
    import nnforge as nf
    from nnforge.ir import Interpreter
    from nnforge.models import default as dm

    torch.manual_seed(0)
    model, tok = dm.load_default_model()
    calib, evals = dm.sentence_splits()
    example = dm.encode(tok, evals[:8])
    calibration = dm.calibration_batches(tok, calib[:n_cal], 32)
    eval_batches = dm.batches(tok, evals[:n_eval], 32)
    reference = embed_torch(model, eval_batches)

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        theirs_fp16 = convert_fp16(model, example)
        theirs_fp16.save(str(tmp / "theirs-fp16.mlpackage"))
        print(f"ct.convert fp16 package: {time.perf_counter() - t0:.1f} s", flush=True)
        for setting in ["fp16"] + args.settings:
            row = {"setting": setting}
            # ours: the bundle's package, and its graph on the reference interpreter
            t0 = time.perf_counter()
            bundle = nf.compile(model, "apple-a17", None if setting == "fp16" else setting,
                                example_inputs=example, calibration=calibration,
                                dynamic_shapes=dm.dynamic_shapes(), input_names=INPUT_NAMES,
                                output_names=["embeddings"], out=tmp / f"ours-{setting}")
            row["ours_compile_s"] = round(time.perf_counter() - t0, 1)
            pkg = bundle.path / "model.mlpackage"
            row["ours_bytes"] = package_bytes(pkg)
            interp = Interpreter(bundle.graph())
            emb = torch.cat([interp.run(*b)[0] for b in eval_batches])
            row["ours"] = dm.evaluate_embeddings(reference, emb).to_dict()
            # the same decode-and-run-in-torch path as theirs, on our package (cross-check)
            dec, info = decoded_linears(pkg, model)
            row["ours_pkg"] = dm.evaluate_embeddings(reference, embed_torch(torch_with(model, dec), eval_batches)).to_dict()
            row["ours_pkg_decode"] = info
            # theirs: coremltools.optimize on the converted fp16 model, decoded, run in torch fp32
            t0 = time.perf_counter()
            mlm = theirs_fp16 if setting == "fp16" else optimize_theirs(theirs_fp16, setting)
            path = tmp / f"theirs-{setting}.mlpackage"
            if setting != "fp16":
                mlm.save(str(path))
            row["theirs_compress_s"] = round(time.perf_counter() - t0, 1)
            row["theirs_bytes"] = package_bytes(path)
            dec, info = decoded_linears(path, model)
            row["theirs"] = dm.evaluate_embeddings(reference, embed_torch(torch_with(model, dec), eval_batches)).to_dict()
            row["theirs_decode"] = info
            rows[setting] = row
            print(f"{setting:<12} ours {row['ours_bytes'] / 1e6:7.2f} MB cos {row['ours']['cosine_mean']:.6f} "
                  f"({row['ours_compile_s']} s) | theirs {row['theirs_bytes'] / 1e6:7.2f} MB cos "
                  f"{row['theirs']['cosine_mean']:.6f} ({row['theirs_compress_s']} s) | their ops "
                  f"{info['weight_ops']}", flush=True)

    base_o, base_t = rows["fp16"]["ours_bytes"], rows["fp16"]["theirs_bytes"]
    for r in rows.values():
        r["ours_x_fp16"] = r["ours_bytes"] / base_o
        r["theirs_x_fp16"] = r["theirs_bytes"] / base_t
        # goal: no larger (within 1% of the package, for manifests/metadata) and strictly closer to fp32
        r["goal_met"] = None if r["setting"] == "fp16" else bool(
            r["ours_x_fp16"] <= r["theirs_x_fp16"] * 1.01 and r["ours"]["cosine_mean"] > r["theirs"]["cosine_mean"])
    head = (f"{'setting':<12} | {'ours MB (x fp16)':>17} | {'theirs MB (x fp16)':>18} | {'ours cos / NN':>17} | "
            f"{'theirs cos / NN':>17} | goal met?")
    print(f"\n{n_eval} held-out sentences, {n_cal} calibration sentences; fidelity vs fp32 torch, fp32 arithmetic "
          f"on decoded weights\n{head}\n{'-' * len(head)}")
    for r in rows.values():
        goal = "(baseline)" if r["goal_met"] is None else ("yes" if r["goal_met"] else "no")
        print(f"{r['setting']:<12} | {r['ours_bytes'] / 1e6:7.2f} ({r['ours_x_fp16']:5.3f}x) | "
              f"{r['theirs_bytes'] / 1e6:8.2f} ({r['theirs_x_fp16']:5.3f}x) | "
              f"{r['ours']['cosine_mean']:.6f} / {r['ours']['nn_agreement']:5.1%} | "
              f"{r['theirs']['cosine_mean']:.6f} / {r['theirs']['nn_agreement']:5.1%} | {goal}")
    print("\ncross-check, ours decoded from its package and run in torch like theirs: " + ", ".join(
        f"{r['setting']} {r['ours_pkg']['cosine_mean']:.6f} / {r['ours_pkg']['nn_agreement']:.1%}" for r in rows.values()))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"eval_sentences": n_eval, "calibration_sentences": n_cal, "quick": args.quick,
            "coremltools": ct.__version__, "torch": torch.__version__, "nnforge": nf.__version__,
            "target": "apple-a17", "layers_compressed": "the 36 encoder nn.Linear weights (both sides)"}
    report = {"meta": meta, "rows": list(rows.values())}
    (args.out / "coreml.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'coreml.json'}")
    write_docs(report, str(args.out / "coreml.json"))


if __name__ == "__main__":
    main()
