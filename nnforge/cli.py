"""The command line: ``nnforge compile|run|verify|inspect|simulate|targets|demo``.

Bad input ends with a non-zero exit and one error line (``nnforge: error: ...``), followed by
details only where they help (the list of unsupported ops, say).
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
import zipfile
from pathlib import Path

from .errors import NnforgeError, UsageError

EXIT_BAD_INPUT = 2
DEFAULT_MODEL_CHECK_SENTENCES = 32     # held-out sentences the default model's bundles are checked on
EXIT_INTERRUPTED = 130          # 128 + SIGINT, as shells report Ctrl-C


def _parse_dims(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items or []:
        name, _, value = item.partition("=")
        if not name or not value.isdigit():
            raise UsageError(f"--dim expects NAME=INT, got {item!r}")
        out[name] = int(value)
    return out


def _model_and_inputs(spec: str, dims: dict[str, int]):
    """(model, example_inputs, dynamic_shapes, input_names, output_names) for a zoo name or .onnx path."""
    from .models import ZOO, zoo_model
    if spec in ZOO or spec == "default":
        return zoo_model("minilm" if spec == "default" else spec)
    path = Path(spec)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        from .frontend.onnx_import import example_inputs_for
        return str(path), example_inputs_for(path, dims), None, None, None
    from .frontend.decoders.importer import is_causal_lm
    if is_causal_lm(path):          # a causal LM: the decoder frontend makes its own inputs
        return str(path), None, None, None, None
    raise UsageError(f"MODEL must be one of {', '.join(list(ZOO) + ['default'])}, a path to an .onnx file, a causal "
                     f"LM's model directory (config.json, *.safetensors, tokenizer files) or a .gguf file, got {spec!r}")


def cmd_compile(args) -> int:
    if args.out is not None:        # checked and locked before the model is even loaded
        from .bundle.format import claim_out
        with claim_out(args.out):
            return _compile(args)
    return _compile(args)


def _compile(args) -> int:
    import nnforge as nf
    model, example, dyn, ins, outs = _model_and_inputs(args.model, _parse_dims(args.dim))
    names = ins or _onnx_input_names(args.model)
    calibration = check = source = None
    decoding = example is None
    if args.calibration and decoding:
        calibration = _text_file(args.calibration)
    elif args.calibration:
        calibration = _batches_file(args.calibration, names, args.calibration_batch_size)
        source = f"{args.calibration} ({sum(len(b[0]) for b in calibration)} rows)"
    elif args.model in ("default", "minilm"):
        calibration, check, source = _default_model_data(args.calibration_samples)
    if args.check_inputs:
        check = _text_file(args.check_inputs) if decoding else \
            _batches_file(args.check_inputs, names, args.calibration_batch_size)
    if args.max_len is not None and not decoding:
        raise UsageError("--max-len is the KV cache length of a causal LM; this model is not one")
    if args.head is not None and not decoding:
        raise UsageError("--head is the format of a causal LM's LM head; this model is not one")
    decoder_options = {"max_len": args.max_len, "head": args.head or "w8"} if decoding else {}
    batch_sizes = None
    if args.batch_sizes is not None:
        text = args.batch_sizes.strip().lower()
        try:
            batch_sizes = () if text in ("", "none") else tuple(int(b) for b in text.split(",") if b.strip())
        except ValueError:
            raise UsageError(f"--batch-sizes takes a comma list of positive integers or 'none', "
                             f"got {args.batch_sizes!r}") from None
    from .frontend.errors import UnsupportedOpsError
    try:
        bundle = nf.compile(model, args.target, args.recipe, example_inputs=example, calibration=calibration,
                            calibration_source=source, check_inputs=check, out=args.out, dynamic_shapes=dyn,
                            input_names=ins, output_names=outs, progress=True, batch_sizes=batch_sizes,
                            allow_nonfinite=args.allow_nonfinite, **decoder_options)
    except UnsupportedOpsError as e:        # its hint names a Python argument the CLI has no flag for
        raise UnsupportedOpsError(e.model, e.items, e.failed, e.frontend, cli=True) from None
    m = bundle.manifest
    c = m["compression"]
    print(f"wrote {bundle.path} ({bundle.size_bytes / 1e6:.1f} MB; weights {c['bytes_before'] / 1e6:.1f} -> "
          f"{c['bytes_after'] / 1e6:.1f} MB; runtime checked: {m['numerics']['runtime_checked']})")
    print("  " + fidelity_line(m))
    for fb in m["fallbacks"]:
        print(f"  fallback: {fb['where']}: {fb['what']} -> {fb['action']}")
    for line in pass_warnings(m):
        print(line)
    from .speed import describe
    print("\n".join(describe(m)))
    return 0


def _onnx_input_names(spec: str) -> list[str] | None:
    if Path(spec).suffix.lower() != ".onnx":
        return None
    from .frontend.onnx_import import input_specs
    return [name for name, _ in input_specs(spec)[0]]


def _text_file(path: str) -> str:
    """A causal LM's calibration or check data: a UTF-8 .txt file (cut into token windows)."""
    if Path(path).suffix.lower() != ".txt":
        raise UsageError(f"{path}: a causal LM takes its calibration and check data as text, a .txt file")
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    return path


