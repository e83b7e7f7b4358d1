"""Configs: JSON round trip, presets, and clear errors."""

import dataclasses
import json

import numpy as np
import pytest

from kerasllm.config import DecoderConfig, EncoderConfig, Seq2SeqConfig, config_from_dict
from kerasllm.errors import UsageError


@pytest.mark.parametrize("cls", [DecoderConfig, EncoderConfig, Seq2SeqConfig])
@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_presets_round_trip_through_json(cls, preset, tmp_path):
    config = cls.preset(preset, vocab_size=123)
    path = tmp_path / "config.json"
    config.to_json(path)
    again = cls.from_json(path)
    assert again == config
    assert config_from_dict(json.loads(path.read_text())) == config
    assert again.vocab_size == 123


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"family": "decoder", "num_layers": 2, "num_layer": 3}))
    with pytest.raises(UsageError, match="unknown key 'num_layer'"):
        DecoderConfig.from_json(path)


@pytest.mark.parametrize("change, message", [
    (dict(hidden_dim=30, num_heads=4), "not divisible"),
    (dict(position="alibi"), "position must be one of"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(dropout=1.5), "dropout"),
])
def test_invalid_values_are_refused(change, message):
    with pytest.raises(UsageError, match=message):
        DecoderConfig.preset("tiny", **change)


def test_wrong_family_and_bad_json(tmp_path):
    with pytest.raises(UsageError, match="family is 'encoder'"):
        DecoderConfig.from_dict({"family": "encoder"})
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        DecoderConfig.from_json(path)


@pytest.mark.parametrize("cls, change, message", [
    # Wrong types: bools are only True/False, ints not bools, numbers not strings.
    (DecoderConfig, dict(norm_first="no"), "norm_first must be true or false, got 'no'"),
    (DecoderConfig, dict(norm_first="false"), "norm_first must be true or false, got 'false'"),
    (DecoderConfig, dict(tie_embeddings=1), "tie_embeddings must be true or false, got 1"),
    (DecoderConfig, dict(use_bias=None), "use_bias must be true or false, got None"),
    (DecoderConfig, dict(num_layers=True), "num_layers must be a positive integer, got True"),
    (DecoderConfig, dict(hidden_dim=32.0), "hidden_dim must be a positive integer, got 32.0"),
    (DecoderConfig, dict(dropout="0.1"), r"dropout must be a number in \[0, 1\), got '0.1'"),
    (DecoderConfig, dict(dropout=False), "dropout must be a number in .*, got False"),
    (DecoderConfig, dict(dropout=float("nan")), "dropout must be a number in .*, got nan"),
    (DecoderConfig, dict(activation=None), "activation must be one of .*, got None"),
    (DecoderConfig, dict(pad_id="0"), "pad_id must be a non-negative integer, got '0'"),
    # Out of range.
    (DecoderConfig, dict(layer_norm_epsilon=-1), "layer_norm_epsilon must be a positive number, got -1"),
    (DecoderConfig, dict(layer_norm_epsilon=0.0), "layer_norm_epsilon must be a positive number, got 0.0"),
    (DecoderConfig, dict(layer_norm_epsilon=float("inf")), "layer_norm_epsilon must be a positive number, got inf"),
    (DecoderConfig, dict(eos_id=-1), "eos_id must be a non-negative integer, got -1"),
    # Special ids outside the vocabulary.
    (DecoderConfig, dict(vocab_size=2), "bos_id must be below vocab_size 2, got 2"),
    (DecoderConfig, dict(vocab_size=3), "eos_id must be below vocab_size 3, got 3"),
    (DecoderConfig, dict(vocab_size=10, eos_id=10), "eos_id must be below vocab_size 10, got 10"),
    (EncoderConfig, dict(vocab_size=4), "mask_id must be below vocab_size 4, got 4"),
    (EncoderConfig, dict(num_labels=-3), "num_labels must be a non-negative integer .*, got -3"),
    (EncoderConfig, dict(num_labels=True), "num_labels must be a non-negative integer .*, got True"),
    (EncoderConfig, dict(mask_id=None), "mask_id must be a non-negative integer, got None"),
    (EncoderConfig, dict(pooling="max"), "pooling must be one of .*, got 'max'"),
    (Seq2SeqConfig, dict(target_vocab_size=-5), "target_vocab_size must be a non-negative integer .*, got -5"),
    (Seq2SeqConfig, dict(num_decoder_layers=-1), "num_decoder_layers must be a non-negative integer .*, got -1"),
    (Seq2SeqConfig, dict(num_decoder_layers="2"), "num_decoder_layers must be a non-negative integer .*, got '2'"),
    # bos/eos are target ids; pad_id pads sources and targets alike.
    (Seq2SeqConfig, dict(target_vocab_size=3), "eos_id must be below target_vocab_size 3, got 3"),
    (Seq2SeqConfig, dict(vocab_size=3, target_vocab_size=40, pad_id=3, bos_id=1, eos_id=2),
     "pad_id must be below vocab_size 3, got 3"),
    (Seq2SeqConfig, dict(vocab_size=2), "bos_id must be below vocab_size 2, got 2"),
    (Seq2SeqConfig, dict(suppress_ids=[True]), r"suppress_ids must be a list of integer ids, got \[True\]"),
    (Seq2SeqConfig, dict(suppress_ids="5"), "suppress_ids must be a list of integer ids, got '5'"),
    (Seq2SeqConfig, dict(suppress_ids=(1, 4)), r"suppress_ids must be a list of integer ids, got \(1, 4\)"),
    (Seq2SeqConfig, dict(target_vocab_size=8, suppress_ids=[8]), r"suppress_ids must be target ids in \[0, 8\), got 8"),
])
def test_wrong_types_and_ranges_are_refused_naming_field_and_value(cls, change, message):
    with pytest.raises(UsageError, match="^config: " + message):
        cls(**change)
    # The same through JSON (bundle manifests, --config files).
    with pytest.raises(UsageError, match="^config: " + message):
        config_from_dict({**cls().to_dict(), **change})


