"""kerasllm.layers used directly, outside the library's models: standalone calls, users'
own functional models saved and loaded, argument checks."""

import doctest
import importlib

import numpy as np
import pytest

import keras

from kerasllm.layers import (FeedForward, MultiHeadAttention, TokenAndPositionEmbedding, TransformerBlock,
                             attention_bias)


def _round_trip(model, path, x):
    """Save `model` to `path` (.keras), load it back, and check the loaded model's output on `x`."""
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(loaded(x)))


# -- MultiHeadAttention builds on its first call -----------------------------------------------
@pytest.mark.parametrize("module", ["attention", "block", "embedding", "feedforward"])
def test_docstring_examples_run(module):
    mod = importlib.import_module(f"kerasllm.layers.{module}")
    result = doctest.testmod(mod, verbose=False)
    assert result.attempted and not result.failed


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
