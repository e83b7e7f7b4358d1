"""Encoder family, model level: padding invariance, saving, masking statistics, metrics, data errors.

Learning (MLM loss falls, classifier accuracy) and export parity: test_encoder_pipeline.py.
"""

import json

import numpy as np
import pytest

import keras

from kerasllm import (CausalLM, DecoderConfig, EncoderConfig, MaskedLM, Seq2SeqLM, TextClassifier, TokenClassifier,
                      datasets, metrics)
from kerasllm.data_tasks import LabelMap, Row, encode_rows, masked_lm_dataset, read_rows
from kerasllm.errors import DataError
from kerasllm.tokenizers import TextTokenizer

VOCAB = 50
VARIANTS = {"post-ln-cls": dict(), "pre-ln-mean": dict(norm_first=True, pooling="mean"),
            "rotary-mean": dict(position="rotary", pooling="mean")}


def config(**overrides):
    return EncoderConfig.preset("tiny", **{"vocab_size": VOCAB, "max_length": 64, "num_labels": 3, **overrides})


def texts(lengths, seed=0):
    """Right-padded `[B, T]` ids starting with BOS (2); real lengths as given."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths)), "int32")
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(6, VOCAB, n)
        ids[row, 0] = 2
    return ids


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padding_does_not_change_results(variant):
    """The same text alone or in a padded batch (with longer texts) gives the same outputs (1e-5)."""
    keras.utils.set_random_seed(0)
    c = config(**VARIANTS[variant])
    batch = texts([5, 17, 9, 30])
    alone = batch[:1, :5]
    for model in (TextClassifier(c), MaskedLM(c), TokenClassifier(c)):
        together, single = model.export_outputs(batch, batch != 0), model.export_outputs(alone, alone != 0)
        for name in together:
            got, want = np.asarray(together[name])[:1], np.asarray(single[name])
            if got.ndim == 3:
                got = got[:, :5]
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{type(model).__name__} {name}")
        # call() derives the padding mask from PAD ids and agrees with export_outputs
        np.testing.assert_allclose(np.asarray(model(batch)), np.asarray(together["logits"]), atol=1e-6)
    embedded = np.asarray(TextClassifier(c).embed(batch, normalize=True))
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(norm_first=True), dict(position="rotary")])
def test_first_token_is_the_encoder_output_at_the_first_position(overrides):
    """`Encoder.first_token` (what a CLS-pooled classifier's export graph computes) equals the
    full encoder's output at position 0 (1e-5), for padded rows too."""
    keras.utils.set_random_seed(0)
    encoder = TextClassifier(config(**overrides)).encoder
    batch = texts([5, 17, 9, 30])
    mask = batch != 0
    np.testing.assert_allclose(np.asarray(encoder.first_token(batch, mask)), np.asarray(encoder(batch, mask))[:, 0],
                               atol=1e-5)


@pytest.mark.parametrize("cls", [MaskedLM, TextClassifier, TokenClassifier])
def test_keras_file_round_trip(cls, tmp_path):
    keras.utils.set_random_seed(1)
    model = cls(config(norm_first=True))
    x = texts([7, 4])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded) is cls and loaded.config == model.config
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(loaded(x)))


