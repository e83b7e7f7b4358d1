"""The Python API as a user's own Keras code calls it: what it refuses, and in which words."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasllm import CausalLM, DecoderConfig, EncoderConfig, MaskedLM, TextClassifier, TokenClassifier

IDS = np.random.RandomState(0).randint(20, 64, (16, 13))


@pytest.mark.parametrize("make", [
    lambda: CausalLM(DecoderConfig.preset("tiny", vocab_size=64)),
    lambda: TokenClassifier(EncoderConfig.preset("tiny", vocab_size=64, num_labels=3)),
])
def test_class_weight_is_refused_where_targets_are_per_token(make):
    """Keras weighs an example by the class argmax(y, -1), for [B, T] targets the position of the
    row's largest id: a CausalLM's loss had become 0.0 (no training, nothing said), a
    TokenClassifier's fit a TensorFlow graph error."""
    model = make()
    model.compile()
    targets = IDS[:, 1:] if isinstance(model, CausalLM) else IDS[:, 1:] % 3
    with pytest.raises(ValueError, match=r"class_weight weighs each example by its one class, and \w+'s targets "
                                         r"are per token: give the weights per token as sample_weight"):
        model.fit(IDS[:, :-1], targets, class_weight={0: 0.5, 1: 1.0, 2: 1.0}, epochs=1, verbose=0)


def test_class_weight_still_weighs_a_text_classifiers_examples():
    """One label per text: class_weight is Keras's per-example weighting, as sample_weight gives it."""
    labels = IDS[:, 0] % 2
    losses = []
    for weights in ({"class_weight": {0: 0.25, 1: 1.0}}, {"sample_weight": np.where(labels == 0, 0.25, 1.0)}):
        keras.utils.set_random_seed(1)
        model = TextClassifier(EncoderConfig.preset("tiny", vocab_size=64, num_labels=2))
        model.compile()
        losses.append(model.fit(IDS, labels, epochs=1, batch_size=16, verbose=0, **weights).history["loss"][0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_ragged_token_ids_are_refused_in_one_line():
    """A tf.RaggedTensor had failed inside the attention mask ("unsupported operand type(s) for -")."""
    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=64))
    model.compile()
    rows = tf.ragged.constant([[7, 8, 9, 10], [7, 8, 9]])
    dataset = tf.data.Dataset.from_tensor_slices((rows[:, :-1], rows[:, 1:])).batch(2)
    message = r"CausalLM expects token_ids of shape \[batch, length\], got a ragged tensor: pad it \(`.to_tensor\(0\)`"
    with pytest.raises(ValueError, match=message):
        model.fit(dataset, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=message):
        model.predict(rows, verbose=0)


@pytest.mark.parametrize("cls", [TextClassifier, TokenClassifier])
def test_fine_tuning_from_a_masked_lm(cls):
    """TokenClassifier had no from_masked_lm (the CLI's --init-from had); a change to the encoder's
    shape had failed in Keras's set_weights ("a weight list of length 28, but ... expecting 40")."""
    masked_lm = MaskedLM(EncoderConfig.preset("tiny", vocab_size=64))
    masked_lm(IDS)
    model = cls.from_masked_lm(masked_lm, num_labels=3, dropout=0.1)
    assert model.config.num_labels == 3 and model.config.dropout == 0.1
    for mine, pretrained in zip(model.encoder.get_weights(), masked_lm.encoder.get_weights()):
        np.testing.assert_array_equal(mine, pretrained)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.from_masked_lm: hidden_dim, num_layers cannot change "
                                         r"\(the pretrained encoder's weights fix them\); only dropout and pooling can"):
        cls.from_masked_lm(masked_lm, num_labels=3, num_layers=3, hidden_dim=64)


