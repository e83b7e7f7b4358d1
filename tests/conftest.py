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
