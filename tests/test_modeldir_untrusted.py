"""Model directories and bundles as untrusted artifacts: a damaged, hand-edited or mixed-up file is one
line naming it and exit 1 (no traceback), before any output; Keras's safe_mode stays on.

The sources are tiny random models laid out as `kerasllm train` lays them out (no training), and one
export of each; every test edits a copy.
"""

from __future__ import annotations

import base64
import json
import marshal
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,"
LABELS = ["negative", "positive"]


def _lay_out(path: Path, task: str, model, labels=None) -> None:
    """`model` in `path` as `kerasllm train TASK` leaves it (a char tokenizer over CHARS)."""
    from kerasllm.tokenizers import TextTokenizer
    from kerasllm.training import save_model_atomic, write_json_atomic

    path.mkdir()
    TextTokenizer.train([CHARS], kind="char").save(path)
    run = {"task": task, "model": model.config.to_dict(), "train": {"seq_len": 32}}
    write_json_atomic(path / "config.json", {**run, **({"labels": labels} if labels else {})})
    save_model_atomic(model, path)


def _build(root: Path) -> None:
    import keras

    from kerasllm import CausalLM, DecoderConfig, EncoderConfig, TextClassifier
    from kerasllm.export.exporter import ExportOptions, export_model_dir
    from kerasllm.tokenizers import TextTokenizer

    vocab_size = TextTokenizer.train([CHARS], kind="char").vocab_size
    keras.utils.set_random_seed(0)
    classifier = TextClassifier(EncoderConfig.preset("tiny", vocab_size=vocab_size, num_labels=2, max_length=64))
    classifier(np.zeros((1, 4), np.int32))  # builds the weights
    _lay_out(root / "clf", "classifier", classifier, LABELS)
    lm = CausalLM(DecoderConfig.preset("tiny", vocab_size=vocab_size, max_length=64))
    lm(np.zeros((1, 4), np.int32))
    _lay_out(root / "lm", "causal-lm", lm)
    for name in ("clf", "lm"):
        export_model_dir(root / name, root / f"{name}-bundle", ExportOptions(optimize=False), log=lambda message: None)


@pytest.fixture(scope="module")
def sources(build_once) -> Path:
    """`clf` and `lm` model dirs (max_length 64) and their bundles `clf-bundle`, `lm-bundle`."""
    return build_once("untrusted_sources", _build)


@pytest.fixture
def copy(sources, tmp_path):
    """`copy(name) -> Path`: a copy of source `name` to edit."""

    def copy_(name: str) -> Path:
        return Path(shutil.copytree(sources / name, tmp_path / name))

    return copy_


def _edit_json(path: Path, edit) -> None:
    """Rewrite the JSON file `path` with `edit(value)`: its return where not None, else `value` edited in place."""
    value = json.loads(path.read_text(encoding="utf-8"))
    edited = edit(value)
    path.write_text(json.dumps(value if edited is None else edited), encoding="utf-8")


def _without(key: str):
    """An edit for `_edit_json`: the object without `key`."""
    return lambda value: {k: v for k, v in value.items() if k != key}


