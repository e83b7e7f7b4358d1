"""Arrays given to `fit`/`evaluate`/`predict` (kerasllm/models/array_inputs.py): Keras's own batches,
split and weights, as untuned datasets of known length; other inputs untouched."""

import numpy as np
import pytest

import keras

from kerasllm import CausalLM, DecoderConfig, EncoderConfig, TextClassifier
from kerasllm.models.split_batch import SplitBatchFitMixin


def causal_lm(seed=0):
    keras.utils.set_random_seed(seed)
    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=40))
    model.compile(jit_compile=False, batch_split=1)
    return model


def tokens(rows=70, seed=1):
    return np.random.default_rng(seed).integers(6, 40, (rows, 17)).astype("int32")


def test_fit_on_arrays_trains_as_keras_does(capsys):
    """Same batches (70 rows, batch 8: the last one of 4 after a 25% split), the same validation rows,
    the same losses and weights as `keras.Model.fit` on the same arrays."""
    x = tokens()
    runs = {}
    for name, fit in (("kerasllm", CausalLM.fit), ("keras", keras.Model.fit)):
        model = causal_lm()
        history = fit(model, x[:, :-1], x[:, 1:], batch_size=8, epochs=2, shuffle=False, validation_split=0.25,
                      verbose=1)
        runs[name] = (model, history.history, capsys.readouterr().out)
    (ours, ours_history, ours_bar), (theirs, theirs_history, theirs_bar) = runs["kerasllm"], runs["keras"]
    assert ours_history.keys() == theirs_history.keys() == {"loss", "val_loss"}
    for key in ours_history:
        np.testing.assert_allclose(ours_history[key], theirs_history[key], rtol=1e-6, err_msg=key)
    for a, b in zip(ours.weights, theirs.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6, err_msg=a.path)
    assert "7/7" in ours_bar and "7/7" in theirs_bar  # ceil(52 / 8) steps, known to the progress bar


def test_class_weights_and_dict_inputs_as_keras_weighs_them():
    rng = np.random.default_rng(2)
    ids = rng.integers(6, 40, (48, 12)).astype("int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    labels = (ids[:, 1] > 22).astype("int32")
    runs = []
    for fit in (TextClassifier.fit, keras.Model.fit):
        keras.utils.set_random_seed(0)
        model = TextClassifier(EncoderConfig.preset("tiny", vocab_size=40, max_length=16, num_labels=2))
        model.compile(jit_compile=False, batch_split=1)
        history = fit(model, inputs, labels, batch_size=16, epochs=2, shuffle=False, class_weight={0: 1.0, 1: 3.0},
                      verbose=0)
        runs.append((history.history["loss"], model.predict(inputs, verbose=0), model.evaluate(inputs, labels,
                                                                                                verbose=0)))
    (loss_a, logits_a, eval_a), (loss_b, logits_b, eval_b) = runs
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    np.testing.assert_allclose(logits_a, logits_b, rtol=0, atol=1e-6)
    assert eval_a == pytest.approx(eval_b, rel=1e-6)


def test_keras_gets_untuned_datasets_of_known_length_and_other_inputs_as_they_are(monkeypatch):
    import tensorflow as tf

    seen = []
    fit_as_is = SplitBatchFitMixin.fit

    def spy(self, x=None, *args, validation_data=None, **kwargs):
        seen.append((x, validation_data))
        return fit_as_is(self, x, *args, validation_data=validation_data, **kwargs)

    monkeypatch.setattr(SplitBatchFitMixin, "fit", spy)
    model, x = causal_lm(), tokens()
    model.fit(x[:, :-1], x[:, 1:], batch_size=8, epochs=1, validation_data=(x[:10, :-1], x[:10, 1:]), verbose=0)
    train, validation = seen[-1]
    for dataset, batches in ((train, 9), (validation, 2)):
        assert isinstance(dataset, tf.data.Dataset)
        assert dataset.options().autotune.enabled is False
        assert int(dataset.cardinality()) == batches
    # with steps_per_epoch the training arrays stay Keras's; validation arrays still take batch_size
    model.fit(x[:, :-1], x[:, 1:], batch_size=5, steps_per_epoch=2, epochs=1,
              validation_data=(x[:10, :-1], x[:10, 1:]), verbose=0)
    train, validation = seen[-1]
    assert isinstance(train, np.ndarray) and int(validation.cardinality()) == 2
    own = tf.data.Dataset.from_tensor_slices((x[:, :-1], x[:, 1:])).batch(8)
    model.fit(own, epochs=1, verbose=0)
    assert seen[-1][0] is own  # a dataset of the caller's keeps its own options
