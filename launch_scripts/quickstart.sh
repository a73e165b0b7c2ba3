#!/usr/bin/env bash
# The main job: a small end-to-end DeBERTaV3 pre-training on the built-in corpus.
#   1. installs what is missing (CPU torch 2.13.0 on a CPU machine, then this package)
#   2. writes the built-in corpus (Python's own documentation), trains a 4k SentencePiece
#      tokenizer, tokenises it into Megatron-layout shards and splits off a validation set
#   3. pre-trains the tiny RTD pair with GDES under the deepspeed launcher, 2 processes, ZeRO-2
#   4. exports the discriminator (with its tokenizer) to Hugging Face format, loads it with
#      transformers, shows which tokens it flags as replaced, and fine-tunes it on a sample of
#      SST-2 when $SST2_DIR (default ../shared/corpora/sst2) holds it
# Usage: bash launch_scripts/quickstart.sh [OUTPUT_DIR] [SECTION.FIELD=VALUE ...]
# OUTPUT_DIR (default runs/quickstart) is taken from the directory you run this in.
# CORPUS_BYTES / VOCAB_SIZE shrink the data step (default: the whole corpus, 4000 pieces).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"
help_requested "$@" && usage 0
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=runs/quickstart
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then out=$1; shift; fi
[[ "$out" == /* ]] || out=$PWD/$out
python=${PYTHON:-python3}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, from wherever it is run
stage() { echo "== $* (at $((SECONDS / 60))m$((SECONDS % 60))s)"; }

stage "1/4 installing what is missing"
bash "$repo/launch_scripts/install.sh" test
mkdir -p "$out/data"
data=$out/data

stage "2/4 data: built-in corpus -> tokenizer -> shards"
if [ ! -f "$data/shards/split_valid.idx" ]; then
  "$python" -m data_prep default-corpus --output "$data/corpus.txt" ${CORPUS_BYTES:+--max-bytes "$CORPUS_BYTES"}
  "$python" -m data_prep train-tokenizer --input "$data/corpus.txt" --output-dir "$data/tokenizer" \
    --vocab-size "${VOCAB_SIZE:-4000}"
  "$python" -m data_prep tokenize --input "$data/corpus.txt" --output-prefix "$data/shards/all" \
    --tokenizer "$data/tokenizer" --workers 2
  "$python" -m data_prep split --input "$data/shards/all_00000" --output-prefix "$data/shards/split" \
    --valid-fraction 0.02
  "$python" -m data_prep verify "$data/shards" --tokenizer "$data/tokenizer"
fi

stage "3/4 pre-training the tiny RTD pair (GDES, ZeRO-2, 2 processes)"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
[ "${gpus:-0}" -gt 0 ] && processes=$((gpus < 2 ? gpus : 2)) && precision=bf16 || { processes=2; precision=fp32; }
deepspeed --num_gpus "$processes" --master_port "${MASTER_PORT:-29517}" --module deberta_ds.train \
  --config quickstart "data.train=[$data/shards/split_train]" \
  "data.valid=[$data/shards/split_valid]" "data.tokenizer=$data/tokenizer" "output_dir=$out/run" \
  "train.precision=$precision" "$@"

stage "4/4 exporting the discriminator for transformers"
"$python" -m deberta_ds.convert to-hf --checkpoint "$out/run" --out "$out/hf_discriminator" --part discriminator
"$python" - "$out" <<'PY'
import json, sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from deberta_ds.checkpoint_reader import load_training_checkpoint

out = Path(sys.argv[1])
model = AutoModel.from_pretrained(out / "hf_discriminator").eval()
tokenizer = AutoTokenizer.from_pretrained(out / "hf_discriminator")  # exported with the model
rtd_head = load_training_checkpoint(out / "run").discriminator.head.eval()  # HF has no RTD head: ours
print(f"transformers loaded {out / 'hf_discriminator'} and its tokenizer; the three tokens its discriminator "
      "finds most likely replaced (P(replaced) from the RTD head of our checkpoint; > 0.5 is a flag):")
for text in ("The assert statement checks a condition and raises an exception.",
             "The assert statement eats a condition and raises an elephant."):  # two words replaced
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = rtd_head(model(**batch).last_hidden_state)[0]
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])[1:-1]
    ranked = sorted(zip(torch.sigmoid(logits[1:-1]).tolist(), tokens), reverse=True)[:3]
    print(f"  {text!r}: " + ", ".join(f"{token} {p:.2f}" for p, token in ranked))
history = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
first, last = history[0], history[-1]
print(f"generator MLM loss: step 1 {first['generator/mlm_loss']:.3f} -> step {last['step']} "
      f"{last['generator/mlm_loss']:.3f} (mean since the previous log step)")
evaluation = json.loads((out / "run" / "eval.jsonl").read_text().splitlines()[-1])
print(f"held-out evaluation at step {evaluation['step']}: MLM loss {evaluation['eval/mlm_loss']:.3f}, "
      f"RTD accuracy {evaluation['eval/rtd_accuracy']:.4f} (all-'original' baseline "
      f"{evaluation['eval/all_original_baseline']:.4f}), RTD AUC {evaluation['eval/rtd_auc']:.3f}")
PY
sst2=${SST2_DIR:-$repo/../shared/corpora/sst2}
if [ -f "$sst2/train.tsv" ]; then
  stage "fine-tuning the export on a sample of SST-2 ($sst2): 8,000 training phrases, 1 epoch"
  # lr 1e-3: a model this small (hidden 64) stays at the majority class after 250 steps at 1e-4
  mkdir -p "$out/sst2_sample"
  head -n 8001 "$sst2/train.tsv" > "$out/sst2_sample/train.tsv"
  head -n 501 "$sst2/dev.tsv" > "$out/sst2_sample/dev.tsv"
  "$python" -m deberta_ds.finetune --model "$out/hf_discriminator" --train "$out/sst2_sample/train.tsv" \
    --valid "$out/sst2_sample/dev.tsv" --test "$sst2/test.tsv" --out "$out/sst2" --epochs 1 --lr 1e-3 --no-progress
else
  echo "== SST-2 not found at $sst2 (set SST2_DIR): skipping the fine-tuning demo"
fi
echo "== done in $((SECONDS / 60))m$((SECONDS % 60))s; outputs under $out:"
echo "  data/              corpus.txt, tokenizer/, shards/ (Megatron .bin/.idx, split_train / split_valid)"
echo "  run/               checkpoints/, metrics.jsonl, eval.jsonl, tensorboard/"
echo "  hf_discriminator/  the discriminator and its tokenizer for transformers"
[ -d "$out/sst2" ] && echo "  sst2/              the fine-tuned classifier: best/, metrics.json, tensorboard/"
echo "TensorBoard logs: $out/run/tensorboard   (tensorboard --logdir $out/run/tensorboard)"
