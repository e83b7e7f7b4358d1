"""Evaluation metrics on numpy arrays. No TensorFlow: `kerasllm evaluate` runs them on bundles too.

Each metric is a small separate function; `kerasllm evaluate` reports them under these
names: `accuracy`, `macro_f1` (classification), `perplexity` (language models),
`entity_f1`, `entity_precision`, `entity_recall` and per type `entity_types` (token classification
with BIO tags).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of predictions equal to the reference."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"accuracy: {y_true.shape} references vs {y_pred.shape} predictions")
    return float(np.mean(y_true == y_pred)) if y_true.size else math.nan


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int | None = None) -> float:
    """Unweighted mean of the per-label F1 scores (scikit-learn's `f1_score(average="macro")`).

    Labels are `0..num_labels-1` (default: every label seen in either array); a label with
    no reference and no prediction is left out, one with no true positive scores 0.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = range(num_labels) if num_labels else np.union1d(y_true, y_pred)
    scores = []
    for label in labels:
        true_positive = np.sum((y_true == label) & (y_pred == label))
        predicted, actual = np.sum(y_pred == label), np.sum(y_true == label)
        if predicted == 0 and actual == 0:
            continue
        scores.append(2.0 * true_positive / (predicted + actual))
    return float(np.mean(scores)) if scores else math.nan


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target id under `logits` `[..., V]` -> `[...]`."""
    log_probs = log_softmax(logits)
    return -np.take_along_axis(log_probs, np.asarray(targets)[..., None], axis=-1)[..., 0]


def perplexity(nll: Sequence[float]) -> float:
    """`exp` of the mean negative log-likelihood per predicted token."""
    nll = np.asarray(nll, dtype=np.float64)
    return float(np.exp(nll.mean())) if nll.size else math.nan


# -- token classification (tagging) ---------------------------------------------------------
def is_bio(tags: Sequence[str]) -> bool:
    """Whether every tag is BIO (IOB2): `O`, or `B-` / `I-` and an entity type."""
    return bool(tags) and all(tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2) for tag in tags)


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one BIO-tagged sentence as `(type, start, end)` spans (end exclusive), by
    conlleval's chunk rules: an entity starts at `B-X`, or at an `I-X` that does not continue an
    entity of type X (after `O`, or after a tag of another type), and goes on over the `I-X`
    that follow."""
    spans, start, kind = set(), None, None
    for position, tag in enumerate([*tags, "O"]):
        prefix, _, tag_type = tag.partition("-")
        if prefix == "I" and start is not None and tag_type == kind:
            continue
        if start is not None:
            spans.add((kind, start, position))
        start, kind = (position, tag_type) if prefix in ("B", "I") else (None, None)
    return spans


def entity_scores(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict:
    """Entity-level `entity_precision`, `entity_recall` and `entity_f1` (micro-averaged over entity
    types) of BIO-tagged sentences, as conlleval and seqeval's default mode count them: an entity
    counts when its type and its span match exactly. 0 when there is nothing to count.
    `entity_types` holds each type's `precision`, `recall`, `f1` and `support` (its entities in the
    references), as seqeval's `classification_report` gives them, for every type either side names.

    Written here rather than taken from seqeval: seqeval requires scikit-learn, and once
    scikit-learn is installed Keras imports it (and SciPy) with TensorFlow for its scikit-learn
    wrappers, ~0.45 s of every training and export process (2.1 vs 1.65 s for `import
    tensorflow, keras` on the 2-core machine). tests/test_metrics.py checks these spans against a
    transcription of conlleval's start/end-of-chunk rules and against seqeval's documented example.
    """
    return entity_scores_of(count_entities(references, predictions))


def count_entities(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]],
                   counts: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Per entity type, `[in the references, predicted, both]`, added to `counts` (a running count
    over batches of sentences: `kerasllm evaluate` holds a window of them at a time)."""
    if len(references) != len(predictions):
        raise ValueError(f"entity_scores: {len(references)} references vs {len(predictions)} predictions")
    counts = {} if counts is None else counts
    for reference, prediction in zip(references, predictions):
        true_spans, predicted_spans = bio_entities(reference), bio_entities(prediction)
        for index, spans in enumerate((true_spans, predicted_spans, true_spans & predicted_spans)):
            for kind, _, _ in spans:
                counts.setdefault(kind, [0, 0, 0])[index] += 1
    return counts


def entity_scores_of(counts: dict[str, list[int]]) -> dict:
    """`entity_scores` from `count_entities`' counts."""
    true_count, predicted_count, correct = (sum(c[i] for c in counts.values()) for i in range(3))
    scores = _precision_recall_f1(correct, predicted_count, true_count)
    by_type = {kind: {**_precision_recall_f1(both, predicted, true), "support": true}
               for kind, (true, predicted, both) in sorted(counts.items())}
    return {"entity_f1": scores["f1"], "entity_precision": scores["precision"], "entity_recall": scores["recall"],
            "entity_types": by_type}


def _precision_recall_f1(correct: int, predicted: int, true: int) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / true if true else 0.0
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}


