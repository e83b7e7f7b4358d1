"""The README's promise for errors: one line `kerasllm: error: ...`, exit code 2 for usage errors,
including the ones click itself raises (missing file, unknown choice, unknown option)."""
import pytest

from kerasllm.cli import main
from kerasllm.export.records import read_records


@pytest.mark.parametrize("args, expected", [
    (["generate", "{tmp}/missing_bundle", "-i", "-"], "Directory '{tmp}/missing_bundle' does not exist"),
    (["generate", "{tmp}", "--format", "xml"], "'xml' is not one of"),
    (["classify", "{tmp}", "--no-such-option"], "No such option '--no-such-option'"),
    # a negative seed crashed a bundle's sampling (NumPy), one past int64 a model dir's (Keras)
    (["generate", "{tmp}", "--temperature", "1", "--seed", "-5"], "'--seed': -5 is not in the range 0<=x<=4294967295"),
    (["translate", "{tmp}", "--temperature", "1", "--seed", str(2**63)], "is not in the range 0<=x<=4294967295"),
])
def test_click_usage_errors_are_one_line_exit_2(tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kerasllm: error: ")
    assert expected.format(tmp=tmp_path) in lines[0]
    assert f"(see 'kerasllm {args[0]} --help')" in lines[0]


def test_malformed_json_message_reads_cleanly(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "Jack\n{"text": 1,}\n')
    errors = [r.error for r in read_records(path)]
    assert errors == ["malformed JSON (Unterminated string starting at column 10)",
                      "malformed JSON (Expecting property name enclosed in double quotes at column 12)"]


@pytest.mark.parametrize("name, fmt, kind", [("words.txt", "auto", "text"), ("pairs.tsv", "text", "text"),
                                             ("pairs.tsv", "conll", "conll")])
def test_evaluate_of_a_seq2seq_model_on_a_file_without_pairs_names_its_own_options(run_cli, tmp_path, name, fmt,
                                                                                  kind):
    """The message was training's; evaluate names its own options (its --source-file/--target-file too)."""
    source = tmp_path / "bundle"
    source.mkdir()
    (source / "manifest.json").write_text('{"task": "seq2seq"}')  # refused before the model loads
    data = tmp_path / name
    data.write_text("forty two\tseven\n")
    result = run_cli("evaluate", source, "--data", data, "--format", fmt)
    assert result.code == 2, result
    assert result.err.splitlines() == [
        f"kerasllm: error: {data}: a seq2seq model is scored on source/target pairs: give a .tsv, .csv or .jsonl "
        f"file with --source-field and --target-field columns (read as {kind}; see --format), or line-aligned "
        "--source-file and --target-file"]


def test_the_cli_process_drops_tensorflows_retracing_warnings_only(run_cli, tmp_path):
    """A model dir traces its generate function once per batch shape, by design; TensorFlow warned
    "N out of the last N calls to <function ...> triggered tf.function retracing" for it, under
    --quiet too and twice (its own handler and the CLI's), again as the shapes changed."""
    import logging

    tf = pytest.importorskip("tensorflow")
    run_cli("generate", tmp_path / "missing", "-q")  # any kerasllm run sets its process up

    class Collect(logging.Handler):  # beside TensorFlow's own handler on its logger
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    @tf.function(autograph=False)
    def double(x):
        return x * 2

    collect, tf_logger = Collect(), logging.getLogger("tensorflow")
    tf_logger.addHandler(collect)
    try:
        for n in range(8):  # a new Python number each call: a trace each, as a new batch shape
            double(n)
        tf_logger.warning("another TensorFlow warning")
    finally:
        tf_logger.removeHandler(collect)
    assert collect.messages == ["another TensorFlow warning"]  # TensorFlow's other warnings pass


def one_line_usage_error(result, expected):
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kerasllm: error: "), result.err
    assert expected in lines[0], result.err


@pytest.mark.parametrize("command", ["causal-lm", "classifier"])
@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_train_seed_out_of_range_is_a_usage_error(run_cli, corpus_file, tmp_path, command, seed):
    result = run_cli("train", command, "--data", corpus_file, "--out", tmp_path / "run", "--steps", 1, "--seed", seed)
    one_line_usage_error(result, f"Invalid value for '--seed': {seed} is not in the range 0<=x<=4294967295")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tokenizer, vocab_size, expected", [
    ("bpe", -5, "Invalid value for '--vocab-size': -5 is not in the range x>=1"),
    ("bpe", 0, "Invalid value for '--vocab-size': 0 is not in the range x>=1"),
    ("char", 0, "Invalid value for '--vocab-size': 0 is not in the range x>=1"),
    ("bpe", 200, "vocab_size (--vocab-size) 200 is too small for a bpe tokenizer: it needs at least 262 "
                 "(256 bytes and 6 special tokens)"),
])
def test_train_vocab_size_too_small_is_a_usage_error(run_cli, corpus_file, tmp_path, tokenizer, vocab_size, expected):
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", tmp_path / "run", "--steps", 1,
                     "--preset", "tiny", "--quiet", "--tokenizer", tokenizer, "--vocab-size", vocab_size)
    one_line_usage_error(result, expected)