def _batches_file(path: str, names: list[str] | None, batch_size: int) -> list[tuple]:
    """Batches of ``batch_size`` rows from a .safetensors or .npz file holding one tensor per
    input name (rows on the first axis)."""
    tensors = _read_inputs(Path(path))
    if names is None:
        raise UsageError(f"{path}: cannot tell which tensor is which input of this model")
    missing = [n for n in names if n not in tensors]
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        raise UsageError(f"{path}: " + "; ".join(
            x for x in (f"no tensor for input(s) {', '.join(missing)}" if missing else "",
                        f"tensor(s) {', '.join(extra)} name no input" if extra else "") if x)
            + f" (the model's inputs: {', '.join(names)})")
    import torch
    ts = [torch.as_tensor(tensors[n]) for n in names]
    rows = {int(t.shape[0]) if t.dim() else -1 for t in ts}
    if len(rows) != 1 or -1 in rows:
        raise UsageError(f"{path}: every tensor needs the same number of rows on its first axis; got "
                         + ", ".join(f"{n} {list(t.shape)}" for n, t in zip(names, ts)))
    (n,) = rows
    if batch_size < 1:
        raise UsageError(f"--calibration-batch-size must be positive, got {batch_size}")
    return [tuple(t[s:s + batch_size] for t in ts) for s in range(0, n, batch_size)]


def _default_model_data(samples: int | None):
    """The default model's own sets: calibration sentences, and held-out sentences for the checks."""
    from .models import default as dm
    _, tok = dm.load_default_model()
    calib, evals = dm.sentence_splits()
    calib = calib[:samples]
    source = (f"the default model's own calibration set: {len(calib)} sentences from Python's pydoc_data "
              "(never used for evaluation)")
    check = dm.batches(tok, evals[:DEFAULT_MODEL_CHECK_SENTENCES], 16)
    return dm.calibration_batches(tok, calib, 32), check, source


def fidelity_line(manifest: dict) -> str:
    """The fidelity a bundle records, with what it was measured on."""
    n = manifest["numerics"]
    f, held = n["fidelity_vs_fp32"], n.get("held_out") or {}
    line = f"fidelity vs fp32: cosine mean {f['cosine_mean']:.4f}"
    if isinstance(f.get("fresh_inputs_margin"), (int, float)) and f.get("rows", 0) > 1:
        line += f" (fresh inputs: within +-{f['fresh_inputs_margin']:.4f})"
    line += f", min {f['cosine_min']:.4f}, SQNR {_db(f['sqnr_db'])} dB"
    if held:
        line += (f"; on {held.get('rows', '?')} held-out rows in {held.get('batches', '?')} batch(es): "
                 f"{held.get('source', '?')}")
    return line


def pass_warnings(manifest: dict) -> list[str]:
    """The warnings the passes recorded (bundles written before passes kept warnings have none)."""
    return [f"  warning: {w}" for r in manifest.get("passes", []) for w in r.get("warnings", [])]


def recovery_lines(manifest: dict) -> list[str]:
    """What the recovery passes (reconstruct, distill) did: the held-out error before and after."""
    out = []
    for r in manifest.get("passes", []):
        f = r.get("figures") or {}
        err = f.get("held_out_error")
        if not isinstance(err, dict) or not err:
            continue
        tuned = f"{f.get('tuned_parameters')} parameters tuned in {f.get('seconds')} s"
        if r.get("name") == "reconstruct":
            mean = {k: sum(e[k] for e in err.values()) / len(err) for k in ("before", "after")}
            worst = max(err, key=lambda b: err[b]["after"])
            out.append(f"  reconstruct: {len(err)} blocks, held-out error {mean['before']:.4g} -> {mean['after']:.4g} "
                       f"on average, the worst block {worst} {err[worst]['before']:.4g} -> {err[worst]['after']:.4g}; "
                       f"{tuned}")
        elif r.get("name") == "distill" and "before" in err:
            out.append(f"  distill: held-out loss {err['before']:.4g} -> {err['after']:.4g} (step {err['step_kept']} "
                       f"of {err['steps']} kept); {tuned}")
    return out


