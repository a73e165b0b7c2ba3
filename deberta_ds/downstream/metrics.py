"""Task metrics. The arithmetic is scikit-learn's, SciPy's and seqeval's; SQuAD 2.0 follows the
official evaluation script (v2.0) rule for rule: answer normalisation (lower case, punctuation,
articles a/an/the and extra whitespace removed), the best score over the gold answers, an
unanswerable question's gold being the empty string, and the no-answer threshold chosen on the
evaluated set to maximise EM (best_exact) and F1 (best_f1)."""

from __future__ import annotations

import collections
import re
import string

import numpy as np


def classification_scores(predictions: np.ndarray, targets: np.ndarray, classes: int) -> dict:
    """accuracy, F1 (binary: of class 1; else macro over the classes) and Matthews' correlation."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    binary = classes == 2
    return {"accuracy": float(accuracy_score(targets, predictions)),
            "f1": float(f1_score(targets, predictions, average="binary" if binary else "macro",
                                 labels=None if binary else list(range(classes)), zero_division=0)),
            "mcc": float(matthews_corrcoef(targets, predictions))}


def regression_scores(predictions: np.ndarray, targets: np.ndarray) -> dict:
    """Pearson and Spearman correlation (0 where the predictions are constant: no correlation)."""
    from scipy.stats import pearsonr, spearmanr

    if np.ptp(predictions) == 0 or np.ptp(targets) == 0:
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearsonr(predictions, targets)[0]), "spearman": float(spearmanr(predictions, targets)[0])}


def entity_scores(predicted: list[list[str]], gold: list[list[str]]) -> dict:
    """Entity-level (exact span and type) precision, recall and F1, micro-averaged, and token accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {"f1": float(f1_score(gold, predicted)), "precision": float(precision_score(gold, predicted)),
            "recall": float(recall_score(gold, predicted)), "accuracy": float(accuracy_score(gold, predicted))}


# ---------------------------------------------------------------- SQuAD 2.0 (the official rules)

def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text, flags=re.UNICODE)
    return " ".join(text.split())


def exact_match(gold: str, predicted: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(predicted))


def token_f1(gold: str, predicted: str) -> float:
    gold_tokens, predicted_tokens = normalize_answer(gold).split(), normalize_answer(predicted).split()
    if not gold_tokens or not predicted_tokens:  # an empty side: 1 when both are empty, else 0
        return float(gold_tokens == predicted_tokens)
    common = sum((collections.Counter(gold_tokens) & collections.Counter(predicted_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _best_threshold(predicted: dict, scores: dict, no_answer_score: dict, has_answer: dict) -> tuple[float, float]:
    """(best score in %, its threshold): predicting "no answer" where no_answer_score > threshold,
    swept over the observed scores (the official find_best_thresh)."""
    current = best = sum(not has for has in has_answer.values())
    threshold = 0.0
    for qid in sorted(no_answer_score, key=lambda q: no_answer_score[q]):
        if has_answer[qid]:
            current += scores[qid]
        else:
            current += -1 if predicted[qid] else 0
        if current > best:
            best, threshold = current, no_answer_score[qid]
    return 100.0 * best / len(scores), threshold


def squad_v2_scores(gold_answers: dict[str, list[str]], predicted: dict[str, str],
                    no_answer_score: dict[str, float]) -> dict:
    """Scores of predicted answers (each the best non-empty span) with their no-answer scores
    (higher: more likely unanswerable; "no answer" is predicted where the score is > the
    threshold). exact / f1 at threshold 0 (the model's own decision); best_exact / best_f1 at the
    thresholds that maximise them; HasAns_* / NoAns_* at best_f1's threshold."""
    golds = {qid: [g for g in answers if normalize_answer(g)] or [""] for qid, answers in gold_answers.items()}
    has_answer = {qid: answers != [""] for qid, answers in golds.items()}
    exact = {qid: max(exact_match(g, predicted[qid]) for g in answers) for qid, answers in golds.items()}
    f1 = {qid: max(token_f1(g, predicted[qid]) for g in answers) for qid, answers in golds.items()}

    def at_threshold(raw: dict, threshold: float) -> dict:
        return {qid: float(not has_answer[qid]) if no_answer_score[qid] > threshold else score
                for qid, score in raw.items()}

    best_exact, exact_threshold = _best_threshold(predicted, exact, no_answer_score, has_answer)
    best_f1, f1_threshold = _best_threshold(predicted, f1, no_answer_score, has_answer)
    result = {"exact": 100.0 * np.mean(list(at_threshold(exact, 0.0).values())),
              "f1": 100.0 * np.mean(list(at_threshold(f1, 0.0).values())),
              "best_exact": best_exact, "best_exact_thresh": exact_threshold, "best_f1": best_f1,
              "best_f1_thresh": f1_threshold}
    chosen_exact, chosen_f1 = at_threshold(exact, f1_threshold), at_threshold(f1, f1_threshold)
    for name, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [qid for qid, has in has_answer.items() if has == wanted]
        if qids:
            result[f"{name}_exact"] = 100.0 * np.mean([chosen_exact[q] for q in qids])
            result[f"{name}_f1"] = 100.0 * np.mean([chosen_f1[q] for q in qids])
    return {key: float(value) for key, value in result.items()}