def test_export_under_a_mixed_precision_policy_writes_an_fp32_bundle(tmp_path):
    """A script that trains under mixed_float16 and then exports had loaded the model in fp16 compute
    and traced a graph of mixed fp16 and fp32 nodes: ONNX Runtime refused it after the conversion."""
    from kerasllm.export.exporter import export_model_dir
    from kerasllm.export.predict import load_predictor
    from kerasllm.tokenizers import TextTokenizer

    tokenizer = TextTokenizer.train(["the quick brown fox jumps over the lazy dog"], kind="char")
    config = DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_length=32)
    model_dir = _decoder_dir(tmp_path / "model", tokenizer, config)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        export_model_dir(model_dir, tmp_path / "bundle", log=lambda line: None)
        assert keras.config.dtype_policy().name == "mixed_float16"  # the script's policy given back
    finally:
        keras.config.set_dtype_policy("float32")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["dtype"] == "fp32"
    assert load_predictor("generate", tmp_path / "bundle") is not None


def test_a_vocabulary_padded_past_the_tokenizer_never_generates_the_padding(tmp_path, run_cli):
    """A model's vocabulary may be padded past its tokenizer's (a round 64 here, 20-odd characters):
    export verified such a model, then `generate` sampled an id the tokenizer does not have and
    ended in a traceback ("token id 52 is outside the vocabulary"), its output file lost, from the
    bundle and from the model dir alike."""
    from kerasllm.export.exporter import export_model_dir
    from kerasllm.tokenizers import TextTokenizer

    tokenizer = TextTokenizer.train(["the quick brown fox jumps over the lazy dog"], kind="char")
    assert tokenizer.vocab_size < 40
    config = DecoderConfig.preset("tiny", vocab_size=64, max_length=32)
    keras.utils.set_random_seed(3)
    model_dir = _decoder_dir(tmp_path / "model", tokenizer, config)
    export_model_dir(model_dir, tmp_path / "bundle", log=lambda line: None)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the fox\nover the\nlazy dog\nquick\n")
    for source in (tmp_path / "bundle", model_dir):
        out = tmp_path / f"{source.name}.jsonl"
        result = run_cli("generate", source, "-i", prompts, "-o", out, "--max-new-tokens", "24",
                         "--temperature", "50", "--seed", "1", "--quiet")
        assert result.code == 0, result
        outputs = [json.loads(line)["output"] for line in out.read_text().splitlines()]
        assert len(outputs) == 4 and all(len(o) > 0 for o in outputs), outputs


def test_predictors_refuse_rows_longer_than_the_model_in_one_line(tmp_path, tiny_seq2seq_bundle):
    """`BundleGenerator.predict` refused a prompt past max_length; the translator's and the encoders'
    `predict` had failed inside ONNX Runtime (learned positions) or run past the trained positions."""
    from kerasllm.errors import UsageError
    from kerasllm.export.predict import load_predictor
    from kerasllm.tokenizers import TextTokenizer

    translator = load_predictor("translate", tiny_seq2seq_bundle)
    with pytest.raises(UsageError, match=r"^source 0 has 40 tokens, more than the model's max_length 32$"):
        translator.predict([[5] * 40])
    tokenizer = TextTokenizer.train(["good bad fine"], kind="char")
    config = EncoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_length=16, num_labels=2)
    model_dir = _classifier_dir(tmp_path / "classifier", tokenizer, config)
    classifier = load_predictor("classify", model_dir)
    with pytest.raises(UsageError, match=r"^text 1 has 17 tokens, more than the model's max_length 16$"):
        classifier.outputs([[2, 5], [2] + [5] * 16], ["logits"])


def _classifier_dir(path, tokenizer, config):
    """A model directory of an untrained TextClassifier with labels bad, good."""
    path.mkdir()
    TextClassifier(config).save(path / "model.keras")
    tokenizer.save(path / "tokenizer.json")
    (path / "config.json").write_text(json.dumps({"task": "classifier", "model": config.to_dict(),
                                                  "labels": ["bad", "good"]}))
    return path


def _decoder_dir(path, tokenizer, config):
    """A model directory of an untrained CausalLM (what `kerasllm export` and the batch commands read)."""
    path.mkdir()
    CausalLM(config).save(path / "model.keras")
    tokenizer.save(path / "tokenizer.json")
    (path / "config.json").write_text(json.dumps({"task": "causal-lm", "model": config.to_dict()}))
    return path


