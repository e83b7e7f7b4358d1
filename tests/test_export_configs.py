"""Encoder and seq2seq exports of configs off the presets' beaten path: tiny random models, each
exported with the default options, its bundle's outputs compared with Keras's (labels and greedy
tokens identical, logits within the export's fp32 tolerance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,"


def _model_dir(path: Path, task: str, config, model) -> Path:
    """Lay `model` out as `kerasllm train TASK` does (with a char tokenizer over CHARS)."""
    from kerasllm.tokenizers import TextTokenizer
    from kerasllm.training import save_model_atomic, write_json_atomic

    path.mkdir()
    TextTokenizer.train([CHARS], kind="char").save(path)
    write_json_atomic(path / "config.json", {"task": task, "model": config.to_dict(), "train": {}})
    save_model_atomic(model, path)
    return path


def _vocab_size() -> int:
    from kerasllm.tokenizers import TextTokenizer

    return TextTokenizer.train([CHARS], kind="char").vocab_size


def _export(run: Path, out: Path, **options):
    from kerasllm.export.exporter import ExportOptions, export_model_dir

    return export_model_dir(run, out, ExportOptions(**options), log=lambda message: None)


def export_classifier(tmp_path: Path, **overrides):
    """A random tiny classifier with `overrides`, exported: `(model, bundle)`."""
    import keras

    from kerasllm import EncoderConfig, TextClassifier

    keras.utils.set_random_seed(0)
    config = EncoderConfig.preset("tiny", vocab_size=_vocab_size(), num_labels=3, max_length=64, **overrides)
    model = TextClassifier(config)
    return model, _export(_model_dir(tmp_path / "run", "classifier", config, model), tmp_path / "bundle")


def export_seq2seq(tmp_path: Path, **overrides):
    """A random tiny one-layer encoder-decoder with `overrides`, exported: `(model, bundle)`."""
    import keras

    from kerasllm import Seq2SeqConfig, Seq2SeqLM

    keras.utils.set_random_seed(0)
    config = Seq2SeqConfig.preset("tiny", vocab_size=_vocab_size(), dropout=0.0,
                                  **{"num_layers": 1, "max_length": 32, **overrides})
    model = Seq2SeqLM(config)
    model.generate([[7]], max_new_tokens=1)  # builds the weights
    return model, _export(_model_dir(tmp_path / "run", "seq2seq", config, model), tmp_path / "bundle")


def assert_classifier_bundle_matches_keras(model, bundle) -> None:
    from kerasllm.export.runtime import create_session

    session = create_session(bundle.graph_path("model"), "cpu").session
    rng = np.random.default_rng(0)
    ids = rng.integers(6, model.config.vocab_size, (3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = model.config.pad_id, 0  # a padded row
    expected = np.asarray(model.export_outputs(ids.astype("int32"), mask)["logits"])
    (got,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
    assert np.abs(got - expected).max() <= 1e-4
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()


def assert_translations_match_keras(model, bundle) -> None:
    from kerasllm.export.translate_predictor import BundleTranslator

    c = model.config
    translator = BundleTranslator(bundle.path, device="cpu")
    rng = np.random.default_rng(0)
    sources = [rng.integers(6, c.vocab_size, size=min(n, c.max_length)).tolist() for n in (4, 9, 6)]
    new = min(10, c.max_length - 1)
    got = translator._generate(sources, translator.options(max_new_tokens=new))
    assert [h[0].tokens for h in got] == model.generate(sources, max_new_tokens=new)


def test_a_one_head_classifier_exports_with_parity(tmp_path):
    """One head: tf2onnx had merged the head Transpose (a Reshape for a size-1 axis) with the head
    merge's Reshape [0, 0, C], copying [B, 1] where [B, T] was meant (convert.py keeps it apart)."""
    model, bundle = export_classifier(tmp_path, num_heads=1)
    assert bundle.manifest["validation"]["labels_compared"] > 0
    assert_classifier_bundle_matches_keras(model, bundle)


def test_a_one_head_seq2seq_model_exports_and_translates_as_keras(tmp_path):
    model, bundle = export_seq2seq(tmp_path, num_heads=1)
    assert bundle.manifest["validation"]["greedy"]["identical"] is True
    assert_translations_match_keras(model, bundle)


def test_a_bias_free_seq2seq_model_exports_and_translates_as_keras(tmp_path):
    """use_bias=False: tf2onnx had merged the cross-attention key/value projection's [B*S, 2C]
    tensordot output with the head split Reshape [0, 0, 2, H, D], taking B and T from the 2-D
    tensor (ORT: cannot reshape {5,64} to {5,64,2,2,16}), whatever the options. Two decoder layers:
    their projections share the encoder output's flattening, which convert._fold_tensordot leaves."""
    model, bundle = export_seq2seq(tmp_path, use_bias=False, num_decoder_layers=2)
    assert bundle.manifest["validation"]["greedy"]["identical"] is True
    assert_translations_match_keras(model, bundle)


def test_a_seq2seq_decoder_with_heads_group_query_attention_refuses_keeps_the_growing_cache(tmp_path):
    """Head size 4: ORT's GroupQueryAttention (the decoder's in-place self-attention buffer) refuses
    it when it runs, which had ended the default export in a traceback; the decoder keeps the growing
    cache (MultiHeadAttention) and the manifest says why."""
    model, bundle = export_seq2seq(tmp_path, num_heads=8)
    decoder = bundle.manifest["optimization"]["decoder"]
    assert decoder["kv_cache"] == "growing" and "GroupQueryAttention" not in decoder["fusions"]
    assert decoder["shared_buffer_unsupported"].endswith("this model's is 4")
    assert "attention_fusion_reverted" not in decoder
    assert bundle.manifest["validation"]["greedy"]["identical"] is True
    assert_translations_match_keras(model, bundle)


def test_a_short_seq2seq_model_exports_with_validation_cases_that_fit(tmp_path):
    """max_length 6: the validation's greedy sources of 9 tokens had ended the export ("a source of 9
    tokens exceeds the model's max_length"); its cases now fit, the decoder step shortened where needed."""
    model, bundle = export_seq2seq(tmp_path, max_length=6)
    validation = bundle.manifest["validation"]
    assert validation["greedy"]["identical"] is True and validation["greedy"]["max_new_tokens"] == 5
    assert max(v for k, v in validation["max_abs_diff"].items() if k.endswith("logits")) <= 1e-4
    assert_translations_match_keras(model, bundle)
