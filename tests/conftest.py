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


@pytest.fixture
def run_cli(capsys):
    """Run `kerasllm ARGS...` in-process (TensorFlow stays imported between tests)."""
    from kerasllm.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A generated story corpus (~60 KB), the same in every run."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(datasets.sample_corpus(300, seed=1), encoding="utf-8")
    return path