def _db(x) -> str:
    return x if isinstance(x, str) else f"{x:.1f}"


def describe_bundle(bundle, layers: bool = False) -> list[str]:
    """What ``nnforge inspect BUNDLE`` prints: where it is from, its signature status, compression
    (whole model and compressed layers apart), fidelity with what it was measured on, fallbacks,
    speed; with ``layers`` a table of every weight layer with its own fidelity."""
    from .bundle import SIGNATURE
    from .speed import describe
    m = bundle.manifest
    c = m["compression"]
    signed = (bundle.path / SIGNATURE).exists()
    out = [f"bundle {bundle.path}: {m['model']['name']} for {m['target']['name']} ({m['backend']['name']} backend), "
           f"recipe {m['recipe']['name']}, nnforge {m['nnforge_version']}",
           "  signature: " + ("manifest.sig present (nnforge verify --key PUB.pem checks it)" if signed else
                              "unsigned: anyone could have edited manifest.json; nnforge verify recomputes what "
                              "the bundle's files confirm"),
           "  inputs:  " + ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in m["signature"]["inputs"]),
           "  outputs: " + ", ".join(f"{o['name']} {o['dtype']}{o['shape']}" for o in m["signature"]["outputs"])]
    if m["signature"].get("guards"):
        out.append("  traced under: " + "; ".join(m["signature"]["guards"]) + " (inputs outside are refused)")
    weights = f"  weights: {_size(c['bytes_before'])} -> {_size(c['bytes_after'])} ({c['ratio']:.2f}x)"
    if "model_bits_per_weight" in c:
        weights += f"; whole model {c['model_bits_per_weight']:.2f} bits/weight"
        if c.get("compressed_layers"):
            weights += (f"; {c['compressed_layers']} of {c['weight_layers']} weight layers compressed, at "
                        f"{c['compressed_bits_per_weight']:.2f} bits/weight")
        else:
            weights += "; no layer compressed"
    else:
        weights += f"; weight layers at {c['layer_bits_per_weight']:.2f} bits/weight"
    out.append(weights)
    out.append("  " + fidelity_line(m))
    calib = m.get("calibration")
    if calib:
        used = calib.get("used_by_passes")
        used = used if isinstance(used, str) else f"the passes used {used['rows']} rows in {used['batches']} batch(es)"
        out.append(f"  calibration: {calib['source']}; {calib['rows']} rows in {calib['batches']} batch(es); {used}")
    for fb in m["fallbacks"]:
        out.append(f"  fallback: {fb['where']}: {fb['what']} -> {fb['action']}")
    fused = (m.get("backend", {}).get("entry") or {}).get("act_linears") or {}
    if fused:
        quants = {f["quant"] for f in fused.values()}
        out.append(f"  integer linears: {len(fused)} run on the int8 codes of their {len(quants)} per-token "
                   "dynamic_quant(s) (backend.entry.act_linears)")
    out += recovery_lines(m)
    out += pass_warnings(m)
    out += describe(m, layers=layers)
    if layers:
        out += layer_table(m)
    return out


def layer_table(manifest: dict) -> list[str]:
    """Every weight layer: encoding, bits per weight, the weight's SQNR against fp32, and its
    output's SQNR and cosine against the fp32 model on the first held-out batch."""
    rows = manifest["compression"]["layers"]
    width = max([5] + [len(r["layer"]) for r in rows])
    out = ["  layers (SQNR in dB against fp32; output figures on the first held-out batch, error accumulated "
           "from the layers before):",
           f"    {'layer':<{width}} {'op':<10} {'shape':<14} {'encoding':<26} {'bits/w':>6} {'w SQNR':>7} "
           f"{'out SQNR':>8} {'out cos':>8}"]
    fallbacks = {fb["where"]: fb for fb in manifest.get("fallbacks", [])}
    for r in rows:
        cos = r.get("output_cosine_min")
        out.append(f"    {r['layer']:<{width}} {r['op']:<10} {str(r['shape']):<14} {r['encoding'][:26]:<26} "
                   f"{r['bits_per_weight']:>6.2f} {_cell(r.get('weight_sqnr_db')):>7} "
                   f"{_cell(r.get('output_sqnr_db')):>8} {('-' if cos is None else f'{cos:.4f}'):>8}"
                   + (f"  fallback: {fallbacks[r['layer']]['action']}" if r["layer"] in fallbacks else ""))
    return out


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _cell(x) -> str:
    return "-" if x is None else _db(x)


