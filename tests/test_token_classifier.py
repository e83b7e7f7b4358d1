"""Token classification end to end with the real CLI: tagged data (JSONL, CoNLL), word/sub-word
alignment for every tokenizer kind, `train token-classifier`, export, `kerasllm tag`, evaluate,
parity between the bundle and Keras, padding, bad input (and a fuzz of it), no TensorFlow on the
serving path.

One token classifier (tiny preset, char tokenizer, no XLA) is trained on the generated NER task
and exported once for the module.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kerasllm import datasets
from kerasllm.data_tasks import read_tagged
from kerasllm.errors import DataError, UsageError

FAST = ["--preset", "tiny", "--seq-len", "96", "--batch-size", "32", "--no-jit-compile", "--quiet"]
SENTENCES = ["Anna Smith flew to New York on 3 May 2020 .", "Ben lives in Paris .",
             "On Monday , Clara met Hugo Tanaka in Rio de Janeiro ."]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def work(build_once, cli_code):
    """Data, a token classifier and its bundle (read-only for the tests), built once per session
    (`build_once`, tests/conftest.py)."""

    def build(root: Path) -> None:
        train = write_jsonl(root / "train.jsonl", datasets.ner_rows(1500, seed=1))
        assert cli_code("sample-data", "ner", "--out", root / "test.conll", "--count", "300", "--seed", "7") == 0
        assert cli_code("train", "token-classifier", "--data", train, "--out", root / "ner", "--steps", "200",
                        "--eval-interval", "100", "--lr", "3e-3", *FAST) == 0
        assert cli_code("export", root / "ner", "--out", root / "ner-bundle") == 0

    return build_once("token-classifier", build)


# -- alignment (no model) -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "unigram"])
def test_each_word_tag_sits_on_its_first_piece_for_every_tokenizer_kind(kind):
    from kerasllm.export.word_pieces import IGNORED, AlignmentError, align_words
    from kerasllm.tokenizers import TextTokenizer

    texts = [" ".join(words) for words, _ in datasets.ner_rows(200, seed=3)]
    tokenizer = TextTokenizer.train(texts, kind=kind, vocab_size=300)
    words = ["Anna", "Smith", "flew", "to", "Sao", "Paulo", "on", "12", "May", "."]
    pieces = align_words(tokenizer, words, tokenizer.bos_id)
    assert pieces[0] == tokenizer.bos_id and pieces.words == words and len(pieces.starts) == len(words)
    labels = pieces.labels(range(10, 10 + len(words)))
    assert [i for i, label in enumerate(labels) if label != IGNORED] == pieces.starts
    assert [labels[s] for s in pieces.starts] == list(range(10, 20))
    # the pieces from each word's first one up to the next word's separator decode back to the word
    ends = [*pieces.starts[1:], len(pieces)]
    for word, start, end in zip(words, pieces.starts, ends):
        assert tokenizer.decode(pieces[start:end]).strip() == word
        assert tokenizer.decode(pieces[start:start + 1]).strip() != ""  # the tag is not on a bare separator
    # truncation keeps whole words, from the start (right) or the end (left)
    limit = pieces.starts[3]  # at most BOS + the first three words' pieces (and the fourth's separator)
    assert align_words(tokenizer, words, tokenizer.bos_id, limit, "right").words == words[:3]
    assert align_words(tokenizer, words, tokenizer.bos_id, len(pieces) - 1, "left").words == words[1:]
    with pytest.raises(AlignmentError, match=r"sentence of 10 words is \d+ tokens, longer than the model's"):
        align_words(tokenizer, words, tokenizer.bos_id, limit)
    with pytest.raises(AlignmentError, match="empty sentence"):
        align_words(tokenizer, [], tokenizer.bos_id)


# -- training, export, parity ---------------------------------------------------------------------
def test_word_accuracy_reaches_95_percent_in_keras_and_bundle(work, run_cli, tmp_path):
    results = {}
    for source in ("ner", "ner-bundle"):
        result = run_cli("evaluate", work / source, "--data", work / "test.conll", "--output", tmp_path / f"{source}.json")
        assert result.code == 0, result
        printed = json.loads(result.out)
        results[source] = json.loads((tmp_path / f"{source}.json").read_text())
        assert printed == results[source] and results[source]["task"] == "token-classifier"
        assert results[source]["count"] == 300 and results[source]["words"] > 2000
        assert results[source]["accuracy"] >= 0.95, results
        assert results[source]["entity_f1"] >= 0.85 and results[source]["macro_f1"] >= 0.85, results
        assert set(results[source]) >= {"entity_precision", "entity_recall"}
        # per entity type: every type of the test set, each with its reference entities as support
        types = {tag[2:] for row in read_tagged(work / "test.conll") for tag in row.tags if tag != "O"}
        by_type = results[source]["entity_types"]
        assert set(by_type) >= types and all(row["support"] > 0 and row["f1"] >= 0.5 for row in by_type.values()), by_type
    assert results["ner"] == results["ner-bundle"]
    history = [json.loads(line) for line in (work / "ner" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "val_loss" in h] == [100, 200]
    config = json.loads((work / "ner" / "config.json").read_text())
    assert config["task"] == "token-classifier"
    assert config["labels"] == ["B-DATE", "B-LOC", "B-PER", "I-DATE", "I-LOC", "I-PER", "O"]


def test_bundle_tags_identical_and_logits_within_1e4(work):
    from kerasllm.export.predict import load_predictor

    sentences = [words for words, _ in datasets.ner_rows(64, seed=11)]
    keras_side, onnx_side = load_predictor("tag", work / "ner"), load_predictor("tag", work / "ner-bundle")
    manifest = json.loads((work / "ner-bundle" / "manifest.json").read_text())
    assert manifest["task"] == "token-classifier" and manifest["labels"] == keras_side.labels
    assert manifest["validation"]["max_abs_diff"]["logits"] <= 1e-4 and manifest["validation"]["labels_compared"]
    batch = [keras_side.check(words) for words in sentences]
    assert batch == [onnx_side.check(words) for words in sentences]
    expected, got = keras_side.outputs(batch, ["logits"])["logits"], onnx_side.outputs(batch, ["logits"])["logits"]
    real = np.zeros(expected.shape[:2], bool)
    for row, ids in enumerate(batch):
        real[row, :len(ids)] = True
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4)
    keras_tags, onnx_tags = keras_side.predict(batch), onnx_side.predict(batch)
    assert [r["tags"] for r in keras_tags] == [r["tags"] for r in onnx_tags]
    assert all(len(r["tags"]) == len(r["scores"]) == len(words) for r, words in zip(onnx_tags, sentences))


@pytest.mark.parametrize("source", ["ner", "ner-bundle"])
def test_padding_does_not_change_tags(work, source):
    from kerasllm.export.predict import load_predictor

    predictor = load_predictor("tag", work / source)
    batch = [predictor.check(text) for text in SENTENCES]
    assert len({len(ids) for ids in batch}) == 3  # each sentence padded to the longest in the batch
    together = predictor.predict(batch)
    for ids, result in zip(batch, together):
        alone = predictor.predict([ids])[0]
        assert alone["tags"] == result["tags"]
        np.testing.assert_allclose(alone["scores"], result["scores"], atol=1e-5)
    assert together[1]["tags"] == ["B-PER", "O", "O", "B-LOC", "O"]


# -- kerasllm tag ---------------------------------------------------------------------------------
def test_tag_cli_end_to_end_keeps_order_and_reports_bad_records(work, tmp_path, run_cli):
    data = tmp_path / "in.jsonl"
    long_sentence = " ".join(["Paris"] * 40)  # 240 characters: past the model's max_length (128)
    data.write_text("\n".join([
        json.dumps({"id": "a", "text": SENTENCES[0]}),
        json.dumps({"id": "b", "tokens": ["Ben", "lives", "in", "Paris", "."]}),
        "",
        json.dumps({"id": "c", "tokens": ["Ben", 7]}),
        "{not json",
        json.dumps({"id": "d", "words": ["x"]}),
        json.dumps({"id": "e", "text": long_sentence}),
        json.dumps({"id": "f", "tokens": []}),
    ]) + "\n", encoding="utf-8")
    out = tmp_path / "tags.jsonl"
    result = run_cli("tag", work / "ner-bundle", "-i", data, "-o", out, "--id-field", "id", "-q")
    assert result.code == 1 and "5 record(s) failed" in result.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c", "5", "d", "e", "f"]
    assert rows[0]["tokens"] == SENTENCES[0].split() and len(rows[0]["tags"]) == len(rows[0]["scores"]) == 11
    assert rows[1]["tags"] == ["B-PER", "O", "O", "B-LOC", "O"] and all(0 < s <= 1 for s in rows[1]["scores"])
    assert rows[2]["error"] == "line 4: field 'tokens' is not a list of strings"
    assert rows[3]["error"].startswith("line 5: malformed JSON")
    assert rows[4]["error"] == "line 6: missing field 'text' or 'tokens' (fields: id, words)"
    assert rows[5]["error"].startswith("line 7: sentence of 40 words is 241 tokens, longer than the model's max_length 128")
    assert rows[6]["error"] == "line 8: empty sentence (no words)"
    # --truncate right keeps the first words that fit; plain text in, standard output out
    (tmp_path / "long.txt").write_text(long_sentence + "\n", encoding="utf-8")
    result = run_cli("tag", work / "ner", "-i", tmp_path / "long.txt", "--truncate", "right", "-q")
    assert result.code == 0, result
    kept = json.loads(result.out)
    assert kept["tokens"] == ["Paris"] * 21 and len(kept["tags"]) == 21  # 1 + 21 x 6 tokens <= 128


def test_tag_on_a_bundle_imports_no_tensorflow(work, tmp_path):
    (tmp_path / "in.txt").write_text(SENTENCES[1] + "\n", encoding="utf-8")
    code = (
        "import sys, json\n"
        "from kerasllm.cli import main\n"
        "from kerasllm.evaluation import evaluate\n"
        f"result = evaluate({str(work / 'ner-bundle')!r}, {str(work / 'test.conll')!r})\n"
        "assert result['accuracy'] >= 0.95, result\n"
        "try:\n"
        f"    main(['tag', {str(work / 'ner-bundle')!r}, '-i', {str(tmp_path / 'in.txt')!r}, '-q'])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1])["tags"] == ["B-PER", "O", "O", "B-LOC", "O"]


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, message, code", [
    ("bad.jsonl", '{"tokens": ["a", "b"], "tags": ["O", "O"]}\n{"tokens": ["a", "b", "c"], "tags": ["O", "O"]}\n',
     "bad.jsonl: line 2: 3 words but 2 tags", 1),
    ("bad.jsonl", '{"tokens": ["a"], "labels": ["O"]}\n', "bad.jsonl: line 1: missing field 'tags' (fields: labels, tokens)", 1),
    ("bad.jsonl", '{"tokens": "a b", "tags": ["O", "O"]}\n', "bad.jsonl: line 1: field 'tokens' is not a list of strings", 1),
    ("bad.jsonl", '{"tokens": ["a"], "tags": [true]}\n', "bad.jsonl: line 1: field 'tags' is not a list of strings", 1),
    ("bad.jsonl", '\n{"tokens": [], "tags": []}\n', "bad.jsonl: line 2: empty sentence (no words)", 1),
    ("bad.jsonl", '{"tokens": ["a", " "], "tags": ["O", "O"]}\n', "bad.jsonl: line 1: word 2 has a blank word or tag", 1),
    ("bad.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a"\n', "bad.jsonl: line 2: malformed JSON", 1),
    ("bad.conll", "Anna B-PER\nlives O\n\nBen B-PER\nParis\n", "bad.conll: line 5: expected a word and a tag", 1),
    ("bad.tsv", "tokens\ttags\na\tO\n", "bad.tsv: tagged sentences are read from JSONL (.jsonl) or CoNLL", 2),
])
def test_bad_training_data_is_one_line_naming_the_line(tmp_path, run_cli, name, content, message, code):
    data = tmp_path / name
    data.write_text(content, encoding="utf-8")
    result = run_cli("train", "token-classifier", "--data", data, "--out", tmp_path / "run", *FAST)
    lines = result.err.splitlines()
    assert result.code == code, result
    assert len(lines) == 1 and lines[0].startswith(f"kerasllm: error: {tmp_path}/{message}"), lines
    assert not (tmp_path / "run").exists()


def test_unknown_tag_or_too_long_sentence_at_evaluation_names_the_line(work, run_cli, tmp_path):
    data = tmp_path / "odd.jsonl"
    write_jsonl(data, [(["Ben", "lives"], ["B-PER", "O"]), (["Acme", "hires"], ["B-ORG", "O"])])
    long = write_jsonl(tmp_path / "long.jsonl", [(["Ben"], ["B-PER"]), (["Paris"] * 40, ["B-LOC"] * 40)])
    for source in ("ner", "ner-bundle"):
        result = run_cli("evaluate", work / source, "--data", data)
        assert result.code == 1 and ("odd.jsonl: line 2: unknown tag 'B-ORG' (known: B-DATE, B-LOC, B-PER, I-DATE, "
                                     "I-LOC, I-PER, O)") in result.err
        result = run_cli("evaluate", work / source, "--data", long)
        assert result.code == 1 and "long.jsonl: line 2: sentence of 40 words is 241 tokens" in result.err


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4),
                            lambda inner: st.lists(inner, max_size=3), max_leaves=6)
_jsonl_lines = st.one_of(
    st.fixed_dictionaries({}, optional={"tokens": _json_values, "tags": _json_values}).map(json.dumps),
    st.text(alphabet='{}[]":, abO\t', max_size=12),
)
_conll_lines = st.one_of(st.just(""), st.text(alphabet=" \tabO-", max_size=8),
                         st.sampled_from(["Anna B-PER", "x O", "-DOCSTART- O", "word"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(st.one_of(_jsonl_lines, _conll_lines), min_size=1, max_size=6),
       suffix=st.sampled_from([".jsonl", ".conll"]))
def test_fuzzed_records_are_read_whole_or_refused_naming_a_line(lines, suffix):
    """Whatever the file holds, `read_tagged` returns well-formed sentences or raises a DataError that
    names the file and a line of it (or, for a file without records, the file): never anything else."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            rows = read_tagged(path)
        except DataError as err:
            message = str(err)
            assert message.startswith(f"{path}: ") and "\n" not in message
            if "no records" not in message:
                line = int(message.split(": line ")[1].split(":")[0])
                assert 1 <= line <= len(lines)
            return
        except UsageError as err:  # pragma: no cover - not raised for these suffixes
            raise AssertionError(err) from None
        for row in rows:
            assert row.words and len(row.words) == len(row.tags)
            assert all(isinstance(w, str) and w.strip() for w in row.words)
            assert all(isinstance(t, str) and t.strip() for t in row.tags)


