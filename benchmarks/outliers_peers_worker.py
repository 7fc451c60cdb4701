"""The peers' side of benchmarks/outliers_peers.py, run by that module in the peers' own virtual
environment (llm-compressor pins older transformers than nnforge's): reads a JSON request, writes a
JSON result.

    python outliers_peers_worker.py request.json result.json

The request: ``model_dir`` (a transformers causal LM directory), ``calibration`` (token-id windows,
the ones nnforge calibrates on), ``eval_ids``, ``window``, ``stride``, ``threads``, ``head``
(``"w8"`` or ``"float"``), ``runs`` (``{"peer", "scheme", "rotation"}`` each; ``rotation`` None or
the peer's transform) and the peers' options (``autoround_iters``). The result: ``{"versions",
"threads", "rows"}``, one row per run after a ``transformers fp32`` row; a run the peer cannot do
keeps its row, with the error and no figure.

With ``"task": "encoder"`` the model is a BERT encoder (the default model), ``calibration`` and
``eval`` are padded batches (``{"input_ids", "attention_mask"}`` each) and each row carries the
mean-pooled, normalised sentence embeddings of ``eval`` instead of a perplexity.
"""
from __future__ import annotations

import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch


class PeerRefusal(Exception):
    """A run the peer cannot do as asked (a model or scheme it has no support for): its row holds
    the reason instead of a figure."""

# rows of logits taken to float64 at a time: a window of a 262k-token vocabulary in float64 is a
# gigabyte, and the same sum over slices gives the same figure
_ROWS = 64
FP32 = ("transformers", "fp32", None)

# llm-compressor's QuIP transform as its examples/transform/quip_example.py sets it: input and
# output rotations, 128-wide Hadamard blocks (they divide every width of the model)
QUIP = {"rotations": ["v", "u"], "transform_block_size": 128, "transform_type": "hadamard"}

# auto-round's integer schemes with dynamic per-token activations (act_group_size -1 is a row of
# the flattened [tokens, channels] input); it has no W4A8/W4A4 preset, so these are written out as
# its INT8/INT4 presets are, with llm-compressor's W4A8/W4A4 weight grid (int4, symmetric, groups of 128)
AUTOROUND_SCHEMES = {
    "W4A8": {"bits": 4, "group_size": 128, "sym": True, "data_type": "int", "act_bits": 8,
             "act_group_size": -1, "act_data_type": "int", "act_dynamic": True, "act_sym": True},
    "W4A4": {"bits": 4, "group_size": 128, "sym": True, "data_type": "int", "act_bits": 4,
             "act_group_size": -1, "act_data_type": "int", "act_dynamic": True, "act_sym": True},
}


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM
    # float32 and eager attention, as nnforge.models.llm.load_small_llm loads the reference
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def perplexity(model, ids: list[int], window: int, stride: int) -> dict:
    """nnforge.generation.perplexity's recipe on ``model``'s logits: windows of at most ``window``
    tokens every ``stride``, each from a fresh state, scoring only the tokens no earlier window
    scored (the first window all but its first); log-softmax in float64."""
    ids_t = torch.tensor(ids, dtype=torch.int64)
    n = ids_t.shape[0]
    nll, scored, windows, prev_end = 0.0, 0, 0, 0
    with torch.inference_mode():
        for begin in range(0, n, stride):
            end = min(begin + window, n)
            chunk = ids_t[begin:end]
            first = max(1, chunk.shape[0] - (end - prev_end))
            logits = model(input_ids=chunk[None], use_cache=False).logits[0]
            for r in range(first - 1, chunk.shape[0] - 1, _ROWS):     # row r predicts token r + 1
                rows = logits[r:min(r + _ROWS, chunk.shape[0] - 1)].to(torch.float64)
                targets = chunk[r + 1:r + 1 + rows.shape[0], None]
                nll -= float(torch.log_softmax(rows, dim=-1).gather(-1, targets).sum())
            scored += chunk.shape[0] - first
            windows += 1
            prev_end = end
            del logits
            if end == n:
                break
    return {"perplexity": math.exp(nll / scored), "nll": nll / scored, "tokens_scored": scored, "windows": windows}


