#!/usr/bin/env bash
# The one prepared GPU check: everything a GPU session must learn, in one command, on a fresh
# offline single-GPU machine (Python 3.12, torch, Triton, transformers, sentencepiece,
# tensorboard; no deepspeed, hjson or pydantic: carry the wheels gpu_wheels.sh builds).
#
#   bash launch_scripts/gpu_wheels.sh                        # here, with pip access: .gpu_wheels/
#   bash launch_scripts/gpu_check.sh OUT_DIR                 # there: at most 480 s of parts on an H100
#   bash launch_scripts/gpu_check.sh --cpu-smoke OUT_DIR     # anywhere: tiny shapes, checks the harness
#
# Parts, each with its own time limit, each writing OUT_DIR/<part>.log:
#   install          the carried wheels (WHEELS, default .gpu_wheels) into /tmp/site, no network
#   pytest           pytest -m cuda: kernel vs float64 reference at model shapes, a training step of
#                    every engine layout on the device, resume exactness on the device
#   attention_bench  fused kernel vs reference, HF eager, FlashDeBERTa, DisentangledFlash, SDPA
#   train_bench      base RTD pair (fused and reference attention) vs HF DeBERTa (eager, and
#                    DisentangledFlash) and ModernBERT; also OUT_DIR/train_bench.json;
#                    TRAIN_SYSTEMS="deberta_ds deberta_ds-reference" picks some (35 s each)
#   quickstart       launch_scripts/quickstart.sh on the GPU (one process, bf16)
# and three parts a follow-up call names in PARTS (not run by default):
#   kernel_tune      benchmarks/kernel_tune.py: every launch configuration, OUT_DIR/kernel_tune.json
#   context_memory   benchmarks/activation_memory.py at L = 2048 and 8192 (context extension)
#   profile          torch.profiler over 3 training steps of the base pair, reference and fused
#                    attention (train_bench.py --profile-steps): OUT_DIR/profile.md with the top 30
#                    kernels by time, the device's idle gaps between kernels and the host syncs
# PARTS="pytest kernel_tune" runs only those (install always runs first on a GPU); PYTEST_ARGS
# replaces the test selection (node ids, run in the order given: the ones a first call's limit
# cut off) and PYTEST_LIMIT the part's limit.
# and OUT_DIR/summary.md: pass/fail per part, the machine, the headline numbers. Exit 1 if a part failed.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"
help_requested "$@" && usage 0
smoke=0
out=""
for arg in "$@"; do
  case $arg in
    --cpu-smoke) smoke=1 ;;
    -*) echo "gpu_check.sh: unknown flag $arg (usage: gpu_check.sh [--cpu-smoke] OUT_DIR)" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done