def _bundle_inputs(bundle, path: str) -> dict:
    """The tensors of ``path`` for the bundle's inputs, in signature order; a missing one is named."""
    tensors = _read_inputs(Path(path))
    names = [i["name"] for i in bundle.manifest["signature"]["inputs"]]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UsageError(f"{path}: missing input(s) {', '.join(missing)} (bundle takes {', '.join(names)})")
    return {n: tensors[n] for n in names}


def _read_inputs(path: Path):
    import numpy as np
    from .bundle import load_tensors
    if path.suffix == ".safetensors":
        tensors = load_tensors(path)
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:     # never unpickle user files
                tensors = {k: z[k] for k in z.files}
        except (ValueError, EOFError, zipfile.BadZipFile) as e:   # pickled arrays, an empty or broken file
            raise UsageError(f"{path}: not a readable .npz file of plain arrays: {e}") from None
    else:
        raise UsageError(f"{path}: inputs must be a .safetensors or .npz file")
    return tensors


def cmd_run(args) -> int:
    import numpy as np
    from .bundle import Bundle, save_tensors
    bundle = Bundle.open(args.bundle)
    runner = bundle.load(args.device)
    if args.inputs:
        inputs = [np.asarray(t) for t in _bundle_inputs(bundle, args.inputs).values()]
    else:
        inputs = [t.numpy() for t in bundle.reference()[0]]
    outs = runner(*inputs)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    names = [o["name"] for o in bundle.manifest["signature"]["outputs"]]
    for n, o in zip(names, outs):
        print(f"{n}: shape {list(o.shape)} dtype {o.dtype} mean {float(np.mean(o)):.6g} std {float(np.std(o)):.6g}")
    if args.out:
        import torch
        save_tensors(Path(args.out), {n: torch.from_numpy(np.ascontiguousarray(o)) for n, o in zip(names, outs)})
        print(f"wrote {args.out}")
    return 0


def _decoder_runner(path: str, device: str | None):
    from .bundle import Bundle
    bundle = Bundle.open(path)
    if "decoder" not in bundle.manifest:
        raise UsageError(f"{path} is not a decoder bundle (it was compiled from a model that is not a causal LM): "
                         "`nnforge run` runs it")
    return bundle.load(device)


def cmd_generate(args) -> int:
    lm = _decoder_runner(args.bundle, args.device)
    prompt = args.prompt
    if args.ids:
        try:
            prompt = [int(t) for t in args.prompt.replace(",", " ").split()]
        except ValueError:
            raise UsageError(f"--ids takes the prompt as token ids separated by spaces or commas, got "
                             f"{args.prompt!r}") from None
    elif lm.tokenizer is None:
        raise UsageError(f"{args.bundle} has no tokenizer (the model came without one): give the prompt as token "
                         "ids with --ids")

    def show(token: int, piece: str | None) -> None:
        print(piece if piece is not None else f"{token} ", end="", flush=True)

    result = lm.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, on_token=show)
    print()
    decode = result.decode_tokens_per_s
    print(f"prefill: {result.prompt_tokens} tokens at {result.prefill_tokens_per_s:.1f} tokens/s; decode: "
          f"{len(result.tokens)} tokens" + (f" at {decode:.1f} tokens/s" if decode else "")
          + (" (stopped at a stop token)" if result.stopped else ""), file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from .frontend.decoders.importer import read_text
    lm = _decoder_runner(args.bundle, args.device)
    text = read_text(Path(args.perplexity))
    ids = text if lm.tokenizer is not None else None
    if ids is None:
        raise UsageError(f"{args.bundle} has no tokenizer, so it cannot read {args.perplexity}")
    result = lm.perplexity(ids, window=args.window, stride=args.stride)
    print(f"perplexity {result.perplexity:.4f} (mean NLL {result.nll:.5f} nats) on {result.tokens} tokens of "
          f"{args.perplexity}, {result.windows} window(s) of <= {args.window or lm.max_len} tokens, stride "
          f"{args.stride or args.window or lm.max_len}")
    return 0


def cmd_verify(args) -> int:
    import nnforge as nf
    report = nf.verify(args.bundle, key=Path(args.key) if args.key else None)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['path']}: {report['files']} files intact")
        print(f"  signature: {report['signature']}")
        print(f"  manifest claims: {report['claims']}")
        print(f"  interpreter vs expected: cosine {report['interpreter_vs_expected']['cosine_min']:.6f}")
        rt = report["runtime_vs_expected"]
        print("  runtime vs expected: " + (f"cosine {rt['cosine_min']:.6f}" if isinstance(rt, dict) else rt))
        f = report["fidelity_vs_fp32"]
        print(f"  fidelity vs fp32 on {f['rows']} held-out rows: cosine mean {f['cosine_mean']:.4f}, "
              f"min {f['cosine_min']:.4f}, SQNR {_db(f['sqnr_db'])} dB")
        print("verified")
    return 0