@pytest.mark.parametrize("cls, change", [
    (DecoderConfig, dict(vocab_size=4)),  # ids 0, 2, 3: the smallest vocabulary holding them
    (DecoderConfig, dict(dropout=0)),  # floats accept ints
    (DecoderConfig, dict(dropout=0.999, layer_norm_epsilon=1)),
    (DecoderConfig, dict(norm_first=False, tie_embeddings=False, use_bias=False)),
    (DecoderConfig, dict(num_layers=1, num_heads=1, hidden_dim=1, intermediate_dim=1, max_length=2,
                         position="sinusoidal")),
    (EncoderConfig, dict(max_length=1)),
    (EncoderConfig, dict(vocab_size=5, num_labels=0, pooling="mean")),
    (EncoderConfig, dict(num_labels=2)),
    (Seq2SeqConfig, dict(vocab_size=4, num_decoder_layers=0, target_vocab_size=0)),
    (Seq2SeqConfig, dict(vocab_size=40, target_vocab_size=4, suppress_ids=[1, 2])),
    (Seq2SeqConfig, dict(vocab_size=1, target_vocab_size=40, pad_id=0, bos_id=30, eos_id=31)),
    (Seq2SeqConfig, dict(num_decoder_layers=None, target_vocab_size=None)),  # None: the same as 0
])
def test_values_at_the_edges_are_accepted(cls, change):
    config = cls(**change)
    assert config_from_dict(json.loads(config.to_json())) == config


@pytest.mark.parametrize("cls", [DecoderConfig, EncoderConfig, Seq2SeqConfig])
def test_every_field_has_a_rule(cls):
    assert set(cls.rules) == {f.name for f in dataclasses.fields(cls)}


def test_numpy_numbers_are_accepted_as_python_numbers():
    """A size computed with NumPy (`ids.max() + 1`, np.int64) is a size: it had been refused as
    "vocab_size must be a positive integer, got np.int64(64)"."""
    ids = np.arange(64)
    config = DecoderConfig.preset("tiny", vocab_size=ids.max() + 1, num_heads=np.int32(4), dropout=np.float32(0.5))
    assert (config.vocab_size, config.num_heads, config.dropout) == (64, 4, 0.5)
    assert type(config.vocab_size) is int and type(config.num_heads) is int and type(config.dropout) is float
    assert config_from_dict(json.loads(config.to_json())) == config
    assert Seq2SeqConfig(target_vocab_size=np.int64(40), suppress_ids=[np.int64(5)]).suppress_ids == [5]
    with pytest.raises(UsageError, match="vocab_size must be a positive integer, got 0"):
        DecoderConfig(vocab_size=np.int64(0))
    with pytest.raises(UsageError, match=r"vocab_size must be a positive integer, got 64.0"):
        DecoderConfig(vocab_size=np.float64(64))


def test_a_family_that_is_not_a_name_is_one_line():
    """A hand-edited config.json's "family": ["decoder"] had been a TypeError traceback (unhashable)."""
    from kerasllm.config import config_from_dict
    from kerasllm.errors import UsageError

    with pytest.raises(UsageError, match=r"^config: unknown family \['decoder'\] \(choose from decoder, encoder, seq2seq\)$"):
        config_from_dict({"family": ["decoder"]})


def test_a_decoder_needs_two_positions():
    """A causal LM of max_length 1 had trained to the end, then could neither export nor generate."""
    from kerasllm.config import DecoderConfig, EncoderConfig
    from kerasllm.errors import UsageError

    with pytest.raises(UsageError, match=r"max_length must be an integer from 2 \(a prompt token and a new one\)"):
        DecoderConfig.preset("tiny", max_length=1)
    assert EncoderConfig.preset("tiny", max_length=1).max_length == 1  # one token still classifies
