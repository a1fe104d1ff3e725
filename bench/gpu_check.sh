#!/usr/bin/env bash
# One GPU, a few minutes: MFU, the default pipeline on CUDA, the gpt2-small profile capped,
# generation and export. Prints one table and writes OUT_DIR/gpu_check.json.
#   bash bench/gpu_check.sh [OUT_DIR]      (OUT_DIR: default $OUT, else gpu_check_out)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
# Your own corpus on the GPU: ~1 GB of text into shards with every core, then gpt2-small
# pretrains from them: MFU, and the share of step time the loader takes (it must be ~0).
# CORPUS_MB=20 CORPUS_PRESET=tiny CORPUS_LEN=32 dry-runs it on a CPU.
"$PY" bench/corpus_prepare.py --sizes "${CORPUS_MB:-1000}" --steps "${CORPUS_STEPS:-30}" \
  --workers "$(nproc)" --preset "${CORPUS_PRESET:-gpt2-small}" --max-length "${CORPUS_LEN:-1024}" \
  --out "$OUT_DIR/corpus_pretrain.json"
[ -n "${CORPUS_ONLY:-}" ] && exit 0
exec "$PY" bench/gpu_check.py --out "${1:-${OUT:-gpu_check_out}}" "${@:2}"
