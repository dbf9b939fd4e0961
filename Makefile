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
# NEEDLE_PIPELINE=needle_read: the same with a language-model stage first (configs/pipeline/needle_read.yaml).
NEEDLE_PIPELINE ?= needle
NEEDLE_RUN ?= runs/$(NEEDLE_PIPELINE)
NEEDLE_DATA = $(NEEDLE_PIPELINE)_data
NEEDLE_LAST = $(if $(filter needle,$(NEEDLE_PIPELINE)),needle_s3,$(NEEDLE_PIPELINE)_s3)
NEEDLE_EVAL ?= lengths=[8,36,72,108,144,288] depths=[0,0.25,0.5,0.75,1] trials=4 budget=921 \
	video.min_pixels=1024 video.max_pixels=4096
# needle_read runs with one torch thread, as its figures were measured (the tiny model's ops are too small
# to split, and a second thread fights the loader worker for a 2-core machine: its S1 ran 7.4 steps/s with
# one, 4.3 with torch's default of 2). The plain pipeline's figures were measured with the default; with
# one thread it took 13 min 8 s instead of 12 and read times worse (docs/eval.md).
ifeq ($(NEEDLE_PIPELINE),needle_read)
needle: export OMP_NUM_THREADS ?= 1
endif
needle: setup
	$(PY) -m train pipeline=$(NEEDLE_PIPELINE) run_dir=$(NEEDLE_RUN)
	$(PY) -m train.eval vniah checkpoint=$(NEEDLE_RUN)/$(NEEDLE_LAST)/final tokenizer=$(NEEDLE_DATA)/tokenizer.model \
		$(NEEDLE_EVAL) out=$(NEEDLE_RUN)

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
