"""The peers benchmarks/llm.py puts beside nnforge's decoder bundles, each behind one interface:

    peer.name                                   # the row label
    peer.bytes                                  # size of the artifact files it runs
    peer.perplexity(ids, window, stride)        # -> (perplexity, tokens scored)
    peer.speed(prompt_ids, new_tokens)          # -> {"prefill_tokens_per_s", "decode_tokens_per_s", "tokens"}

- TorchEager: transformers' module in float32 with eager attention and its own KV cache;
- LlamaCpp: llama.cpp through llama-cpp-python, on the Q4_K_M GGUF as shipped and on a Q4_0 made
  by llama.cpp's quantiser from the same weights in F32;
- OrtGenAI: ONNX Runtime GenAI on the int4 model its model builder makes from the same weights.

Every peer takes token ids (the same ids for all; nothing is re-tokenised), scores perplexity with
:func:`sliding_window_perplexity` and times decoding with :func:`greedy_speed`, so the rows differ
only in the runtime. Artifacts are built once under a cache folder (``work``) and reused.

torch and llama.cpp wait at OpenMP barriers by spinning: on a machine whose cores other processes
also use, a descheduled thread stalls every barrier for a scheduler slice and their rates collapse
while ONNX Runtime's hardly move. Time on idle cores, or set OMP_WAIT_POLICY=PASSIVE before torch
or llama_cpp is imported, and record the load with the figures.

    >>> loaded = load_causal_lm(gguf)
    >>> for peer in make_peers(loaded, gguf, Path("benchmarks/out/llm_peers"))[0]:
    ...     print(peer.name, peer.bytes, peer.perplexity(ids, 256, 128), peer.speed(ids[:128], 32))
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# rows of logits turned to float64 at a time: a window of a 262k-token vocabulary in float64 is
# half a gigabyte per 256 rows, so the log-softmax walks it in slices
_ROWS = 32


# --- the shared recipes ----------------------------------------------------------------------------

def sliding_window_perplexity(ids: Sequence[int], window: int, stride: int,
                              logits_of: Callable[[list[int]], np.ndarray]) -> tuple[float, int]:
    """Perplexity of ``ids`` by Hugging Face's sliding-window recipe: windows of at most ``window``
    tokens start every ``stride`` tokens, each run from a fresh state by ``logits_of(chunk)`` (logits
    ``[len(chunk), vocab]``); a window scores only the tokens the previous one did not (the first all
    but its first token). Log-softmax in float64. Returns (perplexity, tokens scored).

        >>> sliding_window_perplexity(ids, 256, 128, lambda chunk: model(chunk))
    """
    ids = [int(t) for t in ids]
    n = len(ids)
    if window < 2:
        raise ValueError(f"window {window}: a window scores the tokens after its first, so give at least 2")
    if not 1 <= stride <= window:
        raise ValueError(f"stride {stride}: give 1 <= stride <= window ({window})")
    if n < 2:
        raise ValueError(f"{n} token(s): perplexity scores each token after the first, so give at least 2")
    nll, scored, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        chunk = ids[begin:end]
        first = max(1, len(chunk) - (end - prev_end))     # the tokens no earlier window scored
        logits = np.asarray(logits_of(chunk))
        if logits.ndim != 2 or logits.shape[0] != len(chunk):
            raise ValueError(f"logits_of gave shape {logits.shape} for {len(chunk)} tokens: give one row of "
                             "logits per token, [tokens, vocab]")
        targets = np.asarray(chunk[first:])
        if targets.max() >= logits.shape[1]:
            raise ValueError(f"token id {targets.max()} is outside the vocabulary of {logits.shape[1]} logits: give "
                             "ids from the model's own tokenizer")
        for r in range(first - 1, len(chunk) - 1, _ROWS):     # row r predicts token r + 1
            rows = logits[r:min(r + _ROWS, len(chunk) - 1)].astype(np.float64)
            top = rows.max(axis=1, keepdims=True)
            lse = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
            picked = rows[np.arange(len(rows)), targets[r - first + 1:r - first + 1 + len(rows)]]
            nll -= float((picked - lse).sum())
        scored += len(chunk) - first
        prev_end = end
        if end == n:
            break
    return math.exp(nll / scored), scored


def greedy_speed(prefill: Callable[[list[int]], np.ndarray], step: Callable[[int], np.ndarray],
                 prompt_ids: Sequence[int], new_tokens: int, *, warmup: bool = True) -> dict:
    """Prefill and decode rates at batch 1: ``prefill(ids)`` runs the prompt in one call from a fresh
    state and gives the last position's logits; ``step(token)`` runs one token and gives its logits.
    Decoding is greedy and only the ``step`` calls are timed. A short untimed run first takes the
    one-time costs (allocation, kernel choice) out of the figures.

        >>> greedy_speed(peer_prefill, peer_step, ids[:128], 32)["decode_tokens_per_s"]
    """
    prompt = [int(t) for t in prompt_ids]
    if not prompt or new_tokens < 1:
        raise ValueError(f"a prompt of {len(prompt)} token(s) and {new_tokens} new token(s): give at least one of each")
    if warmup:
        last = prefill(prompt[:8])
        for _ in range(2):
            last = step(int(np.argmax(last)))
    start = time.perf_counter()
    last = prefill(prompt)
    prefill_s = time.perf_counter() - start
    tokens, decode_s = [], 0.0
    for _ in range(new_tokens):
        tokens.append(int(np.argmax(last)))
        start = time.perf_counter()
        last = step(tokens[-1])
        decode_s += time.perf_counter() - start
    return {"prefill_tokens_per_s": len(prompt) / prefill_s, "decode_tokens_per_s": new_tokens / decode_s,
            "tokens": tokens}


def _files_bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


@contextmanager
def _built(out: Path):
    """A folder filled under a temporary name and renamed into place, so an interrupted build never
    leaves a folder that looks finished."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    tmp.rename(out)


