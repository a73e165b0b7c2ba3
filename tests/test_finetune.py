"""python -m deberta_ds.finetune on small files made here: a tiny exported model learns a lexical
cue (classification from TSV, sentence pairs from JSONL, regression from CSV), saves its best
epoch in HF format, and bad inputs are named. Metrics are checked against hand-computed values."""

import csv
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deberta_ds.downstream.metrics import classification_scores
from deberta_ds.errors import UserError
from deberta_ds.finetune import Examples, hold_out
from deberta_ds.finetune import main as finetune
from tests.downstream_helpers import export_tiny_model
from tests.proc_helpers import run_bounded


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):
    return export_tiny_model(tmp_path_factory.mktemp("model") / "hf", tokenizer_dir)


def cue_examples(count: int, seed: int, cues=("good", "bad")) -> list[tuple[str, str]]:
    """(text, label): the label is the text's first word, followed by random words."""
    words = "the list of values is sorted when a function returns its result to the caller".split()
    rng = random.Random(seed)
    return [(f"{cue} " + " ".join(rng.choices(words, k=rng.randint(3, 12))), cue)
            for cue in rng.choices(cues, k=count)]


def write_tsv(path, rows, header=("sentence", "label")):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(row) + "\n" for row in rows))
    return path


def run(exported, tmp_path, train, valid, *extra, test=None):
    args = ["--model", str(exported), "--train", str(train), "--valid", str(valid), "--out", str(tmp_path / "out"),
            "--epochs", "3", "--batch-size", "16", "--lr", "1e-3", "--max-length", "32", "--no-progress", *extra]
    return finetune(args + (["--test", str(test)] if test else []))


def test_classification_learns_and_saves_the_best_epoch(exported, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train = write_tsv(tmp_path / "train.tsv", cue_examples(240, 0))
    valid = write_tsv(tmp_path / "dev.tsv", cue_examples(60, 1))
    test = write_tsv(tmp_path / "test.tsv", cue_examples(60, 2))
    assert run(exported, tmp_path, train, valid, test=test) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["labels"] == ["bad", "good"] and len(metrics["valid"]) == 3
    assert metrics["best"]["accuracy"] >= 0.95 and metrics["test"]["accuracy"] >= 0.9
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "best").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "best")
    texts, labels = zip(*cue_examples(60, 2))
    with torch.no_grad():
        predicted = model(**tokenizer(list(texts), padding=True, return_tensors="pt")).logits.argmax(-1).numpy()
    targets = np.array([metrics["labels"].index(label) for label in labels])
    assert classification_scores(predicted, targets, 2)["accuracy"] == pytest.approx(metrics["test"]["accuracy"])


def test_sentence_pairs_from_jsonl_and_regression_from_csv(exported, tmp_path):
    def pairs(count, seed):
        return [{"first": text, "second": f"{label} answer", "label": int(label == "good")}
                for text, label in cue_examples(count, seed)]
    for name, count, seed in (("train", 240, 3), ("dev", 60, 4)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pairs(count, seed)))
    assert run(exported, tmp_path, tmp_path / "train.jsonl", tmp_path / "dev.jsonl", "--text-column", "first",
               "--pair-column", "second") == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["best"]["accuracy"] >= 0.95
    for name, count, seed in (("train", 240, 5), ("dev", 60, 6)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "score"])
            writer.writerows([(text, 1.0 if label == "good" else 0.0) for text, label in cue_examples(count, seed)])
    assert run(exported, tmp_path, tmp_path / "train.csv", tmp_path / "dev.csv", "--task", "regression",
               "--text-column", "text", "--label-column", "score") == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["best"]["pearson"] >= 0.8


