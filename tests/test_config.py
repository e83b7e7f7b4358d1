"""Configs: JSON round trip, presets, and clear errors."""

import json

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
