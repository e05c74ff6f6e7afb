#!/usr/bin/env bash
# On the GPU machine, from the repository root, with bench/work/gpu carried there (made here by
# `python bench/gpu/throughput.py --prepare`): install the four missing wheels, then measure.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site bench/work/gpu/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 bench/gpu/throughput.py "$@"
