"""Extractive QA windows and answers. A question and its context become one or more windows of
at most max_length tokens ([CLS] question [SEP] context part [SEP]); a context too long for one
window is cut into windows overlapping by `doc_stride` tokens. Training: a window whose context
part holds the (first) gold answer whole points at its tokens, any other window (and every
window of an unanswerable question) at [CLS]. Prediction: over an example's windows, the best
span (start <= end, at most max_answer_length tokens, inside the context) by start + end logit,
and the no-answer score: the lowest [CLS] score of the windows minus the best span's."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deberta_ds.downstream.readers import DataError, QAExample

TOP = 20  # start and end candidates per window


@dataclass
class Window:
    example: int                                  # index of its example
    offsets: list[tuple[int, int] | None]         # per token: its characters in the context, None outside it


def qa_features(tokenizer, examples: list[QAExample], max_length: int, doc_stride: int,
                train: bool) -> tuple[list[dict], list[Window]]:
    if not 0 <= doc_stride < max_length // 2:
        raise DataError(f"--doc-stride {doc_stride}: must be >= 0 and less than half of the window ({max_length})")
    encoded = tokenizer([e.question for e in examples], [e.context for e in examples], truncation="only_second",
                        max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True)
    features, windows = [], []
    for row, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
        sequence = encoded.sequence_ids(row)
        offsets = [tuple(span) if part == 1 else None for span, part in zip(encoded["offset_mapping"][row], sequence)]
        feature = {"input_ids": encoded["input_ids"][row], "attention_mask": encoded["attention_mask"][row]}
        if train:
            feature["start_positions"], feature["end_positions"] = answer_tokens(examples[example_index], offsets)
        features.append(feature)
        windows.append(Window(example_index, offsets))
    return features, windows


def answer_tokens(example: QAExample, offsets: list) -> tuple[int, int]:
    """The first gold answer's (start, end) tokens in this window; (0, 0), [CLS], when it has none."""
    if not example.answers:
        return 0, 0
    text, start_char = example.answers[0]
    end_char = start_char + len(text)
    inside = [i for i, span in enumerate(offsets) if span is not None]
    if offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
        return 0, 0
    start = next(i for i in inside if offsets[i][1] > start_char)
    end = next(i for i in reversed(inside) if offsets[i][0] < end_char)
    return start, end


def qa_predictions(examples: list[QAExample], windows: list[Window], outputs: list[dict],
                   max_answer_length: int) -> tuple[dict[str, str], dict[str, float]]:
    """({id: best non-empty answer text}, {id: no-answer score}) over each example's windows."""
    best = [(-np.inf, "") for _ in examples]
    null = [np.inf for _ in examples]
    for window, output in zip(windows, outputs):
        start_logits, end_logits = output["start_logits"], output["end_logits"]
        null[window.example] = min(null[window.example], float(start_logits[0] + end_logits[0]))
        context = examples[window.example].context
        for start in np.argsort(start_logits)[::-1][:TOP]:
            for end in np.argsort(end_logits)[::-1][:TOP]:
                if window.offsets[start] is None or window.offsets[end] is None or not \
                        0 <= end - start < max_answer_length:
                    continue
                score = float(start_logits[start] + end_logits[end])
                if score > best[window.example][0]:
                    best[window.example] = (score, context[window.offsets[start][0]:window.offsets[end][1]])
    answers = {e.id: text for e, (_, text) in zip(examples, best)}
    no_answer = {e.id: null_score - score for e, (score, _), null_score in zip(examples, best, null)}
    return answers, no_answer
