"""The autotuner of :mod:`nnforge.backends.triton.kernels.common`, on the CPU.

Honest unit tests: timings come from a fake ``bench`` (no GPU is timed here), so these check the
selection logic (fastest wins, one measurement per key, state reset between trials, failing
candidates skipped, default when all fail, no tuning under the interpreter) and, with the real
kernels in Triton's interpreter, that a trial launch repeated as a timer repeats it leaves no
state behind: split-K outputs are fresh zeros and the int-weight lock counters return to zero.
Which candidate is fastest on a real A100/H100 is not something a CPU test can say."""
import os

os.environ["TRITON_INTERPRET"] = "1"          # before triton (and the kernels) are imported

import pytest                                 # noqa: E402
import torch                                  # noqa: E402

pytest.importorskip("triton", reason="the kernels need triton")

from nnforge.backends.triton.kernels import common, intweight as iw, lut as lk, sparse24 as s24  # noqa: E402
from nnforge.backends.triton.kernels.common import INTERP, Autotuner, TileConfig, autotune  # noqa: E402
from nnforge.ir.encodings import IntQuant  # noqa: E402
from nnforge.ir.palette import Palettized  # noqa: E402

A, B, C = TileConfig(16, 32, 64, 1, 1), TileConfig(16, 64, 64, 1, 1), TileConfig(16, 32, 32, 1, 1)


class FakeBench:
    """Runs the timed launch ``repeats`` times (as do_bench does) and returns a made-up time per
    config; records what it timed."""

    def __init__(self, times, repeats=3):
        self.times, self.repeats, self.timed, self.current = times, repeats, [], None

    def __call__(self, fn):
        for _ in range(self.repeats):
            fn()
        self.timed.append(self.current)
        return self.times[self.current]


def _tuner(times, repeats=3):
    bench = FakeBench(times, repeats)
    return Autotuner(bench=bench), bench


def _trial(bench, seen=None):
    def trial(cfg):
        bench.current = cfg
        if seen is not None:
            seen.append(cfg)
    return trial


def test_picks_the_fastest_and_measures_each_candidate_once():
    tuner, bench = _tuner({A: 3.0, B: 1.0, C: 2.0})
    assert tuner.choose(("k", "h100", 4096), (A, B, C), _trial(bench)) == B
    assert bench.timed == [A, B, C]
    assert tuner.times[("k", "h100", 4096)] == {A: 3.0, B: 1.0, C: 2.0}


def test_caches_per_key():
    tuner, bench = _tuner({A: 3.0, B: 1.0, C: 2.0})
    trial = _trial(bench)
    tuner.choose(("k", "h100", 4096), (A, B, C), trial)
    assert tuner.choose(("k", "h100", 4096), (A, B, C), trial) == B
    assert len(bench.timed) == 3                       # the second call measured nothing
    bench.times = {A: 1.0, B: 5.0, C: 2.0}
    assert tuner.choose(("k", "h100", 8192), (A, B, C), trial) == A     # another key is measured anew
    assert len(bench.timed) == 6
    assert tuner.choose(("k", "h100", 4096), (A, B, C), trial) == B


def test_state_is_reset_before_every_candidate_and_after_a_failure():
    """A trial that dies mid-launch leaves a lock counter up; the next candidate must start at 0."""
    counter = torch.zeros(1, dtype=torch.int32)
    tuner, bench = _tuner({A: 1.0, B: 2.0, C: 3.0}, repeats=1)
    starts = []

    def trial(cfg):
        bench.current = cfg
        starts.append((cfg, int(counter[0])))
        counter.add_(1)                                # a launch that leaves state behind...
        if cfg == A:
            raise RuntimeError("out of resources")     # ...and one that fails after doing so
    best = tuner.choose(("k",), (A, B, C), trial, reset=lambda: counter.zero_())
    assert starts == [(A, 0), (B, 0), (C, 0)]
    assert best == B                                   # A failed: skipped, not the fastest
    assert A not in tuner.times[("k",)]


def test_falls_back_to_the_default_when_every_candidate_fails():
    tuner, bench = _tuner({})

    def trial(cfg):
        raise RuntimeError("does not compile")
    assert tuner.choose(("k",), (C, A, B), trial) == C
    assert tuner.choose(("k",), (C, A, B), trial) == C and bench.timed == []


def test_autotune_uses_the_default_without_measuring_under_the_interpreter_or_when_off(monkeypatch):
    def never(fn):
        raise AssertionError("nothing may be timed")
    monkeypatch.setattr(common, "TUNER", Autotuner(bench=never))
    assert autotune("k", INTERP, ("decode",), (A, B), lambda c: None) == A
    assert autotune("k", "h100", ("decode",), (B,), lambda c: None) == B          # one candidate
    monkeypatch.setenv(common.AUTOTUNE_ENV, "0")
    assert autotune("k", "h100", ("decode",), (A, B), lambda c: None) == A


