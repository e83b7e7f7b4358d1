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


def test_untouched_sources_still_load(sources, texts, run_cli):
    for name in ("clf", "clf-bundle"):
        result = run_cli("evaluate", sources / name, "--data", texts)
        assert result.code == 0, result
        assert json.loads(result.out)["count"] == 2