def test_an_export_whose_attention_did_not_fuse_says_so(tmp_path):
    """ONNX Runtime's optimizer finds no attention pattern with one head: such bundles ran attention as
    plain ops and said nothing (the manifest's reasons covered only the fusions kerasllm keeps out)."""
    from kerasllm.export.exporter import export_model_dir
    from kerasllm.tokenizers import TextTokenizer

    tokenizer = TextTokenizer.train(["the quick brown fox jumps over the lazy dog"], kind="char")
    lines = []
    for heads in (1, 2):
        config = DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_length=32, num_heads=heads)
        model_dir = _decoder_dir(tmp_path / f"model{heads}", tokenizer, config)
        export_model_dir(model_dir, tmp_path / f"bundle{heads}", log=lines.append)
    one, two = (json.loads((tmp_path / f"bundle{h}" / "manifest.json").read_text())["optimization"] for h in (1, 2))
    assert "GroupQueryAttention" in two["fusions"] and "attention_unfused" not in two
    assert not any(op in one["fusions"] for op in ("Attention", "MultiHeadAttention", "GroupQueryAttention"))
    assert one["attention_unfused"].startswith("ONNX Runtime's optimizer found no attention pattern to fuse")
    assert sum(line.startswith("note: ONNX Runtime's optimizer found no attention") for line in lines) == 1


def test_a_cls_pooled_classifiers_query_only_block_is_explained_not_called_slower(tmp_path):
    """Its last block attends from the CLS token only (on purpose: less work), which no fusion matches:
    a one-layer one had been given the one-head / no-biases note ("slower"), with 2 heads and biases."""
    from kerasllm.export.exporter import CLS_QUERY_BLOCK, export_model_dir
    from kerasllm.tokenizers import TextTokenizer

    tokenizer = TextTokenizer.train(["good bad fine"], kind="char")
    reports, notes = {}, []
    for layers, pooling in ((1, "cls"), (2, "cls"), (1, "mean")):
        config = EncoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_length=16, num_labels=2,
                                      num_layers=layers, pooling=pooling)
        model_dir = _classifier_dir(tmp_path / f"c{layers}{pooling}", tokenizer, config)
        lines = []
        export_model_dir(model_dir, tmp_path / f"b{layers}{pooling}", log=lines.append)
        reports[layers, pooling] = json.loads((tmp_path / f"b{layers}{pooling}" / "manifest.json").read_text())[
            "optimization"]
        notes += [line for line in lines if line.startswith("note:")]
    assert notes == []
    for key in ((1, "cls"), (2, "cls")):
        assert reports[key]["cls_query_block"] == CLS_QUERY_BLOCK and "attention_unfused" not in reports[key]
    assert reports[2, "cls"]["fusions"]["Attention"] == 1  # the first block's
    assert "cls_query_block" not in reports[1, "mean"] and reports[1, "mean"]["fusions"]["Attention"] == 1


def test_fine_tuning_may_set_max_length_where_no_position_table_fixes_it():
    masked_lm = MaskedLM(EncoderConfig.preset("tiny", vocab_size=64, position="rotary", max_length=32))
    masked_lm(IDS)
    assert TextClassifier.from_masked_lm(masked_lm, num_labels=2, max_length=64).config.max_length == 64


def test_a_model_dir_of_another_task_is_named_by_its_task(tmp_path):
    """"runs/clf: a encoder model cannot generate": the family's name, with the wrong article."""
    from kerasllm.errors import UsageError
    from kerasllm.export.predict import load_predictor
    from kerasllm.tokenizers import TextTokenizer

    tokenizer = TextTokenizer.train(["good bad fine"], kind="char")
    config = EncoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_length=16, num_labels=2)
    model_dir = _classifier_dir(tmp_path / "clf", tokenizer, config)
    for task, needs in (("generate", "a causal LM"), ("translate", "a seq2seq model")):
        with pytest.raises(UsageError, match=f"^{model_dir}: a 'classifier' model cannot {task} \\(needs {needs}\\)$"):
            load_predictor(task, model_dir)
    lm_dir = _decoder_dir(tmp_path / "lm", tokenizer, DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size))
    with pytest.raises(UsageError, match=f"^{lm_dir}: a 'causal-lm' model cannot embed \\(needs an encoder\\)$"):
        load_predictor("embed", lm_dir)


