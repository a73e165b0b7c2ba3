"""Reading downstream data in the layouts the public releases use; every error names the file,
the row (line, or JSON path) and the column.

Tables: TSV / CSV with a header line (or named columns), JSON lines. GLUE's TSVs are read
without quote handling (their sentences hold unbalanced quotes). SQuAD 2.0: the official JSON
(data[].paragraphs[].qas[]). CoNLL-2003: one token a line (word first, the NER tag last), blank
lines between sentences, `-DOCSTART-` lines between documents.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from deberta_ds.errors import UserError


class DataError(UserError):
    """Bad downstream data, named: the file, the row and the column."""


@dataclass
class Examples:
    """Sentence (pair) examples, by column."""

    texts: list[str]
    pairs: list[str] | None
    labels: list          # str class names (classification) or floats (regression)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, chosen) -> Examples:
        return Examples([self.texts[i] for i in chosen], [self.pairs[i] for i in chosen] if self.pairs else None,
                        [self.labels[i] for i in chosen])


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]   # (text, character start); empty: unanswerable


@dataclass
class TaggedSentence:
    words: list[str]
    tags: list[str]


def read_text(path: Path) -> str:
    """A file's UTF-8 text (a byte order mark dropped); a missing file or other encoding named."""
    if not path.is_file():
        raise DataError(f"{path}: file not found" + (" (it is a directory)" if path.is_dir() else ""))
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {data[error.start]:#x} at offset {error.start}); convert "
                        "the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def read_rows(path: Path, columns: list[str] | None = None, quoting: bool | None = None,
              skip_malformed: bool = False) -> list[tuple[int, dict]]:
    """(line number, row as a dict) of a TSV / CSV or JSON-lines file. TSV / CSV files carry a
    header line unless `columns` names their columns; every row must have as many fields as the
    header, else the line is named (a stray tab would shift the label), or, with
    `skip_malformed` (QQP's few broken rows), left out with a warning."""
    text = read_text(path)
    rows = read_json_lines(path, text) if path.suffix == ".jsonl" else \
        read_delimited(path, text, columns, quoting, skip_malformed)
    if not rows:
        raise DataError(f"{path}: no examples (an empty file, or only a header)")
    return rows


