#!/usr/bin/env bash
# Installs what is missing for a CPU machine: the local CPU torch wheel (pinned, so pip does
# not pull CUDA wheels), then this package with the given extras. Idempotent and quiet.
# Usage: bash launch_scripts/install.sh [EXTRAS]   (EXTRAS e.g. "test")
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
extras=${1:-}
python=${PYTHON:-python3}
if ! "$python" -c "import torch" 2>/dev/null; then
  "$python" -m pip install --quiet "torch==2.13.0"
fi
spec="$repo"
[ -n "$extras" ] && spec="$repo[$extras]"
if ! "$python" -c "import deberta_ds, deepspeed, sentencepiece" 2>/dev/null \
   || { [ "$extras" = test ] && ! "$python" -c "import transformers, megatron.core, pytest, triton" 2>/dev/null; }; then
  "$python" -m pip install --quiet -e "$spec"
fi
