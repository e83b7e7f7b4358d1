"""Input pipelines at their edges: the corpus's last LM target, over-long encoder sequences, seeded
masked-LM masking, the encoder predictors' options and the tokenizer's decode of bad ids."""

import numpy as np
import pytest

from kerasllm import data
from kerasllm.data import TokenSplit, lm_windows
from kerasllm.errors import DataError


# -- lm_windows -----------------------------------------------------------------------------------
def targets(windows, batches: int) -> np.ndarray:
    return np.concatenate([np.asarray(y).ravel() for _, y in windows.take(batches)])


def test_random_windows_reach_the_last_token_and_start_at_zero():
    """Offsets 0 .. len - seq_len - 1 inclusive, as nanoGPT draws them: with 20 tokens and windows of
    16 + 1 the four offsets 0..3 all occur, so 19 (the last token) is a target and 1 is too."""
    ids = np.arange(20, dtype=np.int32)
    windows = lm_windows(ids, 16, 1, mode="random", seed=0)
    starts = {int(np.asarray(x)[0, 0]) for x, _ in windows.take(80)}
    assert starts == {0, 1, 2, 3}
    assert targets(windows, 50).max() == 19
    for x, y in windows.take(5):  # still next-token pairs
        np.testing.assert_array_equal(np.asarray(x)[:, 1:], np.asarray(y)[:, :-1])


@pytest.mark.parametrize("mode", ["random", "packed"])
def test_exactly_seq_len_plus_one_tokens_make_one_window(mode):
    ids = np.arange(17, dtype=np.int32)
    batches = list(lm_windows(ids, 16, 1, mode=mode, repeat=False))
    assert len(batches) == 1
    x, y = batches[0]
    np.testing.assert_array_equal(np.asarray(x)[0], ids[:16])
    np.testing.assert_array_equal(np.asarray(y)[0], ids[1:])
    with pytest.raises(DataError, match="16 tokens cannot fill one window of 16 \\+ 1"):
        lm_windows(ids[:16], 16, 1, mode=mode)


@pytest.mark.parametrize("mode, windows", [("random", 8), ("packed", 9)])
def test_one_pass_of_fewer_windows_than_a_batch_is_refused_naming_the_counts(mode, windows):
    """300 tokens in windows of 32 + 1 fill no batch of 16: the pass had yielded no batch at all
    (`evaluate` returned [], `fit` reported no val_loss)."""
    ids = np.arange(300, dtype=np.int32)
    with pytest.raises(DataError, match=f"^data: {windows} windows of 32 \\+ 1 tokens cannot fill one batch of 16 "):
        lm_windows(ids, 32, 16, mode=mode, repeat=False)
    per_shard = windows // 2 if mode == "packed" else windows  # packed shards split the windows
    with pytest.raises(DataError, match=f"^data: {per_shard} windows of 32 \\+ 1 tokens per shard cannot fill "):
        lm_windows(ids, 32, 16, mode=mode, repeat=False, shard_index=1, num_shards=2)
    # One batch's worth makes one full batch (the rest of the pass is dropped); repeating, any count fills them.
    assert [np.asarray(x).shape for x, _ in lm_windows(ids, 32, windows - 1, mode=mode, repeat=False)] == [
        (windows - 1, 32)]
    assert [np.asarray(x).shape for x, _ in lm_windows(ids, 32, windows, mode=mode, repeat=False)] == [(windows, 32)]
    assert np.asarray(next(iter(lm_windows(ids, 32, 16, mode=mode)))[0]).shape == (16, 32)


def test_a_split_of_seq_len_plus_one_tokens_a_part_is_enough():
    TokenSplit(np.arange(17), np.arange(17)).checked(0.5, 16)
    with pytest.raises(DataError, match="validation tokens"):
        TokenSplit(np.arange(17), np.arange(16)).checked(0.5, 16)
    with pytest.raises(DataError, match="training tokens"):
        TokenSplit(np.arange(16), np.arange(17)).checked(0.5, 16)


