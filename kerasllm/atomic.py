"""Files written whole or not at all, and workers' scratch directories (TensorFlow-free: the token
cache writes with it before Keras loads)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as JSON under a temporary name and rename it: never a torn file."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def worker_scratch_dir(kind: str, out: Path, worker_index: int) -> Path:
    """An empty local directory for a non-chief worker of a multi-worker run (its own backups, its
    own token cache), named by the run directory and the worker, so that a worker restarted after a
    kill (a preempted machine, a failed job's retry) takes over the directory its killed attempt
    left behind instead of leaving it in the temp directory for good.

    `tempfile.mkdtemp` would give each attempt a new name, and a killed process never runs the
    cleanup that deletes it; here the leftover is cleared at the start of the next attempt.
    """
    run = hashlib.sha256(os.fsencode(Path(out).resolve())).hexdigest()[:12]  # any name the OS takes
    user = f"{os.getuid()}-" if hasattr(os, "getuid") else ""  # users sharing /tmp never collide
    scratch = Path(tempfile.gettempdir()) / f"kerasllm-worker-{kind}-{user}{run}-{int(worker_index)}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)  # private, as mkdtemp's
    return scratch
