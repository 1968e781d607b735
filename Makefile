# Two entry points, each creating and reusing its own virtual environment in .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,train]"
	# open_clip is the HPSv2 parity reference (tests import its model module only). Without its
	# dependencies: PyPI's torchvision does not load beside the CPU torch of these machines.
	$(PY) -m pip install -q --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

.PHONY: demo test lint bench
demo: $(STAMP)
	$(VENV)/bin/tts-jax demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check tts_jax tests benchmarks experiments
	$(VENV)/bin/ruff format --check tts_jax tests benchmarks experiments

bench: $(STAMP)
	$(PY) -m benchmarks.run_all
