"""The Beam RunInference handler (export/beam.py) on Beam's DirectRunner equals the batch CLI.

Runs in the serving-only venv with apache-beam (`make test-beam`; the main .venv has no
apache-beam, see the Makefile), on the fake predictor of tests/fake_predictor.py.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.testing.util import assert_that, equal_to

sys.path.insert(0, str(Path(__file__).parent.parent))
import fake_predictor  # noqa: E402

from kerasllm.export.beam import BundleModelHandler  # noqa: E402
from kerasllm.export.predict import PREDICTORS  # noqa: E402

TEXTS = ["hello world", "", "a", "boom", "y" * 50, "the fox ran to the forest", "x" * 39, "  spaces  "]


@pytest.fixture(autouse=True)
def beam_temp_in_tmp_path(monkeypatch, tmp_path):
    """Beam's job server makes a `beam-temp*` directory per pipeline and leaves it: keep them in
    the test's own directory, not the machine's temp directory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(autouse=True)
def fake_predictors(monkeypatch):
    for task in fake_predictor.TASKS:
        monkeypatch.setitem(PREDICTORS, (task, "bundle"), "fake_predictor:load")


def assert_beam_rows_equal(handler, texts, expected_rows) -> None:
    """Run the pipeline on `texts` keyed by line number; its rows, as the CLI writes them, must equal."""
    def to_row(key, result):
        inference = dict(result.inference)
        if "error" in inference:  # Beam elements carry no line number: add it as the CLI does
            inference["error"] = f"line {key}: {inference['error']}"
        return json.dumps({"id": key, **inference}, sort_keys=True)

    with beam.Pipeline("DirectRunner") as pipeline:
        rows = (pipeline | beam.Create([(str(i + 1), t) for i, t in enumerate(texts)])
                | RunInference(KeyedModelHandler(handler)) | beam.MapTuple(to_row))
        assert_that(rows, equal_to(expected_rows))


@pytest.mark.parametrize("task,options,cli_options", [
    ("generate", {"max_new_tokens": 7}, ["--max-new-tokens", "7"]),
    ("translate", {"n_best": 2, "num_beams": 2}, ["--n-best", "2", "--num-beams", "2"]),
    ("classify", {"top_k": 1}, ["--top-k", "1"]),
    ("embed", {"normalize": True}, ["--normalize"]),
])
def test_beam_run_inference_equals_the_cli(run_cli, tmp_path, task, options, cli_options):
    bundle = fake_predictor.make_bundle(tmp_path / "bundle", task)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out.jsonl"
    result = run_cli(task, bundle, "-i", source, "-o", out, "--batch-size", 3, *cli_options)
    assert result.code == 1, result  # "", "boom" and the 50-token text fail
    cli_rows = [json.dumps(json.loads(line), sort_keys=True) for line in out.read_text().splitlines()]
    assert len(cli_rows) == len(TEXTS) and sum('"error"' in r for r in cli_rows) == 3
    fake_predictor.FakePredictor.batches.clear()
    assert_beam_rows_equal(BundleModelHandler(bundle, task, options, batch_size=3), TEXTS, cli_rows)
    seen = fake_predictor.FakePredictor.batches  # the DirectRunner runs the handler in this process
    assert seen and max(map(len, seen)) <= 3, seen


def test_handler_takes_dict_elements_and_refuses_unknown_options(tmp_path):
    bundle = fake_predictor.make_bundle(tmp_path / "bundle", "generate")
    handler = BundleModelHandler(bundle, "generate", {"max_new_tokens": 3})
    model = handler.load_model()
    results = handler.run_inference([{"text": "abcdef"}, {"prompt": "x"}, "boom"], model)
    assert [r.inference for r in results] == [{"output": "FED"}, {"error": "missing field 'text' (fields: prompt)"},
                                              {"error": "the model failed on this text"}]
    with pytest.raises(ValueError, match="unknown option"):
        BundleModelHandler(bundle, "generate", {"beams": 4})
    with pytest.raises(ValueError, match="unknown option"):
        handler.validate_inference_args({"normalize": True})


def test_tag_takes_texts_lists_of_words_and_dicts_as_the_cli_does(run_cli, tmp_path):
    """`tag`: a text (split on whitespace), a list of words, or a dict with the words under
    `tokens_field` (else its text); a list of non-strings is an error for that element only."""
    bundle = fake_predictor.make_bundle(tmp_path / "bundle", "tag")
    records = [{"text": "hello big world"}, {"tokens": ["a", "list", "of", "words"]}, {"words": ["x", "yyyy"]},
               {"tokens": [1, 2]}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    assert run_cli("tag", bundle, "-i", source, "-o", out).code == 1  # the list of numbers fails
    cli = [json.loads(line) for line in out.read_text().splitlines()]
    assert cli[1]["tokens"] == ["a", "list", "of", "words"] and "error" in cli[3] and "error" in cli[2]
    handler = BundleModelHandler(bundle, "tag")
    model = handler.load_model()
    elements = ["hello big world", ["a", "list", "of", "words"], records[0], records[1], {"tokens": [1, 2]}]
    results = [r.inference for r in handler.run_inference(elements, model)]
    strip = [{k: v for k, v in row.items() if k != "id"} for row in cli]
    assert results[:4] == [strip[0], strip[1], strip[0], strip[1]]
    assert results[4] == {"error": "'tokens' is not a list of strings"}
    renamed = BundleModelHandler(bundle, "tag", tokens_field="words")
    assert [r.inference for r in renamed.run_inference([records[2]], renamed.load_model())] == [
        {"tokens": ["x", "yyyy"], "tags": ["SHORT", "LONG"], "scores": [1.0, 1.0]}]
    assert handler.get_num_bytes(elements[:2]) == len("hello big world") + len("a list of words")


def test_each_copy_of_a_seeded_handler_draws_its_own_numbers(monkeypatch, tmp_path):
    """Beam pickles the handler to every worker, each copy counting its elements from 0: keyed by the
    count alone, every worker's k-th batch got the same seed (2000 copies of one prompt on 4 workers:
    229 distinct samples). Each copy now keys its batches by a number of its own as well."""
    import pickle

    seeds = []
    original = fake_predictor.FakePredictor.predict

    def recording(self, batch, **options):
        seeds.append(options["seed"])
        return original(self, batch, **options)

    monkeypatch.setattr(fake_predictor.FakePredictor, "predict", recording)
    bundle = fake_predictor.make_bundle(tmp_path / "bundle", "generate")
    handler = BundleModelHandler(bundle, "generate", options={"temperature": 1.0, "seed": 5, "max_new_tokens": 4},
                                 batch_size=2)
    for copy in (pickle.loads(pickle.dumps(handler)) for _ in range(2)):
        model = copy.load_model()
        for _ in range(2):
            copy.run_inference(["abc", "abd"], model)
    assert len(seeds) == 4 and len(set(seeds)) == 4, seeds  # two calls on each of two copies
