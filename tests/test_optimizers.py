"""kerasllm's AdamW and WarmupCosineDecay compute what Keras's AdamW and CosineDecay compute."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasllm.optimizers import AdamW, WarmupCosineDecay


@pytest.mark.parametrize("warmup", [0, 10])
def test_schedule_equals_keras_cosine_decay(warmup):
    ours = WarmupCosineDecay(peak=1e-3, decay_steps=90, warmup_steps=warmup, final=1e-4)
    keras_schedule = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else 1e-3, 90, alpha=0.1, warmup_target=1e-3 if warmup else None, warmup_steps=warmup)
    steps = [0, 1, 5, 9, 10, 11, 50, 99, 100, 101, 150]
    np.testing.assert_allclose([float(ours(s)) for s in steps], [float(keras_schedule(s)) for s in steps],
                               rtol=1e-6, atol=1e-12)
    # the shape itself: 0 -> peak over the warmup, then down to final and held there
    assert float(ours(warmup)) == pytest.approx(1e-3)
    assert float(ours(warmup + 90)) == pytest.approx(1e-4) and float(ours(10_000)) == pytest.approx(1e-4)
    restored = WarmupCosineDecay.from_config(ours.get_config())
    assert float(restored(42)) == float(ours(42))


def _model():
    inputs = keras.Input((6,))
    hidden = keras.layers.LayerNormalization(name="norm")(keras.layers.Dense(16, activation="gelu", name="inner")(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))


def _optimizer(cls, schedule, clipnorm, amsgrad, global_clipnorm=None):
    optimizer = cls(learning_rate=schedule, weight_decay=0.1, beta_1=0.9, beta_2=0.99, clipnorm=clipnorm,
                    global_clipnorm=global_clipnorm, amsgrad=amsgrad)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


@pytest.mark.parametrize("clipnorm, global_clipnorm, amsgrad",
                         [(None, None, False), (0.05, None, False), (None, 0.05, False), (0.05, None, True)])
def test_adamw_matches_keras_step_by_step(clipnorm, global_clipnorm, amsgrad):
    """Same initial weights, same batches, jit-compiled train steps: the weights stay equal to float
    rounding after every step (a small clipnorm so that clipping is active on every gradient)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 32, 6)).astype("float32")
    y = rng.normal(size=(8, 32, 3)).astype("float32")
    keras.utils.set_random_seed(1)
    reference, ours = _model(), _model()
    ours.set_weights(reference.get_weights())
    reference.compile(optimizer=_optimizer(keras.optimizers.AdamW, keras.optimizers.schedules.CosineDecay(
        0.0, 6, alpha=0.1, warmup_target=1e-2, warmup_steps=2), clipnorm, amsgrad, global_clipnorm), loss="mse",
        jit_compile=True)
    ours.compile(optimizer=_optimizer(AdamW, WarmupCosineDecay(1e-2, 6, warmup_steps=2, final=1e-3), clipnorm,
                                      amsgrad, global_clipnorm), loss="mse", jit_compile=True)
    start = [w.copy() for w in ours.get_weights()]
    for step in range(8):
        reference.train_on_batch(x[step], y[step])
        ours.train_on_batch(x[step], y[step])
        for a, b in zip(reference.get_weights(), ours.get_weights()):
            np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-7, err_msg=f"step {step + 1}")
    # and training did move the weights (a test that could not fail otherwise)
    assert max(float(np.abs(a - b).max()) for a, b in zip(start, ours.get_weights())) > 1e-3
