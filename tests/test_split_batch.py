"""The split step (kerasllm/models/split_batch.py) trains and evaluates as Keras's own step does."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasllm import CausalLM, DecoderConfig, EncoderConfig, Seq2SeqConfig, Seq2SeqLM, TextClassifier
from kerasllm.models.split_batch import AUTO_MIN_PARAMETERS, resolve_batch_split

TINY = dict(num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64, max_length=32, dropout=0.0)


def _train(make_model, x, y, batch_split, sgd=False, metrics="auto", **fit):
    # AdamW divides each gradient by its running RMS, so where a gradient sums to nearly zero,
    # float rounding between the two ways of summing it can flip an update's sign: runs that
    # compare several steps of a model with such weights use SGD to compare the step's math.
    keras.utils.set_random_seed(1)
    model = make_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1) if sgd else "auto", total_steps=50, batch_split=batch_split,
                  metrics=metrics)
    history = model.fit(x, y, epochs=3, verbose=0, shuffle=False, **fit).history
    evaluated = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    return model, history, evaluated


def _assert_same_training(one, split):
    (m1, h1, e1), (m2, h2, e2) = one, split
    assert m1.batch_parts == 1 and m2.batch_parts == 2
    for key in h1:
        np.testing.assert_allclose(h2[key], h1[key], rtol=2e-5, err_msg=key)
    for key in e1:
        np.testing.assert_allclose(e2[key], e1[key], rtol=2e-5, err_msg=key)
    for w1, w2 in zip(m1.weights, m2.weights):
        np.testing.assert_allclose(w2.numpy(), w1.numpy(), rtol=0, atol=2e-5, err_msg=w1.path)
    assert h1["loss"][-1] < h1["loss"][0]  # it learned something, so equal weights mean something


def test_causal_lm_split_step_equals_the_whole_step():
    """Odd batches (5 -> 3 + 2 rows) and a last batch of one row (1 + 0): same losses, same weights (AdamW,
    the default optimizer, with its global-norm clipping and schedule)."""
    data = np.random.default_rng(0).integers(0, 64, (11, 17))
    make = lambda: CausalLM(DecoderConfig(vocab_size=64, **TINY))  # noqa: E731
    runs = [_train(make, data[:, :-1], data[:, 1:], split, batch_size=5) for split in (1, 2)]
    _assert_same_training(*runs)


def test_classifier_metrics_see_the_whole_batch():
    """Compiled metrics (accuracy) get every part's predictions: the same figures as Keras's step."""
    rng = np.random.default_rng(1)
    x = rng.integers(5, 64, (12, 10))
    x[:, 0] = 2  # CLS-like first token
    y = (x[:, 1] > 30).astype("int32")
    make = lambda: TextClassifier(EncoderConfig(vocab_size=64, num_labels=2, **TINY))  # noqa: E731
    runs = [_train(make, x, y, split, sgd=True, metrics=["accuracy"], batch_size=6) for split in (1, 2)]
    _assert_same_training(*runs)
    assert "accuracy" in runs[1][1] and "accuracy" in runs[1][2]


def test_seq2seq_dict_inputs_split_alike():
    rng = np.random.default_rng(2)
    config = Seq2SeqConfig(vocab_size=40, **TINY)
    source = rng.integers(4, 40, (8, 9))
    target = rng.integers(4, 40, (8, 7))
    x = {"encoder_token_ids": source, "decoder_token_ids": target[:, :-1]}
    make = lambda: Seq2SeqLM(config)  # noqa: E731
    runs = [_train(make, x, target[:, 1:], split, sgd=True, batch_size=4) for split in (1, 2)]
    _assert_same_training(*runs)


def test_auto_splits_only_where_it_is_safe_and_pays(monkeypatch):
    monkeypatch.delenv("KERASLLM_BATCH_SPLIT", raising=False)
    monkeypatch.setattr("kerasllm.distribute.usable_cores", lambda: 2)
    big = CausalLM(DecoderConfig.preset("small", vocab_size=64, dropout=0.0))
    assert big.count_params() >= AUTO_MIN_PARAMETERS
    assert resolve_batch_split(big, "auto", jit_compile=True) == 2
    assert resolve_batch_split(big, "auto", jit_compile=False) == 1  # the parts are XLA programs
    assert resolve_batch_split(big, 1, jit_compile=True) == 1
    monkeypatch.setattr("kerasllm.distribute.usable_cores", lambda: 1)
    assert resolve_batch_split(big, "auto", jit_compile=True) == 1
    monkeypatch.setattr("kerasllm.distribute.usable_cores", lambda: 2)
    # Dropout: concurrent parts would draw the same masks from one seed state.
    dropout = CausalLM(DecoderConfig.preset("small", vocab_size=64, dropout=0.1))
    assert resolve_batch_split(dropout, "auto", jit_compile=True) == 1
    assert resolve_batch_split(dropout, 2, jit_compile=True) == 1
    small = CausalLM(DecoderConfig(vocab_size=64, **TINY))
    assert resolve_batch_split(small, "auto", jit_compile=True) == 1  # too small to pay for a second program
    assert resolve_batch_split(small, 2, jit_compile=True) == 2
    # Under a distribution strategy the replicas already use the devices.
    import tensorflow as tf

    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        assert resolve_batch_split(big, "auto", jit_compile=True) == 1
    monkeypatch.setenv("KERASLLM_BATCH_SPLIT", "1")
    assert resolve_batch_split(big, "auto", jit_compile=True) == 1
    monkeypatch.setenv("KERASLLM_BATCH_SPLIT", "two")
    with pytest.raises(ValueError, match="KERASLLM_BATCH_SPLIT must be an integer, got 'two'"):
        resolve_batch_split(big, "auto", jit_compile=True)
    with pytest.raises(ValueError, match="batch_split must be 'auto' or an integer >= 1"):
        resolve_batch_split(big, "two", jit_compile=True)
    # Several losses: Keras updates a Mean per loss inside compute_loss, which parts would race on.
    monkeypatch.delenv("KERASLLM_BATCH_SPLIT")
    big.compile(batch_split=2)
    assert big.batch_parts == 2
    big.compile(batch_split=2, loss=[big.default_loss(), big.default_loss()])
    assert big.batch_parts == 1


def test_split_step_inside_several_steps_per_execution():
    """kerasllm train runs several steps per call (training.execution_steps): the split step inside
    Keras's loop over them trains as Keras's own step does one call per step."""
    data = np.random.default_rng(3).integers(0, 64, (16, 17))
    runs = []
    for split, per_call in ((1, 1), (2, 4)):
        keras.utils.set_random_seed(1)
        model = CausalLM(DecoderConfig(vocab_size=64, **TINY))
        model.compile(total_steps=50, batch_split=split, steps_per_execution=per_call)
        history = model.fit(data[:, :-1], data[:, 1:], batch_size=4, epochs=2, verbose=0, shuffle=False).history
        runs.append((model, history, {}))
    _assert_same_training(*runs)