def cmd_inspect(args) -> int:
    from .bundle import Bundle
    path = Path(args.path)
    if args.compare:
        return _inspect_compare(args, path)
    if path.is_dir():
        bundle = Bundle.open(path)
        m = bundle.manifest
        if args.json:
            print(json.dumps(m, indent=1))
            return 0
        for line in describe_bundle(bundle, layers=args.layers):
            print(line)
        if args.graph:
            print(bundle.graph())
        return 0
    model, example, dyn, ins, outs = _model_and_inputs(args.path, _parse_dims(args.dim))
    from .frontend import import_model
    graph, _ = import_model(model, example, dynamic_shapes=dyn, input_names=ins, output_names=outs)
    print(graph if args.graph or not args.json else json.dumps(graph.signature()))
    return 0


def _inspect_compare(args, path: Path) -> int:
    """``inspect BUNDLE --compare``: the per-layer divergence table, and the JSON file and figure."""
    from .bundle import Bundle
    from .divergence import compare_layers
    if not path.is_dir():
        raise UsageError(f"--compare needs a bundle directory, got {path}")
    if args.before and (args.json or args.plot):
        raise UsageError("--before prints a table; --json and --plot go with --compare on one bundle")
    if args.plot:
        from .plots import paths
        paths(args.plot)                # a file name it cannot write is refused before the long comparison
    bundle = Bundle.open(path)
    inputs = None
    if args.inputs:
        inputs = _bundle_inputs(bundle, args.inputs)
    original = None
    if args.model:
        original, example, dyn, ins, outs = _model_and_inputs(args.model, _parse_dims(args.dim))
        from .frontend import import_model
        original, _ = import_model(original, example, dynamic_shapes=dyn, input_names=ins, output_names=outs)
    if args.before:
        return _inspect_before_after(args, bundle, inputs, original)
    report = compare_layers(bundle, inputs, original=original, backends=not args.no_runtime,
                            attribute=not args.no_shares)
    if args.json is True:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.format_table(args.top))
    if isinstance(args.json, str):
        print(f"wrote {report.write_json(args.json)}")
    if args.plot:
        for written in report.write_plot(args.plot):
            print(f"wrote {written}")
    return 0


def _inspect_before_after(args, bundle, inputs, original) -> int:
    """``inspect BUNDLE --compare --before OTHER``: both bundles layer by layer on the same inputs
    (the reference interpreter only: the per-layer error is what is compared, not the runtime)."""
    from .divergence import compare_layers
    from .divergence.report import format_before_after
    before = _bundle_before(args.before, bundle)
    if inputs is None:
        inputs = bundle.reference()[0]
    reports = [compare_layers(b, inputs, original=original, backends=False, attribute=False) for b in (before, bundle)]
    try:
        print(format_before_after(*reports, args.top))
    except ValueError as e:
        raise UsageError(f"--before {args.before}: {e}") from None
    return 0


def _bundle_before(path: str, bundle):
    """The bundle ``--before`` names, checked to be for ``bundle``'s target."""
    from .bundle import Bundle
    if not Path(path).is_dir():
        raise UsageError(f"--before needs a bundle directory, got {path}")
    before = Bundle.open(path)
    if before.target != bundle.target:
        raise UsageError(f"--before {path}: a bundle for {before.target}, not {bundle.target}; compare bundles of "
                         "one model and target")
    return before


