"""ES vs NES vs GDES, measured: the DeBERTaV3 paper's embedding-sharing ablation at a scale one
machine runs.

Same data, seed, shapes and steps for every variant: ES, NES and GDES in decoupled mode, and
GDES in joint mode. Per run: held-out MLM loss/accuracy and RTD loss/accuracy/AUC at several
steps (the trainer's eval.jsonl), the paper's embedding analysis (average cosine similarity
between the word embeddings of the generator's and of the discriminator's table), and a
downstream probe: the exported discriminator fine-tuned on SST-2 (same budget, 3 seeds, accuracy
on the 872-sentence test split), beside a randomly initialised model of the same shape.

    python benchmarks/sharing_ablation.py --out runs/ablation            # CPU scale, about 40 min on 2 cores
    python benchmarks/sharing_ablation.py --out runs/ablation --gpu      # a larger pair on one GPU

Data: wikitext-2 (../shared/corpora/wikitext-2) plus the built-in corpus, a tokenizer fitted to
both, 3% held out. Prints markdown tables and writes sharing_ablation.json under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.finetune_gain import random_twin  # noqa: E402
from data_prep.cli import main as data_prep  # noqa: E402
from deberta_ds.checkpoint_reader import checkpoints_folder, newest_complete  # noqa: E402

VARIANTS = [("ES", "es", "decoupled"), ("NES", "nes", "decoupled"), ("GDES", "gdes", "decoupled"),
            ("GDES joint", "gdes", "joint")]
# Run-config overrides per scale (on top of the quickstart recipe: the tiny pair, no dropout),
# with the paper's rtd_lambda of 50.
SCALES = {
    "cpu": {"processes": 2, "vocab": 8000, "overrides": [
        "rtd.rtd_lambda=50", "train.steps=1200", "train.eval_every=400", "train.save_every=0",
        "train.eval_batches=8", "train.log_every=100"]},
    "gpu": {"processes": 1, "vocab": 16000, "overrides": [
        "model=xsmall", "model_overrides={hidden_dropout: 0.1, attention_dropout: 0.1}", "data.max_length=256",
        "train.steps=6000", "train.global_batch_size=128", "train.micro_batch_size=128", "train.precision=bf16",
        "optim.lr=5.0e-4", "optim.generator_lr=5.0e-4", "optim.warmup_steps=500", "train.eval_every=1000",
        "train.save_every=0", "train.eval_batches=8", "train.log_every=200"]},
}


def prepare_data(out: Path, wikitext: Path, vocab: int) -> dict:
    """wikitext-2 + the built-in corpus -> tokenizer -> shards with 3% held out (kept when present)."""
    data = out / "data"
    if not (data / "shards" / "split_valid.idx").is_file():
        data.mkdir(parents=True, exist_ok=True)
        data_prep(["default-corpus", "--output", str(data / "builtin.txt")])
        with open(data / "corpus.txt", "w") as corpus:
            for part in (wikitext / "valid.txt", wikitext / "test.txt", data / "builtin.txt"):
                corpus.write(part.read_text())
        data_prep(["train-tokenizer", "--input", str(data / "corpus.txt"), "--output-dir", str(data / "tokenizer"),
                   "--vocab-size", str(vocab)])
        data_prep(["tokenize", "--input", str(data / "corpus.txt"), "--output-prefix", str(data / "shards" / "all"),
                   "--tokenizer", str(data / "tokenizer"), "--no-progress"])
        data_prep(["split", "--input", str(data / "shards" / "all_00000"), "--output-prefix",
                   str(data / "shards" / "split"), "--valid-fraction", "0.03"])
    return {"train": data / "shards" / "split_train", "valid": data / "shards" / "split_valid",
            "tokenizer": data / "tokenizer"}


def pretrain(run_dir: Path, sharing: str, mode: str, data: dict, scale: dict, port: int) -> float:
    """One pre-training run under the deepspeed launcher (kept when it exists); returns the
    training loop's time in seconds (steps x batch / the logged samples per second)."""
    if not newest_complete(checkpoints_folder(run_dir)):
        subprocess.run(["deepspeed", "--num_gpus", str(scale["processes"]), "--master_port", str(port),
                        "--module", "deberta_ds.train", "--config", "quickstart",
                        f"data.train=[{data['train']}]", f"data.valid=[{data['valid']}]",
                        f"data.tokenizer={data['tokenizer']}", f"output_dir={run_dir}",
                        f"rtd.embedding_sharing={sharing}", f"train.mode={mode}", *scale["overrides"]],
                       check=True, cwd=REPO)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return last["consumed_samples"] / last["perf/samples_per_s"]


