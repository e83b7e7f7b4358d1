"""kerasllm.layers used directly, outside the library's models: standalone calls, users'
own functional models saved and loaded, argument checks."""

import doctest
import importlib

import numpy as np
import pytest

import keras
import tensorflow as tf
from keras import ops

from kerasllm.layers import (FeedForward, MultiHeadAttention, TokenAndPositionEmbedding, TransformerBlock,
                             attention_bias)


def _round_trip(model, path, x):
    """Save `model` to `path` (.keras), load it back, and check the loaded model's output on `x`."""
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(loaded(x)))


# -- MultiHeadAttention builds on its first call -----------------------------------------------
@pytest.mark.parametrize("module", [f"kerasllm.layers.{name}" for name in ("attention", "block", "embedding", "feedforward")]
                         + ["kerasllm.models.encoder", "kerasllm.distribute", "kerasllm.export.translate_predictor"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert not result.failed
    # translate_predictor's one example needs a bundle and 2 workers (skipped): doctest reads the module
    # (a "+SKIP  (2 workers)" directive had made it refuse the whole module).
    assert result.attempted or module.endswith("translate_predictor")


def test_multi_head_attention_builds_on_its_first_call():
    keras.utils.set_random_seed(0)
    layer = MultiHeadAttention(num_heads=2, head_dim=16, name="mha")
    x = keras.random.normal((1, 5, 32))
    out, key, value = layer(x, bias=attention_bias(5, 5))
    assert tuple(out.shape) == (1, 5, 32) and tuple(key.shape) == tuple(value.shape) == (1, 2, 5, 16)
    # The same variables as when built explicitly (TransformerBlock's way; saved models depend on it).
    explicit = MultiHeadAttention(num_heads=2, head_dim=16, name="mha")
    explicit.build((1, 5, 32))
    assert [v.path for v in layer.weights] == [v.path for v in explicit.weights]
    explicit.set_weights(layer.get_weights())
    np.testing.assert_allclose(np.asarray(explicit(x, bias=attention_bias(5, 5))[0]), np.asarray(out),
                               atol=1e-6)


def test_cross_attention_builds_on_its_first_call_from_the_context():
    keras.utils.set_random_seed(0)
    layer = MultiHeadAttention(num_heads=2, head_dim=4, cross_attention=True)
    x, context = keras.random.normal((2, 3, 8)), keras.random.normal((2, 5, 12))
    out, key, value = layer(x, context=context)
    assert tuple(out.shape) == (2, 3, 8) and tuple(key.shape) == (2, 2, 5, 4)
    assert tuple(layer.key_value_dense.kernel.shape) == (12, 16)
    expected = layer.cross_attend(x, *layer.project_key_value(context))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-6)
    with pytest.raises(ValueError, match="context"):
        layer(x)
    with pytest.raises(ValueError, match="context"):
        MultiHeadAttention(num_heads=2, head_dim=4)(x, context=context)


# -- users' own functional models save and load -------------------------------------------------
def test_functional_model_with_feedforward_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(0)
    tokens = keras.Input((None,), dtype="int32")
    h = FeedForward(16)(TokenAndPositionEmbedding(20, 8, 8)(tokens))
    model = keras.Model(tokens, keras.layers.Dense(3)(h))
    _round_trip(model, tmp_path / "ff.keras", np.arange(12, dtype="int32").reshape(2, 6) % 20)


@pytest.mark.parametrize("overrides", [dict(), dict(activation="swiglu", norm_first=False, rotary=True)])
def test_functional_model_with_a_transformer_block_saves_and_loads(overrides, tmp_path):
    keras.utils.set_random_seed(0)
    tokens = keras.Input((None,), dtype="int32")
    h = TokenAndPositionEmbedding(20, 8, 8, position="rotary" if overrides else "learned")(tokens)
    h, _, _ = TransformerBlock(num_heads=2, intermediate_dim=16, **overrides)(h)
    model = keras.Model(tokens, keras.layers.Dense(3)(h))
    _round_trip(model, tmp_path / "block.keras", np.arange(12, dtype="int32").reshape(2, 6) % 20)


def test_functional_model_with_attention_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(0)
    x = keras.Input((None, 8))
    out, _, _ = MultiHeadAttention(num_heads=2, head_dim=4)(x)
    model = keras.Model(x, out)
    _round_trip(model, tmp_path / "mha.keras", np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32"))


def test_builds_accept_shapes_as_lists():
    """Keras restores build shapes from JSON as lists."""
    FeedForward(16).build([None, None, 8])
    TransformerBlock(num_heads=2, intermediate_dim=16, cross_attention=True).build([None, None, 8])
    MultiHeadAttention(num_heads=2, head_dim=4, cross_attention=True).build([None, 3, 8], [None, 5, 12])
    TokenAndPositionEmbedding(20, 8, 8).build([None, None])


# -- activations are checked ---------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda a: FeedForward(16, a),
                                  lambda a: TransformerBlock(num_heads=2, intermediate_dim=16, activation=a)])
