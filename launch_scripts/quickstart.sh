#!/usr/bin/env bash
# The main job. Installs what is missing, then runs the model smoke demo.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/launch_scripts/install.sh" test
cd "$repo"
exec "${PYTHON:-python3}" -m deberta_ds.demo "$@"
