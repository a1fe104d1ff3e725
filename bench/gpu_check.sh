#!/usr/bin/env bash
# One GPU, a few minutes: MFU, the default pipeline on CUDA, the gpt2-small profile capped,
# generation and export. Prints one table and writes OUT_DIR/gpu_check.json.
#   bash bench/gpu_check.sh [OUT_DIR]      (OUT_DIR: default $OUT, else gpu_check_out)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" bench/gpu_check.py --out "${1:-${OUT:-gpu_check_out}}" "${@:2}"
