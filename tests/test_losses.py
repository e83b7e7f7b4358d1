"""Sample weights reach kerasllm's default losses as they reach Keras's own."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasllm import CausalLM, DecoderConfig, EncoderConfig, TextClassifier
from kerasllm.models import SparseCrossEntropy

RNG = np.random.default_rng(0)
KERAS_SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_one_target_per_example_gives_one_loss_per_example():
    """A classifier's targets `[B]`: the loss weighs each example (it had averaged over the batch
    first, so sample and class weights multiplied one scalar)."""
    logits, labels = RNG.normal(size=(8, 3)).astype("float32"), RNG.integers(0, 3, 8)
    weights = np.array([1, 0] * 4, "float32")
    assert keras.ops.shape(SparseCrossEntropy().call(labels, logits)) == (8,)
    got = float(SparseCrossEntropy()(labels, logits, sample_weight=weights))
    assert got == pytest.approx(float(KERAS_SCCE(labels, logits, sample_weight=weights)), rel=1e-6)
    assert got != pytest.approx(float(SparseCrossEntropy()(labels, logits)), rel=1e-3)  # the weights count


@pytest.mark.parametrize("ignore_id", [None, 0])
def test_one_weight_per_position_weighs_each_position(ignore_id):
    """Targets `[B, T]` with weights `[B, T]`: Keras's reduction over weighted positions (it had
    failed: "Dimensions must be equal ... [8], [8,16]"); ignored positions weigh nothing."""
    logits, labels = RNG.normal(size=(8, 16, 11)).astype("float32"), RNG.integers(0, 11, (8, 16))
    weights = np.zeros((8, 16), "float32")
    weights[:, :4] = 1
    got = float(SparseCrossEntropy(ignore_id=ignore_id)(labels, logits, sample_weight=weights))
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=ignore_id)
    assert got == pytest.approx(float(keras_loss(labels, logits, sample_weight=weights)), rel=1e-6)
    # Per-example weights [B] still weigh each example's mean over its positions.
    rows = np.arange(8, dtype="float32")
    per_example = float(SparseCrossEntropy()(labels, logits, sample_weight=rows))
    nll = -np.take_along_axis(keras.ops.convert_to_numpy(keras.ops.log_softmax(logits)), labels[..., None], -1)[..., 0]
    assert per_example == pytest.approx(float((nll.mean(-1) * rows).mean()), rel=1e-5)


def test_ignored_positions_do_not_dilute_per_position_weights():
    """Weights `[B, T]` with an ignored id: the weighted sum is divided by the positions kept, as
    Keras's `ignore_class` does, so padding appended to the targets leaves the loss as it was (it
    had divided by every position: a Seq2SeqLM batch's loss shrank by its share of real tokens)."""
    logits, labels = RNG.normal(size=(4, 6, 11)).astype("float32"), RNG.integers(1, 11, (4, 6))
    loss = SparseCrossEntropy(ignore_id=0)
    alone = float(loss(labels, logits, sample_weight=np.ones((4, 6), "float32")))
    padded_labels = np.concatenate([labels, np.zeros((4, 10), labels.dtype)], axis=1)
    padded_logits = np.concatenate([logits, RNG.normal(size=(4, 10, 11)).astype("float32")], axis=1)
    padded = float(loss(padded_labels, padded_logits, sample_weight=np.ones((4, 16), "float32")))
    assert padded == pytest.approx(alone, rel=1e-6)
    assert alone == pytest.approx(float(KERAS_SCCE(labels, logits)), rel=1e-6)  # all kept: the plain mean


def test_models_evaluate_with_sample_weights_as_keras_loss_does():
    tokens = RNG.integers(6, 64, (8, 17))
    positions = np.zeros((8, 16), "float32")
    positions[:, :4] = 1
    causal = CausalLM(DecoderConfig.preset("tiny", vocab_size=64))
    texts = RNG.integers(6, 64, (8, 12))
    texts[:, 0] = 2
    labels, examples = np.array([0, 1] * 4), np.array([1, 0] * 4, "float32")
    classifier = TextClassifier(EncoderConfig.preset("tiny", vocab_size=64, num_labels=2))
    for model, x, y, weights in ((causal, tokens[:, :-1], tokens[:, 1:], positions),
                                 (classifier, texts, labels, examples)):
        model.compile(batch_split=1)
        ours = model.evaluate(x, y, sample_weight=weights, batch_size=8, verbose=0)
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), batch_split=1)
        theirs = model.evaluate(x, y, sample_weight=weights, batch_size=8, verbose=0)
        assert ours == pytest.approx(theirs, rel=1e-5), type(model).__name__


@pytest.mark.parametrize("ignore_id, label_smoothing", [(None, 0.0), (0, 0.1)])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_weights_of_a_rank_unknown_until_run_time_weigh_as_their_rank_does(ignore_id, label_smoothing, jit_compile):
    """Keras retraces a step that has seen `[B]` and `[B, T]` weights with the weights' rank unknown
    (it had failed: "All tensors passed to ops.shape must have a statically known rank")."""
    import tensorflow as tf

    loss = SparseCrossEntropy(label_smoothing=label_smoothing, ignore_id=ignore_id)
    logits, labels = RNG.normal(size=(4, 6, 11)).astype("float32"), RNG.integers(0, 11, (4, 6))
    relaxed = tf.function(loss, jit_compile=jit_compile, input_signature=[
        tf.TensorSpec((None, None), "int64"), tf.TensorSpec((None, None, 11), "float32"), tf.TensorSpec(None)])
    for weights in (RNG.uniform(size=4).astype("float32"), RNG.uniform(size=(4, 6)).astype("float32")):
        expected = float(loss(labels, logits, sample_weight=weights))  # the weights' rank known
        assert float(relaxed(labels, logits, weights)) == pytest.approx(expected, rel=1e-6), weights.shape


