"""Entity-level scores of BIO-tagged sentences (`kerasllm.metrics.entity_scores`).

kerasllm counts entities itself (see `entity_scores` for why not seqeval). Checked here against
an independent transcription of conlleval's chunk rules (the reference scorer of the CoNLL shared
tasks, whose default mode seqeval follows) on random tag sequences, and against seqeval's
documented example.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kerasllm import metrics


def conlleval_chunks(tags: list[str]) -> set[tuple[str, int, int]]:
    """Spans by conlleval.pl's `endOfChunk` / `startOfChunk` (its B/I/O cases), walked as the
    script walks a sentence: the previous tag starts as O, and an O closes the sentence."""

    def end_of_chunk(prev_tag, tag, prev_type, tag_type):
        return ((prev_tag, tag) in {("B", "B"), ("B", "O"), ("I", "B"), ("I", "O")}
                or (prev_tag != "O" and prev_type != tag_type))

    def start_of_chunk(prev_tag, tag, prev_type, tag_type):
        return ((prev_tag, tag) in {("B", "B"), ("I", "B"), ("O", "B"), ("O", "I")}
                or (tag != "O" and prev_type != tag_type))

    chunks, start, prev_tag, prev_type = set(), None, "O", ""
    for position, full_tag in enumerate([*tags, "O"]):
        tag, _, tag_type = full_tag.partition("-")
        if start is not None and end_of_chunk(prev_tag, tag, prev_type, tag_type):
            chunks.add((prev_type, start, position))
            start = None
        if start_of_chunk(prev_tag, tag, prev_type, tag_type):
            start = position
        prev_tag, prev_type = tag, tag_type
    return chunks


bio_tags = st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"])
sentences = st.lists(bio_tags, min_size=1, max_size=12)


@settings(max_examples=400, deadline=None)
@given(sentences)
def test_entities_are_conllevals_chunks(tags):
    assert metrics.bio_entities(tags) == conlleval_chunks(tags)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(sentences, sentences), min_size=1, max_size=6))
def test_entity_scores_count_exact_type_and_span_matches(pairs):
    references = [r for r, _ in pairs]
    predictions = [p[:len(r)] + ["O"] * (len(r) - len(p)) for r, p in pairs]
    true = [conlleval_chunks(r) for r in references]
    predicted = [conlleval_chunks(p) for p in predictions]
    correct = sum(len(t & p) for t, p in zip(true, predicted))
    n_true, n_predicted = sum(map(len, true)), sum(map(len, predicted))
    scores = metrics.entity_scores(references, predictions)
    precision = correct / n_predicted if n_predicted else 0.0
    recall = correct / n_true if n_true else 0.0
    assert scores["entity_precision"] == pytest.approx(precision)
    assert scores["entity_recall"] == pytest.approx(recall)
    assert scores["entity_f1"] == pytest.approx(2 * precision * recall / (precision + recall) if correct else 0.0)
    assert (scores["entity_f1"] == 1.0) == (true == predicted and n_true > 0)
    # Per type: the same counts restricted to one type; every type either side names is listed.
    named = {kind for spans in true + predicted for kind, _, _ in spans}
    assert set(scores["entity_types"]) == named
    for kind, row in scores["entity_types"].items():
        of_kind = [{s for s in spans if s[0] == kind} for spans in true], [{s for s in spans if s[0] == kind} for spans in predicted]
        kind_true, kind_predicted = sum(map(len, of_kind[0])), sum(map(len, of_kind[1]))
        kind_correct = sum(len(t & p) for t, p in zip(*of_kind))
        assert row["support"] == kind_true
        assert row["precision"] == pytest.approx(kind_correct / kind_predicted if kind_predicted else 0.0)
        assert row["recall"] == pytest.approx(kind_correct / kind_true if kind_true else 0.0)


def test_seqevals_documented_example():
    # seqeval's README: the MISC entity starts one word early in the prediction; PER matches.
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    scores = metrics.entity_scores(y_true, y_pred)
    assert (scores["entity_f1"], scores["entity_precision"], scores["entity_recall"]) == (0.5, 0.5, 0.5)
    # and its classification_report: MISC 0.00 0.00 0.00 support 1, PER 1.00 1.00 1.00 support 1
    assert scores["entity_types"] == {"MISC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
                                      "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}}


def test_an_i_tag_after_another_type_starts_an_entity_and_nothing_to_count_scores_zero():
    assert metrics.bio_entities(["B-PER", "I-LOC", "I-LOC", "O", "I-PER"]) == {
        ("PER", 0, 1), ("LOC", 1, 3), ("PER", 4, 5)}
    assert metrics.entity_scores([["O", "O"]], [["O", "O"]]) == {
        "entity_f1": 0.0, "entity_precision": 0.0, "entity_recall": 0.0, "entity_types": {}}
    with pytest.raises(ValueError, match="2 references vs 1 predictions"):
        metrics.entity_scores([["O"], ["O"]], [["O"]])


def test_bleu_takes_the_tokenizer_of_the_targets_language():
    """sacrebleu's default tokenizer (13a) splits on spaces: a perfect Chinese copy had scored BLEU 0.0."""
    chinese = ["我喜欢吃苹果。", "你看见大海了。", "她写了一本书。", "老师喜欢熊猫。"] * 5
    assert metrics.bleu(chinese, chinese) == 0.0  # 13a: each sentence one word, no 4-gram at all
    assert metrics.bleu_tokenizer_for(chinese) == "zh"
    assert metrics.bleu(chinese, chinese, "zh") == pytest.approx(100.0)
    assert metrics.bleu([s[:-1] + "！" for s in chinese], chinese, "zh") < 100.0
    assert metrics.bleu_tokenizer_for(["こんにちは、世界"]) == "char"  # kana: no MeCab here
    assert metrics.bleu_tokenizer_for(["สวัสดีครับ"]) == "char"
    assert metrics.bleu_tokenizer_for(["the cat sat on the mat", "Zoë à Hà Nội"]) == "13a"
    assert metrics.bleu_tokenizer_for(["the cat sat on the mat", r"¯\_(ツ)_/¯", "Li Bai (李白) wrote it"]) == "13a"
    assert metrics.bleu_tokenizer_for(["我去东京。", "我喜欢 Python 和 Keras。"]) == "zh"
    with pytest.raises(ValueError, match="unknown tokenizer 'ja-mecab'"):
        metrics.bleu(chinese, chinese, "ja-mecab")


def test_short_references_counts_targets_bleu_cannot_score():
    assert metrics.short_references(["the cat sat", "a b c d e", "402", "one two three four"]) == 0.5
    assert metrics.short_references(["我喜欢吃苹果"], "zh") == 0.0 and metrics.short_references(["我喜欢"], "zh") == 1.0
    assert metrics.short_references([]) == 0.0