# -- sequence-to-sequence (translation, text-to-text) -----------------------------------------
# sacrebleu's tokenizers `kerasllm evaluate --bleu-tokenize` offers (those that need no other package
# or download: ja-mecab/ko-mecab need MeCab, spm/flores their SentencePiece models).
BLEU_TOKENIZERS = ("13a", "intl", "zh", "char", "none")
# Scripts written without spaces between words. sacrebleu's default tokenizer (13a) splits on spaces,
# so a sentence in them was one "word" and a perfect Chinese translation scored BLEU 0.0 (chrF 94.7).
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_SPACELESS_OTHER = re.compile(
    "[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f"  # Japanese kana
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]")  # Thai, Lao, Myanmar, Khmer
_WORD = re.compile(r"[^\W\d_]+")


def bleu_tokenizer_for(references: Sequence[str]) -> str:
    """sacrebleu's tokenizer for `references`' language, as its documentation advises: where most of
    their text is in scripts written without spaces (their characters outnumber the other scripts'
    words), `zh` for Chinese (each character a word; other text as 13a) and `char` where a tenth of
    those characters are Japanese kana or Thai, Lao, Myanmar or Khmer (no MeCab or word segmenter
    here); else `13a`. By shares: a stray "ツ" (a kaomoji) or a Chinese name in English references
    leaves them English."""
    text = "\n".join(references)
    han, other = len(_HAN.findall(text)), len(_SPACELESS_OTHER.findall(text))
    words = len(_WORD.findall(_SPACELESS_OTHER.sub(" ", _HAN.sub(" ", text))))  # of the scripts with spaces
    if han + other <= words:  # (a character of a spaceless script counts as about a word)
        return "13a"
    return "char" if other >= (han + other) / 10 else "zh"


def bleu(hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> float:
    """Corpus BLEU (0-100) of one reference per hypothesis, sacrebleu's default settings but for
    its `tokenize`r (`BLEU_TOKENIZERS`; `bleu_tokenizer_for` picks one from the references)."""
    import sacrebleu  # noqa: PLC0415 - only needed for seq2seq evaluation

    _check_pairs("bleu", hypotheses, references)
    if tokenize not in BLEU_TOKENIZERS:
        raise ValueError(f"bleu: unknown tokenizer {tokenize!r} (choose from {', '.join(BLEU_TOKENIZERS)})")
    if not hypotheses:
        return math.nan
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize).score)


def short_references(references: Sequence[str], tokenize: str = "13a") -> float:
    """The share of `references` with fewer than 4 words as BLEU's `tokenize`r splits them: BLEU
    multiplies its 1- to 4-gram precisions, so a corpus of such targets scores 0 however good."""
    from sacrebleu.metrics.bleu import BLEU  # noqa: PLC0415

    split = BLEU(tokenize=tokenize).tokenizer
    return sum(len(split(text.strip()).split()) < 4 for text in references) / len(references) if references else 0.0


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0-100, character n-gram F-score), sacrebleu's default settings."""
    import sacrebleu  # noqa: PLC0415

    _check_pairs("chrf", hypotheses, references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score) if hypotheses else math.nan


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of hypotheses equal to their reference after stripping outer whitespace."""
    _check_pairs("exact_match", hypotheses, references)
    if not hypotheses:
        return math.nan
    return float(np.mean([h.strip() == r.strip() for h, r in zip(hypotheses, references)]))


def _check_pairs(name: str, hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{name}: {len(hypotheses)} hypotheses vs {len(references)} references")
