# Every user-facing action is a target here; `make train` and `make test` set everything up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Lightning's tip banners and wandb's network calls are noise on a laptop.
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

STUDIES := norm-vs-batch-size syncbn-small-batch convnext-bn-vs-ln retinanet-norms pix2pix-bn-vs-in accumulation-vs-batch \
  small-batch-norms bf16-vs-fp32 population-statistics

.PHONY: install export train data-fashion-mnist test test-slow test-ddp test-gpu test-aot bench bench-gpu bench-bn \
  bench-cuda-bn-cpu bench-compile lint format clean clean-logs help exp-retinanet-digits exp-pix2pix-digits \
  sweep-norms sweep-optuna sweep-slurm slurm-packages slurm-local slurm-down test-slurm $(addprefix study-,$(STUDIES))

help:
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

install: $(STAMP) ## create .venv and install normlab with its dev (tests, lint, ONNX export) and sweep extras

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,sweep]'
	@# A CPU-only torch picked up from a local wheel cache breaks torchvision's ops; fail here, loudly.
	$(BIN)/python -c "import torch, torchvision; torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)" \
	  || { echo "torchvision cannot run its ops with this torch build: remove $(VENV) and reinstall"; exit 1; }
	touch $@

# CKPT: a checkpoint of `python -m normlab.train` (ARGS="format=onnx fold_norms=false" ...).
export: install ## export a checkpoint (folded norms, TorchScript or ONNX) with a report: CKPT=path
	$(BIN)/python -m normlab.export ckpt_path=$(CKPT) $(ARGS)

# The experiment `make train` and the sweeps run (EXP=convnext_digits ...); ARGS adds Hydra
# overrides (make train ARGS="norm=ln"). TRAIN_EXPERIMENT is the older name of EXP.
EXP ?= densenet_digits
TRAIN_EXPERIMENT ?= $(EXP)

train: install ## train EXP (default densenet_digits: DenseNet-BC on digits, 120 steps, 83 s on 2 idle CPU cores)
	$(BIN)/python -m normlab.train experiment=$(TRAIN_EXPERIMENT) $(ARGS)

# Files already under data/ are used (and checked); else the Debian package's are linked, the
# package installed with apt-get (as root), or torchvision downloads them (internet).
data-fashion-mnist: install ## Fashion-MNIST's IDX files into data/FashionMNIST/raw (Debian package, apt-get or download)
	$(BIN)/python -m normlab.data.fetch_fashion_mnist --root data

# The grid sweep-norms and sweep-slurm run: one job per norm × batch size.
NORMS ?= bn,syncbn,ln,gn,cuda_bn
BATCHES ?= 2,8,32

sweep-norms: install ## multirun EXP over NORMS × BATCHES, one run dir and wandb run per job (~1 h on CPU)
	$(BIN)/python -m normlab.train -m experiment=$(EXP) norm=$(NORMS) data.batch_size=$(BATCHES) $(ARGS)

sweep-optuna: install ## Optuna search conf/hparams_search/<EXP>_optuna.yaml (densenet_digits, pix2pix_digits, fashion_norm_study); rerun to resume
	$(BIN)/python -m normlab.train experiment=$(EXP) hparams_search=$(EXP)_optuna $(ARGS)

# On a Slurm login node: ARGS="hydra.launcher.partition=gpu hydra.launcher.tasks_per_node=8 ..."
# (one task and one GPU per process); after `make slurm-local`, SLURM_CONF=.slurm/slurm.conf.
sweep-slurm: install ## submit the NORMS grid of EXP to Slurm as a job array (DDP over each job's GPUs)
	$(BIN)/python -m normlab.train -m hydra/launcher=slurm trainer=slurm experiment=$(EXP) \
	  norm=$(NORMS) $(ARGS)

# The fast tests are single-threaded (tests/conftest.py): one pytest worker per core.
test: install ## run the test suite (fast tests, one worker per core)
	$(BIN)/python -m pytest -n auto --dist worksteal $(ARGS)

