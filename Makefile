# Every user-facing action is a target here; `make train` and `make test` set everything up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Lightning's tip banners and wandb's network calls are noise on a laptop.
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: install install-export export study-accumulation-vs-batch train test test-slow test-ddp test-gpu bench bench-gpu bench-bn bench-cuda-bn-cpu lint format clean help exp-retinanet-digits exp-pix2pix-digits

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

install: $(STAMP) ## create .venv and install normlab with dev and sweep extras

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,sweep]'
	@# A CPU-only torch picked up from a local wheel cache breaks torchvision's ops; fail here, loudly.
	$(BIN)/python -c "import torch, torchvision; torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)" \
	  || { echo "torchvision cannot run its ops with this torch build: remove $(VENV) and reinstall"; exit 1; }
	touch $@

install-export: install ## add the ONNX extra (onnx, onnxscript, onnxruntime) for `make export`
	$(BIN)/python -m pip install --quiet -e '.[dev,sweep,export]'

# CKPT: a checkpoint of `python -m normlab.train` (ARGS="format=onnx fold_norms=false" ...).
export: install ## export a checkpoint (folded norms, TorchScript or ONNX) with a report: CKPT=path
	$(BIN)/python -m normlab.export ckpt_path=$(CKPT) $(ARGS)

# The experiment `make train` runs; ARGS adds Hydra overrides (make train ARGS="norm=ln").
TRAIN_EXPERIMENT ?= densenet_digits

train: install ## train the default experiment (DenseNet-BC on digits, CPU)
	$(BIN)/python -m normlab.train experiment=$(TRAIN_EXPERIMENT) $(ARGS)

test: install ## run the test suite (fast tests)
	$(BIN)/python -m pytest $(ARGS)

test-slow: install ## run the slow tests too (and the multi-process ones)
	$(BIN)/python -m pytest -m "(slow or ddp or not slow) and not gpu" $(ARGS)

test-ddp: install ## multi-process checks: SyncBN exactness and 2-process training on CPU (gloo)
	$(BIN)/python -m pytest -m "ddp or not ddp" tests/test_syncbn.py tests/test_ddp.py $(ARGS)

# The GPU half of cuda_bn: kernels compiled, not interpreted.
test-gpu: install ## cuda_bn parity at realistic shapes on a CUDA GPU (fp32, bf16, torch.compile)
	TRITON_INTERPRET=0 $(BIN)/python -m pytest -m gpu tests/test_cuda_bn_gpu.py $(ARGS)

bench: install ## CPU benchmarks (~9 min on 2 cores): tables in experiments/bench/*.md
	$(BIN)/python experiments/bench/run.py $(ARGS)

bench-gpu: install ## GPU benchmarks (bf16): tables in experiments/bench/*_gpu.md and bn_gpu.md
	TRITON_INTERPRET=0 $(BIN)/python experiments/bench/run.py --gpu $(ARGS)

bench-bn: install ## GPU: cuda_bn vs native BN (and BN+ReLU), writes experiments/bench/bn_gpu.md
	TRITON_INTERPRET=0 $(BIN)/python experiments/bench/bn_gpu.py $(ARGS)

bench-cuda-bn-cpu: install ## CPU: a DenseNet step with norm=cuda_bn vs norm=bn (goal ≤ 1.05×)
	$(BIN)/python experiments/bench/cuda_bn_cpu.py $(ARGS)

exp-retinanet-digits: install ## study: RetinaNet R18-FPN on digit scenes, ~15 min on 2 CPU cores
	$(BIN)/python experiments/retinanet_digits/run.py $(ARGS)

exp-pix2pix-digits: install ## study: pix2pix on digit pairs, ~12 min on 2 CPU cores
	$(BIN)/python experiments/pix2pix_digits/run.py $(ARGS)

study-accumulation-vs-batch: install ## study: BN with accumulation vs a true batch, syncbn, GN (~35 min, 2 CPU cores)
	$(BIN)/python experiments/accumulation_vs_batch/run.py $(ARGS)

lint: install ## ruff lint and format check
	$(BIN)/ruff check src tests experiments
	$(BIN)/ruff format --check src tests experiments

format: install ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests experiments
	$(BIN)/ruff format src tests experiments

clean: ## remove the venv, logs and caches
	rm -rf $(VENV) logs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
