#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .whl and bench/work/gpu carried there (made
# here by `python bench/gpu/throughput.py --prepare`): install the missing wheels, then measure.
#     bash bench/gpu/run.sh --out "$OUT"        # ~6 minutes on one H200; results after each route
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
# prepend: a caller's PYTHONPATH is kept
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 bench/gpu/throughput.py "$@"