test-slow: install ## run the slow tests too (and the multi-process ones)
	$(BIN)/python -m pytest -m "(slow or ddp or not slow) and not gpu and not slurm" $(ARGS)

test-ddp: install ## multi-process checks: SyncBN exactness and 2-process training on CPU (gloo)
	$(BIN)/python -m pytest -m "ddp or not ddp" tests/norm/test_syncbn.py tests/test_ddp.py $(ARGS)

# A one-node Slurm on this machine (as root), state and logs in SLURM_DIR; Slurm's commands and
# hydra/launcher=slurm reach it with `export SLURM_CONF=$(SLURM_DIR)/slurm.conf`.
SLURM_DIR ?= .slurm

slurm-packages:
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "local Slurm: slurm-wlm and munge are not installed and there is no apt-get here to install them"; exit 1; }; \
	  echo "installing slurm-wlm and munge with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; }

slurm-local: slurm-packages ## start a one-node Slurm here (root; apt-installs slurm-wlm and munge if missing)
	$(PYTHON) scripts/local_slurm.py up --dir $(SLURM_DIR)

slurm-down: ## stop the daemons slurm-local started (and cancel its jobs)
	$(PYTHON) scripts/local_slurm.py down --dir $(SLURM_DIR)

# Brings up its own local Slurm in a temporary dir and stops it at the end.
test-slurm: install slurm-packages ## tests against a live local Slurm (root): job arrays, DDP over Slurm tasks, pre-emption
	$(BIN)/python -m pytest -m slurm tests/slurm $(ARGS)

# The GPU half of cuda_bn: kernels compiled, not interpreted.
test-gpu: install ## cuda_bn parity at realistic shapes on a CUDA GPU (fp32, bf16, torch.compile)
	TRITON_INTERPRET=0 $(BIN)/python -m pytest -m gpu tests/ops/test_cuda_bn_gpu.py $(ARGS)

# No GPU needed: Triton compiles for sm_80/sm_90 with its bundled ptxas.
test-aot: install ## compile every cuda_bn kernel configuration for sm_80/sm_90 (~1 h on 2 cores: 57.5 min in cuda_bn_aot.md; a progress line a minute); writes experiments/bench/cuda_bn_aot.md
	TRITON_INTERPRET=0 $(BIN)/python -m experiments.bench.cuda_bn_aot $(ARGS)

bench: install ## CPU benchmarks (~18 min on 2 cores, precision estimated; norm_cost alone ~5.5 min: 10 fresh processes; compile is bench-compile): tables in experiments/bench/*.md
	$(BIN)/python -m experiments.bench.run $(ARGS)

bench-gpu: install ## GPU benchmarks (bf16): tables in experiments/bench/*_gpu.md and bn_gpu.md
	TRITON_INTERPRET=0 $(BIN)/python -m experiments.bench.run --gpu $(ARGS)

bench-bn: install ## GPU: cuda_bn vs native BN (and BN+ReLU), writes experiments/bench/bn_gpu.md
	TRITON_INTERPRET=0 $(BIN)/python -m experiments.bench.bn_gpu $(ARGS)

bench-cuda-bn-cpu: install ## CPU: a DenseNet step with norm=cuda_bn vs norm=bn (goal ≤ 1.05×)
	$(BIN)/python -m experiments.bench.cuda_bn_cpu $(ARGS)

bench-compile: install ## CPU: compile=true vs eager per family × norm (step time, warm-up, break-even; 27 min on 2 cores), writes experiments/bench/compile.md
	$(BIN)/python -m experiments.bench.compile --jobs 2 --threads 1 $(ARGS)

exp-retinanet-digits: install ## study: RetinaNet R18-FPN on digit scenes, ~15 min on 2 CPU cores
	$(BIN)/python -m experiments.retinanet_digits.run $(ARGS)

