# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo data clean

# The CPU torch wheel that lies on this machine's disk is installed first, so that pip never resolves a
# CUDA build; pyproject only asks torch>=2.4, which keeps a GPU machine's own build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

data: $(STAMP)
	$(PY) -m dalle2.data.synthetic --out data_builtin --num-train 4096 --num-val 512 --image-size 64

DEMO_OUT ?= demo_out
DEMO_CLIP_STEPS ?= 600
DEMO_DECODER_STEPS ?= 600
DEMO_OVERRIDES ?=

# What exists so far (the full text->image demo lands with the pipeline issue): built-in data -> tiny CLIP ->
# zero-shot retrieval on held-out shards -> tiny 32 px decoder on the CLIP's image embeddings -> report.md.
demo: $(STAMP)
	test -f data_builtin/val/00001.tar || $(PY) -m dalle2.data.synthetic --out data_builtin --num-train 4096 --num-val 512 --image-size 64
	$(PY) train/train.py experiment=clip_tiny trainer.max_steps=$(DEMO_CLIP_STEPS) trainer.val_check_interval=200 \
		hydra.run.dir=$(DEMO_OUT)/clip $(DEMO_OVERRIDES)
	$(PY) eval/evaluate.py task=retrieval clip_ckpt=$(DEMO_OUT)/clip/checkpoints/last.ckpt \
		"data.urls='data_builtin/val/{00000..00001}.tar'" out=$(DEMO_OUT)/clip_retrieval.json
	$(PY) train/train.py experiment=decoder_tiny clip_ckpt=$(DEMO_OUT)/clip/checkpoints/last.ckpt \
		trainer.max_steps=$(DEMO_DECODER_STEPS) trainer.val_check_interval=200 module.sample_every_n_steps=200 \
		hydra.run.dir=$(DEMO_OUT)/decoder $(DEMO_OVERRIDES)
	$(PY) train/demo_report.py $(DEMO_OUT)

clean:
	rm -rf $(VENV) runs outputs multirun demo_out data_builtin .pytest_cache