def int8_head(model) -> str:
    """The LM head's weight as int8 per output channel (absmax / 127, round to nearest), the head
    format nnforge's compressed rows use; untied from the embedding first, so the embedding stays
    as it was (nnforge quantises only the head's product)."""
    head = model.get_output_embeddings()
    w = head.weight.detach()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    head.weight = torch.nn.Parameter((w / scale).round().clamp(-127, 127) * scale, requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    return "int8 per output channel, round to nearest"


def activation_quantisers(model) -> int:
    """Linears whose inputs the model now fake-quantises at run time (compressed-tensors' schemes
    with input activations, auto-round's activation wrappers): a check that the forward scored is
    the quantised one."""
    return sum(1 for m in model.modules()
               if type(m).__name__ == "WrapperWALayer"
               or getattr(getattr(m, "quantization_scheme", None), "input_activations", None) is not None)


# --- llm-compressor ------------------------------------------------------------------------------

def llmcompressor_run(model, samples: list[dict], scheme: str, rotation: str | None, ignore: list[str]) -> str:
    """GPTQ with llm-compressor's preset ``scheme`` on every linear but ``ignore``, calibrated on
    ``samples`` (``{"input_ids", "attention_mask"}`` each, in order), after its QuIP transform when
    ``rotation`` is ``"quip"``; the model is left with its fake-quantised forward (compressed-tensors'
    QDQ of weights and dynamic activations, online transforms as hooks)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.core import active_session
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform import QuIPModifier
    if rotation not in (None, "quip"):
        raise ValueError(f"llm-compressor rotation {rotation!r}: this worker runs None or 'quip'")
    recipe = [QuIPModifier(**QUIP)] if rotation else []
    recipe.append(GPTQModifier(targets="Linear", scheme=scheme, ignore=ignore))
    active_session().reset()
    oneshot(model=model, dataset=Dataset.from_list(samples), recipe=recipe,
            max_seq_length=max(len(x["input_ids"]) for x in samples), num_calibration_samples=len(samples),
            shuffle_calibration_samples=False, batch_size=1)
    return "; ".join(repr(m) for m in recipe)


# --- auto-round ----------------------------------------------------------------------------------

def _check_rotation_mapping(model, scheme) -> None:
    """auto-round rotates integer schemes QuaRot-style through the residual stream (its ``inplace``
    backend), from a per-architecture table of where the norms and linears are; an architecture
    not in it falls back to LLaMA's layout with a warning. Gemma's MLP reads
    ``pre_feedforward_layernorm``, not the ``post_attention_layernorm`` that layout names (an
    output norm there), so the fallback would rotate the wrong modules: refused instead."""
    from auto_round.algorithms.transforms.hadamard.inplace.model_config import MAPPING_REGISTRY
    from auto_round.compressors.utils import is_mx_fp, is_nv_fp
    data_type = scheme.data_type
    if is_mx_fp(data_type) or is_nv_fp(data_type):
        return                                       # the per-linear "transform" backend, no table
    keys = (getattr(model.config, "model_type", ""), type(model).__name__)
    if not any(k in MAPPING_REGISTRY for k in keys):
        raise PeerRefusal(
            f"auto-round's residual-stream Hadamard rotation (inplace backend, used for {data_type} schemes) "
            f"has no layout for {keys[1]} ({keys[0]}): it knows {sorted(MAPPING_REGISTRY)} and would fall back "
            "to LLaMA's, whose MLP input norm (post_attention_layernorm) is an output norm in Gemma 3")


def autoround_run(model, tokenizer, windows: list[list[int]], scheme: str, rotation: str | None,
                  iters: int) -> str:
    """auto-round's SignRound (``iters`` steps per block, its default batch) for ``scheme`` on the
    decoder blocks (the LM head left out, its default), with its Hadamard rotation config when
    ``rotation`` names one; the model is left with its fake-quantised forward (QDQ weights written
    back, activation quantisers wrapped around each linear)."""
    from auto_round import AutoRound
    from auto_round.schemes import PRESET_SCHEMES, QuantizationScheme
    spec = AUTOROUND_SCHEMES.get(scheme)
    if spec is None and scheme not in PRESET_SCHEMES:
        raise ValueError(f"auto-round scheme {scheme!r}: not one of {sorted(AUTOROUND_SCHEMES)} or its presets")
    chosen = QuantizationScheme.from_dict(spec) if spec else scheme
    # auto-round takes samples of one length (it skips shorter ones): the full windows, which are all
    # of text_batches' windows but a short last one
    seqlen = max(map(len, windows))
    data = [{"input_ids": torch.tensor([w]), "attention_mask": torch.ones(1, len(w), dtype=torch.int64)}
            for w in windows if len(w) == seqlen]
    if rotation:
        _check_rotation_mapping(model, chosen if spec else PRESET_SCHEMES[scheme])
    kwargs = {"rotation_config": {"hadamard_type": rotation}} if rotation else {}
    ar = AutoRound(model, tokenizer, scheme=chosen, dataset=data, seqlen=seqlen, nsamples=len(data),
                   iters=iters, device_map="cpu", enable_torch_compile=False, **kwargs)
    ar.quantize()
    return f"AutoRound(scheme={spec or scheme}, iters={iters}, nsamples={len(data)}, seqlen={seqlen}{', ' + str(kwargs) if kwargs else ''})"


def run_one(request: dict, peer: str, scheme: str, rotation: str | None) -> dict:
    from transformers import AutoTokenizer
    windows = request["calibration"]
    row = {"peer": peer, "scheme": scheme, "rotation": rotation, "recipe": None, "head": None,
           "calibration_windows": len(windows), "quantize_s": None, "perplexity": None, "error": None}
    model = load_model(request["model_dir"])
    try:
        t0 = time.perf_counter()
        if peer == "llm-compressor":
            row["recipe"] = llmcompressor_run(model, [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows],
                                              scheme, rotation, ["lm_head"])
        elif peer == "auto-round":
            tokenizer = AutoTokenizer.from_pretrained(request["model_dir"])
            row["recipe"] = autoround_run(model, tokenizer, windows, scheme, rotation,
                                          int(request.get("autoround_iters", 200)))
        elif (peer, scheme, rotation) != FP32:
            raise ValueError(f"peer {peer!r}: this worker runs llm-compressor and auto-round")
        row["quantize_s"] = round(time.perf_counter() - t0, 1)
        model.eval()
        row["activation_quantisers"] = activation_quantisers(model)
        if peer != "transformers" and request.get("head", "w8") == "w8":
            row["head"] = int8_head(model)
        t1 = time.perf_counter()
        row.update(perplexity(model, request["eval_ids"], int(request["window"]), int(request["stride"])))
        row["perplexity_s"] = round(time.perf_counter() - t1, 1)
        if not math.isfinite(row["perplexity"]):
            row["error"], row["perplexity"] = "the quantised model's perplexity is not finite", None
    except PeerRefusal as exc:
        row["error"] = str(exc)
    except Exception as exc:   # the peer failed: the row says how, the other runs go on
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()[-3000:]
    del model
    gc.collect()
    return row


# --- the default model: a BERT encoder with mean pooling ------------------------------------------

# the pooler's dense layer feeds nothing the sentence embedding reads (nnforge's graph has none)
ENCODER_IGNORE = ["re:.*pooler.*"]
# auto-round keeps only calibration samples at least ``seqlen`` tokens long (calibration/llm.py), and
# the default model calibrates on single sentences of every length: it would see a filtered subset
AUTOROUND_ENCODER = ("auto-round calibrates on samples of one fixed length (it drops those shorter than seqlen); "
                     "the default model's calibration set is single sentences of varied length")


def embed(model, batches: list[dict]) -> list[list[float]]:
    """Sentence embeddings as nnforge.models.default.DefaultModel makes them: the encoder's last
    hidden state, mean-pooled over the attention mask, L2-normalised."""
    out = []
    with torch.inference_mode():
        for b in batches:
            ids, mask = torch.tensor(b["input_ids"]), torch.tensor(b["attention_mask"])
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out += (pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)).tolist()
    return out


def run_encoder_one(request: dict, peer: str, scheme: str, rotation: str | None) -> dict:
    from transformers import AutoModel
    row = {"peer": peer, "scheme": scheme, "rotation": rotation, "recipe": None, "quantize_s": None,
           "embeddings": None, "error": None}
    # one sample per sentence, padding dropped: the sentences nnforge calibrates on, each as it is
    samples = [{"input_ids": ids[:sum(mask)], "attention_mask": mask[:sum(mask)]}
               for b in request["calibration"] for ids, mask in zip(b["input_ids"], b["attention_mask"])]
    row["calibration_sentences"] = len(samples)
    model = AutoModel.from_pretrained(request["model_dir"], dtype=torch.float32).eval()
    try:
        t0 = time.perf_counter()
        if peer == "llm-compressor":
            row["recipe"] = llmcompressor_run(model, samples, scheme, rotation, ENCODER_IGNORE)
        elif peer == "auto-round":
            raise PeerRefusal(AUTOROUND_ENCODER)
        elif (peer, scheme, rotation) != FP32:
            raise ValueError(f"peer {peer!r}: this worker runs llm-compressor and auto-round")
        row["quantize_s"] = round(time.perf_counter() - t0, 1)
        model.eval()
        row["activation_quantisers"] = activation_quantisers(model)
        row["embeddings"] = embed(model, request["eval"])
    except PeerRefusal as exc:
        row["error"] = str(exc)
    except Exception as exc:   # the peer failed: the row says how, the other runs go on
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()[-3000:]
    del model
    gc.collect()
    return row


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _spec_key(spec: dict) -> str:
    return f"{spec['peer']}:{spec['scheme']}:{spec.get('rotation') or ''}"


def run(request: dict) -> dict:
    """Every run of ``request`` (the fp32 row first). With ``done_file``, each finished row is
    appended to it as it ends, and rows it already holds (a run that was stopped) are not run again."""
    torch.set_num_threads(int(request.get("threads", 2)))
    torch.manual_seed(0)
    done_file = Path(request["done_file"]) if request.get("done_file") else None
    done = {}
    if done_file is not None and done_file.is_file():
        for line in done_file.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                done[entry["key"]] = entry["row"]
    rows = []
    for spec in [dict(zip(("peer", "scheme", "rotation"), FP32)), *request["runs"]]:
        key = _spec_key(spec)
        if key in done:
            rows.append(done[key])
            print(f"outlier peers worker: {key}: kept from the stopped run in {done_file.name}", file=sys.stderr,
                  flush=True)
            continue
        t0 = time.perf_counter()
        one = run_encoder_one if request.get("task") == "encoder" else run_one
        rows.append(one(request, spec["peer"], spec["scheme"], spec.get("rotation")))
        rows[-1]["wall_s"] = round(time.perf_counter() - t0, 1)
        r = rows[-1]
        if done_file is not None:
            with open(done_file, "a") as f:
                f.write(json.dumps({"key": key, "row": r}) + "\n")
        figure = "error" if r["error"] else format(r["perplexity"], ".3f") if "perplexity" in r else "done"
        print(f"outlier peers worker: {r['peer']} {r['scheme']}{' + ' + r['rotation'] if r['rotation'] else ''}: "
              f"{figure} in {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return {"versions": {d: _version(d) for d in ("llmcompressor", "compressed-tensors", "auto-round", "transformers",
                                                   "torch")},
            "threads": torch.get_num_threads(), "rows": rows}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: outliers_peers_worker.py REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    result = run(json.loads(Path(argv[0]).read_text()))
    Path(argv[1]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
