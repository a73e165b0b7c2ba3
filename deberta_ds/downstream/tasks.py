"""The downstream tasks: where each one's files are under --data-dir, how they are read and
tokenised, which head fine-tunes it and how it is scored. Scores are in percent.

Three families: sentence (pair) classification or regression (GLUE, AG News) with
AutoModelForSequenceClassification; extractive QA with unanswerable questions (SQuAD 2.0) with
AutoModelForQuestionAnswering, contexts longer than the window cut into windows overlapping by
`doc_stride` tokens; and token classification (CoNLL-2003) with AutoModelForTokenClassification,
each word labelled on its first sub-token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deberta_ds.downstream import metrics
from deberta_ds.downstream.loop import IGNORE
from deberta_ds.downstream.qa import qa_features, qa_predictions
from deberta_ds.downstream.readers import DataError, Examples, read_conll, read_examples, read_squad


@dataclass
class Settings:
    """What the tasks take from the command line besides the training recipe."""

    max_length: int | None = None        # None: the task's default
    doc_stride: int = 128                # QA: tokens shared by consecutive windows of a long context
    max_answer_length: int = 30          # QA: longest answer span, in tokens
    max_train_examples: int | None = None
    max_eval_examples: int | None = None


def subsample(items, limit: int | None):
    """At most `limit` items, a fixed random choice in their original order (every seed and model alike)."""
    if limit is None or len(items) <= limit:
        return items
    chosen = sorted(np.random.default_rng(0).choice(len(items), limit, replace=False))
    return items.subset(chosen) if isinstance(items, Examples) else [items[i] for i in chosen]


def find_file(folder: Path, names: list[str], task: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no {' or '.join(names)} for {task}")


@dataclass
class Task:
    name: str
    folders: list[str]                      # under --data-dir: the public name first, then aliases
    train_files: list[str]                  # the first that exists
    eval_files: dict[str, list[str]]        # evaluation set name -> candidate file names
    shown: list[str]                        # the metrics of the table (eval sets prefixed when several)
    default_max_length: int = 128

    def folder(self, data_dir: Path) -> Path:
        for name in self.folders:
            if (data_dir / name).is_dir():
                return data_dir / name
        raise DataError(f"--data-dir {data_dir}: no folder {' or '.join(self.folders)} for {self.name} (expected "
                        f"{data_dir / self.folders[0] / self.train_files[0]})")

    def load(self, data_dir: Path, settings: Settings) -> tuple[object, dict]:
        """(training data, {evaluation set: data}), each cut to the example limits."""
        folder = self.folder(data_dir)
        train = subsample(self.read(find_file(folder, self.train_files, self.name)), settings.max_train_examples)
        evals = {name: subsample(self.read(find_file(folder, names, self.name)), settings.max_eval_examples)
                 for name, names in self.eval_files.items()}
        return train, evals

    def max_length(self, settings: Settings) -> int:
        return settings.max_length or self.default_max_length

    def scored(self, per_set: dict[str, dict]) -> dict:
        """One flat dict of every evaluation set's scores (prefixed by the set's name when several)."""
        if len(per_set) == 1:
            return next(iter(per_set.values()))
        return {f"{name}/{metric}": value for name, scores in per_set.items() for metric, value in scores.items()}


def sequence_head_arguments(classes: list[str] | None) -> dict:
    """AutoModelForSequenceClassification's arguments: the classes in id order, or None (regression)."""
    if classes is None:
        return {"num_labels": 1, "problem_type": "regression"}
    return {"num_labels": len(classes), "problem_type": "single_label_classification",
            "id2label": dict(enumerate(classes)), "label2id": {name: i for i, name in enumerate(classes)}}


def sequence_features(tokenizer, examples: Examples, classes: list[str] | None, max_length: int) -> list[dict]:
    encoded = tokenizer(examples.texts, examples.pairs, truncation=True, max_length=max_length)
    targets = examples.labels if classes is None else [classes.index(label) for label in examples.labels]
    return [{"input_ids": ids, "attention_mask": mask, "labels": target}
            for ids, mask, target in zip(encoded["input_ids"], encoded["attention_mask"], targets)]