# --- transformers eager ----------------------------------------------------------------------------

class TorchEager:
    """transformers' module for the config, loaded with the weights in float32, eager attention;
    decoding reuses the module's own KV cache."""

    def __init__(self, loaded, *, threads: int = 2, name: str = "torch eager fp32"):
        import torch
        from transformers import AutoModelForCausalLM
        self.name, self.threads = name, threads
        with _torch_threads(threads):
            model = AutoModelForCausalLM.from_config(loaded.config, attn_implementation="eager",
                                                     dtype=torch.float32)
            missing, unexpected = model.load_state_dict(dict(loaded.weights), strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or ())
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ValueError(f"the weights do not fit transformers' {type(model).__name__}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}; pass the LoadedCausalLM that load_causal_lm gave")
        self.model = model.float().eval()
        # transformers 5 names the cache argument and output `cache` (`past_key_values` before it)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # what save_pretrained would write: each stored tensor once (a tied head shares the embedding)
        seen = {}
        for t in self.model.state_dict().values():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        self.bytes = sum(seen.values())
        self._cache = None

    def _logits(self, chunk: list[int]) -> np.ndarray:
        import torch
        with _torch_threads(self.threads), torch.inference_mode():
            out = self.model(input_ids=torch.tensor([chunk]), use_cache=False)
        return out.logits[0].float().numpy()

    def _prefill(self, ids: list[int]) -> np.ndarray:
        import torch
        with _torch_threads(self.threads), torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        self._cache = getattr(out, self._cache_arg)
        return out.logits[0, -1].float().numpy()

    def _step(self, token: int) -> np.ndarray:
        import torch
        with _torch_threads(self.threads), torch.inference_mode():
            out = self.model(input_ids=torch.tensor([[token]]), use_cache=True, **{self._cache_arg: self._cache})
        self._cache = getattr(out, self._cache_arg)
        return out.logits[0, -1].float().numpy()

    def perplexity(self, ids, window: int, stride: int) -> tuple[float, int]:
        return sliding_window_perplexity(ids, window, stride, self._logits)

    def speed(self, prompt_ids, new_tokens: int) -> dict:
        return greedy_speed(self._prefill, self._step, prompt_ids, new_tokens)