def test_classifier_from_masked_lm_copies_the_encoder():
    keras.utils.set_random_seed(2)
    mlm = MaskedLM(config(num_labels=0))
    classifier = TextClassifier.from_masked_lm(mlm, num_labels=4)
    assert classifier.config.num_labels == 4
    for a, b in zip(mlm.encoder.get_weights(), classifier.encoder.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = texts([6, 3])
    np.testing.assert_array_equal(np.asarray(mlm.encode(x)[0]), np.asarray(classifier.encode(x)[0]))


@pytest.fixture(scope="module")
def sentiment():
    rows = [Row(f"mem: line {i + 1}", text, label) for i, (text, label) in enumerate(datasets.sentiment_rows(600))]
    tokenizer = TextTokenizer.train([r.text for r in rows], kind="char")
    return rows, tokenizer


def test_masking_follows_the_80_10_10_rule(sentiment):
    """15% of each sequence's real tokens selected (never PAD/BOS); of those 80% MASK, 10% random, 10% kept."""
    rows, tokenizer = sentiment
    seqs = encode_rows(tokenizer, rows, 64)
    special = tokenizer.special_ids()
    data = masked_lm_dataset(seqs, 64, tokenizer.vocab_size, special, 64, seed=3, repeat=False)
    selected = mask = kept = 0
    for inputs, targets, weights in data:
        ids, padding = inputs["token_ids"].numpy(), inputs["padding_mask"].numpy()
        positions, targets, weights = inputs["mask_positions"].numpy(), targets.numpy(), weights.numpy()
        for row in range(len(ids)):
            chosen = positions[row][weights[row] > 0]
            assert padding[row, chosen].all() and (chosen > 0).all()  # never padding, never BOS
            original = ids[row].copy()
            original[chosen] = targets[row][weights[row] > 0]
            selectable = int((padding[row] & ~np.isin(original, [special[k] for k in ("bos", "eos", "sep")])).sum())
            assert len(chosen) == max(1, round(0.15 * selectable))  # BERT's count (the ceiling had given 16.5%)
            now = ids[row, chosen]
            selected += len(chosen)
            mask += int((now == special["mask"]).sum())
            kept += int((now == targets[row][weights[row] > 0]).sum())
    assert selected > 3000
    assert abs(mask / selected - 0.8) < 0.03
    # "unchanged" also catches random replacements that drew the original id (1/V of 10%)
    assert abs(kept / selected - 0.1) < 0.02
    assert abs((selected - mask - kept) / selected - 0.1) < 0.02


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_masked_lm_loss_is_the_weighted_mean_over_masked_positions_with_label_smoothing(eps):
    """MaskedLM's compiled loss: the mean over the masked positions (sample weight 0 on the padding of
    `mask_positions`) of `(1 - eps) * nll + eps * mean(-log p)`; eps 0 is Keras's sparse cross-entropy."""
    model = MaskedLM(config())
    model.compile(label_smoothing=eps, jit_compile=False)
    ids = texts([10, 7])
    inputs = {"token_ids": ids, "padding_mask": (ids > 0).astype("int32"),
              "mask_positions": np.array([[1, 4, 6], [2, 5, 0]], "int32")}
    targets = np.array([[11, 12, 13], [14, 15, 0]], "int32")
    weights = np.array([[1, 1, 1], [1, 1, 0]], "float32")
    logits = np.asarray(model(inputs), "float64")
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    per_position = (1 - eps) * nll + eps * -log_probs.mean(-1)
    expected = (per_position * weights).sum() / weights.sum()
    got = float(model.compute_loss(x=inputs, y=targets, y_pred=model(inputs), sample_weight=weights))
    assert got == pytest.approx(expected, rel=1e-5)
    if eps == 0:
        keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")
        assert got == pytest.approx(float(keras_loss(targets, model(inputs), sample_weight=weights)), rel=1e-6)


def test_a_config_of_another_family_is_a_type_error_naming_the_expected_class():
    """It had been an AttributeError ('DecoderConfig' object has no attribute 'num_labels'), or
    (CausalLM given an EncoderConfig) a model that saved under the encoder family."""
    decoder = DecoderConfig.preset("tiny", vocab_size=64)
    for make, expected, given in [(lambda: TextClassifier(decoder), "EncoderConfig", "DecoderConfig"),
                                  (lambda: Seq2SeqLM(decoder), "Seq2SeqConfig", "DecoderConfig"),
                                  (lambda: CausalLM(config()), "DecoderConfig", "EncoderConfig"),
                                  (lambda: CausalLM(config().to_dict()), "DecoderConfig", "EncoderConfig")]:
        with pytest.raises(TypeError, match=rf"expects a config of class {expected} \(or its dict\), got {given}$"):
            make()


@pytest.mark.parametrize("cls", [MaskedLM, TextClassifier, TokenClassifier])
def test_inputs_longer_than_the_learned_positions_or_without_a_batch_axis_are_refused(cls):
    """A compiled step clamps positions past max_length (XLA's gather, explicit positions): fit and
    predict had run on 200 tokens with max_length 128 (tokens past 127 all at position 127)."""
    import tensorflow as tf

    model = cls(config(max_length=16))
    long = texts([17, 12])
    labels = np.zeros((2, 17) if cls is not TextClassifier else 2, "int32")
    message = "token_ids: a sequence of 17 tokens is longer than max_length 16, the number of learned positions"
    for run in (lambda: model.predict(long, verbose=0), lambda: model.predict({"token_ids": long}, verbose=0),
                lambda: model.fit(long, labels, verbose=0), lambda: model.evaluate(long, labels, verbose=0),
                lambda: model.predict(tf.data.Dataset.from_tensor_slices(long).batch(2), verbose=0)):
        with pytest.raises(ValueError, match=message):
            run()
    with pytest.raises(ValueError, match=rf"{cls.__name__} expects token_ids of shape \[batch, length\]"):
        model(long[0])


@pytest.mark.parametrize("cls", [MaskedLM, TextClassifier, TokenClassifier])
def test_token_ids_as_lists_of_rows(cls):
    """What a tokenizer returns: rows of one length are taken as the array of them (`predict` had
    refused a list as an "Unrecognized data type", `embed` failed in Keras's call); rows of
    different lengths, as lists or a NumPy object array (read as one sequence: "add a batch axis"),
    are refused in one message saying how to pad them."""
    model = cls(config())
    ids = texts([6, 6], seed=1)
    for run in (lambda x: model.predict(x, verbose=0), lambda x: model.predict({"token_ids": x}, verbose=0),
                model.embed):
        expected = np.asarray(run(ids))
        for given in (ids.tolist(), np.array(ids.tolist(), dtype=object)):
            np.testing.assert_allclose(np.asarray(run(given)), expected, atol=1e-6)
    message = (rf"^{cls.__name__} expects token_ids of shape \[batch, length\], got rows of 2 to 3 tokens: pad the "
               r"rows to one length with pad_id 0 \(after each row's tokens\)$")
    ragged = [[2, 7, 8], [2, 9]]
    for given in (ragged, np.array(ragged, dtype=object)):
        for run in (lambda x: model.predict(x, verbose=0), model.embed):
            with pytest.raises(ValueError, match=message):
                run(given)


def test_classifier_labels_outside_the_labels_are_refused():
    """Under XLA (compile's default) a label past num_labels had trained on with loss NaN."""
    model = TextClassifier(config(num_labels=2))
    model.compile()
    x = texts([5] * 4)
    for bad in (2, 5, -1):
        labels = np.array([0, 1, bad, 0])
        message = rf"TextClassifier: label {bad} is not one of the labels 0\.\.1 \(config.num_labels 2\)$"
        for run in (lambda: model.fit(x, labels, verbose=0), lambda: model.evaluate(x, labels, verbose=0),
                    lambda: model.fit(x, labels * 0, validation_data=(x, labels), verbose=0)):
            with pytest.raises(ValueError, match=message):
                run()


def test_token_classifier_refuses_label_smoothing_it_would_not_apply():
    with pytest.raises(ValueError, match="TokenClassifier does not support label_smoothing"):
        TokenClassifier(config()).compile(label_smoothing=0.1, jit_compile=False)


def test_metrics_by_hand():
    y_true, y_pred = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # per label F1: 0 -> 2*1/(2+2)=0.5; 1 -> 2*2/(3+2)=0.8; 2 -> 2*1/(1+2)=2/3
    assert metrics.macro_f1(y_true, y_pred) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert metrics.macro_f1([0, 0], [1, 1], num_labels=2) == 0.0
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    nll = metrics.token_nll(logits, np.array([0, 1]))
    np.testing.assert_allclose(nll, [np.log(2), -np.log(0.8)])
    assert metrics.perplexity(nll) == pytest.approx(np.exp(np.mean(nll)))
    assert metrics.perplexity(np.full(5, np.log(7.0))) == pytest.approx(7.0)


def test_label_map_orders_names_and_numbers():
    assert LabelMap.from_labels(["pos", "neg", "neutral", "pos"]).labels == ["neg", "neutral", "pos"]
    assert LabelMap.from_labels(["10", "2", "1"]).labels == ["1", "2", "10"]
    with pytest.raises(DataError, match=r"f\.tsv: line 7: unknown label 'maybe' \(known: neg, pos\)"):
        LabelMap(["neg", "pos"]).ids([Row("f.tsv: line 7", "some text", "maybe")])


def test_labels_in_two_unicode_normalizations_are_refused_and_looked_up_as_one():
    """NFC "négatif" beside NFD "négatif" (they look the same) had become two classes with half the
    examples each; a reference label in the other form had been "unknown label 'négatif' (known: négatif)"."""
    import unicodedata

    nfc, nfd = "n\u00e9gatif", unicodedata.normalize("NFD", "n\u00e9gatif")
    with pytest.raises(DataError, match=r"labels 'ne\\u0301gatif' and 'n\\xe9gatif' are the same text in two "
                                        r"Unicode normalizations"):
        LabelMap.from_labels([nfc, nfd, "正面"])
    labels = LabelMap.from_labels([nfc, "正面", "😀"])
    assert labels.id(nfd) == labels.id(nfc) == labels.labels.index(nfc)
    with pytest.raises(DataError, match="unknown label 'neutre'"):
        labels.id("neutre")


@pytest.mark.parametrize("name, content, message", [
    ("missing.tsv", "text\tstars\ngood\t5\n", r"missing\.tsv: line 2: missing field 'label'"),
    ("ragged.tsv", "text\tlabel\ngood\tpos\nbad\tneg\textra\n", r"ragged\.tsv: line 3: expected 2 columns"),
    ("bad.jsonl", '{"text": "good", "label": "pos"}\n{"text": "bad", "label": \n', r"bad\.jsonl: line 2: malformed JSON"),
    ("empty.csv", "text,label\ngood,pos\n,neg\n", r"empty\.csv: line 3: empty 'text' field"),
])
def test_bad_records_name_their_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_rows(path, "text", "label")


def test_a_header_without_the_text_column_is_a_usage_error_before_any_record(tmp_path):
    """Training and evaluate had read it as a bad record (line 2: missing field, exit 1) where the batch
    commands refuse the header (exit 2): one reader, one answer."""
    from kerasllm.errors import UsageError

    path = tmp_path / "pairs.tsv"
    path.write_text("source\ttarget\none\t1\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"pairs\.tsv: no text column 'text' in the header \(columns: source, target\)"):
        read_rows(path, "text", "label")


def test_numbers_from_jsonl_are_labels(tmp_path):
    path = tmp_path / "stars.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3 + 1}) + "\n" for i in range(6)))
    rows = read_rows(path, "text", "label")
    assert LabelMap.from_labels([r.label for r in rows]).labels == ["1", "2", "3"]


def test_a_directory_of_text_files_gives_one_record_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("third line\n", encoding="utf-8")
    rows = read_rows(tmp_path)
    assert [r.text for r in rows] == ["first line", "second line", "third line"]
    assert rows[1].where.endswith("a.txt: line 3")


def test_token_classifier_learns_a_context_dependent_tagging_rule():
    """Tag 1 for every token that follows the marker id 7, else 0; padding (-1) is ignored."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(6, 17, 640)
    ids = np.zeros((640, 16), "int32")
    labels = np.full((640, 16), -1, "int32")
    for row, length in enumerate(lengths):
        tokens = rng.integers(6, 20, length)
        ids[row, :length] = tokens
        labels[row, :length] = np.concatenate([[0], tokens[:-1] == 7]).astype("int32")
    mask = (labels >= 0).astype("int32")
    keras.utils.set_random_seed(0)
    model = TokenClassifier(EncoderConfig.preset("tiny", vocab_size=24, num_labels=2, max_length=16))
    model.compile(learning_rate=3e-3, total_steps=480, jit_compile=False)
    inputs = {"token_ids": ids, "padding_mask": mask}
    model.fit({k: v[:512] for k, v in inputs.items()}, labels[:512], batch_size=32, epochs=30, verbose=0)
    predicted = np.asarray(model({k: v[512:] for k, v in inputs.items()})).argmax(-1)
    real = labels[512:] >= 0
    accuracy = (predicted[real] == labels[512:][real]).mean()
    after_marker = real & (labels[512:] == 1)
    assert accuracy >= 0.97, accuracy
    assert (predicted[after_marker] == 1).mean() >= 0.9  # the rare class is learned, not just the majority
