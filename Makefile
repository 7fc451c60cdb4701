# The two commands of the README: `make demo` (sets everything up, compiles the default model for
# one target of each family, prints one table) and `make test`. `make bench` reruns the benchmark
# scripts, which rewrite the measured tables in docs/measured/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nnforge-installed

.PHONY: demo demo-llm test test-slow bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build (a plain `torch` would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nnforge demo

# the small real LLM (Gemma 3 270M) with w4-gptq on onnx and cpu next to fp32 (minutes: two compiles)
demo-llm: $(STAMP)
	$(VENV)/bin/nnforge demo --llm

# one worker per core, each test file on one worker (its module fixtures built once)
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Long on a 2-core machine. Not here: metaschedule.py (its tuning alone takes long; needs the
# bench extra) and gpu_gemm.py (needs an NVIDIA GPU).
bench: $(STAMP)
	$(PY) benchmarks/demo.py
	$(PY) benchmarks/onnx_latency.py
	$(PY) benchmarks/quantization.py
	$(PY) benchmarks/compression.py
	$(PY) benchmarks/presets.py mixed-5 w8a8
	$(PY) benchmarks/structured.py
	$(PY) benchmarks/spmm.py
	$(PY) benchmarks/spmm.py --m 1 --out benchmarks/out/spmm_gemv.json
	$(PY) benchmarks/lowbit_gemm.py
	$(PY) benchmarks/cpu_e2e.py --tune
	$(PY) benchmarks/dispatch.py
	$(PY) benchmarks/cpu_under_load.py
	$(PY) benchmarks/coreml.py
	$(PY) benchmarks/fpga_flightllm.py
	$(PY) benchmarks/hls4ml_compare.py
	$(PY) benchmarks/llm_targets.py
	$(PY) benchmarks/outliers.py
	$(PY) benchmarks/slicing.py
	$(PY) benchmarks/recovery.py

clean:
	rm -rf bundles build *.egg-info .pytest_cache

# Differential fuzzing (nnforge/fuzz): random graphs from the op registry, random compression
# pipelines, every backend that runs here, each compared with the reference interpreter.
# Findings (with reduced repros) go to build/fuzz-findings; exits 1 on an open finding.
FUZZ_MINUTES ?= 10
FUZZ_SEED ?= 1
FUZZ_BACKENDS ?= onnx,tvm
.PHONY: fuzz
fuzz: $(STAMP)
	$(PY) -m nnforge.fuzz --minutes $(FUZZ_MINUTES) --seed $(FUZZ_SEED) --backends $(FUZZ_BACKENDS) --out build/fuzz-findings
