"""What `fit`/`evaluate`/`predict`/`generate` refuse from a Python caller, in one line, before Keras runs."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasllm import CausalLM, DecoderConfig, EncoderConfig, MaskedLM, Seq2SeqConfig, Seq2SeqLM, TextClassifier
from kerasllm.errors import UsageError

RNG = np.random.default_rng(0)


def causal_lm():
    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=64, max_length=32))
    model.compile()  # XLA, as by default: there an id past the table is clamped, not refused
    return model


def seq2seq(**config):
    model = Seq2SeqLM(Seq2SeqConfig.preset("tiny", vocab_size=64, max_length=32, **config))
    model.compile()
    return model


def test_ids_outside_the_vocabulary_are_refused_before_they_clamp_or_spread_nan():
    """Input ids past the vocabulary had been clamped into the embedding table under XLA (the model
    read another token, no error); targets past it had given loss NaN and, after one fit, NaN weights."""
    model = causal_lm()
    tokens = RNG.integers(6, 64, (4, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]
    before = [w.numpy().copy() for w in model.weights]
    for bad_x, bad_y, name, bad in ((x + 100, y, "token_ids", x.max() + 100), (x, y + 100, "targets", y.max() + 100),
                                    (x - 70, y, "token_ids", x.min() - 70)):
        message = rf"^CausalLM: {name} holds id {bad}, outside the vocabulary of 64 ids \(0\.\.63\)$"
        for run in (lambda: model.fit(bad_x, bad_y, verbose=0), lambda: model.evaluate(bad_x, bad_y, verbose=0),
                    lambda: model.fit(x, y, validation_data=(bad_x, bad_y), verbose=0)):
            with pytest.raises(ValueError, match=message):
                run()
    with pytest.raises(ValueError, match=r"^CausalLM: token_ids holds id 1\d\d, outside the vocabulary"):
        model.predict(x + 100, verbose=0)
    with pytest.raises(ValueError, match=r"^CausalLM: token_ids holds id 1234567, outside"):  # not 1.23457e+06
        model.predict(np.full((2, 8), 1234567.0, "float32"), verbose=0)
    for w, old in zip(model.weights, before):  # nothing ran
        np.testing.assert_array_equal(w.numpy(), old)
    # Ids in range still train, and a loss of the caller's own is not second-guessed.
    assert np.isfinite(model.fit(x, y, verbose=0).history["loss"][0])
    model.compile(loss=lambda t, p: keras.ops.mean(p), jit_compile=False, batch_split=1)
    model.evaluate(x, y + 100, verbose=0)


def test_seq2seq_checks_each_side_against_its_own_vocabulary():
    """A separate target vocabulary (40 ids) bounds the decoder's ids and the targets, not the source's."""
    model = seq2seq(target_vocab_size=40)
    source, target = RNG.integers(6, 64, (4, 9)), RNG.integers(6, 40, (4, 7))
    x = {"encoder_token_ids": source, "decoder_token_ids": target[:, :-1]}
    assert np.isfinite(model.evaluate(x, target[:, 1:], verbose=0))  # source ids 40..63 are fine
    with pytest.raises(ValueError, match=r"^Seq2SeqLM: decoder_token_ids holds id 45, outside the vocabulary of "
                                         r"40 ids \(0\.\.39\)$"):
        model.evaluate({**x, "decoder_token_ids": np.full((4, 6), 45)}, target[:, 1:], verbose=0)
    with pytest.raises(ValueError, match=r"^Seq2SeqLM: targets holds id 40, outside the vocabulary of 40 ids"):
        model.fit(x, np.full((4, 6), 40), verbose=0)
    padded = target[:, 1:].copy()
    padded[:, 3:] = model.config.pad_id  # the ignored id is a target like any other
    model.evaluate(x, padded, verbose=0)


def test_inputs_of_the_wrong_structure_say_what_the_model_takes():
    """A dict without a needed key had failed inside `call` with a bare KeyError, a Seq2SeqLM given an
    array with a TypeError about tensor indices."""
    model = seq2seq()
    source, target = RNG.integers(6, 64, (4, 9)), RNG.integers(6, 64, (4, 7))
    expected = "Seq2SeqLM expects a dict with encoder_token_ids and decoder_token_ids"
    for run, tail in ((lambda: model.predict({"encoder_token_ids": source}, verbose=0),
                       "; decoder_token_ids missing (got encoder_token_ids)"),
                      (lambda: model.fit(source, target, verbose=0), ", got ndarray"),
                      (lambda: model.evaluate(source.tolist(), target, verbose=0), ", got ndarray")):
        with pytest.raises(ValueError, match=f"^{expected}{tail}$".replace("(", r"\(").replace(")", r"\)")):
            run()
    with pytest.raises(ValueError, match=r"^CausalLM expects a dict with token_ids; token_ids missing \(got ids\)$"):
        causal_lm().predict({"ids": source}, verbose=0)


def test_fit_and_evaluate_take_lists_of_rows_as_predict_does():
    """`fit`/`evaluate` had refused lists of rows (Keras's "Unrecognized data type", printing the
    whole input) where `predict` took them."""
    tokens = RNG.integers(6, 64, (8, 13))
    x, y = tokens[:, :-1], tokens[:, 1:]
    results = []
    for given_x, given_y in ((x, y), (x.tolist(), y.tolist())):
        keras.utils.set_random_seed(3)
        model = causal_lm()
        history = model.fit(given_x, given_y, validation_data=(given_x, given_y), batch_size=4, shuffle=False,
                            verbose=0).history
        results.append([*history["loss"], *history["val_loss"], model.evaluate(given_x, given_y, verbose=0)])
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6)
    classifier = TextClassifier(EncoderConfig.preset("tiny", vocab_size=64, num_labels=2))
    classifier.compile()
    assert np.isfinite(classifier.evaluate(x.tolist(), [0, 1] * 4, verbose=0))
    with pytest.raises(ValueError, match=r"expects targets of shape \[batch, length\], got rows of 2 to 3 tokens"):
        causal_lm().fit(x[:2].tolist(), [[7, 8, 9], [7, 8]], verbose=0)


def test_masked_lm_targets_are_checked_against_the_vocabulary():
    model = MaskedLM(EncoderConfig.preset("tiny", vocab_size=64))
    model.compile()
    tokens = RNG.integers(6, 64, (4, 10))
    positions = RNG.integers(1, 10, (4, 2))
    x = {"token_ids": tokens, "mask_positions": positions}
    with pytest.raises(ValueError, match=r"^MaskedLM: targets holds id 64, outside the vocabulary of 64 ids"):
        model.fit(x, np.full((4, 2), 64), sample_weight=np.ones((4, 2)), verbose=0)


def test_generate_checks_its_stop_ids():
    """`stop_token_ids` was the one unchecked argument: one int was a TypeError, strings a Keras dtype
    error, and ids the model can never emit were taken (stopping nothing)."""
    model = causal_lm()
    prompt = [[7, 8, 9]]
    one = model.generate(prompt, max_new_tokens=4, stop_token_ids=12)
    np.testing.assert_array_equal(one, model.generate(prompt, max_new_tokens=4, stop_token_ids=[12]))
    np.testing.assert_array_equal(model.generate(prompt, max_new_tokens=4, stop_token_ids=[]),
                                  model.generate(prompt, max_new_tokens=4))
    for bad, message in ((["3"], r"stop_token_ids must be token ids \(integers\), got '3' in them"),
                         ([1.5], r"stop_token_ids must be token ids \(integers\), got 1\.5 in them"),
                         ([999], r"stop token id 999 is outside the vocabulary of 64 ids \(0\.\.63\)"),
                         ([-1], r"stop token id -1 is outside the vocabulary of 64 ids \(0\.\.63\)")):
        with pytest.raises(UsageError, match=f"^generate: {message}$"):
            model.generate(prompt, max_new_tokens=4, stop_token_ids=bad)


def test_compile_refuses_settings_it_would_not_apply():
    """With an optimizer or loss of the caller's own, the default optimizer's settings and the default
    loss's label smoothing had been dropped without a word."""
    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=64))
    with pytest.raises(ValueError, match=r"^compile: learning_rate, total_steps configure the default optimizer "
                                         r"\(optimizer='auto'\); with an optimizer of your own, set them there$"):
        model.compile(optimizer=keras.optimizers.SGD(0.1), learning_rate=0.5, total_steps=100)
    # passed at all, whatever the value: the defaults' own values had been dropped without a word (no clipping)
    with pytest.raises(ValueError, match=r"^compile: global_clipnorm configures the default optimizer .* set it there$"):
        model.compile(optimizer=keras.optimizers.SGD(0.1), global_clipnorm=1.0)
    with pytest.raises(ValueError, match=r"^compile: learning_rate, weight_decay configure the default optimizer"):
        model.compile(optimizer=keras.optimizers.SGD(0.1), learning_rate=1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"^compile: label_smoothing applies to the default loss"):
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), label_smoothing=0.1)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.compile(total_steps=100, label_smoothing=0.1)  # the defaults take them
    model.compile(learning_rate=1e-3, weight_decay=0.1, global_clipnorm=1.0)
    assert (model.optimizer.weight_decay, model.optimizer.global_clipnorm) == (0.1, 1.0)


