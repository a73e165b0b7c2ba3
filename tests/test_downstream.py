"""Downstream evaluation (deberta_ds.downstream, python -m deberta_ds.evaluate): metrics against
scikit-learn / seqeval and the official SQuAD 2.0 rules on crafted predictions, readers of the
public layouts with their quirks and named errors, QA windows and first-sub-token NER labels,
and one suite run (classification, QA, NER; a baseline) whose saved models transformers loads
with the same predictions."""

import json
import statistics

import numpy as np
import pytest
import torch

from deberta_ds.downstream import metrics
from deberta_ds.downstream.readers import DataError, QAExample, TaggedSentence
from deberta_ds.downstream.report import table
from deberta_ds.downstream.tasks import TASKS, Settings, parse_tasks
from deberta_ds.evaluate import main as evaluate
from tests.downstream_helpers import GLUE_FOLDERS, conll_file, export_tiny_model, glue_folder, squad_file, write_lines


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):
    return export_tiny_model(tmp_path_factory.mktemp("model") / "hf", tokenizer_dir, dropout=0.0)


@pytest.fixture(scope="module")
def tokenizer(exported):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(exported)


def test_classification_and_entity_metrics_against_hand_computed_values():
    predicted, target = np.array([1, 1, 0, 0, 1, 0]), np.array([1, 0, 0, 0, 1, 1])  # tp 2, fp 1, fn 1, tn 2
    result = metrics.classification_scores(predicted, target, 2)
    assert result["accuracy"] == pytest.approx(4 / 6) and result["f1"] == pytest.approx(2 / 3)
    assert result["mcc"] == pytest.approx((2 * 2 - 1 * 1) / 3 / 3)
    three = metrics.classification_scores(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]), 3)
    assert three["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)  # macro: per-class F1 1, 2/3, 2/3
    regression = metrics.regression_scores(np.array([1.0, 2.0, 3.0, 5.0]), np.array([2.0, 4.0, 6.0, 8.0]))
    assert regression["spearman"] == pytest.approx(1.0)
    assert regression["pearson"] == pytest.approx(np.corrcoef([1, 2, 3, 5], [2, 4, 6, 8])[0, 1])
    # IOB1 as CoNLL-2003 writes it: I- starts an entity after O; B- only between two of one type.
    gold = [["I-PER", "I-PER", "O", "I-LOC"], ["I-ORG", "B-ORG", "O"]]
    guess = [["I-PER", "O", "O", "I-LOC"], ["I-ORG", "I-ORG", "O"]]  # 1 of 4 gold entities exact, of 3 guessed
    entities = metrics.entity_scores(guess, gold)
    assert entities["precision"] == pytest.approx(1 / 3) and entities["recall"] == pytest.approx(1 / 4)
    assert entities["f1"] == pytest.approx(2 / 7)


def test_squad_v2_follows_the_official_rules():
    """Normalisation (case, punctuation, articles, spaces), the best of several gold answers, an
    empty gold (unanswerable), and the no-answer threshold that maximises EM / F1 on the set."""
    assert metrics.normalize_answer("  The  Cat's, hat!") == "cats hat"
    assert metrics.token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    gold = {"a": ["Alice Smith", "alice"], "b": ["the Eiffel tower"], "c": [], "d": ["Rome"]}
    predicted = {"a": "Alice", "b": "Eiffel Tower!", "c": "Paris", "d": "Oslo"}
    no_answer = {"a": -2.0, "b": 1.0, "c": 3.0, "d": 0.5}  # > threshold: predict no answer
    scores = metrics.squad_v2_scores(gold, predicted, no_answer)
    # At threshold 0: a answered (EM 1 via "alice"), b, c, d abstain: c right (1), b and d wrong.
    assert scores["exact"] == pytest.approx(50.0) and scores["f1"] == pytest.approx(50.0)
    # Sweeping: answer a only -> 2/4; a, d -> 2/4; a, d, b -> 3/4 (best, threshold 1.0); all -> 3/4, not better.
    assert scores["best_exact"] == pytest.approx(75.0) and scores["best_exact_thresh"] == 1.0
    assert scores["best_f1"] == pytest.approx(75.0) and scores["best_f1_thresh"] == 1.0
    assert scores["HasAns_exact"] == pytest.approx(200 / 3) and scores["NoAns_exact"] == pytest.approx(100.0)


def test_report_gives_median_range_and_difference():
    runs = [{"task": "glue/rte", "model": name, "seed": seed, "scores": {"accuracy": value}}
            for name, values in (("model", [60.0, 70.0, 65.0]), ("random-init", [50.0, 52.0, 58.0]))
            for seed, value in enumerate(values, 1)]
    row = table(runs, [TASKS["glue/rte"]], "model", "random-init")["rows"][0]
    assert row["model"]["median"] == 65.0 and (row["model"]["min"], row["model"]["max"]) == (60.0, 70.0)
    assert row["baseline"]["median"] == 52.0 and row["difference"] == 13.0
    assert row["model"]["stdev"] == pytest.approx(statistics.stdev([60.0, 70.0, 65.0]))


def test_glue_layouts_with_their_quirks(tmp_path, capsys):
    for folder in GLUE_FOLDERS.values():
        glue_folder(tmp_path, folder, 40, 0)
    for name in GLUE_FOLDERS:
        train, evals = TASKS[name].load(tmp_path, Settings())
        assert len(train) == 40 and all(len(e) == 10 for e in evals.values()), name
        assert len(train.texts) == 40 and (train.pairs is None) == (name in ("glue/cola", "glue/sst2")), name
    assert "QQP/train.tsv: left out 1 malformed rows (lines [42])" in capsys.readouterr().err
    assert set(TASKS["glue/mnli"].load(tmp_path, Settings())[1]) == {"m", "mm"}
    assert TASKS["glue/stsb"].load(tmp_path, Settings())[0].labels[0] in (0.0, 2.5, 5.0)
    subsets = [TASKS["glue/sst2"].load(tmp_path, Settings(max_train_examples=7))[0] for _ in range(2)]
    assert len(subsets[0]) == 7 and subsets[0].texts == subsets[1].texts  # a fixed choice


def test_bad_data_is_named_by_file_row_and_column(tmp_path):
    glue_folder(tmp_path, "RTE", 8, 0)
    cases = []
    with pytest.raises(DataError, match="no folder CoLA or cola for glue/cola"):
        TASKS["glue/cola"].load(tmp_path, Settings())
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    cases.append(("glue/rte", r"RTE/dev.tsv:2: column 'label': 'maybe' is not one of the labels"))
    squad = squad_file(tmp_path / "squad2" / "train-v2.0.json", 3, 0)
    document = json.loads((tmp_path / "squad2" / "train-v2.0.json").read_text())
    document["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"] += 1
    (tmp_path / "squad2" / "train-v2.0.json").write_text(json.dumps(document))
    squad_file(tmp_path / "squad2" / "dev-v2.0.json", 3, 1)
    assert squad[1]["answers"]
    cases.append(("squad2", r"data\[0\].paragraphs\[1\].qas\[0\].answers\[0\]: text .* is not at answer_start"))
    conll_file(tmp_path / "conll2003" / "train.txt", 3, 0)
    write_lines(tmp_path / "conll2003" / "valid.txt", ["alice NNP I-NP I-PER", "met VB I-VP X-PER"])
    conll_file(tmp_path / "conll2003" / "test.txt", 3, 0)
    cases.append(("conll2003", r"valid.txt:2: column 4: tag 'X-PER' is not O, B-TYPE or I-TYPE"))
    for name, message in cases:
        with pytest.raises(DataError, match=message):
            TASKS[name].load(tmp_path, Settings())
    with pytest.raises(DataError, match="--tasks: unknown"):
        parse_tasks("glue/nope")
    assert [task.name for task in parse_tasks("glue,squad2")][-1] == "squad2" and len(parse_tasks("glue")) == 9


def test_long_contexts_become_overlapping_windows_that_point_at_the_answer(tokenizer):
    from deberta_ds.downstream.qa import qa_features

    context = " ".join(["values sorted"] * 40) + " written by alice . " + " ".join(["the caller"] * 40)
    start = context.index("alice")
    examples = [QAExample("q", "who wrote it ?", context, [("alice", start)]),
                QAExample("n", "who lives in rome ?", context, [])]
    features, windows = qa_features(tokenizer, examples, max_length=48, doc_stride=12, train=True)
    answered = [f for f, w in zip(features, windows) if w.example == 0 and f["start_positions"] > 0]
    assert sum(w.example == 0 for w in windows) > 3 and answered  # several windows; the answer inside some
    for feature in answered:
        span = feature["input_ids"][feature["start_positions"]:feature["end_positions"] + 1]
        assert tokenizer.decode(span).strip() == "alice"
    assert all(f["start_positions"] == f["end_positions"] == 0 for f, w in zip(features, windows) if w.example == 1)
    first, second = [w for w in windows if w.example == 0][:2]  # consecutive windows share doc_stride tokens
    first_context = [o for o in first.offsets if o is not None]
    second_context = [o for o in second.offsets if o is not None]
    assert first_context[-12:] == second_context[:12]


def test_ner_labels_the_first_sub_token_of_each_word(tokenizer):
    sentence = TaggedSentence(["unflinchingly", "alice", "met", "bob"], ["O", "I-PER", "O", "I-PER"])
    features, firsts = TASKS["conll2003"].features(tokenizer, [sentence], Settings(), train=True)
    labels, words = features[0]["labels"], firsts[0]
    encoded = tokenizer(sentence.words, is_split_into_words=True)
    assert len(encoded.input_ids) > len(sentence.words) + 2  # some word has several sub-tokens
    tags = TASKS["conll2003"].labels
    for position, word in enumerate(encoded.word_ids()):
        is_first = word is not None and (position == 0 or encoded.word_ids()[position - 1] != word)
        assert (words[position] == word) if is_first else words[position] is None
        assert labels[position] == (tags.index(sentence.tags[word]) if is_first else -100)


def test_suite_fine_tunes_scores_and_saves_models_transformers_loads(exported, tmp_path):
    """glue/sst2, squad2 and conll2003, 1 seed: each learns its cue; results.md / results.json
    hold every row; every run logs to TensorBoard and saves a HF folder whose Auto class (and
    pipeline, where transformers 5 has one) predicts as scored; the medians reach --tensorboard-dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "data"
    glue_folder(data, "SST-2", 96, 0)
    squad_file(data / "squad2" / "train-v2.0.json", 96, 0)
    questions = squad_file(data / "squad2" / "dev-v2.0.json", 24, 1)
    conll_file(data / "conll2003" / "train.txt", 96, 0)
    conll_file(data / "conll2003" / "valid.txt", 24, 1)
    conll_file(data / "conll2003" / "test.txt", 24, 2)
    out = tmp_path / "out"
    assert evaluate(["--model", str(exported), "--tasks", "glue/sst2,squad2,conll2003", "--data-dir", str(data),
                     "--seeds", "1", "--out", str(out), "--epochs", "4", "--lr", "3e-3", "--batch-size", "16",
                     "--max-length", "64", "--doc-stride", "16", "--no-progress", "--tensorboard-dir",
                     str(tmp_path / "tb"), "--tensorboard-step", "7"]) == 0
    report = json.loads((out / "results.json").read_text())
    rows = {(row["task"], row["metric"]): row for row in report["rows"]}
    assert set(rows) == {(task, metric) for task in ("glue/sst2", "squad2", "conll2003")
                         for metric in TASKS[task].shown}
    assert rows[("glue/sst2", "accuracy")]["model"]["median"] >= 90
    assert rows[("squad2", "best_f1")]["model"]["median"] >= 60  # abstaining everywhere: 33
    assert rows[("conll2003", "dev/f1")]["model"]["median"] >= 80
    assert "| squad2 | best_f1 |" in (out / "results.md").read_text()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("downstream/glue/sst2/accuracy")] == [7]
    runs = {run["task"]: out / "runs" / run["task"].replace("/", "_") / "model_seed1" for run in report["runs"]}
    for run_dir in runs.values():
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        assert "finetune/loss" in events.Tags()["scalars"] and (run_dir / "model" / "config.json").is_file()
    check_saved_classifier(runs["glue/sst2"], data)
    check_saved_tagger(runs["conll2003"], data)
    check_saved_reader(runs["squad2"], questions)


def test_baseline_random_init_has_fresh_weights_per_seed_and_a_difference_column(exported, tmp_path):
    from safetensors.torch import load_file

    glue_folder(tmp_path / "data", "SST-2", 32, 0)
    out = tmp_path / "out"
    assert evaluate(["--model", str(exported), "--tasks", "glue/sst2", "--data-dir", str(tmp_path / "data"),
                     "--baseline", "random-init", "--seeds", "2", "--out", str(out), "--epochs", "1",
                     "--batch-size", "16", "--max-length", "32", "--no-progress"]) == 0
    report = json.loads((out / "results.json").read_text())
    row = report["rows"][0]
    assert row["model"]["seeds"] == row["baseline"]["seeds"] == 2
    assert row["difference"] == pytest.approx(row["model"]["median"] - row["baseline"]["median"])
    assert "| random-init: median (range) | difference |" in (out / "results.md").read_text()
    key = "deberta.embeddings.word_embeddings.weight"
    weights = {name: load_file(out / "runs" / "glue_sst2" / f"{name}/model/model.safetensors")[key]
               for name in ("model_seed1", "random-init_seed1", "random-init_seed2")}
    assert not torch.equal(weights["random-init_seed1"], weights["random-init_seed2"])
    assert (weights["model_seed1"] - weights["random-init_seed1"]).abs().max() > 0.01


def check_saved_classifier(run_dir, data):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    texts = [line.split("\t")[0] for line in (data / "SST-2" / "dev.tsv").read_text().splitlines()[1:]]
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    with torch.no_grad():
        predicted = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
    scored = json.loads((run_dir / "metrics.json").read_text())["scores"]["accuracy"]
    gold = [int(line.split("\t")[1]) for line in (data / "SST-2" / "dev.tsv").read_text().splitlines()[1:]]
    assert 100 * np.mean(np.array(predicted) == np.array(gold)) == pytest.approx(scored)
    labels = [result["label"] for result in pipeline("text-classification", model=str(run_dir / "model"))(texts)]
    assert labels == [model.config.id2label[p] for p in predicted]


def check_saved_tagger(run_dir, data):
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    from deberta_ds.downstream.readers import read_conll

    sentences = read_conll(data / "conll2003" / "valid.txt")[:10]
    model = AutoModelForTokenClassification.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    tagger = pipeline("token-classification", model=str(run_dir / "model"))
    for sentence in sentences:
        encoded = tokenizer(sentence.words, is_split_into_words=True, return_tensors="pt")
        assert encoded.input_ids[0].tolist() == tokenizer(" ".join(sentence.words)).input_ids
        with torch.no_grad():
            labels = model(**encoded).logits[0].argmax(-1).tolist()
        expected = {position: model.config.id2label[label] for position, label in enumerate(labels)
                    if model.config.id2label[label] != "O"}
        assert {entity["index"]: entity["entity"] for entity in tagger(" ".join(sentence.words))} == expected


def check_saved_reader(run_dir, questions):
    """transformers 5 has no question-answering pipeline: the reloaded Auto model's answers
    (through the same windows and span choice) equal the scored ones."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from deberta_ds.downstream.loop import Placement, predict
    from deberta_ds.downstream.qa import qa_features, qa_predictions

    model = AutoModelForQuestionAnswering.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    examples = [QAExample(q["id"], q["question"], q["context"], [(a["text"], a["answer_start"]) for a in q["answers"]])
                for q in questions]
    features, windows = qa_features(tokenizer, examples, 64, 16, train=False)
    outputs = predict(model, features, tokenizer.pad_token_id, 8, Placement(torch.device("cpu")), False,
                      ("start_logits", "end_logits"), token_level=True)
    answers, no_answer = qa_predictions(examples, windows, outputs, 30)
    golds = {e.id: [text for text, _ in e.answers] for e in examples}
    scored = json.loads((run_dir / "metrics.json").read_text())["scores"]
    assert metrics.squad_v2_scores(golds, answers, no_answer)["best_f1"] == pytest.approx(scored["best_f1"])


def test_downstream_during_training_runs_in_the_background_and_logs(tmp_path, tokenizer_dir):
    """eval.downstream's rank-0 hook: a due checkpoint (here a native one; a run's step folders
    go the same way) starts deberta_ds.evaluate in its own process; a checkpoint due while it runs
    is skipped; its end is logged, its medians reach the run's TensorBoard at the step; a suite
    that fails is logged with its log file and raises nothing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deberta_ds.config import RTDConfig, preset
    from deberta_ds.downstream.in_training import DownstreamDuringTraining
    from deberta_ds.errors import UserError
    from deberta_ds.model import ReplacedTokenDetection
    from deberta_ds.native_checkpoint import save_native
    from deberta_ds.training.run_config import DownstreamSection

    save_native(ReplacedTokenDetection(RTDConfig(discriminator=preset("tiny"), mask_token_id=1000)), tmp_path / "ckpt")
    glue_folder(tmp_path / "data", "SST-2", 32, 0)
    settings = DownstreamSection(every=2, tasks="glue/sst2", data_dir=str(tmp_path / "data"),
                                 arguments=["--tokenizer", str(tokenizer_dir), "--epochs", "1", "--batch-size", "8",
                                            "--max-length", "32"])
    lines = []
    hook = DownstreamDuringTraining(settings, tmp_path / "run", lines.append, enabled=True)
    hook.checkpoint_saved(3, tmp_path / "ckpt")  # not a multiple of every: nothing
    hook.checkpoint_saved(4, tmp_path / "ckpt")
    hook.checkpoint_saved(6, tmp_path / "ckpt")  # the step-4 suite still runs: skipped
    assert hook.running.process.wait(timeout=600) == 0, (tmp_path / "run/downstream/step_00000004.log").read_text()
    hook.close()
    assert "step 6 skipped, the evaluation of step 4 is still running" in lines[1]
    assert lines[-1].endswith("step 4 evaluated: " + str(tmp_path / "run/downstream/step_00000004/results.md"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("downstream/glue/sst2/accuracy")] == [4]
    broken = DownstreamSection(every=2, tasks="glue/nope", data_dir=str(tmp_path / "data"))
    hook = DownstreamDuringTraining(broken, tmp_path / "run", lines.append, enabled=True)
    hook.checkpoint_saved(8, tmp_path / "ckpt")
    assert hook.running.process.wait(timeout=300) == 1
    hook.close()
    assert "the evaluation of step 8 failed (exit code 1); see" in lines[-1]
    assert "--tasks: unknown" in (tmp_path / "run/downstream/step_00000008.log").read_text()
    with pytest.raises(UserError, match="eval.downstream.data_dir"):
        DownstreamSection(every=5, tasks="glue/rte", data_dir=str(tmp_path / "missing"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (launch_scripts/gpu_check.sh)")
def test_bf16_and_compile_on_the_gpu_learn_like_fp32(exported, tmp_path):
    """On the GPU, as in pre-training: bf16 autocast and torch.compile fine-tune to the same
    learnt cue as fp32 (accuracy >= 90 each)."""
    glue_folder(tmp_path / "data", "SST-2", 160, 0)
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert evaluate(["--model", str(exported), "--tasks", "glue/sst2", "--data-dir", str(tmp_path / "data"),
                         "--seeds", "1", "--out", str(out), "--epochs", "4", "--lr", "2e-3", "--batch-size", "16",
                         "--max-length", "64", "--precision", precision, "--no-progress"]
                        + (["--compile"] if precision == "bf16" else [])) == 0
        report = json.loads((out / "results.json").read_text())
        assert report["rows"][0]["model"]["median"] >= 90, precision


@pytest.mark.slow
def test_a_training_run_with_eval_downstream_evaluates_its_checkpoints(train_shards, tmp_path):
    """`eval.downstream` in the run config: the trainer (python -m deberta_ds.train) starts the
    suite on its step-2 checkpoint in the background and finishes without waiting; the suite
    exports that training checkpoint with the run's tokenizer and logs its median at step 2."""
    import os
    import re
    import sys
    import time
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.proc_helpers import run_bounded
    from tests.train_helpers import tiny_run

    glue_folder(tmp_path / "data", "SST-2", 32, 0)
    downstream = {"every": 2, "tasks": "glue/sst2", "data_dir": str(tmp_path / "data"),
                  "arguments": ["--epochs", "1", "--batch-size", "8", "--max-length", "32"]}
    run = tiny_run(train_shards, tmp_path / "run", train={"steps": 4, "save_every": 2}, eval={"downstream": downstream})
    (tmp_path / "c.json").write_text(json.dumps(run))
    result = run_bounded([sys.executable, "-m", "deberta_ds.train", "--config", str(tmp_path / "c.json")],
                         cwd=Path(__file__).resolve().parents[1])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    pid = int(re.search(r"eval.downstream: evaluating step 2 in the background \(pid (\d+)", output).group(1))
    deadline = time.monotonic() + 300
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:  # the suite outlives the trainer
        time.sleep(1)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, 9)
        raise AssertionError("the downstream suite of step 2 did not finish within 300 s")
    log = (tmp_path / "run" / "downstream" / "step_00000002.log").read_text()
    assert (tmp_path / "run" / "downstream" / "step_00000002" / "results.md").is_file(), log[-3000:]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert 2 in [e.step for e in events.Scalars("downstream/glue/sst2/accuracy")]