def test_a_file_without_header_with_a_held_out_fraction_logs_to_tensorboard(exported, tmp_path):
    """AG News' layout (text<TAB>label, no header line, no validation file): --columns names the
    columns, --valid-fraction holds out a quarter; four classes are learnt and the loss, learning
    rate and every epoch's scores reach TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = cue_examples(320, 7, cues=("world", "sports", "business", "tech"))
    train = tmp_path / "news.tsv"
    train.write_text("".join(f"{text}\t{label}\n" for text, label in rows))
    assert finetune(["--model", str(exported), "--train", str(train), "--valid-fraction", "0.25", "--columns",
                     "text,label", "--text-column", "text", "--out", str(tmp_path / "out"), "--epochs", "6",
                     "--batch-size", "16", "--lr", "1e-3", "--max-length", "32", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["examples"] == {"train": 240, "valid": 80}
    assert metrics["labels"] == ["business", "sports", "tech", "world"] and metrics["best"]["accuracy"] >= 0.9
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("finetune/loss")] == list(range(10, 91, 10))  # 15 steps an epoch
    learning_rates = [event.value for event in events.Scalars("finetune/lr")]
    assert learning_rates[-1] == pytest.approx(0.0) and max(learning_rates) <= 1e-3
    logged = [event.value for event in events.Scalars("valid/accuracy")]
    assert logged == pytest.approx([epoch["accuracy"] for epoch in metrics["valid"]])


def test_held_out_split_is_a_fixed_partition():
    examples = Examples([f"text {i}" for i in range(50)], None, [str(i % 2) for i in range(50)])
    train, valid = hold_out(examples, 0.2, "x.tsv")
    again, _ = hold_out(examples, 0.2, "x.tsv")
    assert len(valid.texts) == 10 and sorted(train.texts + valid.texts) == sorted(examples.texts)
    assert train.texts == again.texts
    assert [int(text.split()[1]) % 2 for text in valid.texts] == [int(label) for label in valid.labels]
    for fraction in (0.0, 1.0):
        with pytest.raises(UserError, match=f"--valid-fraction {fraction}: holds out"):
            hold_out(examples, fraction, "x.tsv")


def test_bad_inputs_are_named(exported, tmp_path, capsys):
    train = write_tsv(tmp_path / "train.tsv", cue_examples(20, 0))
    (tmp_path / "bare.tsv").write_text("good one\tgood\nbad two\tbad\n")
    (tmp_path / "shifted.tsv").write_text("sentence\tlabel\ngood one\tgood\nbad\tone\tbad\n")
    cases = [
        (write_tsv(tmp_path / "cols.tsv", [("x", "good")], header=("text", "label")), "no column 'sentence'"),
        (write_tsv(tmp_path / "odd.tsv", [("x", "good"), ("y", "great")]), "odd.tsv:3: column 'label': 'great'"),
        (write_tsv(tmp_path / "empty.tsv", []), "empty.tsv: no examples"),
        (tmp_path / "bare.tsv", "name its columns with --columns"),
        (tmp_path / "shifted.tsv", "shifted.tsv:3: 3 fields, the header has 2"),
    ]
    for valid, message in cases:
        assert run(exported, tmp_path, train, valid) == 1
        assert message in capsys.readouterr().err
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert finetune(["--model", str(bert), "--train", str(train), "--valid", str(train),
                     "--out", str(tmp_path / "o")]) == 1
    assert "model_type 'bert' is not a DeBERTa-v2/v3 checkpoint" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((exported / "config.json").read_text())
    assert finetune(["--model", str(bare), "--train", str(train), "--valid", str(train),
                     "--out", str(tmp_path / "o")]) == 1
    assert "holds no tokenizer" in capsys.readouterr().err


def test_finetune_gain_benchmark_compares_with_a_fresh_twin_per_seed(exported, tmp_path):
    """benchmarks/finetune_gain.py: every seed fine-tunes the model and a random twin of its shape
    (its own weights per seed, the model's tokenizer) and the table reports both."""
    from safetensors.torch import load_file

    data = tmp_path / "data"
    data.mkdir()
    for name, seed in (("train", 0), ("dev", 1), ("test", 2)):
        write_tsv(data / f"{name}.tsv", cue_examples(64, seed))
    repo = Path(__file__).resolve().parents[1]
    result = run_bounded([sys.executable, "benchmarks/finetune_gain.py", "--model", str(exported), "--data",
                          str(data), "--out", str(tmp_path / "gain"), "--seeds", "1", "2"], cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((tmp_path / "gain" / "finetune_gain.json").read_text())
    assert [row["seed"] for row in runs["pre-trained"]] == [1, 2] == [row["seed"] for row in runs["random init"]]
    assert "| pre-trained |" in result.stdout and "| random init |" in result.stdout
    assert "per seed:" in result.stdout
    weights = [load_file(tmp_path / "gain" / f"random_seed{seed}" / "model.safetensors") for seed in (1, 2)]
    original = load_file(exported / "model.safetensors")
    key = next(k for k in original if "word_embeddings" in k)
    assert weights[0][key].shape == original[key].shape
    assert not torch.equal(weights[0][key], weights[1][key]) and not torch.equal(weights[0][key], original[key])
    assert (tmp_path / "gain" / "random_seed1" / "tokenizer.json").read_bytes() == \
        (exported / "tokenizer.json").read_bytes()
    # Files named one by one, with the other options passed on to deberta_ds.finetune (AG News' way).
    for name in ("train", "test"):
        lines = (data / f"{name}.tsv").read_text().splitlines(keepends=True)[1:]
        (data / f"bare_{name}.tsv").write_text("".join(lines))
    result = run_bounded([sys.executable, "benchmarks/finetune_gain.py", "--model", str(exported), "--train",
                          str(data / "bare_train.tsv"), "--test", str(data / "bare_test.tsv"), "--valid-fraction",
                          "0.25", "--columns", "text,label", "--text-column", "text", "--out",
                          str(tmp_path / "bare"), "--seeds", "1"], cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "bare" / "pre-trained_seed1" / "metrics.json").read_text())
    assert metrics["examples"] == {"train": 48, "valid": 16} and "test" in metrics


def test_bad_inputs_fail_before_training_with_a_named_error(exported, tmp_path, capsys):
    """Issue 33 item 11: each of these used to end in a traceback, be accepted silently, or be
    found only after training; now each is refused, naming the flag, file, line or column, before
    a step is taken (no output folder appears)."""
    train = write_tsv(tmp_path / "train.tsv", cue_examples(20, 0))
    (tmp_path / "latin1.tsv").write_bytes("sentence\tlabel\ncaf\xe9 good\tgood\n".encode("latin-1"))
    (tmp_path / "list.jsonl").write_text('{"sentence": "a", "label": "good"}\n["a", "good"]\n')
    (tmp_path / "nolabel.jsonl").write_text('{"sentence": "a", "label": "good"}\n{"sentence": "b"}\n')
    (tmp_path / "nan.tsv").write_text("sentence\tlabel\na\t1.0\nb\tnan\n")
    one_class = write_tsv(tmp_path / "one.tsv", [("good one", "good"), ("good two", "good")])
    odd_test = write_tsv(tmp_path / "odd.tsv", [("x", "great")])
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / name).write_bytes((exported / name).read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    cases = [
        (["--valid", str(tmp_path / "latin1.tsv")], "latin1.tsv:2: not UTF-8"),
        (["--valid", str(tmp_path / "list.jsonl")], "list.jsonl:2: a list, not an object"),
        (["--valid", str(tmp_path / "nolabel.jsonl")], "nolabel.jsonl:2: no column 'label'"),
        (["--valid", str(train), "--lr", "nan"], "--lr: must be a finite number > 0"),
        (["--valid", str(train), "--lr", "-1"], "--lr: must be a finite number > 0"),
        (["--valid", str(train), "--warmup-ratio", "5"], "--warmup-ratio: must be in [0, 1]"),
        (["--valid", str(train), "--out", str(a_file)], "is a file"),
        (["--valid", str(train), "--model", str(pickled)], "holds pytorch_model.bin, a pickle"),
        (["--valid", str(train), "--labels", "bad,good,good"], "['good'] named more than once"),
        (["--valid", str(one_class), "--train", str(one_class)], "holds one class only"),
        (["--train", str(tmp_path / "nan.tsv"), "--valid", str(tmp_path / "nan.tsv"), "--task", "regression"],
         "nan.tsv:3: column 'label': 'nan' is not a finite number"),
        (["--valid", str(train), "--test", str(odd_test)], "odd.tsv:2: column 'label': 'great' is not one of the "
                                                           "labels ['bad', 'good']"),
    ]
    for flags, message in cases:
        args = ["--model", str(exported), "--train", str(train), "--out", str(tmp_path / "out"), "--no-progress"]
        assert finetune(args + flags) == 1, flags
        assert message in capsys.readouterr().err, flags
        assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        finetune(["--model", str(exported), "--train", str(train), "--valid-fraction", "nan", "--out", "x"])
    assert "--valid-fraction must be between 0 and 1" in capsys.readouterr().err
    (tmp_path / "bom.tsv").write_bytes("\ufeffsentence\tlabel\nx\tgood\n".encode())  # a BOM before the header
    from deberta_ds.downstream.readers import read_examples
    assert read_examples(tmp_path / "bom.tsv", "sentence", None, "label", False).texts == ["x"]


@pytest.mark.slow
def test_two_data_parallel_ranks_through_torchrun_train_as_one_process(tmp_path, tokenizer_dir):
    """torchrun with 2 CPU ranks (gloo): each global batch of 16 is split 8 / 8 and the gradients
    averaged, so with dropout off the two ranks fine-tune the same model as one process does
    (weights within 1e-4, validation scores equal); rank 0 alone writes the output."""
    from safetensors.torch import load_file

    from deberta_ds.parallel_env import free_port

    model = export_tiny_model(tmp_path / "hf", tokenizer_dir, dropout=0.0)
    train = write_tsv(tmp_path / "train.tsv", cue_examples(64, 0))
    valid = write_tsv(tmp_path / "dev.tsv", cue_examples(24, 1))
    common = ["-m", "deberta_ds.finetune", "--model", str(model), "--train", str(train), "--valid", str(valid),
              "--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--max-length", "32", "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[1]
    single = run_bounded([sys.executable, *common, "--out", str(tmp_path / "one")], cwd=repo, env=environment)
    assert single.returncode == 0, single.stderr[-3000:]
    launched = run_bounded([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(free_port()), *common, "--out", str(tmp_path / "two")], cwd=repo, env=environment)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, two = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two"))
    assert [epoch["accuracy"] for epoch in one["valid"]] == [epoch["accuracy"] for epoch in two["valid"]]
    weights = [load_file(tmp_path / name / "best" / "model.safetensors") for name in ("one", "two")]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) <= 1e-4
