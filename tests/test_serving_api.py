"""kerasllm.export's predictors served from Python (a long-running service, not the batch CLI).

Tiny random models, exported once per test session (`build_once`): what they output does not
matter here, only that the serving API takes and refuses requests as it promises.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kerasllm.errors import UsageError
from kerasllm.export.predict import RecordError, load_predictor

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,"


def _export_random(root: Path, task: str, config, model, **run_fields) -> None:
    """`model` laid out as `kerasllm train TASK` does (a char tokenizer over CHARS), exported to root/bundle."""
    from kerasllm.export.exporter import ExportOptions, export_model_dir
    from kerasllm.tokenizers import TextTokenizer
    from kerasllm.training import save_model_atomic, write_json_atomic

    run = root / "run"
    run.mkdir()
    TextTokenizer.train([CHARS], kind="char").save(run)
    write_json_atomic(run / "config.json", {"task": task, "model": config.to_dict(), "train": {},
                                                **run_fields})
    save_model_atomic(model, run)
    export_model_dir(run, root / "bundle", ExportOptions(optimize=False), log=lambda message: None)


@pytest.fixture(scope="module")
def lm_bundle(build_once) -> Path:
    """A tiny random causal LM's bundle."""

    def build(root: Path) -> None:
        import keras

        from kerasllm import CausalLM, DecoderConfig
        from kerasllm.tokenizers import TextTokenizer

        keras.utils.set_random_seed(0)
        vocab = TextTokenizer.train([CHARS], kind="char").vocab_size
        config = DecoderConfig.preset("tiny", vocab_size=vocab, max_length=32)
        model = CausalLM(config)
        model(np.zeros((1, 4), np.int32))  # builds the weights
        _export_random(root, "causal-lm", config, model)

    return build_once("serving-api-lm", build) / "bundle"


@pytest.fixture(scope="module")
def clf_bundle(build_once) -> Path:
    """A tiny random three-label classifier's bundle."""

    def build(root: Path) -> None:
        import keras

        from kerasllm import EncoderConfig, TextClassifier
        from kerasllm.tokenizers import TextTokenizer

        keras.utils.set_random_seed(0)
        vocab = TextTokenizer.train([CHARS], kind="char").vocab_size
        config = EncoderConfig.preset("tiny", vocab_size=vocab, num_labels=3, max_length=32)
        _export_random(root, "classifier", config, TextClassifier(config), labels=["neg", "neu", "pos"])

    return build_once("serving-api-clf", build) / "bundle"


@pytest.fixture(scope="module")
def predictors(lm_bundle, clf_bundle, tiny_seq2seq_bundle):
    """One predictor of each kind, by task."""
    return {"generate": load_predictor("generate", lm_bundle, device="cpu"),
            "classify": load_predictor("classify", clf_bundle, device="cpu"),
            "embed": load_predictor("embed", clf_bundle, device="cpu"),
            "translate": load_predictor("translate", tiny_seq2seq_bundle, device="cpu")}


# -- check(): what a request's text may be -----------------------------------------------------
@pytest.mark.parametrize("task", ["generate", "classify", "embed", "translate"])
def test_check_refuses_a_lone_surrogate_as_the_record_reader_does(predictors, task):
    """A JSON request body can hold half of a surrogate pair: the tokenizer had raised "TextInputSequence
    must be str" (it is a str); now the record reader's words, as the CLI gives them for the same text."""
    text = json.loads('"ab\\udcff cd"')
    with pytest.raises(RecordError, match=r"holds half of a surrogate pair \(\\udcff at character 3\), "
                                          r"which is not text"):
        predictors[task].check(text)


@pytest.mark.parametrize("task", ["generate", "classify", "embed", "translate"])
@pytest.mark.parametrize("value, kind", [(b"ab", "bytes"), (123, "int"), (["ab", "cd"], "list"), (None, "NoneType")])
def test_check_names_the_type_of_a_text_that_is_not_a_str(predictors, task, value, kind):
    """bytes, a number or a list had failed inside check() (TypeError, AttributeError 'no attribute strip')."""
    with pytest.raises(UsageError, match=rf"must be a str, got {kind}$"):
        predictors[task].check(value)