def sequence_scores(outputs: list[dict], examples: Examples, classes: list[str] | None) -> dict:
    """accuracy, F1 and MCC (classification), Pearson and Spearman (regression), as fractions."""
    logits = np.stack([output["logits"] for output in outputs])
    if classes is None:
        return metrics.regression_scores(logits[:, 0], np.asarray(examples.labels))
    targets = np.array([classes.index(label) for label in examples.labels])
    return metrics.classification_scores(logits.argmax(-1), targets, len(classes))


@dataclass
class SequenceTask(Task):
    """Sentence or sentence-pair classification (labels: the classes in id order) or regression (None)."""

    text: str = "sentence"
    pair: str | None = None
    label: str = "label"
    labels: list[str] | None = None
    columns: list[str] | None = None        # a headerless file's columns
    quoting: bool = False
    skip_malformed: bool = False
    head: str = "AutoModelForSequenceClassification"
    outputs: tuple = ("logits",)
    token_level: bool = False

    def read(self, path: Path) -> Examples:
        return read_examples(path, self.text, self.pair, self.label, self.labels is None, self.labels, self.columns,
                             self.quoting, self.skip_malformed)

    def head_arguments(self) -> dict:
        return sequence_head_arguments(self.labels)

    def features(self, tokenizer, examples: Examples, settings: Settings, train: bool) -> tuple[list[dict], None]:
        return sequence_features(tokenizer, examples, self.labels, self.max_length(settings)), None

    def score(self, outputs: list[dict], examples: Examples, extra, settings: Settings) -> dict:
        return {name: 100 * value for name, value in sequence_scores(outputs, examples, self.labels).items()}


@dataclass
class QuestionAnsweringTask(Task):
    head: str = "AutoModelForQuestionAnswering"
    outputs: tuple = ("start_logits", "end_logits")
    token_level: bool = True

    def read(self, path: Path):
        return read_squad(path)

    def head_arguments(self) -> dict:
        return {}

    def features(self, tokenizer, examples, settings: Settings, train: bool):
        return qa_features(tokenizer, examples, self.max_length(settings), settings.doc_stride, train)

    def score(self, outputs: list[dict], examples, windows, settings: Settings) -> dict:
        answers, no_answer = qa_predictions(examples, windows, outputs, settings.max_answer_length)
        return metrics.squad_v2_scores({e.id: [text for text, _ in e.answers] for e in examples}, answers, no_answer)


@dataclass
class TokenTask(Task):
    labels: list[str] = field(default_factory=list)
    head: str = "AutoModelForTokenClassification"
    outputs: tuple = ("logits",)
    token_level: bool = True

    def read(self, path: Path):
        sentences = read_conll(path)
        unknown = sorted({tag for sentence in sentences for tag in sentence.tags} - set(self.labels))
        if unknown:
            raise DataError(f"{path}: tags {unknown[:5]} are not CoNLL-2003's ({self.labels})")
        return sentences

    def head_arguments(self) -> dict:
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {name: i for i, name in enumerate(self.labels)}}

    def features(self, tokenizer, sentences, settings: Settings, train: bool) -> tuple[list[dict], list]:
        """Sub-token features; a word's tag on its first sub-token, IGNORE elsewhere. The second
        item: each feature's word index per token (None: special token or later sub-token)."""
        encoded = tokenizer([s.words for s in sentences], is_split_into_words=True, truncation=True,
                            max_length=self.max_length(settings))
        features, firsts = [], []
        for row, sentence in enumerate(sentences):
            words, previous, first = encoded.word_ids(row), None, []
            for word in words:
                first.append(word if word is not None and word != previous else None)
                previous = word
            features.append({"input_ids": encoded["input_ids"][row], "attention_mask": encoded["attention_mask"][row],
                             "labels": [IGNORE if w is None else self.labels.index(sentence.tags[w]) for w in first]})
            firsts.append(first)
        return features, firsts

    def score(self, outputs: list[dict], sentences, firsts, settings: Settings) -> dict:
        """Entity F1 over whole sentences: a word cut off by max_length is predicted O."""
        predicted = []
        for output, sentence, first in zip(outputs, sentences, firsts):
            tags = ["O"] * len(sentence.words)
            for position, word in enumerate(first):
                if word is not None:
                    tags[word] = self.labels[int(output["logits"][position].argmax())]
            predicted.append(tags)
        return {name: 100 * value for name, value in
                metrics.entity_scores(predicted, [s.tags for s in sentences]).items()}