def test_an_unknown_activation_is_refused_at_construction(make):
    with pytest.raises(ValueError, match="'bogus'.*'gelu', 'relu', 'swiglu'"):
        make("bogus")
    for name in ("gelu", "relu", "swiglu"):
        make(name)


# -- the configs' rules for positions and heads --------------------------------------------------
def test_an_unknown_position_kind_is_refused_at_construction():
    """It had built a layer that adds no position information at all."""
    with pytest.raises(ValueError, match="unknown position 'absolute': expected one of 'learned', 'sinusoidal', "
                                         "'rotary'"):
        TokenAndPositionEmbedding(vocab_size=10, max_length=8, hidden_dim=4, position="absolute")


def test_heads_that_do_not_split_the_width_are_refused():
    """Width 30 over 4 heads had silently attended over 4 x 7 = 28 dimensions."""
    block = TransformerBlock(num_heads=4, intermediate_dim=64)
    with pytest.raises(ValueError, match="hidden_dim 30 is not divisible by num_heads 4"):
        block(keras.random.normal((1, 4, 30)))
    with pytest.raises(ValueError, match="rotary positions need an even head size, got 5"):
        TransformerBlock(num_heads=2, intermediate_dim=16, rotary=True).build((None, None, 10))
    out, _, _ = TransformerBlock(num_heads=3, intermediate_dim=16)(keras.random.normal((1, 4, 30)))
    assert tuple(out.shape) == (1, 4, 30)


# -- learned positions past max_length ----------------------------------------------------------
def test_learned_positions_past_max_length_are_a_clear_error():
    layer = TokenAndPositionEmbedding(20, 4, 8, position="learned")
    layer(np.zeros((1, 4), "int32"))  # max_length tokens: fine
    with pytest.raises(ValueError, match="6 tokens.*max_length 4"):
        layer(np.zeros((1, 6), "int32"))
    with pytest.raises(ValueError, match="position 4.*max_length 4"):
        layer(np.zeros((1, 5), "int32"), np.arange(5, dtype="int32")[None])
    with pytest.raises(ValueError, match="position 4.*max_length 4"):
        layer(np.zeros((1, 2), "int32"), ops.convert_to_tensor([[0, 4]], "int32"))
    with pytest.raises(ValueError, match="position -1"):
        layer(np.zeros((1, 2), "int32"), np.array([[0, -1]], "int32"))
    # Traced with a static length: at trace time, for a Keras model or a tf.function alike.
    with pytest.raises(ValueError, match="6 tokens.*max_length 4"):
        layer(keras.Input((6,), dtype="int32"))
    with pytest.raises(ValueError, match="6 tokens.*max_length 4"):
        tf.function(lambda t: layer(t)).get_concrete_function(tf.TensorSpec((1, 6), tf.int32))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_learned_positions_within_max_length_run_traced_with_a_dynamic_length(jit_compile):
    layer = TokenAndPositionEmbedding(20, 4, 8, position="learned")
    ids = np.array([[1, 2, 3]], "int32")
    eager = np.asarray(layer(ids))
    step = tf.function(lambda t, p: layer(t, p), jit_compile=jit_compile,
                       input_signature=[tf.TensorSpec((None, None), tf.int32)] * 2)
    np.testing.assert_allclose(step(ids, np.array([[0, 1, 2]], "int32")).numpy(), eager, atol=1e-6)
    plain = tf.function(lambda t: layer(t), jit_compile=jit_compile,
                        input_signature=[tf.TensorSpec((None, None), tf.int32)])
    np.testing.assert_allclose(plain(ids).numpy(), eager, atol=1e-6)


@pytest.mark.parametrize("position", ["sinusoidal", "rotary"])
def test_sinusoidal_and_rotary_positions_run_past_max_length(position):
    layer = TokenAndPositionEmbedding(20, 4, 8, position=position)
    assert tuple(layer(np.zeros((1, 9), "int32")).shape) == (1, 9, 8)
    assert tuple(layer(np.zeros((1, 2), "int32"), np.array([[7, 100]], "int32")).shape) == (1, 2, 8)
    assert tuple(layer(keras.Input((9,), dtype="int32")).shape) == (None, 9, 8)
    traced = tf.function(lambda t: layer(t), input_signature=[tf.TensorSpec((None, None), tf.int32)])
    assert tuple(traced(np.zeros((2, 11), "int32")).shape) == (2, 11, 8)
