# lightning_sensorium — every target mirrors a CI command. `make` alone lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= data
SYNTH  := $(DATA)/synthetic
STORES := $(DATA)/stores

.DEFAULT_GOAL := help
.PHONY: help install test test-full lint format demo bench gpu-check clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(BIN)/lightning-sensorium: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: the local CPU wheel. A range that it satisfies then installs nothing more (no CUDA wheels).
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

install: $(BIN)/lightning-sensorium ## create .venv, install torch==2.13.0 (CPU) first, then the project with [dev]

test: install ## run the CI test suite (CPU, tiny synthetic mice)
	$(BIN)/pytest -m "not slow and not gpu" -q

test-full: install ## run every test, slow ones included (no GPU tests)
	$(BIN)/pytest -m "not gpu" -q

lint: install ## ruff lint + format check, mypy, the import layers (lint-imports, see pyproject.toml)
	$(BIN)/ruff check lightning_sensorium tests benchmarks tools
	$(BIN)/ruff format --check lightning_sensorium tests benchmarks tools
	$(BIN)/mypy lightning_sensorium
	$(BIN)/lint-imports --no-cache --no-logo

format: install ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix lightning_sensorium tests benchmarks tools
	$(BIN)/ruff format lightning_sensorium tests benchmarks tools

demo: install ## synthesise 3 demo mice (if missing), convert them to zarr, train the factorized CPU recipe 5 minutes, evaluate
	$(BIN)/python -m lightning_sensorium.demo --data $(DATA)

bench: install ## benchmarks: data loading (store, demo batches), readout reads, the strided first layer, float32 vs bf16 steps, training memory, torch.compile (figures go to BENCHMARKS.md)
	$(BIN)/python benchmarks/bench_store.py
	$(BIN)/python benchmarks/bench_readout.py
	$(BIN)/python benchmarks/bench_strided_conv.py
	$(BIN)/python -m lightning_sensorium.demo --data $(DATA) --no-train
	$(BIN)/python benchmarks/bench_precision.py --data $(STORES)
	$(BIN)/python benchmarks/bench_loader.py --data $(STORES)
	$(BIN)/python benchmarks/bench_memory.py --data $(STORES)
	$(BIN)/python benchmarks/bench_compile.py --data $(STORES)

gpu-check: install ## on a GPU machine (~8 min): every model at full size, bf16, eager and compiled; a 1-GPU ddp fit; runs/gpu_check.json
	$(BIN)/python benchmarks/gpu_check.py --out runs/gpu_check.json

clean: ## remove the demo data and run logs (keeps .venv)
	rm -rf $(DATA) runs lightning_logs