def test_a_subclass_adds_layers_in_its_own_init():
    """Built at the end of each model's own __init__, a model was locked before a subclass could add a
    layer after super().__init__() (keras-hub's models allow it): a value head on a CausalLM."""

    class ValueLM(CausalLM):
        def __init__(self, config, **kwargs):
            super().__init__(config, **kwargs)
            self.value_head = keras.layers.Dense(1, name="value_head")

        def values(self, ids):
            return self.value_head(self.embedding(ids))

    model = ValueLM(DecoderConfig.preset("tiny", vocab_size=64))
    assert model.built and model.count_params() == CausalLM(DecoderConfig.preset("tiny", vocab_size=64)).count_params()
    assert tuple(model.values(IDS[:2]).shape) == (2, 13, 1)
    assert any(v is model.value_head.kernel for v in model.trainable_variables)  # the model's weights now
    clone = ValueLM.from_config(model.get_config())
    assert clone.built and isinstance(clone.value_head, keras.layers.Dense)

    class Counted(CausalLM):  # built right after super().__init__(), as before
        def __init__(self, config, **kwargs):
            super().__init__(config, **kwargs)
            self.base_parameters = self.count_params()
            self.extra = keras.layers.Dense(2, name="extra")

    plain = CausalLM(DecoderConfig.preset("tiny", vocab_size=64)).count_params()
    assert Counted(DecoderConfig.preset("tiny", vocab_size=64)).base_parameters == plain

    class Built(ValueLM):  # a build() of its own: built once its __init__ has made its layers
        def build(self, input_shape=None):
            super().build(input_shape)
            self.value_head.build((None, None, self.config.hidden_dim))

    built = Built(DecoderConfig.preset("tiny", vocab_size=64))
    assert len(built.weights) == len(CausalLM(DecoderConfig.preset("tiny", vocab_size=64)).weights) + 2

    class Mixin:  # put first, with an __init__ of its own
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.mixed = keras.layers.Dense(2, name="mixed")

    class Mixed(Mixin, CausalLM):
        pass

    assert Mixed(DecoderConfig.preset("tiny", vocab_size=64)).built
    with pytest.raises(ValueError, match="cannot add new elements of state"):
        built.late = keras.layers.Dense(1)  # locked once constructed, as any built Keras layer


@pytest.mark.parametrize("make, inputs", [
    (lambda: CausalLM(DecoderConfig.preset("tiny", vocab_size=64)), IDS[:2]),
    (lambda: TextClassifier(EncoderConfig.preset("tiny", vocab_size=64, num_labels=2)), IDS[:2]),
    (lambda: __import__("kerasllm").Seq2SeqLM(__import__("kerasllm").Seq2SeqConfig.preset("tiny", vocab_size=64)),
     {"encoder_token_ids": IDS[:2], "decoder_token_ids": IDS[:2, :5]}),
])
def test_model_export_serves_integer_token_ids(make, inputs, tmp_path):
    """Keras's default signature follows input_dtype: float32 ids (TF Serving's integer ids refused), and
    a Seq2SeqLM did not export at all."""
    model = make()
    expected = model(inputs)
    model.export(tmp_path / "saved", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "saved"))
    ids = tf.nest.map_structure(lambda a: tf.constant(a, tf.int32), inputs)
    np.testing.assert_allclose(served.serve(ids), expected, atol=1e-5)
    spec = tf.nest.flatten(served.signatures["serving_default"].structured_input_signature[1])
    assert {s.dtype for s in spec} == {tf.int32}