@contextmanager
def _torch_threads(threads: int):
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def hf_directory(loaded, work: Path) -> Path:
    """The model as a transformers model directory (float32 safetensors, config, tokenizer) under
    ``work/hf``, the input ONNX Runtime GenAI's model builder reads; made once."""
    out = Path(work) / "hf"
    if (out / "config.json").is_file():
        return out
    if loaded.tokenizer is None:
        raise ValueError(f"{loaded.source}: no tokenizer came with the model, and the model builder needs one "
                         "beside the weights; load a GGUF or a model directory that carries its tokenizer")
    from nnforge.models.llm import save_model_directory
    model = TorchEager(loaded).model
    with _built(out) as tmp:
        save_model_directory(model, loaded.tokenizer, tmp)
    return out


# --- llama.cpp -------------------------------------------------------------------------------------

class LlamaCpp:
    """llama.cpp (llama-cpp-python) on one GGUF file, ``threads`` CPU threads. Perplexity runs each
    window through a context that keeps every position's logits; speed uses a second context that
    computes only the last position's, as llama.cpp's generation does."""

    def __init__(self, gguf: Path, *, name: str, threads: int = 2):
        import llama_cpp
        self.gguf, self.name, self.threads = Path(gguf), name, threads
        self.bytes = self.gguf.stat().st_size
        self._llama_cpp = llama_cpp
        self._scoring = self._speed = None

    @classmethod
    def as_shipped(cls, gguf: Path, **kw) -> LlamaCpp:
        """The GGUF as it is, labelled with its quantisation type."""
        return cls(gguf, name=f"llama.cpp {_gguf_file_type(gguf)} (as shipped)", **kw)

    @classmethod
    def quantized(cls, gguf: Path, work: Path, ftype: str = "Q4_0", **kw) -> LlamaCpp:
        """A GGUF of type ``ftype`` made by llama.cpp's own quantiser from an F32 GGUF of ``gguf``'s
        weights (dequantised as transformers reads them), so the quantiser starts from the same
        float weights the other peers run; both files are made once under ``work``."""
        import llama_cpp
        work = Path(work)
        f32 = work / f"{Path(gguf).stem}-f32.gguf"
        if not f32.is_file():
            write_f32_gguf(gguf, f32)
        out = work / f"{Path(gguf).stem}-from-f32-{ftype.lower()}.gguf"
        if not out.is_file():
            const = f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}"
            if not hasattr(llama_cpp, const):
                raise ValueError(f"llama.cpp has no file type {ftype!r} ({const}); give one such as Q4_0, Q4_K_M, Q8_0")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, const)
            params.nthread = kw.get("threads", 2)
            tmp = out.with_name(out.name + ".partial")
            rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), params)
            if rc != 0:
                tmp.unlink(missing_ok=True)
                raise RuntimeError(f"llama.cpp's quantiser returned {rc} quantising {f32} to {ftype}; its log above "
                                   "says why")
            tmp.rename(out)
        return cls(out, name=f"llama.cpp {ftype.upper()} (llama.cpp quantiser, from F32)", **kw)

    def _context(self, held, n_ctx: int, logits_all: bool):
        """``held`` if it holds ``n_ctx`` tokens, else a new context that does (the logits of every
        position of a window take n_ctx x vocab floats, so contexts are sized to their use)."""
        if held is not None and held.n_ctx() >= n_ctx:
            return held
        return self._llama_cpp.Llama(model_path=str(self.gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                     n_threads=self.threads, n_threads_batch=self.threads, logits_all=logits_all,
                                     verbose=False)

    def _logits(self, chunk: list[int]) -> np.ndarray:
        self._scoring = llm = self._context(self._scoring, len(chunk), logits_all=True)
        llm.reset()                                   # a fresh state: the cache from position 0
        llm.eval(chunk)
        return llm.scores[:len(chunk)]

    def _last_logits(self) -> np.ndarray:
        llm = self._speed
        row = self._llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).copy()

    def _prefill(self, ids: list[int]) -> np.ndarray:
        self._speed.reset()
        self._speed.eval(ids)
        return self._last_logits()

    def _step(self, token: int) -> np.ndarray:
        self._speed.eval([token])
        return self._last_logits()

    def perplexity(self, ids, window: int, stride: int) -> tuple[float, int]:
        return sliding_window_perplexity(ids, window, stride, self._logits)

    def speed(self, prompt_ids, new_tokens: int) -> dict:
        self._speed = self._context(self._speed, len(prompt_ids) + new_tokens, logits_all=False)
        return greedy_speed(self._prefill, self._step, prompt_ids, new_tokens)