def test_stop_ids_come_in_any_iterable():
    """A set, dict keys or a generator of ids had worked before the check and must still."""
    model = causal_lm()
    prompt = [[7, 8, 9]]
    expected = model.generate(prompt, max_new_tokens=4, stop_token_ids=[12, 13])
    for given in ({12, 13}, frozenset({12, 13}), dict.fromkeys([12, 13]).keys(), (i for i in (12, 13)),
                  np.array([12, 13])):
        np.testing.assert_array_equal(model.generate(prompt, max_new_tokens=4, stop_token_ids=given), expected)
    with pytest.raises(UsageError, match=r"^generate: stop_token_ids must be token ids \(integers\), got '12'$"):
        model.generate(prompt, max_new_tokens=4, stop_token_ids="12")


def test_token_classifier_targets_are_padded_with_no_label():
    """Rows of tags of different lengths: the advice had been pad_id 0, a real label (padding then
    trained as label 0); -1 is the label the loss ignores."""
    from kerasllm import TokenClassifier

    model = TokenClassifier(EncoderConfig.preset("tiny", vocab_size=64, num_labels=3))
    model.compile()
    with pytest.raises(ValueError, match=r"got rows of 2 to 3 tokens: pad the rows to one length with -1 \(no "
                                         r"label\) \(after each row's tokens\)$"):
        model.fit([[2, 7, 8], [2, 9, 0]], [[0, 1, 2], [0, 1]], verbose=0)


def test_a_loss_that_ignores_an_id_outside_the_vocabulary_takes_it():
    """Keras's loss with ignore_class=-100 (Hugging Face's convention): -100 is no token id."""
    model = causal_lm()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100),
                  jit_compile=False, batch_split=1)
    tokens = RNG.integers(6, 64, (4, 9))
    x, y = tokens[:, :-1], tokens[:, 1:].copy()
    y[:, 5:] = -100
    assert np.isfinite(model.evaluate(x, y, verbose=0))
    y[0, 0] = 500
    with pytest.raises(ValueError, match=r"^CausalLM: targets holds id 500, outside the vocabulary of 64 ids"):
        model.evaluate(x, y, verbose=0)
