#!/usr/bin/env bash
# Installs what is missing for a CPU machine: the local CPU torch wheel (pinned, so pip does
# not pull CUDA wheels), then this package with the given extras. Idempotent and quiet.
# Usage: bash launch_scripts/install.sh [EXTRAS]   (EXTRAS e.g. "test")
# DEBERTA_DS_OFFLINE=1 (an offline machine whose packages were installed otherwise, e.g. the
# GPU check): install nothing, only check that the runtime imports.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"
help_requested "$@" && usage 0
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
extras=${1:-}
python=${PYTHON:-python3}
if [ "${DEBERTA_DS_OFFLINE:-0}" = 1 ]; then
  (cd "$repo" && "$python" -c "import deberta_ds, deepspeed, sentencepiece, transformers") || {
    echo "install.sh: DEBERTA_DS_OFFLINE=1 but the imports above fail; install the wheels first" >&2; exit 1; }
  exit 0
fi
if ! "$python" -c "import torch" 2>/dev/null; then
  "$python" -m pip install --quiet "torch==2.13.0"
fi
# The tests run the fused kernel under Triton's interpreter; CPU torch brings no Triton, so this adds
# the one CUDA torch 2.13 requires (3.7.1): CPU and GPU runs of the pinned torch then share one
# compiler version. A torch that brings its own Triton (CUDA wheels) keeps it.
if [ "$extras" = test ] && ! "$python" -c "import triton" 2>/dev/null; then
  "$python" -m pip install --quiet "triton==3.7.1"
fi
spec="$repo"
[ -n "$extras" ] && spec="$repo[$extras]"
if ! "$python" -c "import deberta_ds, deepspeed, sentencepiece" 2>/dev/null \
   || { [ "$extras" = test ] && ! "$python" -c "import transformers, megatron.core, pytest, triton, onnxruntime, ruff, sklearn, scipy, seqeval" 2>/dev/null; }; then
  "$python" -m pip install --quiet -e "$spec"
fi
