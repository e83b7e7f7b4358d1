"""Encoder family end to end with the real CLI: masked-LM pretraining, classifier training,
evaluate, export to a bundle, batch inference, parity between the bundle and Keras, bad input.

One masked LM, one classifier and their bundles are trained once per module (tiny preset,
no XLA) on the generated sentiment task and shared by the tests.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kerasllm import datasets

FAST = ["--preset", "tiny", "--seq-len", "64", "--batch-size", "32", "--no-jit-compile", "--quiet"]


def kerasllm(*args) -> int:
    """Run the CLI in-process; the exit code."""
    from kerasllm.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def write_rows(path: Path, rows, fmt: str) -> Path:
    if fmt == "tsv":
        path.write_text("text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows), encoding="utf-8")
    return path


def build(root: Path) -> None:
    train = write_rows(root / "train.tsv", datasets.sentiment_rows(1500, seed=1), "tsv")
    write_rows(root / "test.jsonl", datasets.sentiment_rows(300, seed=7), "jsonl")
    assert kerasllm("train", "masked-lm", "--data", train, "--out", root / "mlm", "--steps", "100",
                    "--eval-interval", "50", "--lr", "3e-3", *FAST) == 0
    assert kerasllm("train", "classifier", "--data", train, "--out", root / "clf", "--steps", "150",
                    "--eval-interval", "150", "--lr", "3e-3", *FAST) == 0
    assert kerasllm("export", root / "clf", "--out", root / "clf-bundle") == 0
    assert kerasllm("export", root / "mlm", "--out", root / "mlm-bundle") == 0


@pytest.fixture(scope="module")
def work(build_once):
    """Data, a masked LM, a classifier trained from scratch, and both bundles (read-only for tests),
    built once per test session (`build_once`, tests/conftest.py)."""
    root = build_once("encoder-pipeline", build)
    return root, root / "train.tsv", root / "test.jsonl"


def history(run: Path):
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_masked_lm_loss_falls(work):
    root, _, _ = work
    steps = history(root / "mlm")
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.4, steps
    validation = [h["val_loss"] for h in steps if "val_loss" in h]
    assert len(validation) == 2 and validation[1] < validation[0]
    config = json.loads((root / "mlm" / "config.json").read_text())
    assert config["task"] == "masked-lm" and config["model"]["family"] == "encoder"


def test_masked_lm_cli_compiles_with_the_label_smoothing_it_is_given(tmp_path, monkeypatch):
    """`--label-smoothing` reaches MaskedLM.compile (it was once accepted and dropped) and is saved with the run."""
    from kerasllm import MaskedLM

    seen, compile_as_is = [], MaskedLM.compile

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("label_smoothing"))
        return compile_as_is(self, *args, **kwargs)

    monkeypatch.setattr(MaskedLM, "compile", spy)
    train = write_rows(tmp_path / "train.tsv", datasets.sentiment_rows(100, seed=1), "tsv")
    assert kerasllm("train", "masked-lm", "--data", train, "--out", tmp_path / "mlm", "--steps", "2",
                    "--eval-interval", "2", "--label-smoothing", "0.1", *FAST) == 0
    assert seen == [0.1]
    assert json.loads((tmp_path / "mlm" / "config.json").read_text())["train"]["label_smoothing"] == 0.1


def test_classifier_reaches_95_percent_in_keras_and_bundle(work, capsys, tmp_path):
    root, _, test = work
    results = {}
    for source in ("clf", "clf-bundle"):
        capsys.readouterr()
        assert kerasllm("evaluate", root / source, "--data", test, "--output", tmp_path / f"{source}.json") == 0
        printed = json.loads(capsys.readouterr().out)
        results[source] = json.loads((tmp_path / f"{source}.json").read_text())
        assert printed == results[source]
        assert results[source]["count"] == 300
        assert results[source]["accuracy"] >= 0.95 and results[source]["macro_f1"] >= 0.95, results
    assert results["clf"] == results["clf-bundle"]
    config = json.loads((root / "clf" / "config.json").read_text())
    assert config["labels"] == ["negative", "positive"]


def test_bundle_labels_identical_and_logits_within_1e4(work):
    from kerasllm.export.predict import load_predictor

    root, _, test = work
    texts = [json.loads(line)["text"] for line in test.read_text().splitlines()]
    keras_side = load_predictor("classify", root / "clf")
    onnx_side = load_predictor("classify", root / "clf-bundle")
    manifest = json.loads((root / "clf-bundle" / "manifest.json").read_text())
    assert manifest["labels"] == ["negative", "positive"] and manifest["family"] == "encoder"
    assert manifest["validation"]["max_abs_diff"]["logits"] <= 1e-4
    batch = [keras_side.check(t) for t in texts[:64]]
    assert batch == [onnx_side.check(t) for t in texts[:64]]
    expected, got = keras_side.outputs(batch, ["logits", "embeddings"]), onnx_side.outputs(batch, ["logits", "embeddings"])
    np.testing.assert_array_equal(expected["logits"].argmax(-1), got["logits"].argmax(-1))
    np.testing.assert_allclose(got["logits"], expected["logits"], atol=1e-4)
    np.testing.assert_allclose(got["embeddings"], expected["embeddings"], atol=1e-4)
    results = onnx_side.predict(batch[:3], top_k=1)
    assert all(set(r) == {"label", "scores"} and list(r["scores"]) == [r["label"]] for r in results)


def test_fp16_bundle_keeps_the_fused_graph_and_the_labels(work, tmp_path):
    """fp16 (the GPU export): attention and the residual + layer norm pairs fused (one kernel each
    on CUDA), and the same labels as the fp32 bundle on the test set (checked on the CPU)."""
    from kerasllm.export.predict import load_predictor

    root, _, test = work
    assert kerasllm("export", root / "clf", "--out", tmp_path / "fp16", "--dtype", "fp16") == 0
    fusions = json.loads((tmp_path / "fp16" / "manifest.json").read_text())["optimization"]["fusions"]
    assert fusions["Attention"] >= 1 and fusions["SkipLayerNormalization"] >= 1, fusions
    texts = [json.loads(line)["text"] for line in test.read_text().splitlines()]
    labels = []
    for source in (root / "clf-bundle", tmp_path / "fp16"):
        predictor = load_predictor("classify", source)
        labels.append([r["label"] for r in predictor.predict([predictor.check(t) for t in texts], top_k=1)])
    assert len(labels[0]) == 300 and labels[0] == labels[1]


def test_bundles_fuse_attention_and_split_runs_agree_with_one_run(work):
    """The validated graph is the fused one, and the predictor's runs by length (CPU) give the
    outputs of one run over the whole padded batch: labels, embeddings, per-token logits."""
    from kerasllm.export.batch import plan_batches
    from kerasllm.export.predict import load_predictor

    root, _, test = work
    texts = [json.loads(line)["text"] for line in test.read_text().splitlines()][:48]
    for name, task in (("clf-bundle", "classify"), ("mlm-bundle", "embed")):
        manifest = json.loads((root / name / "manifest.json").read_text())
        # every layer, but a CLS-pooled classifier's last, which attends from one query (Encoder.first_token)
        layers = manifest["config"]["num_layers"] - (name == "clf-bundle")
        assert manifest["optimization"]["fusions"]["Attention"] == layers, manifest
        predictor = load_predictor(task, root / name)
        assert predictor.run_tokens  # a CPU session: the batch is split
        batch = [predictor.check(t) for t in texts]
        lengths = {len(ids) for ids in batch}
        assert len(lengths) > 5
        predictor.run_tokens = 4 * min(lengths) + 64  # several runs, of different sizes and lengths
        assert len(plan_batches([len(ids) for ids in batch], len(batch), predictor.run_tokens)) > 2
        split = predictor.outputs(batch, ["logits", "embeddings"])
        predictor.run_tokens = None
        whole = predictor.outputs(batch, ["logits", "embeddings"])
        real = np.zeros(whole["logits"].shape[:2], bool)
        for row, ids in enumerate(batch):
            real[row, :len(ids)] = True
        for key in ("logits", "embeddings"):
            assert split[key].shape == whole[key].shape
            got, expected = (split[key], whole[key]) if split[key].ndim == 2 else (split[key][real], whole[key][real])
            np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_array_equal(split["logits"].argmax(-1)[real if task == "embed" else slice(None)],
                                      whole["logits"].argmax(-1)[real if task == "embed" else slice(None)])


def test_padding_does_not_change_bundle_results(work):
    from kerasllm.export.predict import load_predictor

    root, _, _ = work
    predictor = load_predictor("classify", root / "clf-bundle")
    texts = ["This kettle is awful.", "I bought the tent last week and it is wonderful, really wonderful.",
             "My watch turned out flimsy after a month.", "Great."]
    batch = [predictor.check(t) for t in texts]
    together = predictor.outputs(batch, ["logits", "embeddings"])
    for i, ids in enumerate(batch):
        alone = predictor.outputs([ids], ["logits", "embeddings"])
        for name in ("logits", "embeddings"):
            np.testing.assert_allclose(together[name][i], alone[name][0], atol=1e-5)
    embedder = load_predictor("embed", root / "clf-bundle")
    vectors = np.array([r["embedding"] for r in embedder.predict(batch, normalize=True)])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)


def test_masked_lm_perplexity_agrees_between_keras_and_bundle(work, capsys):
    root, _, test = work
    values = []
    for source in ("mlm", "mlm-bundle"):
        capsys.readouterr()
        assert kerasllm("evaluate", root / source, "--data", test) == 0
        values.append(json.loads(capsys.readouterr().out))
    assert values[0]["masked_tokens"] == values[1]["masked_tokens"] > 1000
    assert values[0]["perplexity"] == pytest.approx(values[1]["perplexity"], rel=1e-4)
    vocab = json.loads((root / "mlm" / "config.json").read_text())["model"]["vocab_size"]
    assert values[0]["perplexity"] < vocab / 2  # far better than a uniform guess over the vocabulary


def test_init_from_reuses_the_pretrained_encoder_and_tokenizer(work, tmp_path):
    from kerasllm.modeldir import load_model_dir

    root, train, _ = work
    out = tmp_path / "finetuned"
    # One step at a negligible rate: the encoder must still hold the masked LM's weights. No --preset
    # (FAST[2:]): the architecture is the pretrained run's.
    assert kerasllm("train", "classifier", "--data", train, "--init-from", root / "mlm", "--out", out,
                    "--steps", "1", "--lr", "1e-9", "--weight-decay", "0", "--validation-fraction", "0", *FAST[2:]) == 0
    assert (out / "tokenizer.json").read_bytes() == (root / "mlm" / "tokenizer.json").read_bytes()
    pretrained, _, _ = load_model_dir(root / "mlm")
    finetuned, _, run = load_model_dir(out)
    assert run["train"]["init_from"] == str(root / "mlm") and run["model"]["num_labels"] == 2
    for a, b in zip(pretrained.encoder.get_weights(), finetuned.encoder.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_init_from_a_tokenizer_that_lacks_the_datas_characters_is_said(work, tmp_path, caplog):
    """The README's pipeline with other text: the masked LM's char tokenizer never saw a digit, and the
    fine-tune's reviews are full of them (they had become `<unk>` without a word)."""
    import logging

    root, _, _ = work
    data = write_rows(tmp_path / "digits.tsv", [(f"Order {n} arrived on day {n * 7 % 31}.", "positive" if n % 2 else
                                                 "negative") for n in range(1000, 1040)], "tsv")
    with caplog.at_level(logging.WARNING, logger="kerasllm"):
        assert kerasllm("train", "classifier", "--data", data, "--init-from", root / "mlm", "--out", tmp_path / "clf",
                        "--steps", "1", "--validation-fraction", "0", *FAST[2:]) == 0
    warnings = [m for m in caplog.messages if "<unk>" in m]
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), caplog.messages
    assert f"the tokenizer (--init-from {root / 'mlm'}'s) does not cover this data; it lacks '0', '1', '2'" \
        in warnings[0], warnings