def test_one_model_takes_weights_per_example_then_per_position_as_keras_loss_does():
    tokens = RNG.integers(6, 64, (8, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]
    per_example, per_position = RNG.uniform(size=8), RNG.uniform(size=(8, 16))
    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=64))
    model.compile(batch_split=1)
    ours = [model.evaluate(x, y, sample_weight=w, batch_size=8, verbose=0) for w in (per_example, per_position)]
    # Keras's loss takes per-position weights only: a row's weight at each of its positions.
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), batch_split=1)
    theirs = [model.evaluate(x, y, sample_weight=w, batch_size=8, verbose=0)
              for w in (np.repeat(per_example[:, None], 16, axis=1), per_position)]
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours[0] != pytest.approx(ours[1], rel=1e-3)  # the two kinds weigh differently


def test_one_classifier_takes_labels_of_shape_b_then_b_1():
    """Keras takes a classifier's labels as [B] or [B, 1]; a model given both (evaluate, then fit)
    retraces with the labels' rank unknown, where the loss had failed ("statically known rank")."""
    x = RNG.integers(6, 64, (8, 12)).astype("int32")
    y = RNG.integers(0, 3, (8,))
    model = TextClassifier(EncoderConfig.preset("tiny", vocab_size=64, num_labels=3, max_length=16))
    model.compile(batch_split=1)
    losses = [model.evaluate(x, labels, batch_size=8, verbose=0) for labels in (y, y[:, None], y)]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-6)
    model.fit(x, y[:, None], epochs=1, batch_size=8, verbose=0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_an_ignored_id_gives_the_token_mean_whatever_the_weights(label_smoothing):
    """With `ignore_id` (a Seq2SeqLM's padding) the loss is the mean over the batch's kept positions,
    as torch's CrossEntropyLoss(ignore_index) computes it: no weights, weights of ones per position
    and per example give one value, and a row of padding only adds nothing. Without weights it had
    been the mean of each row's mean (short targets' tokens weighing more), which weights of ones
    changed, and an all-padding row had counted as a loss of 0 (the batch's loss shrank by 1/B)."""
    logits, labels = RNG.normal(size=(4, 7, 11)).astype("float32"), RNG.integers(1, 11, (4, 7))
    labels[0, 5:], labels[1, 2:] = 0, 0  # rows keep 5, 2, 7 and 7 positions
    loss = SparseCrossEntropy(label_smoothing=label_smoothing, ignore_id=0)
    log_probs = keras.ops.convert_to_numpy(keras.ops.log_softmax(logits))
    token = -(1 - label_smoothing) * np.take_along_axis(log_probs, labels[..., None], -1)[..., 0] \
        - label_smoothing * log_probs.mean(-1)
    kept = labels != 0
    expected = token[kept].mean()  # torch: CrossEntropyLoss(ignore_index=0, label_smoothing=...)
    values = [float(loss(labels, logits)), float(loss(labels, logits, sample_weight=np.ones((4, 7), "float32"))),
              float(loss(labels, logits, sample_weight=np.ones(4, "float32")))]
    assert values == pytest.approx([expected] * 3, rel=1e-5)
    padded = float(loss(np.concatenate([labels, np.zeros((1, 7), labels.dtype)]),
                        np.concatenate([logits, RNG.normal(size=(1, 7, 11)).astype("float32")])))
    assert padded == pytest.approx(expected, rel=1e-5)
    # A weight per example weighs each of its positions (Keras's broadcast), still over the kept ones.
    rows = np.array([1, 0, 2, 1], "float32")
    weighted = float(loss(labels, logits, sample_weight=rows))
    assert weighted == pytest.approx(float((token * rows[:, None])[kept].sum() / kept.sum()), rel=1e-5)


def test_classifier_labels_of_shape_b_1_are_smoothed_and_weighed_as_b():
    """Labels `[B, 1]` with label smoothing had failed in take_along_axis, and with `[B]` weights
    the direct call had returned the batch's mean loss times the mean weight."""
    logits, labels = RNG.normal(size=(8, 3)).astype("float32"), RNG.integers(0, 3, 8)
    weights = RNG.uniform(size=8).astype("float32")
    for smoothing in (0.0, 0.1):
        loss = SparseCrossEntropy(label_smoothing=smoothing)
        assert float(loss(labels[:, None], logits, sample_weight=weights)) == pytest.approx(
            float(loss(labels, logits, sample_weight=weights)), rel=1e-6)
    model = TextClassifier(EncoderConfig.preset("tiny", vocab_size=64, num_labels=3, max_length=16))
    model.compile(label_smoothing=0.1, batch_split=1)
    x = RNG.integers(6, 64, (8, 12)).astype("int32")
    history = model.fit(x, labels[:, None], epochs=3, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