exp-pix2pix-digits: install ## study: pix2pix on digit pairs, ~4 min on 2 CPU cores
	$(BIN)/python -m experiments.pix2pix_digits.run $(ARGS)

# Each study trains what is missing under logs/studies/<study>/ (rerun to resume), then writes
# experiments/<study>/runs.csv (one row per run), results.md and its plots. ARGS="--collect"
# trains nothing: it re-tabulates the finished runs, or the committed runs.csv alone.
# The norm studies run on Fashion-MNIST (fetched first); ARGS="--data digits" runs their digits
# version, which needs nothing fetched.
STUDY_DATA = $(if $(findstring --data digits,$(ARGS)),,data-fashion-mnist)

study-norm-vs-batch-size: install $(STUDY_DATA) ## study: bn/gn × batch 2-32, ln/in × 2 and 32, ghost_bn controls on Fashion-MNIST, 3 seeds (52 min on 2 cores, measured)
	$(BIN)/python -m experiments.norm_vs_batch_size.run $(ARGS)

study-syncbn-small-batch: install ## study: 2 processes × 2 with bn vs syncbn vs 1 × 4 bn, 3 seeds (22 min)
	$(BIN)/python -m experiments.syncbn_small_batch.run $(ARGS)

study-convnext-bn-vs-ln: install ## study: ConvNeXt-atto with its LayerNorm vs BatchNorm, 3 seeds (4 min)
	$(BIN)/python -m experiments.convnext_bn_vs_ln.run $(ARGS)

study-retinanet-norms: install ## study: RetinaNet backbone frozen_bn/bn/syncbn, heads gn/none, 64 px, 3 seeds (45 min on 2 cores)
	$(BIN)/python -m experiments.retinanet_norms.run $(ARGS)

study-pix2pix-bn-vs-in: install ## study: pix2pix with bn vs in at batch 1 and 16, 3 seeds (12 min)
	$(BIN)/python -m experiments.pix2pix_bn_vs_in.run $(ARGS)

study-accumulation-vs-batch: install $(STUDY_DATA) ## study: BN with accumulation vs a true batch, syncbn, GN on Fashion-MNIST, 3 seeds (17 min on 2 cores)
	$(BIN)/python -m experiments.accumulation_vs_batch.run $(ARGS)

study-small-batch-norms: install $(STUDY_DATA) ## study: bn/brn/ghost_bn/gn/gn+WS/frn/EvoNorm/rms at batch 2 and 32 on Fashion-MNIST, 3 seeds (111 CPU-min, 57 min on 2 idle cores, measured)
	$(BIN)/python -m experiments.small_batch_norms.run $(ARGS)

# Its 32-true runs are small_batch_norms' (same overrides), copied when that study ran at this commit.
study-bf16-vs-fp32: install data-fashion-mnist ## study: bn/gn/frn/evonorm_s0 at batch 2 and 32, bf16-mixed vs 32-true on Fashion-MNIST, 3 seeds (23 min on 2 cores with small_batch_norms' fp32 runs to copy)
	$(BIN)/python -m experiments.bf16_vs_fp32.run $(ARGS)

study-population-statistics: install data-fashion-mnist ## study: BN's population statistics (EMA vs PreciseBN), train-test inconsistency at batch 2-128, weight EMA per norm (Wu & Johnson 2021) on Fashion-MNIST, 3 seeds (82 min on 2 cores, measured)
	$(BIN)/python -m experiments.population_statistics.run $(ARGS)

lint: install ## ruff lint and format check
	$(BIN)/ruff check src tests experiments
	$(BIN)/ruff format --check src tests experiments

format: install ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests experiments
	$(BIN)/ruff format src tests experiments

clean-logs: ## remove logs/ (run dirs, sweeps, study runs, offline wandb runs)
	rm -rf logs

clean: ## remove the venv, logs and caches
	rm -rf $(VENV) logs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