@pytest.mark.parametrize("mode", ["random", "packed"])
def test_memmap_windows_reach_the_last_token_as_in_memory(mode, tmp_path, monkeypatch):
    ids = np.arange(40, dtype=np.uint16)
    ids.tofile(tmp_path / "ids.bin")
    mapped = np.memmap(tmp_path / "ids.bin", dtype=np.uint16, mode="r")
    in_memory = targets(lm_windows(ids.astype(np.int32), 16, 2, mode, seed=4), 40)
    monkeypatch.setattr(data, "IN_MEMORY_TOKENS", 10)
    from_disk = targets(lm_windows(mapped, 16, 2, mode, seed=4), 40)
    np.testing.assert_array_equal(from_disk, in_memory)
    if mode == "random":
        assert from_disk.max() == 39


# -- encoder task pipelines -----------------------------------------------------------------------
SPECIAL = dict(pad=0, unk=1, bos=2, eos=3, mask=4, sep=5)


def test_sequences_longer_than_the_maximum_are_refused_up_front_naming_the_longest():
    from kerasllm.data_tasks import classification_dataset, masked_lm_dataset, token_classification_dataset

    seqs = [list(range(2, 12)), list(range(2, 82)), list(range(2, 70))]
    message = "sequence 1 has 80 tokens, more than the maximum length 64"
    with pytest.raises(DataError, match=message):
        classification_dataset(seqs, np.array([0, 1, 0]), 2, 0, 64, repeat=False)
    with pytest.raises(DataError, match=message):
        token_classification_dataset(seqs, [[-1] * len(s) for s in seqs], 2, 0, 64, repeat=False)
    with pytest.raises(DataError, match=message):
        masked_lm_dataset(seqs, 2, 90, SPECIAL, 64, repeat=False)
    # max_length itself is allowed, and padded to its bucket
    batches = list(classification_dataset([list(range(2, 66)), [2, 7]], np.array([0, 1]), 1, 0, 64,
                                          shuffle=False, repeat=False))
    assert [b[0]["token_ids"].shape[1] for b in batches] == [64, 16]


def masked_batches(seed: int, **options):
    from kerasllm.data_tasks import masked_lm_dataset

    seqs = [[2] + list(range(6, 6 + n)) for n in [3, 10, 20, 40, 7, 33]]
    dataset = masked_lm_dataset(seqs, 2, 60, SPECIAL, 64, seed=seed, **options)
    return [(x["token_ids"].numpy(), x["mask_positions"].numpy(), y.numpy(), w.numpy()) for x, y, w in dataset]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for one, other in zip(a, b):
        for x, y in zip(one, other):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("shuffle", [True, False])
def test_masked_lm_masks_are_reproducible_with_a_seed(shuffle):
    """Two pipelines of one seed: the same batches, masks included; another seed masks otherwise."""
    first = masked_batches(5, shuffle=shuffle, repeat=False)
    assert_same_batches(first, masked_batches(5, shuffle=shuffle, repeat=False))
    other = masked_batches(6, shuffle=False, repeat=False)
    if not shuffle:  # the same rows in the same order, masked differently
        assert any((a[1] != b[1]).any() for a, b in zip(first, other))
    for ids, positions, targets, weights in first:
        chosen = positions[weights > 0]
        assert (chosen > 0).all()  # never BOS
        assert targets.dtype == np.int32 and weights.dtype == np.float32


def test_masked_lm_masks_differ_between_epochs_of_one_pipeline():
    from kerasllm.data_tasks import masked_lm_dataset

    seqs = [[2] + list(range(6, 46))] * 4
    dataset = masked_lm_dataset(seqs, 2, 60, SPECIAL, 64, seed=1, shuffle=False, repeat=False)
    epochs = [[x["mask_positions"].numpy() for x, _, _ in dataset] for _ in range(2)]
    assert any((a != b).any() for a, b in zip(*epochs))