def glue(name, folder, shown, **reading) -> SequenceTask:
    return SequenceTask(f"glue/{name}", [folder, name], ["train.tsv"], {"dev": ["dev.tsv"]}, shown, **reading)


BINARY = ["0", "1"]
NLI = ["entailment", "not_entailment"]
CONLL_TAGS = ["O"] + [f"{p}-{t}" for t in ("PER", "ORG", "LOC", "MISC") for p in ("B", "I")]
TASKS = {task.name: task for task in [
    glue("cola", "CoLA", ["mcc"], labels=BINARY, columns=["source", "label", "original_label", "sentence"]),
    glue("sst2", "SST-2", ["accuracy"], labels=BINARY),
    glue("mrpc", "MRPC", ["f1", "accuracy"], text="#1 String", pair="#2 String", label="Quality", labels=BINARY),
    glue("stsb", "STS-B", ["pearson", "spearman"], text="sentence1", pair="sentence2", label="score"),
    glue("qqp", "QQP", ["f1", "accuracy"], text="question1", pair="question2", label="is_duplicate", labels=BINARY,
         skip_malformed=True),
    SequenceTask("glue/mnli", ["MNLI", "mnli"], ["train.tsv"], {"m": ["dev_matched.tsv"],
                                                                 "mm": ["dev_mismatched.tsv"]},
                 ["m/accuracy", "mm/accuracy"], text="sentence1", pair="sentence2", label="gold_label",
                 labels=["contradiction", "entailment", "neutral"]),
    glue("qnli", "QNLI", ["accuracy"], text="question", pair="sentence", labels=NLI),
    glue("rte", "RTE", ["accuracy"], text="sentence1", pair="sentence2", labels=NLI),
    glue("wnli", "WNLI", ["accuracy"], text="sentence1", pair="sentence2", labels=BINARY),
    SequenceTask("agnews", ["agnews", "ag_news"], ["train.tsv", "dev.tsv"], {"test": ["test.tsv"]},
                 ["accuracy", "f1"], text="text", columns=["text", "label"],
                 labels=["World", "Sports", "Business", "Sci/Tech"]),
    QuestionAnsweringTask("squad2", ["squad2", "SQuAD2"], ["train-v2.0.json"], {"dev": ["dev-v2.0.json"]},
                          ["best_exact", "best_f1", "HasAns_f1", "NoAns_f1"], default_max_length=384),
    TokenTask("conll2003", ["conll2003", "CoNLL2003"], ["train.txt", "eng.train"],
              {"dev": ["valid.txt", "eng.testa"], "test": ["test.txt", "eng.testb"]}, ["dev/f1", "test/f1"],
              labels=CONLL_TAGS),
]}


def parse_tasks(text: str) -> list[Task]:
    """--tasks: comma-separated names; `glue` stands for its nine tasks."""
    names = []
    for name in (part.strip() for part in text.split(",") if part.strip()):
        names += [n for n in TASKS if n.startswith("glue/")] if name == "glue" else [name]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise DataError(f"--tasks: unknown {unknown or text!r}; choose from glue, {', '.join(TASKS)}")
    return [TASKS[name] for name in dict.fromkeys(names)]