def _edit_keras_config(model_dir: Path, edit) -> None:
    """Rewrite the config.json inside DIR/model.keras with `edit(config)` (its return, if any)."""
    path = model_dir / "model.keras"
    with zipfile.ZipFile(path) as archive:
        items = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(items["config.json"])
    items["config.json"] = json.dumps(edit(config) or config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in items.items():
            archive.writestr(name, data)


@pytest.fixture
def texts(tmp_path) -> Path:
    path = tmp_path / "texts.tsv"
    path.write_text("text\tlabel\nthe film was good\tpositive\na bad one\tnegative\n", encoding="utf-8")
    return path


def _one_line(result, code: int = 1) -> str:
    """The single error line of a command that failed with `code`."""
    lines = result.err.strip().splitlines()
    assert result.code == code and len(lines) == 1 and lines[0].startswith("kerasllm: error: "), result
    assert "Traceback" not in result.err
    return lines[0][len("kerasllm: error: "):]


# -- 5: ONNX Runtime failing inside `kerasllm evaluate` ----------------------------------------------
def test_evaluate_says_an_onnxruntime_failure_in_one_line_naming_the_record(sources, tmp_path, run_cli, monkeypatch):
    """ONNX Runtime failing on a batch (as it did on a manifest max_length past the graph's position
    table) had ended `kerasllm evaluate` in a traceback; the batch commands said it in one line."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    def fail(*args, **kwargs):
        raise InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : indices element out of data bounds\nmore")

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", fail)
    monkeypatch.setattr(onnxruntime.InferenceSession, "run_with_iobinding", fail)
    data = tmp_path / "texts.tsv"
    data.write_text("text\tlabel\nshort one\tpositive\nthe longest text of all\tnegative\n"
                    "a longer one\tpositive\n", encoding="utf-8")
    for name in ("clf-bundle", "lm-bundle"):
        for batch_size, where in ((1, "line 2"), (8, "line 2 (and 2 other records of its batch)")):
            assert _one_line(run_cli("evaluate", sources / name, "--data", data, "--batch-size", batch_size)) == (
                f"{data}: {where}: ONNX Runtime failed running the model ([ONNXRuntimeError] : 2 : "
                "INVALID_ARGUMENT : indices element out of data bounds)")


# -- 6: what evaluate reads first ---------------------------------------------------------------------
@pytest.mark.parametrize("content, expected", [
    (b"{oops", "manifest.json: not valid JSON ("),
    (b"[1, 2]", "manifest.json: expected a JSON object"),
    (b'{"task": "classifier", \xff}', "manifest.json: not valid JSON ('utf-8' codec can't decode"),
    (None, "manifest.json: incomplete manifest, missing task"),
    ("task-list", "manifest.json: task must be a string, got [\"x\"]"),
])
def test_evaluate_names_a_malformed_manifest_as_the_other_commands_do(copy, texts, run_cli, content, expected):
    bundle = copy("clf-bundle")
    if content is None:
        _edit_json(bundle / "manifest.json", _without("task"))
    elif content == "task-list":
        _edit_json(bundle / "manifest.json", lambda m: m.update(task=["x"]))
    else:
        (bundle / "manifest.json").write_bytes(content)
    assert _one_line(run_cli("evaluate", bundle, "--data", texts)).startswith(f"{bundle}/{expected}")


def test_evaluate_names_a_malformed_config_json(copy, texts, run_cli):
    model_dir = copy("clf")
    (model_dir / "config.json").write_text("[1]", encoding="utf-8")
    assert _one_line(run_cli("evaluate", model_dir, "--data", texts)) == (
        f"{model_dir}/config.json: expected a JSON object, got a list")
    (model_dir / "config.json").write_bytes(b'{"task": "\xff"}')
    assert _one_line(run_cli("evaluate", model_dir, "--data", texts), code=2).startswith(
        f"{model_dir}/config.json: cannot be read ('utf-8' codec can't decode")


# -- 9: config.json of the wrong shape ----------------------------------------------------------------
@pytest.mark.parametrize("edit, expected", [
    (_without("model"), "config.json: no 'model' (not a config.json that kerasllm train wrote?)"),
    (_without("task"), "config.json: no 'task' (not a config.json that kerasllm train wrote?)"),
    (lambda run: [1], "config.json: expected a JSON object, got a list"),
    (lambda run: run.update(model="x"), "config.json: 'model' must be a JSON object, got a string"),
    (lambda run: run.update(train="x"), "config.json: 'train' must be a JSON object, got a string"),
    (lambda run: run.update(task=["classifier"]), "config.json: 'task' must be a string, got a list"),
    (lambda run: run.update(task="summarizer"), "config.json: unknown task 'summarizer' (choose from "),
    (lambda run: run["model"].update(evil=1), "config.json: model config: unknown key 'evil' for EncoderConfig"),
])
def test_a_config_json_of_the_wrong_shape_is_one_line_naming_it(copy, texts, tmp_path, run_cli, edit, expected):
    model_dir = copy("clf")
    _edit_json(model_dir / "config.json", edit)
    result = run_cli("classify", model_dir, "-i", texts, "-o", tmp_path / "out.jsonl")
    assert _one_line(result).startswith(f"{model_dir}/{expected}")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_bad_config_inside_model_keras_names_model_keras(copy, texts, tmp_path, run_cli):
    model_dir = copy("clf")
    _edit_keras_config(model_dir, lambda c: c["config"]["config"].update(vocab_size="x"))
    assert _one_line(run_cli("classify", model_dir, "-i", texts, "-o", tmp_path / "out.jsonl")) == (
        f"{model_dir}/model.keras: model config: vocab_size must be a positive integer, got 'x'")


# -- 8 and 15: what Keras refuses to load ------------------------------------------------------------
@pytest.mark.parametrize("edit, expected", [
    (lambda c: c.update(class_name="Nope", registered_name="kerasllm>Nope"),
     "cannot be loaded, corrupt or incomplete (TypeError: Could not locate class 'Nope'.)"),
    (lambda c: c.update(module="this", class_name="X", registered_name=None),
     "cannot be loaded, corrupt or incomplete (TypeError: Could not locate class 'X'.)"),
    (lambda c: [1, 2], "cannot be loaded, corrupt or incomplete (TypeError: "),
    (lambda c: {"module": "keras", "class_name": "Sequential", "registered_name": None, "config": {
        "name": "s", "layers": [
            {"module": "keras.layers", "class_name": "InputLayer", "registered_name": None,
             "config": {"batch_shape": [None], "dtype": "string", "name": "in"}},
            {"module": "keras.layers", "class_name": "StringLookup", "registered_name": None,
             "config": {"name": "l", "vocabulary": "/etc/hostname", "output_mode": "int"}}]}},
     "cannot be loaded: Keras's safe mode refused it (Requested the loading of a vocabulary file outside of "
     "the model archive.)"),
])
def test_a_model_keras_that_keras_refuses_is_one_line(copy, texts, tmp_path, run_cli, edit, expected):
    """Keras raises these as TypeError (the StringLookup's safe_mode refusal wrapped in two), which had
    escaped as tracebacks quoting the whole config."""
    model_dir = copy("clf")
    _edit_keras_config(model_dir, edit)
    assert _one_line(run_cli("classify", model_dir, "-i", texts, "-o", tmp_path / "out.jsonl")).startswith(
        f"{model_dir}/model.keras: {expected}")
    assert _one_line(run_cli("export", model_dir, "--out", tmp_path / "bundle")).startswith(
        f"{model_dir}/model.keras: {expected}")


def _marker_lambda(marker: Path) -> str:
    def write_marker(x):
        Path(marker).write_text("ran")
        return x

    return base64.b64encode(marshal.dumps(write_marker.__code__)).decode()


def test_a_lambda_layer_is_refused_in_a_whole_sentence_and_never_run(copy, texts, tmp_path, run_cli):
    """Keras's safe_mode refusal had been cut at 200 characters, mid-sentence ("If you trust the )")."""
    model_dir, marker = copy("clf"), tmp_path / "ran"
    code = _marker_lambda(marker)
    _edit_keras_config(model_dir, lambda c: {"module": "keras", "class_name": "Sequential", "registered_name": None,
                                             "config": {"name": "s", "layers": [
        {"module": "keras.layers", "class_name": "InputLayer", "registered_name": None,
         "config": {"batch_shape": [None, None], "dtype": "int32", "name": "in"}},
        {"module": "keras.layers", "class_name": "Lambda", "registered_name": None, "config": {
            "name": "l", "function": {"class_name": "__lambda__",
                                      "config": {"code": code, "defaults": None, "closure": None}}}}]}})
    assert _one_line(run_cli("classify", model_dir, "-i", texts, "-o", tmp_path / "out.jsonl")) == (
        f"{model_dir}/model.keras: cannot be loaded: it holds a Lambda layer (Python code), which Keras's safe "
        "mode refuses to run (kerasllm models have none)")
    assert not marker.exists()


# -- 10: model.keras against config.json and the tokenizer --------------------------------------------
def test_a_model_keras_of_another_run_is_refused_at_load(copy, sources, texts, tmp_path, run_cli):
    """A classifier's model.keras in a causal LM's directory had failed as an AttributeError traceback in
    the first batch; the other way round, a TypeError."""
    lm, clf = copy("lm"), copy("clf")
    shutil.copyfile(sources / "clf" / "model.keras", lm / "model.keras")
    shutil.copyfile(sources / "lm" / "model.keras", clf / "model.keras")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the film\n", encoding="utf-8")
    assert _one_line(run_cli("generate", lm, "-i", prompts, "-o", tmp_path / "lm.jsonl")) == (
        f"{lm}/model.keras holds a TextClassifier, but {lm}/config.json describes a causal-lm model "
        "(a CausalLM): a model.keras from another run?")
    assert _one_line(run_cli("evaluate", clf, "--data", texts)) == (
        f"{clf}/model.keras holds a CausalLM, but {clf}/config.json describes a classifier model "
        "(a TextClassifier): a model.keras from another run?")


def test_a_config_json_that_disagrees_with_model_keras_is_refused(copy, texts, tmp_path, run_cli):
    """config.json's vocab_size raised to fit a bigger tokenizer: the model's embedding has fewer rows,
    and the ids past it had been refused mid-job (exit 2, a batch index), or passed to the export."""
    model_dir = copy("clf")
    _edit_json(model_dir / "config.json", lambda run: run["model"].update(vocab_size=1000, max_length=512))
    expected = (f"{model_dir}/config.json: its model config does not match {model_dir}/model.keras's: "
                f"vocab_size 1000 (model.keras: 45), max_length 512 (model.keras: 64)")
    assert _one_line(run_cli("classify", model_dir, "-i", texts, "-o", tmp_path / "out.jsonl")) == expected
    assert _one_line(run_cli("export", model_dir, "--out", tmp_path / "bundle")) == expected


# -- 11: label names ----------------------------------------------------------------------------------
def test_duplicate_or_malformed_labels_are_refused(copy, texts, tmp_path, run_cli):
    """A name given twice had passed: classify reported one output's probability under the other's name."""
    bundle, model_dir = copy("clf-bundle"), copy("clf")
    _edit_json(bundle / "manifest.json", lambda m: m.update(labels=["positive", "positive"]))
    for args in (["classify", bundle, "-i", texts, "-o", tmp_path / "out.jsonl"],
                 ["evaluate", bundle, "--data", texts]):
        assert _one_line(run_cli(*args)) == (
            f"{bundle}/manifest.json: labels: 'positive' appears twice (each output needs its own name)")
    assert not (tmp_path / "out.jsonl").exists()
    for labels, expected in ((["negative", "negative"], "labels: 'negative' appears twice (each output needs "
                                                        "its own name)"),
                             ("no", 'labels must be a list of label names, got "no"'),
                             ([0, 1], "labels must be a list of label names, got [0, 1]")):
        _edit_json(model_dir / "config.json", lambda run: run.update(labels=labels))
        assert _one_line(run_cli("classify", model_dir, "-i", texts, "-o", tmp_path / "out.jsonl")) == (
            f"{model_dir}/config.json: {expected}")
    assert not (tmp_path / "out.jsonl").exists()


def test_untouched_sources_still_load(sources, texts, run_cli):
    for name in ("clf", "clf-bundle"):
        result = run_cli("evaluate", sources / name, "--data", texts)
        assert result.code == 0, result
        assert json.loads(result.out)["count"] == 2


# -- progress of `kerasllm evaluate` (scale QA: 11 minutes with nothing on the screen) -------------------
class _Recorder:
    def __init__(self):
        self.totals, self.done = [], 0

    def reset(self, total=None):
        self.totals.append(total)

    def update(self, n=1):
        self.done += n


def test_every_evaluator_reports_its_progress_over_the_records(sources, tmp_path, monkeypatch):
    from kerasllm import evaluation

    data = tmp_path / "texts.tsv"
    data.write_text("text\tlabel\n" + "".join(f"record {i} was {'good' if i % 2 else 'bad'}\t"
                                              f"{'positive' if i % 2 else 'negative'}\n" for i in range(11)))
    monkeypatch.setattr(evaluation, "EVAL_WINDOW_TOKENS", 40)  # the causal LM's records in several parts
    for name in ("clf-bundle", "lm-bundle", "clf"):
        progress = _Recorder()
        result = evaluation.evaluate(sources / name, data, batch_size=4, progress=progress)
        assert progress.totals == [11] and progress.done == 11 == result["count"], (name, vars(progress))


def test_evaluate_takes_quiet_and_shows_no_bar_off_a_terminal(sources, tmp_path, run_cli):
    data = tmp_path / "texts.tsv"
    data.write_text("text\tlabel\nthe film was good\tpositive\na bad one\tnegative\n")
    for quiet in ([], ["--quiet"]):
        result = run_cli("evaluate", sources / "clf-bundle", "--data", data, *quiet)
        assert result.code == 0 and json.loads(result.out)["count"] == 2, result
        assert "evaluate:" not in result.err and "rec/s" not in result.err, result.err
