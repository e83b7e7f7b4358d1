"""Shared fixtures: tiny models and corpora, a CLI runner, quiet TensorFlow."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Two pytest workers share two cores: ORT pool threads spinning while idle would steal them.
os.environ.setdefault("KERASLLM_ORT_SPINNING", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from kerasllm import datasets  # noqa: E402


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return f"CliResult(code={self.code}, err={self.err[-2000:]!r})"


def cli_exit_code(*args) -> int:
    """Run `kerasllm ARGS...` in-process (TensorFlow stays imported between tests); its exit code."""
    from kerasllm.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


@pytest.fixture(scope="session")
def cli_code():
    """`cli_code(*args) -> exit code`: `kerasllm ARGS...` in-process, its output left as it goes
    (for session and module fixtures, which cannot capture it)."""
    return cli_exit_code


@pytest.fixture
def run_cli(capsys):
    """Run `kerasllm ARGS...` in-process: a `CliResult` with the exit code and what it printed."""

    def run(*args) -> CliResult:
        capsys.readouterr()
        code = cli_exit_code(*args)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A generated story corpus (~60 KB), the same in every run."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(datasets.sample_corpus(300, seed=1), encoding="utf-8")
    return path


@pytest.fixture
def interrupt_training(monkeypatch):
    """`interrupt_training(step)`: `kerasllm train` runs in this process stop as if by Ctrl-C once
    they have logged `step` (the last checkpoint stays); `interrupt_training(None)` lets them finish."""
    from kerasllm import training

    original = training.ProgressLogger.on_train_batch_end

    def interrupt(step: int | None) -> None:
        def stop_at_step(self, batch, logs=None):
            original(self, batch, logs)
            if self.step == step:
                raise KeyboardInterrupt

        monkeypatch.setattr(training.ProgressLogger, "on_train_batch_end", original if step is None else stop_at_step)

    return interrupt


@pytest.fixture(scope="session")
def build_once(tmp_path_factory, worker_id):
    """`build_once(name, build) -> Path`: a directory that `build(path)` fills once per test session,
    even under pytest-xdist: the first worker builds it under a file lock in the directory the
    workers share, the others wait and reuse it (read-only for the tests)."""
    import shutil  # noqa: PLC0415

    from filelock import FileLock  # noqa: PLC0415

    base = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        base = base.parent

    def build_once_(name: str, build) -> Path:
        root = base / name
        with FileLock(str(base / f"{name}.lock")):
            if not (root / "built").is_file():
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir()
                build(root)
                (root / "built").touch()
        return root

    return build_once_


@pytest.fixture(scope="session")
def tiny_seq2seq_bundle(build_once) -> Path:
    """A tiny seq2seq bundle (numbers in words to digits, 2 training steps: what it outputs does not
    matter), built once per test session; read-only, copy it to change it."""

    def build(root: Path) -> None:
        import keras  # noqa: PLC0415

        from kerasllm.export.exporter import export_model_dir  # noqa: PLC0415
        from kerasllm.recipes.seq2seq import Seq2SeqTrainArgs, train_seq2seq  # noqa: PLC0415

        keras.utils.set_random_seed(0)
        data = root / "train.tsv"
        data.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in datasets.number_words_pairs(
            200, max_value=999, seed=0)), encoding="utf-8")
        args = Seq2SeqTrainArgs(data=str(data), preset="tiny", steps=2, batch_size=16, eval_interval=100,
                                jit_compile=False)
        train_seq2seq(args, root / "run", quiet=True, config_overrides={"max_length": 32})
        export_model_dir(root / "run", root / "bundle", log=lambda message: None)

    return build_once("tiny-seq2seq", build) / "bundle"