def test_bert_masking_selects_round_15_percent_of_the_selectable_tokens_in_order():
    """BERT's count, max(1, round(0.15 n)), as the evaluation's masking (the ceiling had masked 16.5%)."""
    import tensorflow as tf

    from kerasllm.data_tasks import bert_masking

    ids = np.zeros((4, 32), np.int32)
    ids[0, :21] = [2] + list(range(6, 26))  # 20 selectable: 3 chosen
    ids[1, :3] = [2, 7, 3]  # 1 selectable (EOS is not): 1 chosen
    ids[2, :2] = [2, 3]  # none
    ids[3, :8] = [2] + list(range(6, 13))  # 7 selectable: round(1.05) = 1 chosen (the ceiling: 2)
    masked, positions, targets, weights = (t.numpy() for t in bert_masking(
        tf.constant(ids), tf.constant([4, 2], tf.int64), 60, 4, [0, 2, 3, 5], 6))
    assert positions.shape == (4, 6) and weights.sum(axis=1).tolist() == [3, 1, 0, 1]
    for row in range(4):
        chosen = positions[row][weights[row] > 0]
        assert (np.diff(chosen) > 0).all() and (positions[row][weights[row] == 0] == 0).all()
        np.testing.assert_array_equal(targets[row][weights[row] > 0], ids[row, chosen])
        unchosen = np.setdiff1d(np.arange(32), chosen)
        np.testing.assert_array_equal(masked[row, unchosen], ids[row, unchosen])
    assert positions[1, 0] == 1 and (targets[2] == 0).all()


# -- encoder predictors ---------------------------------------------------------------------------
def encoder_predictor(task: str):
    """A classify/embed/tag predictor over a stand-in graph: logits [B, 3] (or [B, T, 3] to tag)."""
    from pathlib import Path

    from kerasllm.export.encoder_predictor import EncoderPredictor, TagPredictor

    def run(ids, mask, names):
        logits = np.stack([ids.sum(-1) * 0.0, ids.sum(-1) * 0.01, -ids.sum(-1) * 0.01], -1)
        per_token = np.stack([ids * 0.01, ids * 0.0, -ids * 0.01], -1)
        outputs = {"logits": per_token if task == "tag" else logits,
                   "embeddings": np.stack([ids.sum(-1), mask.sum(-1)], -1)}
        return {name: outputs[name] for name in names}

    model_task = {"classify": "classifier", "embed": "masked-lm", "tag": "token-classifier"}[task]
    config = {"max_length": 16, "bos_id": 2, "pad_id": 0, "vocab_size": 16, "num_labels": 3}
    cls = TagPredictor if task == "tag" else EncoderPredictor
    return cls(task, model_task, None, config, ["a", "b", "c"], run, Path("src"))


BATCH = [[2, 7, 8], [2, 9]]


@pytest.mark.parametrize("task, options, message", [
    ("classify", dict(topk=1), "classify: unknown option 'topk'"),
    ("classify", dict(normalize=True), "classify: unknown option 'normalize'"),
    ("embed", dict(normalise=True), "embed: unknown option 'normalise'"),
    ("embed", dict(top_k=1), "embed: unknown option 'top_k'"),
    ("tag", dict(top_k=1), "tag: unknown option 'top_k'"),
    ("classify", dict(top_k=0), "top_k must be a whole number >= 1"),
    ("classify", dict(top_k=-1), "top_k must be a whole number >= 1"),
    ("classify", dict(top_k=1.5), "top_k must be a whole number >= 1"),
])
def test_encoder_predictors_refuse_unknown_options_and_a_top_k_below_one(task, options, message):
    from kerasllm.errors import UsageError

    predictor = encoder_predictor(task)
    with pytest.raises(UsageError, match=message):
        predictor.predict(BATCH, **options)


