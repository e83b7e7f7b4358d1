"""What an unfinished batch job was started with, kept beside its output for `--resume`.

`--resume` checks that the output's ids are the input's (`batch.skip_resumed`), not that the
done records came from the same command: a resume with another `--max-new-tokens`, `--seed` or
bundle had appended other outputs to the old ones, exit 0. So a job writing to a file records its
settings in `.OUTPUT.job.json` beside it while it runs, and removes the record when it ends
with every record done (error records included); a stopped or failed job keeps it, and its
`--resume` is refused in one line where a setting differs. An output without a record (written
by an older version, or a finished job's) resumes, with a warning that it cannot be checked once
it appends.

Recorded: the source (its path and its manifest's or model file's size and time) and every
option that changes a record's output: decoding options, fields, format, truncation, shards.
Not recorded: what only changes speed or memory (`--batch-size`, `--max-batch-tokens`,
`--bucket`, `--window`, `--device`), so that a job stopped by running out of memory resumes
with smaller batches. (A sampled record's output depends on its batch: README says so.)
The input's contents are not recorded either: `--resume` reads the same input.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kerasllm.errors import UsageError


def record_path(output_path: str) -> Path | None:
    """Where the record of a job writing `output_path` lives; None for standard output, descriptors and
    outputs that are not regular files (/dev/null, a FIFO: nothing to resume; `-o /dev/null` had written
    /dev/.null.job.json, refused to anyone but root)."""
    from kerasllm.export.batch import OutputLock, names_a_descriptor  # noqa: PLC0415

    if output_path == "-" or names_a_descriptor(output_path) or not OutputLock.applies(Path(output_path)):
        return None
    output = Path(os.path.realpath(output_path))
    return output.with_name(f".{output.name}.job.json")


def source_identity(source: str | Path) -> dict[str, Any]:
    """A bundle's or model dir's path and its defining file's identity: a bundle's manifest by its
    content (its SHA-256: the manifest holds every file's hash, so a byte-identical copy or a fresh
    download of the bundle is the same source; by modification time, such a copy had refused --resume
    and offered only --overwrite, losing the records written), a model dir's model.keras by its size
    and modification time (hashing gigabytes per job start is not worth it there)."""
    source = Path(os.path.realpath(source))
    manifest = source / "manifest.json"
    if manifest.is_file():
        try:
            digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
        except OSError:
            digest = None
        return {"path": str(source), "file": manifest.name, "sha256": digest}
    if (source / "model.keras").is_file():
        stat = (source / "model.keras").stat()
        return {"path": str(source), "file": "model.keras", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"path": str(source)}


def settings(task: str, source: str | Path, **options: Any) -> dict[str, Any]:
    """The record of a job: its task, its source's identity and `options` (made JSON-plain)."""
    return json.loads(json.dumps({"task": task, "source": source_identity(source), **options}, default=str))


def write(path: Path | None, record: dict[str, Any]) -> str | None:
    """Keep `record` at `path`; the reason where it cannot be (an output the user may write in a
    directory they may not: the job goes on without it, as an older version's output resumes)."""
    if path is None:
        return None
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.replace(partial, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        return err.strerror or str(err)
    return None


def remove(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):  # (a directory the user may not write holds none: `write`)
            path.unlink(missing_ok=True)


NO_RECORD = ("has records but no job record (a job started by an older kerasllm, or whose record could not be "
             "kept): its model and options cannot be checked against this resume's")


def check(path: Path | None, record: dict[str, Any], output_path: str) -> str | None:
    """UsageError where the stopped job recorded at `path` was started otherwise than `record`; a
    warning (returned) where there is no record to check against (a job an older kerasllm started
    had been resumed with another model and other options without a word)."""
    if path is None or not path.is_file():
        return f"{output_path} {NO_RECORD}"
    try:
        started = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        started = None
    if not isinstance(started, dict):
        return f"{output_path} {NO_RECORD.replace('no job record', 'an unreadable job record')}"
    if started.get("task") != record.get("task"):  # (its options differ in kind: not "another version")
        raise UsageError(f"--resume: {output_path} was started by `kerasllm {started.get('task')}`, not "
                         f"`kerasllm {record.get('task')}`; resume it with that command, or pass --overwrite to "
                         "start again")
    for key in sorted(set(started) | set(record)):
        before, now = started.get(key), record.get(key)
        if before == now or key == "source" and _same_source(before, now):
            continue
        unknown = (sorted(set(before) ^ set(now)) if isinstance(before, dict) and isinstance(now, dict) else
                   [key] if key not in started or key not in record else [])
        if unknown and key != "source":
            # A setting one version records and the other does not: not an option the user changed (the
            # message had been "started with other options ()").
            raise UsageError(f"--resume: {output_path} was started by another kerasllm version (its job record "
                             f"and this one's differ in {', '.join(unknown)}); finish it with that version, or pass "
                             "--overwrite to start again")
        if key == "source":
            what = (f"from {before.get('path')}" if before.get("path") != now.get("path")
                    else f"from {now.get('path')} as it was then (its {now.get('file')} has changed since)")
            raise UsageError(f"--resume: {output_path} was started {what}; its records would mix two models "
                             "(pass --overwrite to start again)")
        if isinstance(before, dict) and isinstance(now, dict):
            inner = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            details = ", ".join(f"{k} {before.get(k)!r}, now {now.get(k)!r}" for k in inner)
        else:
            details = f"{before!r}, now {now!r}"
        raise UsageError(f"--resume: {output_path} was started with other {key.replace('_', ' ')} ({details}); "
                         "rerun with the job's options, or pass --overwrite to start again")
    return None


def _same_source(before: Any, now: Any) -> bool:
    """Whether a recorded source is `now`'s where the two identify it differently: a record of an
    earlier version identified a bundle's manifest by its size and modification time (2026-12-07;
    its SHA-256 since), which the manifest as it is now still shows."""
    if not (isinstance(before, dict) and isinstance(now, dict)) or before.get("path") != now.get("path"):
        return False
    if before.get("file") != now.get("file") or "sha256" in before or "size" not in before:
        return False
    try:
        stat = (Path(now["path"]) / before["file"]).stat()
    except (OSError, KeyError, TypeError):
        return False
    return (before.get("size"), before.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns)