def cmd_simulate(args) -> int:
    from . import fpga
    from .fpga.simulator import check_lengths
    from .models import ZOO
    check_lengths(args.prompt, args.generate)       # before a zoo model is imported
    model = args.model
    if model in ZOO or model == "default":          # a zoo model: its fp32 graph, as imported
        from .frontend import import_model
        m, example, dyn, ins, outs = _model_and_inputs(model, {})
        model, _ = import_model(m, example, dynamic_shapes=dyn, input_names=ins, output_names=outs)
    result = fpga.simulate(model, args.target, prompt=args.prompt, generate=args.generate)
    if args.json:
        print(json.dumps(result.summary(), indent=1))
    else:
        print(fpga.format_table(result))
    if args.plots:
        for path in fpga.write_plots(result, args.plots):
            print(f"wrote {path}")
    return 0


def cmd_targets(args) -> int:
    import nnforge as nf
    from .backends.base import available_backends
    if args.explain:
        print("\n".join(explain_target(args.explain)))
        return 0
    rows = []
    for t in nf.targets():
        ok, why = t.can_run()
        built = t.backend in available_backends()
        rows.append((t.name, t.backend + ("" if built else " (not in this build)"), t.kind,
                     "yes" if ok and built else "no", t.description if ok and built else
                     ("backend not available" if not built else why)))
    if args.json:
        print(json.dumps([dict(zip(("name", "backend", "kind", "runs_here", "note"), r)) for r in rows], indent=1))
        return 0
    print(f"{'target':<15} {'backend':<26} {'kind':<9} {'runs here':<9} note")
    for r in rows:
        print(f"{r[0]:<15} {r[1]:<26} {r[2]:<9} {r[3]:<9} {r[4]}")
    return 0


def explain_target(name: str) -> list[str]:
    """What ``nnforge targets --explain TARGET`` prints: the target, its backend, whether it runs
    here, its native formats, and the backend's capability table (the one its lowering reads)."""
    from .backends.base import get_backend
    from .targets import get_target
    t = get_target(name)
    backend = get_backend(t.backend)
    ok, why = t.can_run()
    out = [f"{t.name}: {t.description}", f"  backend: {backend.name}; runs here: {'yes' if ok else 'no (' + why + ')'}",
           f"  native formats (from {Path(t.path).name if t.path else 'its TOML'}): "
           + (", ".join(t.formats.get("native", [])) or "none listed")]
    rows = list(backend.capabilities)
    if not rows:
        out.append("  capability table: none declared (every weight is decoded to dense)")
        return out
    out.append("  runs natively (op, weight encoding, how); any other weight is decoded and reported as a fallback:")
    out += [f"    {line}" for line in backend.capabilities.describe()]
    return out


def cmd_demo(args) -> int:
    if args.llm:
        from .demo_llm import format_llm_table, run_llm_demo
        rows = run_llm_demo(args.out or "bundles/demo-llm")
        print()
        print(format_llm_table(rows))
        return 0
    from .demo import check_rows, format_table, run_demo
    rows = run_demo(args.out or "bundles/demo", full=args.full, sentences=args.sentences)
    print()
    print(format_table(rows, full=args.full))
    failures = check_rows(rows)
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


