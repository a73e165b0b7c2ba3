"""Small downstream data in the public layouts (GLUE folders with their quirks, SQuAD 2.0 JSON,
CoNLL-2003 column files, AG News), made of learnable cues, and a tiny exported model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = "the list of values is sorted when a function returns its result to the caller".split()
NAMES = ["alice", "bob", "carol", "dave"]
PLACES = ["paris", "rome", "oslo", "lima"]


def export_tiny_model(folder: Path, tokenizer_dir, dropout: float = 0.1) -> Path:
    """A tiny random RTD discriminator exported to HF format with its tokenizer."""
    from deberta_ds.config import RTDConfig, preset
    from deberta_ds.convert import to_hf
    from deberta_ds.hf_tokenizer import write_hf_tokenizer
    from deberta_ds.model import ReplacedTokenDetection

    torch.manual_seed(0)
    config = preset("tiny", hidden_dropout=dropout, attention_dropout=dropout)
    to_hf(ReplacedTokenDetection(RTDConfig(discriminator=config, mask_token_id=1000)), folder)
    write_hf_tokenizer(tokenizer_dir, folder)
    return folder


def filler(rng: random.Random, low: int = 3, high: int = 10) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def cue_rows(count: int, seed: int, cues=("good", "bad")) -> list[tuple[str, str]]:
    """(text, cue): the text starts with its cue word."""
    rng = random.Random(seed)
    return [(f"{cue} {filler(rng)}", cue) for cue in rng.choices(cues, k=count)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def glue_folder(root: Path, task: str, count: int, seed: int) -> None:
    """One GLUE task's train.tsv and dev.tsv (MNLI: dev_matched / dev_mismatched) in its columns;
    the label follows a cue word of the first sentence."""
    splits = {"MNLI": ["train", "dev_matched", "dev_mismatched"]}.get(task, ["train", "dev"])
    for offset, split in enumerate(splits):
        rows = cue_rows(count if split == "train" else count // 4, seed + offset, cues=("good", "bad", "fine"))
        write_lines(root / task / f"{split}.tsv", glue_lines(task, rows, random.Random(seed + offset)))


def glue_lines(task: str, rows, rng: random.Random) -> list[str]:
    binary = {"good": "1", "bad": "0", "fine": "1"}
    nli = {"good": "entailment", "bad": "not_entailment", "fine": "entailment"}
    mnli = {"good": "entailment", "bad": "contradiction", "fine": "neutral"}
    second = filler(rng)
    if task == "CoLA":  # no header: source, label, original label, sentence
        return [f"gj04\t{binary[cue]}\t\t{text}" for text, cue in rows]
    if task == "SST-2":
        return ["sentence\tlabel"] + [f"{text}\t{binary[cue]}" for text, cue in rows]
    if task == "MRPC":
        return ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [
            f"{binary[cue]}\t{i}\t{i + 1}\t{text}\t{second}" for i, (text, cue) in enumerate(rows)]
    if task == "STS-B":
        return ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"] + [
            f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{text}\t{second}\t{ {'good': 5.0, 'bad': 0.0, 'fine': 2.5}[cue]}"
            for i, (text, cue) in enumerate(rows)]
    if task == "QQP":  # with a malformed row, as the real file has
        return ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"] + [
            f"{i}\t{i}\t{i + 1}\t{text}\t{second}\t{binary[cue]}" for i, (text, cue) in enumerate(rows)] + ["7\tbroken"]
    if task == "MNLI":
        header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                  "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
        return ["\t".join(header)] + [f"{i}\t1\t1\tfiction\t(\t(\t(\t(\t{text}\t{second}\t{mnli[cue]}\t{mnli[cue]}"
                                      for i, (text, cue) in enumerate(rows)]
    if task == "QNLI":
        return ["index\tquestion\tsentence\tlabel"] + [f"{i}\t{text}\t{second}\t{nli[cue]}"
                                                      for i, (text, cue) in enumerate(rows)]
    labels = nli if task == "RTE" else binary  # RTE, WNLI
    return ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\t{text}\t{second}\t{labels[cue]}"
                                                    for i, (text, cue) in enumerate(rows)]


GLUE_FOLDERS = {"glue/cola": "CoLA", "glue/sst2": "SST-2", "glue/mrpc": "MRPC", "glue/stsb": "STS-B",
                "glue/qqp": "QQP", "glue/mnli": "MNLI", "glue/qnli": "QNLI", "glue/rte": "RTE", "glue/wnli": "WNLI"}


def squad_file(path: Path, count: int, seed: int, context_words: int = 12) -> list[dict]:
    """SQuAD 2.0 JSON: the answer is the name after "by" in the context; a question about a
    place that the context does not hold is unanswerable. Returns the questions written."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(count):
        name = rng.choice(NAMES)
        context = f"{filler(rng, context_words, context_words)} written by {name} . {filler(rng)}"
        start = context.index(f"by {name}") + 3
        if i % 3 == 2:
            qa = {"id": f"q{i}", "question": f"who lives in {rng.choice(PLACES)} ?", "answers": [],
                  "is_impossible": True}
        else:
            qa = {"id": f"q{i}", "question": "who wrote it ?", "is_impossible": False,
                  "answers": [{"text": name, "answer_start": start}, {"text": f"by {name}", "answer_start": start - 3}]}
        paragraphs.append({"context": context, "qas": [qa]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return [p["qas"][0] | {"context": p["context"]} for p in paragraphs]


def conll_file(path: Path, count: int, seed: int) -> None:
    """CoNLL-2003 columns (word POS chunk tag), IOB1 as the original: names are persons, places
    locations; -DOCSTART- lines between documents."""
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- -X- O", ""]
    for _ in range(count):
        for word in filler(rng, 2, 6).split() + [rng.choice(NAMES), "met"] + filler(rng, 1, 3).split() + \
                [rng.choice(PLACES)]:
            tag = "I-PER" if word in NAMES else "I-LOC" if word in PLACES else "O"
            lines.append(f"{word} NN I-NP {tag}")
        lines.append("")
    write_lines(path, lines)


def agnews_folder(root: Path, count: int, seed: int) -> None:
    cues = ("World", "Sports", "Business", "Sci/Tech")
    for offset, split in enumerate(["dev", "test"]):
        rows = cue_rows(count if split == "dev" else count // 4, seed + offset, cues=cues)
        write_lines(root / "agnews" / f"{split}.tsv", [f"{text.replace('Sci/Tech', 'science')}\t{cue}"
                                                       for text, cue in rows])
