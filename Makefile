# longvl developer entry points. `make train` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
# Clusters override this, e.g. `make setup TORCH_SPEC="torch==2.13.0 --index-url <cuda index>"`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.longvl-setup
# DeepSpeed's accelerator: cuda where an NVIDIA driver is present, cpu elsewhere (an explicit value wins).
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export WANDB_MODE ?= offline
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# The venv first on PATH for every command and subprocess: DeepSpeed JIT-builds its CPU comm extension with
# whichever ninja comes first, and a system ninja next to the venv's one makes it rebuild (~1 min) each time.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup train needle test test-fast bench doctor clean

setup: $(STAMP)

# Idempotent: re-runs only when the project metadata changes. torch goes in first so the project's
# `torch>=...` requirement is already satisfied and pip never resolves a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

train: setup
	$(PY) -m train pipeline=demo

# The needle miniature (configs/pipeline/needle.yaml), then the video needle-in-a-haystack eval at its own
# protocol: 1 fps, the last stage's visual-token budget (0.9 x 1024 tokens) and frame sizes, haystack
# lengths up to what the last stage's 1024-token sequence holds (144 s) plus 2x that (288 s, never trained).
# NEEDLE_PIPELINE=needle_position: the four stages without the language-model ones. The eval reads the last
# stage's weights and the tokenizer of the pipeline's corpus, both named by its config.
NEEDLE_PIPELINE ?= needle
NEEDLE_RUN ?= runs/$(NEEDLE_PIPELINE)
NEEDLE_EVAL ?= lengths=[8,36,72,108,144,288] depths=[0,0.25,0.5,0.75,1] trials=4 budget=921 \
	video.min_pixels=1024 video.max_pixels=4096
# "<last stage> <data_root>", composed once when the recipe runs (after setup has made $(PY)), not per use.
NEEDLE_LAST_AND_DATA = $(eval NEEDLE_LAST_AND_DATA := $(shell $(PY) -c 'from train.config.compose import \
	stage_configs; c = stage_configs(["pipeline=$(NEEDLE_PIPELINE)"])[-1]; print(c.stage.name, c.data_root)'))$(NEEDLE_LAST_AND_DATA)
needle: setup
	$(PY) -m train pipeline=$(NEEDLE_PIPELINE) run_dir=$(NEEDLE_RUN)
	$(PY) -m train.eval vniah checkpoint=$(NEEDLE_RUN)/$(word 1,$(NEEDLE_LAST_AND_DATA))/final \
		tokenizer=$(word 2,$(NEEDLE_LAST_AND_DATA))/tokenizer.model $(NEEDLE_EVAL) out=$(NEEDLE_RUN)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not dist and not slurm" $(PYTEST_ARGS)

# Devices, GPU stack versions, what a run will use here, and checks on the local devices (train/doctor.py).
doctor: setup
	$(PY) -m train.doctor $(DOCTOR_ARGS)

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .cache