def test_encoder_predictors_take_the_batch_clis_options_and_an_empty_batch():
    from kerasllm.export.batch import TASK_DEFAULTS

    classify = encoder_predictor("classify")
    assert len(classify.predict(BATCH, **TASK_DEFAULTS["classify"])[0]["scores"]) == 3
    top = classify.predict(BATCH, top_k=np.int64(2))
    assert [list(r["scores"]) for r in top] == [["b", "a"], ["b", "a"]]
    assert list(classify.predict(BATCH, top_k=5)[0]["scores"]) == ["b", "a", "c"]
    embed = encoder_predictor("embed")
    assert embed.predict(BATCH, **TASK_DEFAULTS["embed"])[1]["embedding"] == [11.0, 2.0]
    assert np.linalg.norm(embed.predict(BATCH, normalize=True)[1]["embedding"]) == pytest.approx(1.0)
    for task in ("classify", "embed", "tag"):
        assert encoder_predictor(task).predict([], **TASK_DEFAULTS[task]) == []


# -- tokenizer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_decoding_an_id_outside_the_vocabulary_is_a_value_error_naming_it(kind):
    from kerasllm.tokenizers import TextTokenizer

    tok = TextTokenizer.train(["hello world, hello there"] * 20, kind=kind, vocab_size=300)
    size = tok.vocab_size
    good = tok.encode("hello there")
    assert tok.decode(good) == "hello there" and tok.decode(np.asarray(good)) == "hello there"
    assert tok.decode([]) == "" and tok.decode_batch([good, []]) == ["hello there", ""]
    for bad in (-1, size, size + 7, 2**40):
        message = f"token id {bad} is outside the vocabulary \\(ids 0 .. {size - 1}, vocabulary size {size}\\)"
        with pytest.raises(ValueError, match=message):
            tok.decode(good + [bad])
        with pytest.raises(ValueError, match=message):
            tok.decode_batch([good, [bad]])


def test_one_number_written_two_ways_is_refused_and_label_order_is_fixed():
    """"1" and "1.0" had become two classes, in an order that followed Python's string hashing."""
    import itertools

    from kerasllm.data_tasks import LabelMap

    with pytest.raises(DataError, match=r"labels '1' and '1\.0' are the same number written differently"):
        LabelMap.from_labels(["0", "1", "0", "1.0"])
    orders = {tuple(LabelMap.from_labels(list(p)).labels) for p in itertools.permutations(["2", "inf", "-1e3", "10"])}
    assert orders == {("-1e3", "2", "10", "inf")}


@pytest.mark.parametrize("labels, expected", [
    (["9007199254740993", "9007199254740992"], ["9007199254740992", "9007199254740993"]),  # 2**53 and 2**53 + 1
    (["1e500", "1e400", "2"], ["2", "1e400", "1e500"]),  # both past a float's range
    (["10", "1_0"], ["10", "1_0"]),  # Python's spelling of 10, a name here
])
def test_different_numbers_stay_different_labels(labels, expected):
    """Labels were compared as floats: long numeric ids (snowflake or product ids) past 2**53, and
    numbers past a float's range, were refused as "the same number written differently" (fuzzing)."""
    from kerasllm.data_tasks import LabelMap

    assert LabelMap.from_labels(labels * 2).labels == expected


def test_classifier_rows_are_not_tokenized_whole_to_keep_their_start(monkeypatch):
    from kerasllm.data_tasks import Row, encode_rows
    from kerasllm.tokenizers import TextTokenizer

    tok = TextTokenizer.train(["great lamp bad lamp"], kind="char")
    lengths = []
    real = tok.encode_batch
    monkeypatch.setattr(tok, "encode_batch", lambda texts: lengths.extend(map(len, texts)) or real(texts))
    rows = [Row("f.tsv: line 2", "great lamp " * 1_000_000, "pos"), Row("f.tsv: line 3", "bad lamp", "neg")]
    encoded = encode_rows(tok, rows, max_length=16)
    assert encoded == [[tok.bos_id] + tok.encode("great lamp " * 2)[:15], [tok.bos_id] + tok.encode("bad lamp")]
    assert max(lengths) < 5000