[ -n "$out" ] || { echo "usage: bash launch_scripts/gpu_check.sh [--cpu-smoke] OUT_DIR" >&2; exit 2; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=${WORK:-$(mktemp -d /tmp/deberta_ds_gpu_check.XXXX)}
python=${PYTHON:-python3}
train_systems=${TRAIN_SYSTEMS:-deberta_ds deberta_ds-reference hf-deberta hf-deberta-df modernbert}
cd "$repo"
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

parts=()
declare -A result
wanted=" install ${PARTS:-pytest attention_bench train_bench quickstart} "
part() {  # part NAME LIMIT_S COMMAND...: run it, log to OUT/NAME.log, record pass/fail and seconds
  local name=$1 limit=$2 start rc
  shift 2
  [[ $wanted == *" $name "* ]] || return 0
  parts+=("$name")
  start=$(date +%s)
  echo "== $name (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  if [ $rc = 0 ]; then result[$name]="pass"; elif [ $rc = 124 ]; then result[$name]="FAIL (timed out)";
  else result[$name]="FAIL (exit $rc)"; fi
  result[$name]="${result[$name]}, $(( $(date +%s) - start )) s"
  echo "   ${result[$name]}"
}

if [ $smoke = 1 ]; then
  export GPU_CHECK_SMOKE=1 TRITON_INTERPRET=1
  part install 10 echo "cpu smoke run: no wheels installed (this machine's packages are used)"
  part pytest 900 "$python" -m pytest -m cuda -q -p no:cacheprovider tests/test_gpu.py
  part attention_bench 300 "$python" benchmarks/attention_bench.py --device cpu --lengths 40 --tokens 40 --repeats 1
  part train_bench 600 "$python" benchmarks/train_bench.py --out "$work/train_bench" --cpu-smoke
  part profile 300 "$python" benchmarks/train_bench.py --out "$work/profile" --cpu-smoke --steps 1 \
    --profile-steps 2 --systems deberta_ds-reference
  part quickstart 900 env CORPUS_BYTES=600000 VOCAB_SIZE=1000 bash launch_scripts/quickstart.sh \
    "$work/quickstart" train.steps=4 train.log_every=2 train.eval_every=0 train.save_every=0 train.eval_batches=1
else
  wheels=${WHEELS:-$repo/.gpu_wheels}
  # The default parts' limits add up to 480 s: with a machine's start, one call of 500 s leaves a
  # second start's 4 minutes of a session's 15 for rerunning what failed.
  part install 45 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH="$repo:/tmp/site${PYTHONPATH#"$repo"}" PATH="/tmp/site/bin:$PATH" DEBERTA_DS_OFFLINE=1
  part kernel_tune 150 "$python" benchmarks/kernel_tune.py --out "$out/kernel_tune.json" --repeats 5
  part context_memory 70 bash -c "$python benchmarks/activation_memory.py --device cuda --micro-batch 4 --length 2048 &&
    $python benchmarks/activation_memory.py --device cuda --micro-batch 1 --length 8192"
  # Each system starts a trainer and compiles its layers (train.compile) before the profiled steps.
  part profile 240 "$python" benchmarks/train_bench.py --out "$work/profile" --timeout-s 115 --warmup 3 --steps 1 \
    --profile-steps 3 --systems deberta_ds-reference deberta_ds
  # shellcheck disable=SC2086 # PYTEST_ARGS is a list of words
  part pytest "${PYTEST_LIMIT:-130}" "$python" -m pytest -m cuda -q -p no:cacheprovider ${PYTEST_ARGS:-tests/test_gpu.py}
  part attention_bench 55 "$python" benchmarks/attention_bench.py --lengths 512 2048 8192 --tokens 16384
  # shellcheck disable=SC2086 # the systems are a list of words
  part train_bench $(( 35 * $(wc -w <<< "$train_systems") )) "$python" benchmarks/train_bench.py \
    --out "$work/train_bench" --timeout-s 45 --warmup 5 --steps 10 --systems $train_systems
  # 300 of the quickstart's 600 steps: on an H200 its tiny model ran 9.5 steps/s (host-bound)
  # after 25 s of data prep, so the whole job did not fit 60 s (2026-11-27)
  part quickstart 75 bash launch_scripts/quickstart.sh "$work/quickstart" train.steps=300
fi
if [[ $wanted == *" profile "* ]]; then
  cat "$work"/profile/profile_*.md > "$out/profile.md" 2>/dev/null || echo "no profile written" > "$out/profile.md"
fi
if [[ $wanted == *" train_bench "* ]]; then
  cp "$work/train_bench/train_bench.json" "$out/" 2>/dev/null || echo '{"systems": {}}' > "$out/train_bench.json"
fi

"$python" - "$smoke" <<'PY' > "$out/summary.md"
import platform, subprocess, sys
from importlib import metadata

smoke = sys.argv[1] == "1"
print("# GPU check" + (" (CPU smoke run: numbers mean nothing)" if smoke else ""))
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
except FileNotFoundError:
    gpu = "none (no nvidia-smi)"
versions = {}
for name in ("torch", "triton", "transformers", "deepspeed"):
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = "missing"
print(f"\nGPU: {gpu}; Python {platform.python_version()}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
PY
{
  echo
  echo "| part | result |"
  echo "|---|---|"
  for name in "${parts[@]}"; do echo "| $name | ${result[$name]} |"; done
  echo
  section() { [ -f "$out/$1.log" ] && { echo; echo "## $1"; }; }
  section pytest && tail -n 3 "$out/pytest.log"
  section attention_bench && { grep -E '^\|' "$out/attention_bench.log" | grep -E 'fused|L \|'; tail -n 1 "$out/attention_bench.log"; }
  section train_bench && grep -E '^\||^device' "$out/train_bench.log"
  section quickstart && grep -E 'MLM loss|RTD accuracy|loaded' "$out/quickstart.log"
  section kernel_tune && grep -E '^\||^best|^device' "$out/kernel_tune.log"
  section context_memory && grep -E 'peak' "$out/context_memory.log"
  section profile && grep -E '^#|^kernel time|^host syncs' "$out/profile.md"
} >> "$out/summary.md"
cat "$out/summary.md"
for name in "${parts[@]}"; do
  [[ ${result[$name]} == pass* ]] || exit 1
done