def test_token_ids_that_are_not_whole_numbers_are_refused():
    """`x / 64.0` (a "normalise the inputs" step) had been read as id 0, padding, and trained on."""
    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=64))
    model.compile()
    with pytest.raises(ValueError, match=r"CausalLM: token_ids holds 0\.\d+, not a token id \(ids are whole numbers"):
        model.predict(IDS / 64.0, verbose=0)
    with pytest.raises(ValueError, match=r"targets holds nan, not a token id"):
        model.fit(IDS[:, :-1], np.where(IDS[:, 1:] > 30, np.nan, IDS[:, 1:]), epochs=1, verbose=0)
    assert model.predict(IDS.astype("float32"), verbose=0).shape == (16, 13, 64)  # whole floats are ids


def test_a_padding_mask_of_another_shape_and_a_missing_input_are_named():
    from kerasllm import Seq2SeqConfig, Seq2SeqLM

    classifier = TextClassifier(EncoderConfig.preset("tiny", vocab_size=64, num_labels=2))
    with pytest.raises(ValueError, match=r"padding_mask of shape \[16, 5\] for token_ids of shape \[16, 13\]"):
        classifier.predict({"token_ids": IDS, "padding_mask": np.ones((16, 5), "int32")}, verbose=0)
    s2s = Seq2SeqLM(Seq2SeqConfig.preset("tiny", vocab_size=64))
    with pytest.raises(ValueError, match="expects a dict with encoder_token_ids and decoder_token_ids; "
                                         "decoder_token_ids missing"):
        s2s({"encoder_token_ids": IDS})


def test_a_callback_setting_the_learning_rate_beside_a_schedule_is_refused_at_fit():
    """Keras refused at the callback's first change (maybe hours in), telling to build "the optimizer
    with a float learning_rate", which compile() built."""
    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=64))
    model.compile(total_steps=8)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=0)
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau sets the learning rate, which follows a schedule here "
                                         r"\(WarmupCosineDecay, from compile\(total_steps=...\)\)"):
        model.fit(IDS[:, :-1], IDS[:, 1:], epochs=1, verbose=0, callbacks=[plateau])
    with pytest.raises(ValueError, match="ReduceLROnPlateau sets the learning rate"):  # Keras's CallbackList too
        model.fit(IDS[:, :-1], IDS[:, 1:], epochs=1, verbose=0, callbacks=keras.callbacks.CallbackList([plateau]))
    model.compile()  # a constant rate: the callback may change it
    model.fit(IDS[:, :-1], IDS[:, 1:], epochs=2, verbose=0, callbacks=[plateau])


def test_generate_inside_a_tf_function_says_it_runs_eagerly():
    from kerasllm.errors import UsageError

    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=64))
    with pytest.raises(UsageError, match="generate runs eagerly"):
        tf.function(lambda prompt: model.generate(prompt, max_new_tokens=2))(tf.constant([[7, 8, 9]]))


def test_a_model_trained_in_python_saves_as_a_model_dir_that_exports(tmp_path):
    """The model directory's format had been found only in the tests; `save_model_dir` writes it."""
    from kerasllm import save_model_dir
    from kerasllm.export.exporter import export_model_dir
    from kerasllm.export.predict import load_predictor
    from kerasllm.tokenizers import TextTokenizer

    tokenizer = TextTokenizer.train(["good film", "bad film", "a good day", "a bad day"], kind="char")
    config = EncoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size, num_labels=2)
    model = TextClassifier(config)
    texts = ["good film", "bad film"]
    ids = np.array([[tokenizer.bos_id] + tokenizer.encode(t)[:8] for t in texts])
    with pytest.raises(ValueError, match=r"2 different label names needed \(config.num_labels\), got \['x'\]"):
        save_model_dir(tmp_path / "bad", model, tokenizer, labels=["x"])
    run = save_model_dir(tmp_path / "run", model, tokenizer, labels=["negative", "positive"])
    export_model_dir(run, tmp_path / "bundle", log=lambda line: None)  # verified against Keras at export
    expected = model.predict(ids, verbose=0)
    for source in (run, tmp_path / "bundle"):
        classifier = load_predictor("classify", source)
        results = classifier.predict([classifier.check(t) for t in texts])
        assert [r["label"] for r in results] == [["negative", "positive"][i] for i in expected.argmax(-1)]
