#!/usr/bin/env bash
# TRL 1.13 (the last release with NashMDTrainer / XPOTrainer, in trl.experimental) in its own
# virtualenv, for benchmarks/bench_trainers.py --impl trl. Usage: benchmarks/trl/setup_venv.sh [VENV]
#
# trl 1.13.0 requires transformers>=4.56.2, accelerate>=1.4.0, datasets>=4.7.0 (its wheel
# metadata); trl.experimental.online_dpo also imports `requests` (vllm_client) without declaring
# it. The pins below are the versions of nashkern's .venv, so both sides of the comparison run
# the same torch / transformers / accelerate / tokenizers. TORCH_SPEC as in the Makefile.
set -euo pipefail
VENV=${1:-.venv-trl}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install -q $TORCH_SPEC
"$VENV/bin/python" -m pip install -q "trl==1.13.0" "transformers==5.23.0" "accelerate==1.15.0" \
    "datasets==5.2.0" "tokenizers==0.23.3" "safetensors==0.8.0" "numpy==2.4.6" "requests==2.34.2"
TRL_EXPERIMENTAL_SILENCE=1 "$VENV/bin/python" -c \
    "import trl, trl.experimental.nash_md, trl.experimental.xpo; print('trl', trl.__version__, 'ok')"
touch "$VENV/.installed"