def test_autotune_on_a_gpu_target_goes_through_the_process_tuner(monkeypatch):
    tuner, bench = _tuner({A: 2.0, B: 1.0})
    monkeypatch.setattr(common, "TUNER", tuner)
    monkeypatch.delenv(common.AUTOTUNE_ENV, raising=False)
    assert autotune("lut", "a100", ("decode", 8), (A, B), _trial(bench)) == B
    assert ("lut", "a100", "decode", 8) in tuner.best


def test_no_timing_during_a_cuda_graph_capture(monkeypatch):
    def never(fn):
        raise AssertionError("nothing may be timed while capturing")
    tuner = Autotuner(bench=never)
    tuner.best[("lut", "h100", "decode")] = B
    monkeypatch.setattr(common, "TUNER", tuner)
    monkeypatch.setattr(common, "_capturing", lambda: True)
    monkeypatch.delenv(common.AUTOTUNE_ENV, raising=False)
    assert autotune("lut", "h100", ("decode",), (A, B), lambda c: None) == B       # the choice made before
    assert autotune("lut", "h100", ("gemm",), (A, B), lambda c: None) == A         # none yet: the default


def test_tuning_keys_separate_what_changes_the_best_tile():
    enc = Palettized.from_indices(torch.randint(0, 16, (64, 128)), torch.randn(1, 16).half(), bits=4,
                                  shape=(64, 128))
    w = lk.pack(enc, "h100")
    key = common.tune_key("decode", 5, torch.float16, w, False, None)
    assert key[:4] == ("decode", 8, 64, 128)
    assert key == common.tune_key("decode", 7, torch.float16, w, False, None)          # same power-of-two class
    assert key != common.tune_key("decode", 9, torch.float16, w, False, None)
    assert key != common.tune_key("decode", 5, torch.bfloat16, w, False, None)
    assert key != common.tune_key("decode", 5, torch.float16, w, True, None)


# --- the real kernels' trials, in the interpreter: repeating a trial leaves nothing behind ------------
def _trials_agree(launch, ref, cands):
    """Every candidate's result, on every repetition, matches ``ref`` (no partial sums carried
    over from the previous repetition); a candidate the interpreter cannot run is skipped."""
    results = []

    def trial(cfg):
        y = launch(cfg)
        results.append((cfg, y))
        return y
    tuner = Autotuner(bench=lambda fn: [fn() for _ in range(3)] and 1.0)
    best = tuner.choose(("trial",), cands, trial)
    assert results and best == cands[0]
    for cfg, y in results:
        err = float((y.float() - ref).abs().max() / ref.abs().max())
        assert err < 3e-3, (cfg, err)
    return {cfg for cfg, _ in results}


def test_lut_split_k_trials_start_from_zero():
    g = torch.Generator().manual_seed(0)
    enc = Palettized.from_indices(torch.randint(0, 16, (64, 256), generator=g), torch.randn(1, 16, generator=g).half(),
                                  bits=4, shape=(64, 256))
    w, x = lk.pack(enc, "h100"), torch.randn(4, 256, generator=g).half()
    ref = x.float() @ enc.decode().T
    ran = _trials_agree(lambda c: lk._launch(x, w, None, c, 4), ref, (A, B))
    assert ran == {A, B}


def test_intweight_trials_leave_the_lock_counters_at_zero():
    g = torch.Generator().manual_seed(1)
    enc = IntQuant.quantize(torch.randn(64, 256, generator=g), 4, group_size=128)
    w, x = iw.pack(enc, "h100"), torch.randn(3, 256, generator=g).half()
    ref = x.float() @ enc.decode().T
    bad = TileConfig(16, 48, 64, 1, 1)                 # BLOCK_N 48: not a power of two, cannot run
    ran = _trials_agree(lambda c: iw._launch(x, w, None, c, 4, INTERP), ref, (iw.INTERPRETER_CONFIG, bad))
    assert ran == {iw.INTERPRETER_CONFIG}
    assert int(iw._locks(x.device, 0).abs().sum()) == 0


def test_sparse24_split_k_trials_start_from_zero():
    from nnforge.ir import Dense, Sparse
    g = torch.Generator().manual_seed(2)
    dense = torch.randn(64, 256, generator=g)
    keep = torch.zeros(64, 256, dtype=torch.bool)
    keep[:, 0::4] = keep[:, 2::4] = True
    enc = Sparse.from_mask(dense, keep, "2:4", lambda v: Dense(v.half()))
    w, x = s24.pack(enc, "h100"), torch.randn(2, 256, generator=g).half()
    ref = x.float() @ enc.decode().float().T
    _trials_agree(lambda c: s24._launch(x, w, None, c, 4, INTERP), ref, (s24.INTERPRET_CONFIG,))
