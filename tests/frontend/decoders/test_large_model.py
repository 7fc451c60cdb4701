"""A Llama-shaped model of about 1.1B parameters (random float32 weights, sharded safetensors written
here) calibrated and compressed with w4-gptq within 6 GiB beyond the weights' memory map: the
checkpoint's pages are mapped, not copied; calibration holds one layer's decoded weight and drops
the caches it does not read; the interpreter keeps no float32 twin of the quantised model.

Slow (the checkpoint is 4.4 GB on disk, GPTQ runs over 154 layers), Linux only (RssAnon is read
from /proc)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .sharded import LLAMA_1B, llama_parameters, write_llama

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from Linux's /proc")]

BEYOND_THE_MAP = 6 * 2**30

# The compile in a process of its own, so that its peak is its own: a thread samples the
# anonymous memory (what is not pages of a mapped file) every 20 ms.
_COMPILE = r"""
import json, sys, threading, time
peak = 0
def sample():
    global peak
    while True:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
import nnforge as nf
from nnforge.models.llm import text_split
bundle = nf.compile(sys.argv[1], "onnx", "w4-gptq", calibration=text_split()[0][:8000], out=sys.argv[2],
                    max_len=256)
time.sleep(0.05)
print(json.dumps({"peak_anon": peak, "memory": bundle.manifest["memory"], "timings": bundle.manifest["timings"]}))
"""


def test_a_1b_llama_compresses_within_6_gib_beyond_its_memory_map(tmp_path):
    assert 1.0e9 < llama_parameters(**LLAMA_1B) < 1.2e9
    model = write_llama(tmp_path / "llama-1b", **LLAMA_1B)
    assert len(list(model.glob("model-*.safetensors"))) >= 4
    out = tmp_path / "bundle"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    run = subprocess.run([sys.executable, "-c", _COMPILE, str(model), str(out)], capture_output=True, text=True,
                         env=env, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    assert report["peak_anon"] <= BEYOND_THE_MAP, f"{report['peak_anon'] / 2**30:.2f} GiB beyond the memory map"
    assert set(report["memory"]["peak_rss_bytes"]) >= {"after_import", "after_passes", "after_lowering"}

    import nnforge as nf
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decoder"]["layers"] == LLAMA_1B["layers"] and manifest["decoder"]["head"]["format"] == "w8"
    result = nf.load(out).generate("The river", max_new_tokens=4, stop_tokens=[])
    assert len(result.tokens) == 4 and result.text is not None