def _gguf_file_type(path: Path) -> str:
    import gguf as gg
    field = gg.GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return "GGUF"
    return gg.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_")


def write_f32_gguf(src: Path, out: Path) -> Path:
    """A copy of the GGUF ``src`` with every tensor dequantised to F32 (its metadata, tokenizer
    included, kept), written tensor by tensor so memory holds one tensor at a time. F32 rather than
    F16 so the dequantised values reach llama.cpp's quantiser unrounded.

        >>> write_f32_gguf(Path("gemma-3-270m-q4_k_m.gguf"), Path("gemma-3-270m-f32.gguf"))
    """
    import gguf as gg
    reader = gg.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tmp = out.with_name(out.name + ".partial")
    writer = gg.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        # the writer adds the header's own fields and the architecture itself
        if field.name == gg.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == gg.Keys.General.FILE_TYPE:
            value = int(gg.LlamaFileType.ALL_F32)
        sub_type = field.types[-1] if field.types[0] == gg.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        shape = tuple(reversed([int(d) for d in t.shape]))        # GGUF lists dims innermost first
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), 4 * math.prod(shape),
                               raw_dtype=gg.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        shape = tuple(reversed([int(d) for d in t.shape]))
        writer.write_tensor_data(np.ascontiguousarray(gg.dequantize(t.data, t.tensor_type), np.float32).reshape(shape))
    writer.close()
    tmp.rename(out)
    return out


# --- ONNX Runtime GenAI ----------------------------------------------------------------------------

# The model builder (onnxruntime-genai 0.18) reads Gemma 3's rope settings in transformers 4's form
# (rope_theta for the global layers, rope_local_base_freq for the sliding ones); transformers 5 keeps
# them per layer type in rope_parameters, on which the builder stops with KeyError 'rope_type'. The
# builder runs with its config reader giving the same settings in the older form; nothing else
# about the model changes. Without the per-type form this does nothing.
_BUILDER_SHIM = """
import runpy, sys
import transformers
_read = transformers.AutoConfig.from_pretrained.__func__
def from_pretrained(cls, *args, **kwargs):
    config = _read(cls, *args, **kwargs)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and {"full_attention", "sliding_attention"} <= rope.keys():
        if rope["sliding_attention"].get("rope_type", "default") != "default":
            sys.exit("the sliding layers' rope is " + rope["sliding_attention"]["rope_type"] + ": the model builder "
                     "gives them a plain rope only")
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        config.rope_parameters = dict(rope["full_attention"])
        config.rope_theta = config.rope_parameters["rope_theta"]
    return config
transformers.AutoConfig.from_pretrained = classmethod(from_pretrained)
sys.argv[0] = "onnxruntime_genai.models.builder"
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
"""


