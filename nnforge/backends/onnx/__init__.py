"""The onnx backend: IR -> ONNX (opset 21 + com.microsoft MatMulNBits and GroupQueryAttention), run
by ONNX Runtime. A decoder's caches are written in place by GroupQueryAttention (state.py).

Dense weights are not copied: initializers point into the bundle's ``weights.safetensors`` with
ONNX external-data offsets. Tensors the backend creates (converted scales, widened codes) go to
``model.onnx.data``. The model passes ``onnx.checker.check_model(full_check=True)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ...ir import Graph, symbolic as sym
from ...targets import Target
from ..base import Artifact, Backend, BackendError, Fallback, InputSpec, LowerContext, Runner, RuntimeSpec
from . import weights as W
from .builder import INLINE_LIMIT, OnnxBuilder, onnx_type
from .capabilities import CAPABILITIES
from .ops import LOWERINGS
from . import attention  # noqa: E402,F401  (registers the decoder ops' rules in LOWERINGS: attention, cache_update)
from . import kvcache  # noqa: E402,F401  (registers kv_cache_write and kv_cache_read in LOWERINGS)
from . import actquant  # noqa: E402,F401  (registers dynamic_quant in LOWERINGS)
from .state import METADATA_KEY as KV_METADATA, KvCache, Resident, spec_of

OPSET = 21
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def _value_info(v, name: str | None = None):
    dims = [d if isinstance(d, int) else (d if sym.is_symbol(d) else None) for d in v.shape]
    return helper.make_tensor_value_info(name or v.name, onnx_type(v.dtype), dims)


def build_model(graph: Graph, weights, opset: int = OPSET,
                target: Target | None = None) -> tuple[onnx.ModelProto, list[Fallback]]:
    """The ONNX model for ``graph`` built for ``target``; dense weights are read in place from the
    safetensors file ``weights`` (a path, or its :class:`nnforge.bundle.format.TensorIndex`) by
    offset, the file named relative to the model (it lies beside it)."""
    from ...bundle.format import TensorIndex
    weights = weights if isinstance(weights, TensorIndex) else TensorIndex(Path(weights))
    missing = sorted({n.op for n in graph.nodes if n.op not in LOWERINGS})
    if missing:
        raise BackendError(f"the onnx backend has no lowering for op(s) {', '.join(missing)} "
                           f"(used by nodes {', '.join(n.name for n in graph.nodes if n.op in missing)[:300]})")
    b = OnnxBuilder(graph, weights, weights.path.name, target)
    fallbacks: list[Fallback] = []
    for node in graph.nodes:
        try:
            LOWERINGS[node.op](b, node, fallbacks)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"onnx backend: lowering node {node.name} ({node.op}) failed: {e}") from e
    outputs = []
    for v in graph.outputs:
        if v.is_weight or v.producer is None:
            # ONNX graph outputs must be produced by a node.
            name = b.fresh(f"{v.name}_out")
            b.node("Identity", [W.dense(b, v, fallbacks) if v.is_weight else v.name], name)
            outputs.append(_value_info(v, name))
        else:
            outputs.append(_value_info(v))
    g = helper.make_graph(b.nodes, graph.name, [_value_info(v) for v in graph.inputs], outputs, b.initializers)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in sorted(b.domains)]
    model = helper.make_model(g, opset_imports=opsets, producer_name="nnforge")
    model.ir_version = 10
    if b.kv_cache:
        helper.set_model_props(model, {KV_METADATA: json.dumps(b.kv_cache, sort_keys=True)})
    return model, fallbacks


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
              "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def check_external_data(model_path: Path) -> None:
    """Every initializer's external data must be a plain file inside the bundle (checked before
    ONNX Runtime opens anything)."""
    from ...bundle import BundleError, safe_join
    try:
        model = onnx.load(os.fspath(model_path), load_external_data=False)
    except Exception as e:
        raise BundleError(f"{model_path}: not a readable ONNX model: {e}") from None
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), None)
        try:
            safe_join(model_path.parent, location)
        except BundleError as e:
            raise BundleError(f"{model_path}: initializer {t.name} reads external data {location!r} "
                              f"outside the bundle ({e})") from None


# ONNX Runtime session config entries a bundle may ask for (anything else in a manifest is refused).
# "session.disable_quant_qdq" = "1" lets constant folding dequantise weight-only DequantizeLinear
# nodes (fp8, int8, widened int3) into fp32 initialisers once at load: ORT's CPU has no matmul
# for those weights, and otherwise runs every dequantisation on every call. Bundles with
# activation quantisation keep the QDQ fusions instead.
SESSION_CONFIG_KEYS = {"session.disable_quant_qdq": {"0", "1"}}


def session_config(graph: Graph, model: onnx.ModelProto) -> dict[str, str]:
    weight_dq = any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    activation_q = any(n.op == "fake_quant" for n in graph.nodes)
    return {"session.disable_quant_qdq": "1"} if weight_dq and not activation_q else {}


def check_session_config(config, where: str) -> dict[str, str]:
    from ...bundle import BundleError
    if not isinstance(config, dict):
        raise BundleError(f"{where}: session_config must be a table of strings, got {type(config).__name__}")
    for k, v in config.items():
        if k not in SESSION_CONFIG_KEYS or v not in SESSION_CONFIG_KEYS[k]:
            raise BundleError(f"{where}: session_config entry {k!r} = {v!r} is not allowed; allowed: "
                              + ", ".join(f"{a} in {sorted(b)}" for a, b in SESSION_CONFIG_KEYS.items()))
    return config


class OnnxRunner(Runner):
    """Runs a bundle's model.onnx on ONNX Runtime's CPU provider. ``kv_cache``: which outputs share
    which input's buffer (the bundle entry's record; by default the model's own metadata), for
    caches that GroupQueryAttention writes in place (state.py)."""

    def __init__(self, model_path: Path, threads: int | None = None, config: dict[str, str] | None = None,
                 kv_cache: dict | None = None):
        import onnxruntime as ort
        self.model_path, self.config = Path(model_path), config
        check_external_data(model_path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.log_severity_level = 3
        for key, value in check_session_config(config or {}, str(model_path)).items():
            opts.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(os.fspath(model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:       # ORT raises its own pybind exception types
            raise BackendError(f"{model_path}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from None
        self.inputs = []
        for i in self.session.get_inputs():
            if i.type not in _ORT_TYPES:
                raise BackendError(f"{model_path}: input {i.name} has type {i.type}, which nnforge does not feed")
            dims = tuple(d if isinstance(d, (int, str)) else None for d in i.shape)
            self.inputs.append(InputSpec(i.name, _ORT_TYPES[i.type], dims))
        self.output_names = [o.name for o in self.session.get_outputs()]
        spec = kv_cache if kv_cache is not None else spec_of(self.session)
        self.kv = KvCache(self, spec, str(model_path)) if spec else None

    def resident(self, state_pairs, tokens, logits):
        """The caches GroupQueryAttention writes in place kept between decode steps (None when the
        model writes none in place: they then go through numpy)."""
        return Resident(self, self.kv, state_pairs, tokens, logits) if self.kv is not None else None

    def values(self, inputs: list, wanted: list) -> tuple[dict, dict]:
        """Every value of ``wanted`` (IR values) ONNX Runtime computes, by its IR name."""
        return _values(self, inputs, wanted)

    def run_numpy(self, inputs: list) -> list:
        if self.kv is not None:
            feeds = dict(zip(self.input_names, inputs))
            # ORT writes these caches in place: on copies, so the caller's arrays stay as they were
            caches = {name: np.array(feeds.pop(name), order="C") for name in set(self.kv.shared.values())}
            outs = self.kv.run(feeds, caches)
            return [outs[name] for name in self.output_names]
        try:
            return self.session.run(None, dict(zip(self.input_names, inputs)))
        except Exception as e:
            raise BackendError(f"ONNX Runtime failed on inputs "
                               f"{', '.join(f'{n} {list(x.shape)}' for n, x in zip(self.input_names, inputs))}: "
                               f"{str(e).splitlines()[0]}") from None


def _values(runner: OnnxRunner, inputs: list, wanted: list) -> tuple[dict, dict]:
    """Every value of ``wanted`` (IR values) that ONNX Runtime computes, under its IR name, from a
    copy of the model with those values added as outputs (its external data linked beside it); and
    the copy's final outputs against the runner's own."""
    import shutil
    import tempfile
    path = runner.model_path
    model = onnx.load(os.fspath(path), load_external_data=False)
    produced = {o for n in model.graph.node for o in n.output}
    have = {o.name for o in model.graph.output}
    extra = [v for v in wanted if v.name in produced and v.name not in have]
    model.graph.output.extend(helper.make_tensor_value_info(v.name, onnx_type(v.dtype), None) for v in extra)
    files = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    with tempfile.TemporaryDirectory(prefix="nnforge-values-") as tmp:
        for rel in files:                   # ONNX Runtime reads external data next to the model
            src, dst = path.parent / rel, Path(tmp, rel)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        onnx.save_model(model, os.fspath(Path(tmp, path.name)))
        copy = OnnxRunner(Path(tmp, path.name), config=runner.config)
        feeds = [np.ascontiguousarray(np.asarray(t)) for t in inputs]
        got = copy.run_numpy(copy.check_inputs(feeds))
    names = copy.output_names
    values = dict(zip(names, got))
    plain = runner.run_numpy(runner.check_inputs(feeds))
    from ...numerics import compare, json_safe
    import torch
    exposed = compare([torch.as_tensor(values[n]) for n in names[:len(plain)]], [torch.as_tensor(p) for p in plain])
    return values, {"exposed": len(extra), "exposed_vs_bundle": json_safe(exposed)}


class OnnxBackend(Backend):
    name = "onnx"
    runtime = RuntimeSpec("onnxruntime", "onnxruntime", 1)     # ONNX Runtime reads older files within a major
    capabilities = CAPABILITIES
    lowers = LOWERINGS

    def prepare(self, target: Target, shapes: dict) -> list:
        """The decompositions, and the decoder ops of dtypes other than float32 written out too:
        its attention and cache_update rules (attention.py) take float32."""
        return self.decompositions() + [{"pass": "decompose", "ops": ["attention", "cache_update"],
                                         "keep_dtypes": ["float32"]}]

    def lower(self, graph: Graph, target: Target, ctx: LowerContext) -> Artifact:
        opset = int(target.options.get("opset", OPSET))
        model, fallbacks = build_model(graph, ctx.files.weights, opset, target)
        path = ctx.files.path(MODEL_FILE)
        onnx.save_model(model, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=INLINE_LIMIT)
        try:
            onnx.checker.check_model(os.fspath(path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise BackendError(f"onnx backend produced an invalid model for graph {graph.name}: "
                               f"{str(e).splitlines()[0]}") from e
        files = [MODEL_FILE] + ([DATA_FILE] if ctx.files.exists(DATA_FILE) else [])
        entry = {"model": MODEL_FILE, "opset": opset}
        kv = next((p.value for p in model.metadata_props if p.key == KV_METADATA), None)
        if kv:
            entry["kv_cache"] = json.loads(kv)
        config = session_config(graph, model)
        if config:
            entry["session_config"] = config
        return Artifact(files=files, entry=entry, fallbacks=fallbacks,
                       toolchain=self.toolchain())

    def load(self, bundle_dir: Path, entry: dict, device: str | None = None) -> Runner:
        if device not in (None, "cpu"):
            raise BackendError(f"the onnx backend runs on the CPU; device {device!r} is not supported")
        from ...bundle import safe_join
        return OnnxRunner(safe_join(Path(bundle_dir), entry.get("model")), config=entry.get("session_config"),
                          kv_cache=entry.get("kv_cache"))

    def toolchain(self) -> dict[str, str]:
        import onnxruntime
        return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}

    def times_here(self, target: Target) -> tuple[bool, str]:
        return True, "ONNX Runtime runs natively on this CPU"