def test_init_from_refuses_options_it_would_ignore(work, run_cli, tmp_path):
    root, train, _ = work
    (tmp_path / "c.json").write_text("{}")
    for given in (["--tokenizer", "bpe"], ["--preset", "small"], ["--vocab-size", "300"], ["--layers", "4"],
                  ["--config", str(tmp_path / "c.json")], ["--position", "rotary"]):
        result = run_cli("train", "classifier", "--data", train, "--init-from", root / "mlm", "--out",
                         tmp_path / "clf", *given)
        assert result.code == 2 and f"drop {given[0]}" in result.err, result  # (it had said "and overrides")
        assert not (tmp_path / "clf").exists()
    # --dropout is a fine-tuning setting, not the architecture's: taken
    result = run_cli("train", "classifier", "--data", train, "--init-from", root / "mlm", "--out", tmp_path / "clf",
                     "--dropout", "0.3", "--steps", "1", "--validation-fraction", "0", *FAST[2:])
    assert result.code == 0, result
    assert json.loads((tmp_path / "clf" / "config.json").read_text())["model"]["dropout"] == 0.3


def test_unknown_label_at_evaluation_names_the_line(work, capsys, tmp_path):
    root, _, _ = work
    data = tmp_path / "odd.tsv"
    data.write_text("text\tlabel\nThis lamp is great.\tpositive\nThis lamp is meh.\tmeh\n", encoding="utf-8")
    for source in ("clf", "clf-bundle"):
        capsys.readouterr()
        assert kerasllm("evaluate", root / source, "--data", data) == 1
        assert "odd.tsv: line 3: unknown label 'meh' (known: negative, positive)" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("text\tlabel\ngood lamp\tpositive\nbad lamp\tnegative\textra\n", "bad.tsv: line 3: expected 2 columns"),
    ("text\tstars\ngood lamp\t5\n", "bad.tsv: line 2: missing field 'label'"),
])
def test_bad_training_data_names_the_line_and_writes_nothing(tmp_path, capsys, content, message):
    data = tmp_path / "bad.tsv"
    data.write_text(content, encoding="utf-8")
    assert kerasllm("train", "classifier", "--data", data, "--out", tmp_path / "run", *FAST) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_serving_a_bundle_imports_no_tensorflow(work):
    root, _, test = work
    code = (
        "import sys, json\n"
        "from kerasllm.export.predict import load_predictor\n"
        "from kerasllm.evaluation import evaluate\n"
        f"p = load_predictor('classify', {str(root / 'clf-bundle')!r})\n"
        "print(json.dumps(p.predict([p.check('This phone is perfect.')])))\n"
        f"assert evaluate({str(root / 'clf-bundle')!r}, {str(test)!r})['accuracy'] >= 0.95\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1])[0]["label"] == "positive"


def test_classifier_resume_continues_from_the_last_checkpoint(work, tmp_path, interrupt_training):
    _, train, _ = work
    out = tmp_path / "run"
    interrupt_training(15)
    assert kerasllm("train", "classifier", "--data", train, "--out", out, "--steps", "20", "--eval-interval", "10",
                    "--eval-steps", "1", *FAST) == 130
    assert not (out / "model.keras").exists() and (out / "checkpoints").is_dir()
    interrupt_training(None)
    assert kerasllm("train", "classifier", "--out", out, "--resume", "--quiet") == 0
    steps = [h["step"] for h in history(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    assert [h["step"] for h in history(out) if "val_loss" in h] == [10, 20]
    assert json.loads((out / "config.json").read_text())["labels"] == ["negative", "positive"]


@pytest.mark.parametrize("overrides, fused, kernel", [
    (dict(), 1, "Attention"),  # CLS pooling: the last layer attends from the first token only (Encoder.first_token)
    (dict(norm_first=True, pooling="mean"), 2, "Attention"),
    # RoPE between the projection and the scores: RotaryEmbedding on q and k, then MultiHeadAttention
    # (ORT's CPU Attention kernel refuses do_rotary)
    (dict(position="rotary", pooling="mean"), 2, "MultiHeadAttention"),
    (dict(position="rotary"), 1, "MultiHeadAttention"),
])
def test_encoder_export_fuses_attention_where_it_matches(tmp_path, overrides, fused, kernel):
    """Each variant's export passes the family's validation (1e-4, identical labels) with its
    self-attention fused into com.microsoft.Attention (or, rotary, MultiHeadAttention), or left as it is."""
    import keras
    import onnx

    from kerasllm import EncoderConfig, TextClassifier
    from kerasllm.export.encoder_export import export_encoder_family
    from kerasllm.export.exporter import ExportOptions

    keras.utils.set_random_seed(0)
    model = TextClassifier(EncoderConfig.preset("tiny", vocab_size=50, max_length=64, num_labels=3, **overrides))
    (tmp_path / "scratch").mkdir()
    (tmp_path / "staging").mkdir()
    entries = export_encoder_family(model, tmp_path / "scratch", tmp_path / "staging", ExportOptions(), log=print)
    assert entries["optimization"]["fusions"].get(kernel, 0) == fused
    assert entries["optimization"]["fusions"].get("RotaryEmbedding", 0) == (2 * fused if "rotary" in str(overrides)
                                                                          else 0)
    assert entries["validation"]["max_abs_diff"]["logits"] <= 1e-4
    assert "kv_cache" not in entries["optimization"]  # had claimed "growing": an encoder graph has no KV cache
    ops = [node.op_type for node in onnx.load(str(tmp_path / "staging" / "model.onnx")).graph.node]
    assert ops.count(kernel) == fused and ops.count("Softmax") == 2 - fused


def test_encoder_attention_fusion_is_dropped_when_it_fails_validation(tmp_path, monkeypatch):
    import keras

    from kerasllm import EncoderConfig, TextClassifier
    from kerasllm.export import encoder_export
    from kerasllm.export.exporter import ExportOptions
    from kerasllm.export.validate import ValidationError

    real, calls = encoder_export.check_parity, []

    def first_fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise ValidationError("validation: logits differs by 0.005 (> 0.0001)")
        return real(*args, **kwargs)

    monkeypatch.setattr(encoder_export, "check_parity", first_fails)
    keras.utils.set_random_seed(0)
    model = TextClassifier(EncoderConfig.preset("tiny", vocab_size=50, max_length=64, num_labels=3))
    (tmp_path / "scratch").mkdir()
    (tmp_path / "staging").mkdir()
    report = encoder_export.export_encoder_family(model, tmp_path / "scratch", tmp_path / "staging", ExportOptions(),
                                                  log=print)["optimization"]
    assert len(calls) == 2 and "Attention" not in report["fusions"] and "kv_cache" not in report
    assert report["attention_fusion_reverted"].endswith("differs by 0.005 (> 0.0001)")
    assert report["fusions"]["LayerNormalization"] == 5  # the other fusions stay


def test_fp16_token_classifier_export_records_its_logits_difference(tmp_path):
    """fp16 logits are judged by top-1 agreement; their max |diff| had not been recorded either, so a
    token classifier (logits its only output) logged 'max |diff| , labels agree ...' and wrote
    `max_abs_diff: {}` into the manifest."""
    import keras

    from kerasllm import EncoderConfig, TokenClassifier
    from kerasllm.export.encoder_export import export_encoder_family
    from kerasllm.export.exporter import ExportOptions

    keras.utils.set_random_seed(0)
    model = TokenClassifier(EncoderConfig.preset("tiny", vocab_size=50, max_length=48, num_labels=5))
    (tmp_path / "scratch").mkdir()
    (tmp_path / "staging").mkdir()
    lines = []
    validation = export_encoder_family(model, tmp_path / "scratch", tmp_path / "staging", ExportOptions(dtype="fp16"),
                                       log=lines.append)["validation"]
    assert list(validation["max_abs_diff"]) == ["logits"] and 0 < validation["max_abs_diff"]["logits"] < 0.05
    line = next(text for text in lines if text.startswith("validated against Keras"))
    assert f"max |diff| logits {validation['max_abs_diff']['logits']:.2g}, labels agree on" in line, line


def test_a_huge_text_is_refused_or_cut_without_tokenizing_it_whole(work):
    """A 5.5 MB text had been tokenized whole (19 s, 2 GB) only to be refused or cut to max_length."""
    from kerasllm.export.predict import RecordError, load_predictor

    root, _, _ = work
    predictor = load_predictor("classify", root / "clf-bundle")
    huge = "great lamp " * 500_000
    limit = predictor.max_length - 1
    with pytest.raises(RecordError, match=f"text of more than {limit} tokens is longer than the model's max_length"):
        predictor.check(huge)
    assert predictor.check(huge, truncate="right") == [predictor.bos_id] + predictor.tokenizer.encode(huge[:5000])[:limit]
    assert predictor.check(huge, truncate="left")[-5:] == predictor.tokenizer.encode(huge[-5000:])[-5:]


@pytest.mark.parametrize("labels", [["only"], ["negative", "positive", "neutral"]])
def test_label_names_that_do_not_fit_the_head_are_refused(work, tmp_path, labels):
    """Too few names ended classify in an IndexError traceback, too many gave a label that never comes."""
    import shutil

    from kerasllm.errors import KerasLLMError
    from kerasllm.export.predict import load_predictor

    root, _, _ = work
    for name, record in (("clf-bundle", "manifest.json"), ("clf", "config.json")):
        copy = tmp_path / name
        shutil.copytree(root / name, copy)
        saved = json.loads((copy / record).read_text())
        (copy / record).write_text(json.dumps({**saved, "labels": labels}))
        with pytest.raises(KerasLLMError, match=f"{len(labels)} label names saved for a model with 2 outputs"):
            load_predictor("classify", copy)


@pytest.mark.parametrize("source", ["clf-bundle", "mlm-bundle"])
def test_evaluation_in_windows_scores_as_all_at_once(work, monkeypatch, source):
    """`kerasllm evaluate` holds a window of records at a time (every record, with its token ids, had
    been held to the end): windows of 7 give the metrics of one window, the masks too."""
    from kerasllm import evaluation

    root, _, test = work
    whole = evaluation.evaluate(root / source, test)
    monkeypatch.setattr(evaluation, "EVAL_WINDOW_ROWS", 7)
    windowed = evaluation.evaluate(root / source, test)
    assert whole["count"] > 14 and windowed.keys() == whole.keys()
    for key, value in whole.items():
        assert windowed[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key