class OrtGenAI:
    """ONNX Runtime GenAI on the model its model builder makes (``-p int4 -e cpu``, the builder's
    defaults unless ``extra_options`` says otherwise, e.g. ``{"matmul_mixed_precision":
    "last_matmul:int8"}``) from the model written as a transformers directory; ``threads`` intra-op
    threads. Perplexity appends each window to a fresh generator and reads every position's logits.
    Speed runs a second build with the builder's ``prune_lm_head`` (the same weights; prefill computes
    the last position's logits only, as the other peers' prefill does); decoding appends one token
    per call, the forward pass of ``generate_next_token``, the greedy choice made by
    :func:`greedy_speed` as for every peer."""

    def __init__(self, loaded, work: Path, *, threads: int = 2, precision: str = "int4",
                 extra_options: dict[str, str] | None = None, name: str | None = None):
        import onnxruntime_genai as og
        self._og, self.loaded, self.work = og, loaded, Path(work)
        self.precision, self.extra, self.threads = precision, dict(extra_options or {}), threads
        options = " ".join(f"{k}={v}" for k, v in sorted(self.extra.items()))
        self.name = name or f"ORT GenAI {precision} (model builder{', ' + options if options else ''})"
        self.out = self._built(self.extra)
        self.bytes = _files_bytes(p for p in self.out.iterdir() if p.name.endswith((".onnx", ".onnx.data")))
        self._scoring = self._load(self.out)
        self._speed = self._gen = None

    def _built(self, extra: dict[str, str]) -> Path:
        """The builder's output folder for these options, built once."""
        options = " ".join(f"{k}={v}" for k, v in sorted(extra.items()))
        slug = "".join(c if c.isalnum() else "-" for c in options)
        out = self.work / f"ort-genai-{self.precision}-cpu{'-' + slug if slug else ''}"
        if (out / "genai_config.json").is_file():
            return out
        hf = hf_directory(self.loaded, self.work)
        with _built(out) as tmp:
            cmd = [sys.executable, "-c", _BUILDER_SHIM, "-i", str(hf), "-o", str(tmp), "-p", self.precision,
                   "-e", "cpu", "-c", str(self.work / "ort-genai-cache")]
            if extra:
                cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
            run = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if run.returncode != 0 or not (tmp / "genai_config.json").is_file():
                raise RuntimeError(f"ONNX Runtime GenAI's model builder failed on {hf} (exit {run.returncode}):\n"
                                   f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        return out

    def _load(self, out: Path):
        config = self._og.Config(str(out))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": self.threads, "inter_op_num_threads": 1}}}}))
        # the sliding layers' cache is allocated at least a window long (GroupQueryAttention refuses less)
        genai = json.loads((out / "genai_config.json").read_text())
        self._min_length = int(genai["model"]["decoder"].get("sliding_window", {}).get("window_size", 0))
        return self._og.Model(config)

    def _generator(self, model, max_length: int):
        params = self._og.GeneratorParams(model)
        params.set_search_options(max_length=max(max_length, self._min_length), do_sample=False)
        return self._og.Generator(model, params)

    def _logits(self, chunk: list[int]) -> np.ndarray:
        gen = self._generator(self._scoring, len(chunk) + 1)
        gen.append_tokens(np.asarray([chunk], dtype=np.int32))
        logits = gen.get_output("logits")
        return logits.reshape(-1, logits.shape[-1])[-len(chunk):]

    def _prefill(self, ids: list[int]) -> np.ndarray:
        self._gen = self._generator(self._speed, self._max_length)
        self._gen.append_tokens(np.asarray([ids], dtype=np.int32))
        return self._gen.get_output("logits")[0, -1]

    def _step(self, token: int) -> np.ndarray:
        self._gen.append_tokens(np.asarray([[token]], dtype=np.int32))
        return self._gen.get_output("logits")[0, -1]

    def perplexity(self, ids, window: int, stride: int) -> tuple[float, int]:
        return sliding_window_perplexity(ids, window, stride, self._logits)

    def speed(self, prompt_ids, new_tokens: int) -> dict:
        if self._speed is None:
            self._speed = self._load(self._built({**self.extra, "prune_lm_head": "true"}))
        self._max_length = len(prompt_ids) + new_tokens + 1
        return greedy_speed(self._prefill, self._step, prompt_ids, new_tokens)


# --- all of them -----------------------------------------------------------------------------------

def make_peers(loaded, gguf: Path, work: Path, *, threads: int = 2) -> tuple[list, list[str]]:
    """(the peers that run here, one line per peer left out saying why). ``loaded``: what
    ``load_causal_lm(gguf)`` gave; ``gguf``: the model's GGUF file; ``work``: the artifacts' cache.

        >>> peers, skipped = make_peers(load_causal_lm(gguf), gguf, Path("benchmarks/out/llm_peers"))
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    peers, skipped = [TorchEager(loaded, threads=threads)], []
    if importlib.util.find_spec("llama_cpp") is None:
        skipped.append("llama.cpp: llama-cpp-python is not installed (pip install 'nnforge[bench]'; it builds from source)")
    else:
        peers += [LlamaCpp.quantized(gguf, work, "Q4_0", threads=threads), LlamaCpp.as_shipped(gguf, threads=threads)]
    if importlib.util.find_spec("onnxruntime_genai") is None:
        skipped.append("ORT GenAI: onnxruntime-genai is not installed (pip install 'nnforge[bench]')")
    else:
        peers.append(OrtGenAI(loaded, work, threads=threads))
    return peers, skipped
