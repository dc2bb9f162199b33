# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# read as source (never installed) by the pytorch-fid parity test: pyproject's fid-reference comment says why
TORCHVISION_SOURCE ?= torchvision==0.29.1

.PHONY: venv lint format docs test test-all test-fast demo data clean

# The CPU torch wheel that lies on this machine's disk is installed first, so that pip never resolves a
# CUDA build; pyproject only asks torch>=2.6 (safe weights-only loading), which keeps a GPU machine's own build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['fid-reference'])" \
		| xargs $(PIP) install -q --no-deps
	$(PIP) download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.11 \
		-d $(VENV)/share/fid-reference $(TORCHVISION_SOURCE)
	touch $(STAMP)

venv: $(STAMP)

# ruff (pyproject [tool.ruff]): lint, and the formatter's check (`make format` rewrites)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The docs site (mkdocs.yml -> site/): --strict makes a broken link or anchor, or a page left out of nav, an error.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# `make test` (what CI runs, ~12 min on 2 cores): lint, the docs site, and every test not marked `slow` -- the
# unhappy-path guarantees (kill -9 and resume, a signal to one rank, a dead rank, uneven shards) included.
# `make test-all` adds the `slow` ones (compile parity, FSDP vs DDP equality, the whole stack, notebooks).
test: lint docs
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: lint docs
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

data: $(STAMP)
	$(PY) -m dalle2.data.synthetic --out data_builtin --num-train 4096 --num-val 512 --num-test 512 --image-size 256 --reuse

DEMO_OUT ?= demo_out
DEMO_EXPERIMENT ?= demo
DEMO_OVERRIDES ?=

# The whole stack on the built-in data (2 CPU cores; time measured in results/demo.json): CLIP -> retrieval eval -> embedding
# shards -> prior -> 64 px decoder -> 64 -> 256 px upsampler -> 256 px samples of 64 held-out captions -> FID/CLIP-FD/
# CLIP score, lenient and strict checkers -> $(DEMO_OUT)/report.md (DEMO_EXPERIMENT=demo_cascade: 32 px decoder +
# 32 -> 64 upsampler). Finished stages are
# skipped when rerun; e.g.
#   make demo DEMO_OVERRIDES="decoder.trainer.max_steps=6000 force=[decoder]"
demo: $(STAMP)
	$(PY) -m dalle2.data.synthetic --out data_builtin --num-train 4096 --num-val 512 --num-test 512 --image-size 256 --reuse
	$(PY) train/train_all.py experiment=$(DEMO_EXPERIMENT) out_dir=$(DEMO_OUT) $(DEMO_OVERRIDES)
	@echo "[make demo] report: $(DEMO_OUT)/report.md (also $(DEMO_OUT)/report.html; samples in $(DEMO_OUT)/sample/)"

clean:
	rm -rf $(VENV) runs outputs multirun demo_out data_builtin .pytest_cache site