@pytest.mark.parametrize("vocab_size", [5, 29, 30, 36])
def test_unigram_vocab_size_below_the_datas_characters_names_the_size_needed(run_cli, tmp_path, vocab_size):
    """30 distinct characters (space, '-', digits, 17 letters): the trainer failed below 30 with a bare
    Exception, and from 30 to 36 returned more tokens than asked (48 for 30); 37 trains to 37."""
    from kerasllm import datasets

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("source\ttarget\n" + "".join(f"{a}\t{b}\n" for a, b in datasets.number_words_pairs(300, seed=0)))
    result = run_cli("train", "seq2seq", "--data", pairs, "--out", tmp_path / "run", "--steps", 1, "--preset", "tiny",
                     "--quiet", "--tokenizer", "unigram", "--vocab-size", vocab_size)
    one_line_usage_error(result, f"vocab_size (--vocab-size) {vocab_size} is too small for a unigram tokenizer of this "
                                 "data: it needs at least 37 (a token for each of its 30 distinct characters and 7 more)")


@pytest.mark.parametrize("command", ["causal-lm", "masked-lm"])
def test_blank_files_inside_a_data_directory_are_skipped(run_cli, corpus_file, tmp_path, command):
    """causal-lm had refused the whole directory for its one empty .txt ('file is empty'); masked-lm
    skipped it (no records). Both train on the files with text."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text(corpus_file.read_text(encoding="utf-8"), encoding="utf-8")
    (data / "b.txt").write_text("")
    (data / "sub" / "c.md").write_text(" \n\t\n\u3000\n", encoding="utf-8")  # whitespace only
    result = run_cli("train", command, "--data", data, "--out", tmp_path / "run", "--steps", 2, "--preset", "tiny",
                     "--seq-len", 32, "--batch-size", 4, "--eval-steps", 1, "--quiet", "--no-jit-compile")
    assert result.code == 0, result


def test_a_data_directory_without_text_and_a_named_empty_file_stay_errors(run_cli, tmp_path):
    from kerasllm.data import resolve_text_files

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("")
    (data / "b.txt").write_text("\n  \n")
    result = run_cli("train", "causal-lm", "--data", data, "--out", tmp_path / "run", "--steps", 2, "--quiet")
    assert result.code == 1, result
    assert result.err.strip() == f"kerasllm: error: data: {data}: directory holds no text (its 2 text files are empty)"
    result = run_cli("train", "causal-lm", "--data", data / "a.txt", "--out", tmp_path / "run", "--steps", 2, "--quiet")
    assert result.code == 1, result
    assert result.err.strip() == f"kerasllm: error: data: {data / 'a.txt'}: file is empty"
    # A file named itself is kept whatever it holds; a byte that is not UTF-8 counts as text (reported later).
    (data / "c.txt").write_bytes(b"  \xff\n")
    # A blank file an editor saved "UTF-8 with BOM" holds no text either (the BOM is not read as text).
    (data / "d.txt").write_bytes(b"\xef\xbb\xbf\r\n")
    assert resolve_text_files([data, data / "a.txt"]) == [data / "c.txt", data / "a.txt"]


def test_only_tag_hints_at_truncate_for_a_sentence_too_long(run_cli, tmp_path):
    """`kerasllm evaluate` has no --truncate: its error had still said '(use --truncate right ...)',
    hard-coded for `kerasllm tag` in join_words."""
    import json

    from kerasllm import datasets

    train = tmp_path / "ner.jsonl"
    train.write_text("".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in datasets.ner_rows(100, seed=0)))
    run = tmp_path / "ner"
    assert run_cli("train", "token-classifier", "--data", train, "--out", run, "--steps", 2, "--preset", "tiny",
                   "--max-length", 32, "--seq-len", 32, "--quiet", "--no-jit-compile").code == 0
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"tokens": ["Anna"] * 40, "tags": ["B-PER"] + ["I-PER"] * 39}) + "\n")
    too_long = "line 1: sentence of 40 words is 201 tokens, longer than the model's max_length 32"
    result = run_cli("evaluate", run, "--data", long)
    assert result.code == 1, result
    assert result.err.strip() == f"kerasllm: error: {long}: {too_long}", result.err
    assert run_cli("export", run, "--out", tmp_path / "bundle").code == 0
    result = run_cli("tag", tmp_path / "bundle", "-i", long, "-o", tmp_path / "tagged.jsonl")
    error = json.loads((tmp_path / "tagged.jsonl").read_text())["error"]
    assert error == f"{too_long} (use --truncate right to keep its first words)"


def _evaluate_needing(monkeypatch, module):
    """`kerasllm evaluate` whose scoring imports `module` (as metrics.bleu imports sacrebleu)."""
    from kerasllm import evaluation

    def run(*args, **kwargs):
        __import__(module)

    monkeypatch.setattr(evaluation, "evaluate", run)


def test_a_missing_optional_package_is_one_line_exit_1(run_cli, monkeypatch, tmp_path):
    """`kerasllm evaluate` on a seq2seq bundle in a serving-only environment without sacrebleu ended
    in a ModuleNotFoundError traceback."""
    import sys

    from kerasllm import metrics

    data = tmp_path / "pairs.tsv"
    data.write_text("source\ttarget\nforty two\t42\n")
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # `import sacrebleu` fails: not installed
    monkeypatch.setattr("kerasllm.evaluation.evaluate", lambda *a, **k: metrics.bleu(["42"], ["42"]))
    result = run_cli("evaluate", tmp_path, "--data", data)
    assert result.code == 1, result
    assert result.err.splitlines() == ["kerasllm: error: this command needs the Python package 'sacrebleu' "
                                       "(pip install sacrebleu)"]
    _evaluate_needing(monkeypatch, "tensorflow_text.ops")  # a submodule: named by its package
    result = run_cli("evaluate", tmp_path, "--data", data)
    assert result.err.splitlines() == ["kerasllm: error: this command needs the Python package 'tensorflow_text' "
                                       "(pip install tensorflow_text)"]
    _evaluate_needing(monkeypatch, "kerasllm.no_such_module")  # kerasllm's own: a bug, its traceback stays
    with pytest.raises(ModuleNotFoundError, match="kerasllm.no_such_module"):
        main(["evaluate", str(tmp_path), "--data", str(data)])


def test_a_missing_package_under_verbose_logs_its_traceback_too(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "pairs.tsv"
    data.write_text("source\ttarget\nforty two\t42\n")
    code = ("import sys; sys.modules['sacrebleu'] = None\n"
            "from kerasllm import evaluation, metrics\n"
            "evaluation.evaluate = lambda *a, **k: metrics.bleu(['42'], ['42'])\n"
            "from kerasllm.cli import main\n"
            f"main(['-v', 'evaluate', {str(tmp_path)!r}, '--data', {str(data)!r}])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr and "import sacrebleu" in result.stderr
    assert result.stderr.splitlines()[-1] == ("kerasllm: error: this command needs the Python package 'sacrebleu' "
                                              "(pip install sacrebleu)")
    # Any other error the CLI reports in one line: -v adds its traceback before it ("Log debug details
    # (and tracebacks)"), without -v the one line alone.
    code = ("from kerasllm import evaluation\nfrom kerasllm.errors import DataError\n"
            "def fail(*a, **k):\n    raise DataError('pairs.tsv: line 2: empty target')\n"
            "evaluation.evaluate = fail\nfrom kerasllm.cli import main\n"
            f"main(sys.argv[1:] + ['evaluate', {str(tmp_path)!r}, '--data', {str(data)!r}])\n")
    for flags, traceback in (["-v"], True), ([], False):
        result = subprocess.run([sys.executable, "-c", "import sys\n" + code, *flags], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 1, result.stderr
        assert ("Traceback (most recent call last)" in result.stderr) is traceback, result.stderr
        assert result.stderr.splitlines()[-1] == "kerasllm: error: pairs.tsv: line 2: empty target"


def _import_failing(how):
    """A batch job whose lazy `import onnxruntime` is hit by Ctrl-C: onnxruntime's module init turns
    the KeyboardInterrupt into `ImportError: initialization failed` raised from it (`how`: "cause"),
    or another import's error may only have it as its context ("context"); None: a plain ImportError."""

    def run_job(*args, **kwargs):
        if how is None:
            raise ImportError("initialization failed")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            if how == "cause":
                raise ImportError("initialization failed") from stop
            raise ImportError("initialization failed")  # noqa: B904  (implicit chaining is the point)

    return run_job


@pytest.mark.parametrize("how", ["cause", "context"])
def test_ctrl_c_during_a_lazy_import_is_an_interruption(run_cli, monkeypatch, tmp_path, how):
    """Ctrl-C early in a batch job, while run_job imported onnxruntime (before its SignalGuard),
    printed a 37-line ImportError traceback and exited 1 instead of `kerasllm: interrupted` / 130."""
    monkeypatch.setattr("kerasllm.cli.infer.run_job", _import_failing(how))
    result = run_cli("classify", tmp_path, "-i", tmp_path / "in.txt", "-q")
    assert result.code == 130, result
    assert result.err.splitlines() == ["kerasllm: interrupted"]


def test_an_import_error_without_an_interrupt_keeps_its_traceback(monkeypatch, tmp_path):
    monkeypatch.setattr("kerasllm.cli.infer.run_job", _import_failing(None))
    with pytest.raises(ImportError, match="initialization failed"):
        main(["classify", str(tmp_path), "-i", str(tmp_path / "in.txt"), "-q"])
