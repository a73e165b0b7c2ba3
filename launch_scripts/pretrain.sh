#!/usr/bin/env bash
# Pre-train a DeBERTaV3 RTD pair with the deepspeed launcher: one node, a hostfile, or one node
# of a multi-node job started per node (SLURM, or by hand with --no_ssh).
#
# Usage: launch_scripts/pretrain.sh [--dry-run] [SECTION.FIELD=VALUE ...]
#
# Environment (all optional except the data):
#   TRAIN_SHARDS   training shards: a directory, prefix or glob (required)
#   TOKENIZER      tokenizer directory holding spm.model + tokenizer.json (required)
#   VALID_SHARDS   held-out shards for evaluation
#   RECIPE         a published setting shipped in the package (deberta_ds/recipes/): ablation_base (default),
#                  quickstart, xsmall, small, base, large (each file cites its sources); context extension
#                  extend/base_2048 then extend/base_8192 (with init_from=CHECKPOINT_DIR)
#   CONFIG         any run config YAML/JSON instead of a recipe
#   PRESET         model preset overriding the config's: tiny xsmall small base large
#   OUTPUT_DIR     default runs/$RECIPE (runs/$PRESET when PRESET is set)
#   NUM_GPUS       processes per node (default: GPUs visible, else 2 CPU processes)
#   ZERO_STAGE, PRECISION, GLOBAL_BATCH, MICRO_BATCH, STEPS, TP   run-config shortcuts
#   HOSTFILE       multi-node with ssh: deepspeed --hostfile (lines "host slots=N"); LAUNCHER pdsh|openmpi
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node without ssh: run this once per node
#   DRY_RUN=1      same as --dry-run: print the command and exit
# Relative paths, OUTPUT_DIR's default included, are taken from the directory you run this in.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, from wherever it is run

source "$repo/launch_scripts/usage.sh"
fail() { echo "error: $*" >&2; echo >&2; usage 2; }

dry_run=${DRY_RUN:-0}
overrides=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    *=*) overrides+=("$arg") ;;
    *) fail "unexpected argument '$arg' (overrides look like section.field=value)" ;;
  esac
done

# Every path resolves once, against the caller's directory, before anything is checked or started.
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
for var in TRAIN_SHARDS TOKENIZER VALID_SHARDS CONFIG HOSTFILE NODES_FILE OUTPUT_DIR; do
  if [ -n "${!var:-}" ]; then printf -v "$var" '%s' "$(absolute "${!var}")"; fi
done

[ -n "${TRAIN_SHARDS:-}" ] || fail "TRAIN_SHARDS is not set"
[ -n "${TOKENIZER:-}" ] || fail "TOKENIZER is not set"
compgen -G "${TRAIN_SHARDS%/}*" >/dev/null || fail "TRAIN_SHARDS=$TRAIN_SHARDS matches nothing"
[ -f "$TOKENIZER/spm.model" ] || [ -f "$TOKENIZER" ] || fail "TOKENIZER=$TOKENIZER holds no spm.model"
recipe=${RECIPE:-ablation_base}
if [ -n "${PRESET:-}" ]; then
  case "$PRESET" in tiny|xsmall|small|base|large) ;; *) fail "PRESET=$PRESET is not tiny, xsmall, small, base or large" ;; esac
fi
if [ -z "${CONFIG:-}" ]; then
  CONFIG=$("$python" -m deberta_ds.resources recipe "$recipe" 2>/dev/null) ||
    fail "RECIPE=$recipe is not one of: $("$python" -m deberta_ds.resources recipes)"
  if [[ $recipe == extend/* ]] && [[ " ${overrides[*]} " != *" init_from="* ]]; then
    fail "RECIPE=$recipe continues a shorter run: give its checkpoint as init_from=DIR"
  fi
fi
config=$CONFIG
[ -f "$config" ] || fail "CONFIG=$config not found"
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NUM_GPUS:-0}" -gt 0 ] || NUM_GPUS=2
fi
[[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || fail "NUM_GPUS=$NUM_GPUS is not a positive integer"

run_args=(--config "$config" "data.train=[$TRAIN_SHARDS]" "data.tokenizer=$TOKENIZER"
          "output_dir=${OUTPUT_DIR:-$PWD/runs/${PRESET:-$recipe}}")
[ -n "${PRESET:-}" ] && run_args+=("model=$PRESET")
[ -n "${VALID_SHARDS:-}" ] && run_args+=("data.valid=[$VALID_SHARDS]")
for pair in ZERO_STAGE:train.zero_stage PRECISION:train.precision GLOBAL_BATCH:train.global_batch_size \
            MICRO_BATCH:train.micro_batch_size STEPS:train.steps TP:train.tp; do
  var=${pair%%:*}
  [ -n "${!var:-}" ] && run_args+=("${pair#*:}=${!var}")
done
run_args+=("${overrides[@]}")

launch=(deepspeed)
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || fail "HOSTFILE=$HOSTFILE not found"
  launch+=(--hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}")
elif [ -n "${NNODES:-}" ] && [ "$NNODES" -gt 1 ]; then
  [ -n "${NODE_RANK:-}" ] || fail "NNODES=$NNODES needs NODE_RANK (0..$((NNODES - 1)))"
  [ -n "${MASTER_ADDR:-}" ] || fail "NNODES=$NNODES needs MASTER_ADDR (the address of node 0)"
  # The launcher reads the node count from a hostfile; --no_ssh starts only this node's processes.
  nodes_file=${NODES_FILE:-$(mktemp)}
  for ((node = 0; node < NNODES; node++)); do echo "node$node slots=$NUM_GPUS"; done > "$nodes_file"
  launch+=(--hostfile "$nodes_file" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
else
  launch+=(--num_gpus "$NUM_GPUS")
fi
launch+=(--master_port "${MASTER_PORT:-29500}" --module deberta_ds.train "${run_args[@]}")

if [ "$dry_run" = 1 ]; then
  printf '%q ' "${launch[@]}"; echo
  exit 0
fi
exec "${launch[@]}"