def test_resume_continues_and_init_from_reuses_the_encoder(work, tmp_path, interrupt_training, cli_code):
    from kerasllm.modeldir import load_model_dir

    data = write_jsonl(tmp_path / "train.jsonl", datasets.ner_rows(200, seed=5))
    out = tmp_path / "run"
    interrupt_training(15)
    assert cli_code("train", "token-classifier", "--data", data, "--out", out, "--steps", "20", "--eval-interval", "10",
                    "--eval-steps", "1", *FAST) == 130
    assert not (out / "model.keras").exists() and (out / "checkpoints").is_dir()
    interrupt_training(None)
    assert cli_code("train", "token-classifier", "--out", out, "--resume", "--quiet") == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "val_loss" in h] == [10, 20]
    # --init-from a token-classifier run: its tokenizer and (one step at a negligible rate) its encoder
    tuned = tmp_path / "tuned"
    assert cli_code("train", "token-classifier", "--data", data, "--init-from", work / "ner", "--out", tuned,
                    "--steps", "1", "--lr", "1e-9", "--weight-decay", "0", "--validation-fraction", "0", *FAST[2:]) == 0
    assert (tuned / "tokenizer.json").read_bytes() == (work / "ner" / "tokenizer.json").read_bytes()
    pretrained, _, _ = load_model_dir(work / "ner")
    finetuned, _, run = load_model_dir(tuned)
    assert run["task"] == "token-classifier" and run["train"]["init_from"] == str(work / "ner")
    for a, b in zip(pretrained.encoder.get_weights(), finetuned.encoder.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_token_labels_outside_the_labels_are_refused_but_minus_one_is_no_label():
    """Under XLA (compile's default) a label past num_labels had given the loss NaN."""
    from kerasllm import EncoderConfig, TokenClassifier

    model = TokenClassifier(EncoderConfig.preset("tiny", vocab_size=32, num_labels=3, max_length=8))
    model.compile(batch_split=1)
    x = np.random.default_rng(0).integers(6, 32, (4, 6))
    labels = np.full((4, 6), -1)
    labels[:, 1:4] = 1
    for bad in (3, -2):
        labels[2, 5] = bad
        with pytest.raises(ValueError, match=rf"TokenClassifier: label {bad} is not one of the labels 0\.\.2 "
                                             r"\(config.num_labels 3\) nor -1 \(no label\)"):
            model.fit(x, labels, verbose=0)
    labels[2, 5] = -1
    assert np.isfinite(model.evaluate(x, labels, verbose=0))


def test_evaluation_in_windows_scores_as_all_at_once(work, monkeypatch):
    """Entities and words are counted window by window (all sentences had been held to the end)."""
    from kerasllm import evaluation

    whole = evaluation.evaluate(work / "ner-bundle", work / "test.conll")
    monkeypatch.setattr(evaluation, "EVAL_WINDOW_ROWS", 5)
    assert evaluation.evaluate(work / "ner-bundle", work / "test.conll") == whole
