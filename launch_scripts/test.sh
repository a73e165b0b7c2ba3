#!/usr/bin/env bash
# README's test command: installs what is missing, lints the tree (ruff.toml), then runs the whole
# suite (slow tests too).
# Extra arguments go to pytest, e.g. `bash launch_scripts/test.sh -m "not slow"`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"
help_requested "$@" && usage 0
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/launch_scripts/install.sh" test
cd "$repo"
"${PYTHON:-python3}" -m ruff check .
exec "${PYTHON:-python3}" -m pytest -q "$@"
