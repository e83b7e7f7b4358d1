"""The README's promise for errors: one line `kerasllm: error: ...`, exit code 2 for usage errors,
including the ones click itself raises (missing file, unknown choice, unknown option)."""
import pytest

from kerasllm.cli import main
from kerasllm.export.records import read_records


@pytest.mark.parametrize("args, expected", [
    (["generate", "{tmp}/missing_bundle", "-i", "-"], "Directory '{tmp}/missing_bundle' does not exist"),
    (["generate", "{tmp}", "--format", "xml"], "'xml' is not one of"),
    (["classify", "{tmp}", "--no-such-option"], "No such option '--no-such-option'"),
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
    """The message was training's, offering --source-file/--target-file, which evaluate does not have."""
    source = tmp_path / "bundle"
    source.mkdir()
    (source / "manifest.json").write_text('{"task": "seq2seq"}')  # refused before the model loads
    data = tmp_path / name
    data.write_text("forty two\tseven\n")
    result = run_cli("evaluate", source, "--data", data, "--format", fmt)
    assert result.code == 2, result
    assert result.err.splitlines() == [
        f"kerasllm: error: {data}: a seq2seq model is scored on source/target pairs: give a .tsv, .csv or .jsonl "
        f"file with --source-field and --target-field columns (read as {kind}; see --format)"]


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
