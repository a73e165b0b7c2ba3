#!/usr/bin/env bash
# Run HERE (a machine with pip access), before carrying DIR to an offline GPU machine whose image
# has Python 3.12, torch, Triton, transformers, sentencepiece and tensorboard but no deepspeed,
# hjson or pydantic: puts into DIR (an ignored folder, default .gpu_wheels, about 5 MB) a wheel
# for each missing package, for CPython 3.12 on manylinux x86_64:
#   deepspeed 0.19.8 (built here as a pure-Python wheel: no ops compiled; the trainer uses
#   torch's fused AdamW on GPUs), hjson, pydantic + pydantic-core (a matching pair),
#   annotated-types, typing-inspection, typing-extensions (pydantic wants 4.16), the attention peers flashdeberta and
#   disentangled-flash 1.1.1, and this package.
# gpu_check.sh installs them there with `pip install --no-index --no-deps --target`.
# Usage: bash launch_scripts/gpu_wheels.sh [DIR]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"
help_requested "$@" && usage 0
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-$repo/.gpu_wheels}
python=${PYTHON:-python3}
mkdir -p "$dir"
rm -f "$dir"/*.whl
platform=(--python-version 3.12 --implementation cp --only-binary=:all:
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$python" -m pip download --quiet --no-deps "${platform[@]}" -d "$dir" \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 \
  flashdeberta==0.0.8 disentangled-flash==1.1.1
DS_BUILD_OPS=0 "$python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$dir" deepspeed==0.19.8
"$python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$dir" "$repo"
ls -l "$dir"
du -sh "$dir"