def average_cosine(table: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs i != j of rows: (|sum of unit rows|^2 - N) / (N (N - 1))."""
    unit = torch.nn.functional.normalize(table.double(), dim=1)
    total, rows = unit.sum(0), unit.shape[0]
    return float((total @ total - rows) / (rows * (rows - 1)))


def embedding_similarity(run_dir: Path, regular: slice) -> dict:
    """The paper's analysis on the regular pieces' rows (no specials, no padding rows)."""
    from deberta_ds.checkpoint_reader import load_training_checkpoint

    pair = load_training_checkpoint(run_dir)
    generator = pair.generator.word_embeddings.weight.detach()[regular]
    discriminator = pair.export_discriminator_embedding()[regular]
    return {"generator": average_cosine(generator), "discriminator": average_cosine(discriminator)}


def sample_tsv(source: Path, target: Path, rows: int, seed: int) -> Path:
    header, *lines = source.read_text().splitlines(keepends=True)
    random.Random(seed).shuffle(lines)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(header + "".join(lines[:rows]))
    return target


def probe(model_dir: Path, sst2: Path, out: Path, seeds: list[int], train_rows: int, lr: float) -> list[float]:
    """SST-2 test accuracy per seed: `train_rows` sampled phrases, 1 epoch, the same recipe for all."""
    from deberta_ds.finetune import main as finetune

    train = sample_tsv(sst2 / "train.tsv", out.parent / "sst2_sample" / "train.tsv", train_rows, seed=0)
    valid = sample_tsv(sst2 / "dev.tsv", out.parent / "sst2_sample" / "dev.tsv", 1000, seed=0)
    accuracies = []
    for seed in seeds:
        target = out / f"seed{seed}"
        if not (target / "metrics.json").is_file():
            code = finetune(["--model", str(model_dir), "--train", str(train), "--valid", str(valid),
                             "--test", str(sst2 / "test.tsv"), "--out", str(target), "--epochs", "1",
                             "--lr", str(lr), "--seed", str(seed), "--no-progress"])
            assert code == 0, target
        accuracies.append(json.loads((target / "metrics.json").read_text())["test"]["accuracy"])
    return accuracies


def mean_spread(values: list[float]) -> str:
    tensor = torch.tensor(values, dtype=torch.float64)
    return f"{tensor.mean():.4f} ± {tensor.std():.4f}"


def report(results: dict, header: str) -> None:
    print(header)
    print("\n| run | step | MLM loss | MLM acc | RTD loss | RTD acc | RTD AUC |\n|---|---|---|---|---|---|---|")
    for name, result in results["runs"].items():
        for row in result["eval"]:
            print(f"| {name} | {row['step']} | {row['eval/mlm_loss']:.3f} | {row['eval/mlm_accuracy']:.4f} | "
                  f"{row['eval/rtd_loss']:.4f} | {row['eval/rtd_accuracy']:.4f} | {row['eval/rtd_auc']:.4f} |")
    print("\n| run | avg cosine E_G | avg cosine E_D | SST-2 test acc (mean ± sd, 3 seeds) | pre-training time |")
    print("|---|---|---|---|---|")
    for name, result in results["runs"].items():
        print(f"| {name} | {result['cosine']['generator']:.4f} | {result['cosine']['discriminator']:.4f} | "
              f"{mean_spread(result['sst2'])} | {result['seconds']:.0f} s |")
    print(f"| random init | - | - | {mean_spread(results['random_sst2'])} | - |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gpu", action="store_true", help="the larger GPU scale")
    parser.add_argument("--corpora", default=str(REPO.parent / "shared" / "corpora"),
                        help="folder with wikitext-2/ and sst2/")
    parser.add_argument("--probe-rows", type=int, default=24000, help="SST-2 training phrases per fine-tuning run")
    parser.add_argument("--probe-lr", type=float, default=1e-3, help="fine-tuning peak learning rate")
    parser.add_argument("--steps", type=int, help="pre-training steps instead of the scale's (3 evaluations)")
    args = parser.parse_args()
    out, corpora, scale = Path(args.out), Path(args.corpora), dict(SCALES["gpu" if args.gpu else "cpu"])
    if args.steps:
        scale["overrides"] = [*scale["overrides"], f"train.steps={args.steps}",
                              f"train.eval_every={max(1, args.steps // 3)}"]
    for needed in (corpora / "wikitext-2" / "valid.txt", corpora / "sst2" / "train.tsv"):
        if not needed.is_file():
            raise SystemExit(f"--corpora: {needed} not found (the real text this benchmark needs)")
    data = prepare_data(out, corpora / "wikitext-2", scale["vocab"])
    pieces = json.loads((data["tokenizer"] / "tokenizer.json").read_text())["pieces"]
    results = {"runs": {}}
    probe_dir = f"sst2_{args.probe_rows}rows_lr{args.probe_lr:g}"
    for offset, (name, sharing, mode) in enumerate(VARIANTS):
        run_dir = out / name.replace(" ", "_")
        seconds = pretrain(run_dir, sharing, mode, data, scale, port=29530 + offset)
        export = [sys.executable, "-m", "deberta_ds.convert", "to-hf", "--checkpoint", str(run_dir),
                          "--out", str(run_dir / "hf_discriminator"), "--part", "discriminator"]
        if not (run_dir / "hf_discriminator" / "config.json").is_file():
            subprocess.run(export, check=True, cwd=REPO)
        results["runs"][name] = {
            "eval": [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()],
            "cosine": embedding_similarity(run_dir, slice(4, pieces)), "seconds": seconds,
            "sst2": probe(run_dir / "hf_discriminator", corpora / "sst2", run_dir / probe_dir, [1, 2, 3],
                          args.probe_rows, args.probe_lr)}
    twin = out / "random_init" / "hf"
    if not (twin / "config.json").is_file():
        random_twin(out / "GDES" / "hf_discriminator", twin, seed=0)
    results["random_sst2"] = probe(twin, corpora / "sst2", out / "random_init" / probe_dir, [1, 2, 3],
                                   args.probe_rows, args.probe_lr)
    header = (f"{datetime.date.today()}, torch {torch.__version__}, "
              f"{'GPU ' + torch.cuda.get_device_name() if args.gpu else f'{os.cpu_count()} CPU cores'}, "
              f"scale {'gpu' if args.gpu else 'cpu'}: {' '.join(scale['overrides'])}; SST-2 probe: "
              f"{args.probe_rows} phrases, 1 epoch, lr {args.probe_lr:g}, batch 32, seeds 1-3")
    results["header"] = header
    (out / "sharing_ablation.json").write_text(json.dumps(results, indent=1))
    report(results, header)


if __name__ == "__main__":
    main()