def test_bert_masking_counts_as_python_rounds():
    """0.15 * 190 is 28.4999... in float64 (Python's round, the evaluation's masking: 28) but 28.5 in
    float32, which training had rounded to 29."""
    import tensorflow as tf

    from kerasllm.data_tasks import bert_masking

    lengths = [190, 350, 390, 20, 7]
    ids = np.zeros((len(lengths), 400), np.int32)
    for row, n in enumerate(lengths):
        ids[row, :n] = np.arange(n) % 50 + 6
    _, _, _, weights = bert_masking(tf.constant(ids), tf.constant([1, 2], tf.int64), 60, 4, [0, 2, 3, 5], 80)
    assert weights.numpy().sum(axis=1).tolist() == [max(1, round(0.15 * n)) for n in lengths]


def test_a_corpus_reads_crlf_and_carriage_return_line_ends_as_line_feeds(tmp_path):
    """A CRLF corpus (Notepad, a Windows checkout) had trained its `\\r` as a token (a BPE merge of
    "\\r\\n" too), where every record reader drops it; a CRLF is never cut in two between blocks."""
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40
    for name, line_end in (("lf.txt", "\n"), ("crlf.txt", "\r\n"), ("cr.txt", "\r")):
        path = tmp_path / name
        path.write_bytes(text.replace("\n", line_end).encode())
        for block_bytes in (None, 7, 64):
            assert "".join(data.text_blocks(path, block_bytes)) == text, (name, block_bytes)


def test_a_compressed_or_utf16_corpus_is_refused_and_a_directory_with_compressed_shards_too(tmp_path):
    import gzip

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "part-000.txt").write_text("some text\n")
    (corpus / "part-001.txt.gz").write_bytes(gzip.compress(b"more text\n"))
    with pytest.raises(DataError, match="part-001.txt.gz: a compressed text file"):
        data.resolve_text_files(corpus)  # it had trained on the .txt alone, without a word
    for name, content, reason in (("c.txt", gzip.compress(b"text\n"), "gzip-compressed"),
                                  ("u.txt", "text\nmore\n".encode("utf-16-le"), "UTF-16")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=f"{name}: {reason}"):
            list(data.text_blocks(tmp_path / name))


def test_a_reference_label_spelled_another_way_is_the_models_label():
    """pandas writes a label column that held a NaN as 1.0 and a clean split's as 1; CSV True, JSON true.
    Evaluation had called each "unknown label"; spellings that could name two labels stay unknown."""
    from kerasllm.data_tasks import LabelMap

    numbers = LabelMap(["0.0", "1.0"])
    assert [numbers.id(label) for label in ("0", "1", "1.00", "1e0", "0.0")] == [0, 1, 1, 1, 0]
    truths = LabelMap(["false", "true"])
    assert [truths.id(label) for label in ("False", "TRUE", "true")] == [0, 1, 1]
    both = LabelMap(["True", "true", "x"])
    assert both.id("true") == 1
    with pytest.raises(DataError, match="unknown label 'TRUE'"):
        both.id("TRUE")
    with pytest.raises(DataError, match="unknown label '2'"):
        numbers.id("2")


@pytest.mark.parametrize("missing", ["nan", "NaN", "-nan"])
def test_nan_among_numeric_labels_is_refused_as_a_missing_value(missing):
    """`nan` (str(float("nan")), NumPy, older pandas) among numeric labels had become a class of its own,
    silently; among names it is a name (ISO 639-3's code for Min Nan)."""
    from kerasllm.data_tasks import LabelMap

    with pytest.raises(DataError, match=f"label '{missing}' among numeric labels is a missing value"):
        LabelMap.from_labels(["1.0", "0.0", missing, "1.0"])
    assert LabelMap.from_labels(["zho", missing, "eng"]).labels == sorted(["zho", missing, "eng"])