def read_json_lines(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not JSON ({error})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: a {type(row).__name__}, not an object of named fields")
        rows.append((number, row))
    return rows


def read_delimited(path: Path, text: str, columns: list[str] | None, quoting: bool | None,
                   skip_malformed: bool) -> list[tuple[int, dict]]:
    delimiter = "\t" if path.suffix in (".tsv", ".txt") else ","
    quoting = delimiter == "," if quoting is None else quoting
    reader = csv.reader(text.splitlines(), delimiter=delimiter,
                        quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE)
    rows, header, skipped = [], columns, []
    for fields in reader:
        if not fields:
            continue  # a blank line
        if header is None:
            header = fields
            continue
        if len(fields) != len(header):
            if skip_malformed:
                skipped.append(reader.line_num)
                continue
            named = "the columns named are" if columns else "the header has"
            hint = "" if columns else "; a file without a header line needs its columns named (--columns)"
            raise DataError(f"{path}:{reader.line_num}: {len(fields)} fields, {named} {len(header)} ({header}){hint}")
        rows.append((reader.line_num, dict(zip(header, fields))))
    if skipped:
        print(f"warning: {path}: left out {len(skipped)} malformed rows (lines {skipped[:5]}"
              f"{'...' if len(skipped) > 5 else ''}): wrong number of fields", file=sys.stderr)
    return rows


def column_check(path: Path, rows: list[tuple[int, dict]], needed: dict[str, str], header: bool) -> None:
    """Every row holds every needed column ({column: the flag that names it})."""
    hint = " (or, for a file without a header line, name its columns with --columns)" if header else ""
    for number, row in rows:
        for column, flag in needed.items():
            if column not in row:
                raise DataError(f"{path}:{number}: no column {column!r} (columns: {sorted(row)}); name it with "
                                f"{flag}{hint if path.suffix != '.jsonl' else ''}")


def read_examples(path: Path, text: str, pair: str | None, label: str, regression: bool,
                  labels: list[str] | None = None, columns: list[str] | None = None, quoting: bool | None = None,
                  skip_malformed: bool = False) -> Examples:
    """Sentence (pair) examples of a table: finite numbers (regression) or class names (of
    `labels` when given)."""
    rows = read_rows(path, columns, quoting, skip_malformed)
    needed = {text: "--text-column", label: "--label-column"} | ({pair: "--pair-column"} if pair else {})
    column_check(path, rows, needed, header=columns is None)
    values = []
    for number, row in rows:
        value = str(row[label]).strip()
        if regression:
            try:
                number_value = float(value)
            except ValueError:
                number_value = math.nan
            if not math.isfinite(number_value):
                raise DataError(f"{path}:{number}: column {label!r}: {value!r} is not a finite number (a regression "
                                "target)")
            values.append(number_value)
        elif labels is not None and value not in labels:
            raise DataError(f"{path}:{number}: column {label!r}: {value!r} is not one of the labels {labels}")
        else:
            values.append(value)
    return Examples([str(row[text]) for _, row in rows], [str(row[pair]) for _, row in rows] if pair else None, values)


# ---------------------------------------------------------------- SQuAD 2.0

def _field(node, key: str, kind: type, where: str, path: Path):
    if not isinstance(node, dict) or key not in node:
        raise DataError(f"{path}: {where}: no field {key!r}")
    if not isinstance(node[key], kind):
        raise DataError(f"{path}: {where}.{key}: a {type(node[key]).__name__}, not a {kind.__name__}")
    return node[key]


def read_squad(path: Path) -> list[QAExample]:
    """The questions of a SQuAD 2.0 file. An answer whose text is not at its answer_start in the
    context is an error naming its JSON path."""
    try:
        document = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not JSON ({error})") from None
    examples = []
    for a, article in enumerate(_field(document, "data", list, "top level", path)):
        for p, paragraph in enumerate(_field(article, "paragraphs", list, f"data[{a}]", path)):
            where = f"data[{a}].paragraphs[{p}]"
            context = _field(paragraph, "context", str, where, path)
            for q, qa in enumerate(_field(paragraph, "qas", list, where, path)):
                examples.append(_qa_example(qa, context, f"{where}.qas[{q}]", path))
    if not examples:
        raise DataError(f"{path}: holds no questions")
    return examples


def _qa_example(qa, context: str, where: str, path: Path) -> QAExample:
    answers = []
    impossible = qa.get("is_impossible", False) if isinstance(qa, dict) else False
    for i, answer in enumerate([] if impossible else _field(qa, "answers", list, where, path)):
        text, start = _field(answer, "text", str, f"{where}.answers[{i}]", path), \
            _field(answer, "answer_start", int, f"{where}.answers[{i}]", path)
        if context[start:start + len(text)] != text:
            raise DataError(f"{path}: {where}.answers[{i}]: text {text!r} is not at answer_start {start} of the "
                            f"context (it holds {context[start:start + len(text)]!r})")
        answers.append((text, start))
    return QAExample(str(_field(qa, "id", str, where, path)), _field(qa, "question", str, where, path), context,
                     answers)


# ---------------------------------------------------------------- CoNLL-2003

def read_conll(path: Path) -> list[TaggedSentence]:
    """Sentences of a CoNLL-2003 column file (IOB1 or IOB2 tags in the last column)."""
    sentences, words, tags = [], [], []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                sentences.append(TaggedSentence(words, tags))
            words, tags = [], []
            continue
        if len(fields) < 2:
            raise DataError(f"{path}:{number}: one column ({line.strip()!r}); a token line is WORD ... TAG")
        tag = fields[-1]
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise DataError(f"{path}:{number}: column {len(fields)}: tag {tag!r} is not O, B-TYPE or I-TYPE")
        words.append(fields[0])
        tags.append(tag)
    if words:
        sentences.append(TaggedSentence(words, tags))
    if not sentences:
        raise DataError(f"{path}: holds no sentences")
    return sentences