class _RecipeAction(argparse.Action):
    """``--recipe help`` prints what a recipe can be and exits, like --help (the model and target
    are not needed for it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values in ("help", "list"):
            from .passes.recipes import describe_recipes
            print(describe_recipes())
            parser.exit(0)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    from .passes.recipes import HEAD_FORMATS
    p = argparse.ArgumentParser(prog="nnforge", description="Compress a model and compile it for a hardware target.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model into a bundle",
                       description="Compile MODEL (a zoo name: default/minilm, resnet18, llama; an .onnx file; or a "
                                   "causal LM: a transformers model directory or a .gguf file, whose --calibration "
                                   "and --check-inputs are .txt files).")
    c.add_argument("model")
    c.add_argument("--target", required=True, help="a target name (see `nnforge targets`)")
    c.add_argument("--recipe", default=None, action=_RecipeAction,
                   help="a preset name, a .toml or .json recipe file, or a JSON list of pass configs (default: no "
                        "compression); '--recipe help' lists the presets, the file format and every pass's options")
    c.add_argument("--out", default=None, help="bundle directory (default: bundles/<model>-<target>)")
    c.add_argument("--dim", action="append", default=[], metavar="NAME=INT",
                   help="size of a symbolic input dim for example inputs of an .onnx model (default 1)")
    c.add_argument("--batch-sizes", default=None, metavar="B,B,...",
                   help="batch sizes of the bundle's speed records and per-shape dispatch, where the target runs "
                        "here (default 1,32 or $NNFORGE_BATCH_SIZES; 'none' measures nothing)")
    c.add_argument("--calibration", default=None, metavar="FILE",
                   help="calibration data for data-driven passes (GPTQ, SparseGPT, SmoothQuant, activation ranges, "
                        "Hessian palettes...): a .safetensors or .npz file with one tensor per input name, samples "
                        "on the first axis (a causal LM: a .txt file). The default model brings its own set")
    c.add_argument("--calibration-batch-size", type=int, default=32, metavar="N",
                   help="rows per batch when reading --calibration and --check-inputs (default 32)")
    c.add_argument("--check-inputs", default=None, metavar="FILE",
                   help="held-out inputs the fidelity is measured on, same format (default: calibration batches "
                        "held out from the passes, or the example inputs when no pass reads data)")
    c.add_argument("--allow-nonfinite", action="store_true",
                   help="accept NaN/inf in weights, inputs and outputs (refused by default, naming the tensor)")
    c.add_argument("--max-len", type=int, default=None, metavar="N",
                   help="a causal LM's static KV cache length: the longest prompt plus generation (default 512, or "
                        "the model's own limit when smaller)")
    c.add_argument("--head", default=None, choices=list(HEAD_FORMATS),
                   help="a causal LM's LM head format (with a tied embedding): w8 (default: int8 per channel), "
                        "w4-g32 (int4 in groups of 32, GPTQ: fewer bytes a decode step reads), fp32, or recipe "
                        "(compressed like the other layers)")
    c.add_argument("--calibration-samples", type=int, default=None,
                   help="calibration sentences for the default model (default: all of its calibration split)")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("run", help="run a bundle", description="Run a bundle on inputs (default: its reference inputs).")
    r.add_argument("bundle")
    r.add_argument("--inputs", help=".safetensors or .npz file with one tensor per input name")
    r.add_argument("--out", help="write outputs to this .safetensors file")
    r.add_argument("--device", default=None)
    r.set_defaults(fn=cmd_run)

    g = sub.add_parser("generate", help="generate text with a decoder bundle",
                       description="Generate from PROMPT with a decoder bundle, streaming the tokens; ends with the "
                                   "prefill and decode rates in tokens/s.")
    g.add_argument("bundle")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K likeliest tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (1: off)")
    g.add_argument("--seed", type=int, default=None, help="seed of sampled decoding (the same seed, the same text)")
    g.add_argument("--ids", action="store_true", help="PROMPT is token ids (for a bundle without a tokenizer)")
    g.add_argument("--device", default=None)
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("eval", help="evaluate a decoder bundle",
                       description="Perplexity of a decoder bundle on a text file, by sliding windows.")
    e.add_argument("bundle")
    e.add_argument("--perplexity", required=True, metavar="FILE", help="a UTF-8 .txt file")
    e.add_argument("--window", type=int, default=None, metavar="N", help="tokens per window (default: max_len)")
    e.add_argument("--stride", type=int, default=None, metavar="N", help="tokens between windows (default: window)")
    e.add_argument("--device", default=None)
    e.set_defaults(fn=cmd_eval)

    v = sub.add_parser("verify", help="check a bundle's files and numerics",
                       description="Re-hash every file of a bundle and re-run its numerics check.")
    v.add_argument("bundle")
    v.add_argument("--json", action="store_true")
    v.add_argument("--key", default=None, metavar="PUB.pem",
                   help="Ed25519 public key (PEM): the manifest's signature (manifest.sig) must match it")
    v.set_defaults(fn=cmd_verify)

    i = sub.add_parser("inspect", help="describe a bundle or a model",
                       description="Summarise a bundle (or print the IR of a model) with its compression figures.")
    i.add_argument("path", help="bundle directory, zoo model name or .onnx file")
    i.add_argument("--graph", action="store_true", help="print the IR graph")
    i.add_argument("--layers", action="store_true", help="list weight layers and their encodings")
    i.add_argument("--json", nargs="?", const=True, default=False, metavar="FILE",
                   help="print JSON; with --compare and FILE, write the report there")
    i.add_argument("--dim", action="append", default=[], metavar="NAME=INT")
    i.add_argument("--compare", action="store_true",
                   help="locate where the bundle departs from fp32, layer by layer (nnforge.compare_layers): "
                        "the reference interpreter in fp32 and with the bundle's encodings, and its runtime "
                        "where it runs here and shows intermediate values (onnx)")
    i.add_argument("--inputs", default=None, metavar="FILE",
                   help="with --compare: .safetensors or .npz inputs by name (default: the bundle's reference inputs)")
    i.add_argument("--model", default=None, metavar="MODEL",
                   help="with --compare: the fp32 model (zoo name or .onnx file; a bundle holds only compressed "
                        "weights; default: the zoo model the bundle names)")
    i.add_argument("--plot", default=None, metavar="FILE",
                   help="with --compare: draw SQNR by layer into FILE (.svg or .png; the other format is written "
                        "beside it)")
    i.add_argument("--before", default=None, metavar="BUNDLE",
                   help="with --compare: a bundle of the same model and target before a change (e.g. one-shot, "
                        "beside its '+rec' recovered bundle): each layer's error before and after, on the same inputs")
    i.add_argument("--top", type=int, default=10, help="with --compare: weight layers listed (default 10)")
    i.add_argument("--no-shares", action="store_true",
                   help="with --compare: skip each weight's share of the end-to-end error (one graph run per weight)")
    i.add_argument("--no-runtime", action="store_true", help="with --compare: the reference interpreter only")
    i.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("simulate", help="estimate latency, throughput, resources and energy on an FPGA",
                       description="Cycle-approximate FPGA simulation (FlightLLM-style accelerator) of MODEL: "
                                   "llama2-7b, opt-6.7b, a bundle directory, or a zoo model name.")
    s.add_argument("model")
    s.add_argument("--target", default="alveo-u280", help="an fpga target (alveo-u280, versal-vhk158)")
    s.add_argument("--prompt", type=int, default=128, help="prefill tokens (default 128)")
    s.add_argument("--generate", type=int, default=512, help="decoded tokens (default 512)")
    s.add_argument("--plots", default=None, metavar="DIR",
                   help="write the roofline and time-breakdown figures (SVG and PNG) here")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_simulate)

    t = sub.add_parser("targets", help="list targets", description="List hardware targets and whether each runs here.")
    t.add_argument("--json", action="store_true")
    t.add_argument("--explain", default=None, metavar="TARGET",
                   help="what TARGET's backend runs natively (op x weight encoding) and how, from its capability table")
    t.set_defaults(fn=cmd_targets)

    d = sub.add_parser("demo", help="compile the default model for one target of each family",
                       description="Compile the embedded default model for one target of each family (onnx, "
                                   "CPU, GPU, phone, FPGA, MLIR) with the recipe it is known for, and print size, "
                                   "fidelity on held-out sentences and speed against torch eager.")
    d.add_argument("--out", default=None, help="where the bundles go (default bundles/demo, or bundles/demo-llm)")
    d.add_argument("--full", action="store_true",
                   help="every recipe of every family, on more sentences (what `make bench` records)")
    d.add_argument("--sentences", type=int, default=None, metavar="N",
                   help="score at most N held-out sentences per row (default: each family's own count)")
    d.add_argument("--llm", action="store_true",
                   help="the small real LLM (Gemma 3 270M, the models extra) with w4-gptq on onnx and cpu next to "
                        "fp32 torch: perplexity, decode tokens/s and a generated sentence (make demo-llm)")
    d.set_defaults(fn=cmd_demo)
    return p


# what to do about the usual OSErrors
_OS_HINTS = {errno.ENOSPC: "free some space or write somewhere else",
             errno.EDQUOT: "free some space or write somewhere else",
             errno.EACCES: "check its permissions or use another path",
             errno.EPERM: "check its permissions or use another path",
             errno.EROFS: "the file system is read-only: use another path",
             errno.EISDIR: "it is a directory: give a file",
             errno.ENOTDIR: "a part of the path is not a directory",
             errno.ENOENT: "check the path"}


def _os_error_line(e: OSError) -> str:
    """'PATH: reason; what to do' for an OSError (both paths of a failed rename)."""
    if not e.strerror:              # raised by nnforge with its own message
        return str(e)
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    text = f"{where}: {e.strerror}" if where else e.strerror
    hint = _OS_HINTS.get(e.errno)
    return f"{text}; {hint}" if hint else text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:          # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        message, rc = "nnforge: interrupted", EXIT_INTERRUPTED
    except OSError as e:
        message, rc = f"nnforge: error: {_os_error_line(e)}", EXIT_BAD_INPUT
    except NnforgeError as e:         # every error nnforge raises on purpose; anything else is a bug
        first, _, rest = str(e).partition("\n")
        message, rc = f"nnforge: error: {first}" + (f"\n{rest}" if rest else ""), EXIT_BAD_INPUT
    # printed once the failed frames are gone: a progress bar still open in one of them (leave=False)
    # is closed, and its line cleared, when its frame is freed
    print(message, file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
