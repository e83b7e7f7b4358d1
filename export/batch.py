"""Batch inference over a stream of records: bounded memory, token-budget batches, input order.

The machinery behind `kerasllm generate|classify|embed|tag|translate` (and the Beam model
handler). It never imports TensorFlow: it talks to a `Predictor` (export/predict.py).

How a job runs:
    records (export/records.py) --window of N records--> check() each text into ids
      -> plan_batches(): sort the window by length (bucketing), cut batches by count and by
         a padded-token budget -> predict_planned()/predict_in_order(): the window's batches to the predictor
         (all at once to a predictor with `predict_batches`, which may decode several at a
         time, else batch by batch to `predict`) -> results put back by position, batch by batch
      -> the finished prefix of the window is written at once, in input order, whole lines.
Memory holds one window, never the file. A record that cannot be read, has no text, or
fails `check` becomes an error record (`{"id": ..., "error": "line N: ..."}`) and the job
goes on. A `RecordError` raised by `predict` is pinned on its record by retrying the
batch in halves. ONNX Runtime failing to run a batch stops the job (`RuntimeFailure`): one line
naming the batch's lines, the finished lines written.

Resuming (`resume_point`): the output is a prefix of the full output (one line per input
record, in input order), so rerunning skips as many input records as the output has
complete lines, after checking that their ids agree; a torn last line is cut off first. The done
records of the window the stopped job was in are predicted again, not written (`skip_resumed`), so
the resumed job's windows and batches, and so its results to the last digit, are the uninterrupted job's.

Example:
>>> from kerasllm.export.batch import BatchRunner, JsonlWriter
>>> from kerasllm.export.records import read_records
>>> runner = BatchRunner(predictor, options={"max_new_tokens": 32})   # doctest: +SKIP
>>> summary = runner.run(read_records("prompts.txt"), JsonlWriter("out.jsonl"))  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import sys
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

from kerasllm.errors import DataError, KerasLLMError, UsageError
from kerasllm.export.predict import GENERATED_TOKENS, Predictor, RecordError
from kerasllm.export.records import Record

TRUNCATE_POLICIES = ("error", "left", "right")

_DECODING = {"max_new_tokens": 64, "temperature": 0.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0,
             "stop": None, "num_beams": 1, "n_best": 1, "seed": None}
# Each task's predictor options and their defaults (the CLI's and the Beam handler's).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "generate": _DECODING,
    "translate": _DECODING,
    "classify": {"top_k": None},
    "embed": {"normalize": False},
    "tag": {},
}


# -- batch planning ----------------------------------------------------------------------------
def plan_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None,
                 bucket: bool = True, extra_tokens: int = 0) -> list[list[int]]:
    """Group positions `0..len(lengths)-1` into batches.

    A batch holds at most `batch_size` items, and its padded size, `count * (longest +
    extra_tokens)`, stays within `max_batch_tokens` (an item over the budget on its own gets
    a batch of its own). With `bucket`, items are taken shortest first, so each batch holds
    texts of similar length and little padding is computed; without it, in input order.

    Args:
        lengths: token count of each item.
        batch_size: most items per batch.
        max_batch_tokens: budget of padded tokens per batch, or None for no budget.
        bucket: sort by length before cutting batches.
        extra_tokens: tokens each item grows by while it is processed (new tokens of
            generation), counted in the budget because the model holds them too.

    Example:
    >>> plan_batches([5, 1, 4, 1], batch_size=2, max_batch_tokens=None)
    [[1, 3], [2, 0]]
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__) if bucket else range(len(lengths))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        grown = max(longest, lengths[i])
        over_budget = max_batch_tokens is not None and (len(current) + 1) * (grown + extra_tokens) > max_batch_tokens
        if current and (len(current) >= batch_size or over_budget):
            batches.append(current)
            current, grown = [], lengths[i]
        current.append(i)
        longest = grown
    if current:
        batches.append(current)
    return batches


def predict_isolating(predictor: Predictor, batch: Sequence[list[int]], options: dict) -> list[dict]:
    """`predictor.predict(batch)`, with a RecordError pinned on the record that raised it.

    When the batch fails with a RecordError, it is split in halves and each half retried
    (down to single records), so one bad record costs the others nothing and a batch of n
    with one bad record takes about 2*log2(n) extra calls; that record gets `{"error": message}`.
    """
    try:
        results = predictor.predict(batch, **options)
    except RecordError as err:
        if len(batch) == 1:
            return [{"error": str(err)}]
        half = len(batch) // 2
        return predict_isolating(predictor, batch[:half], options) + predict_isolating(predictor, batch[half:], options)
    return _counted(results, batch)


def batch_seed(seed: int, key: int | tuple[int, ...]) -> int:
    """The seed a batch of a seeded sampling job draws from: one of its own, from the job's seed
    and the batch's `key` (its first record's line). With `--seed` passed unchanged to every batch,
    each batch had restarted the same random stream, so record k and record k + batch size of one
    prompt were the same sample (1000 samples of one prompt: 31-39 distinct). The same job (same
    input, seed and batching) still draws the same."""
    import numpy as np  # noqa: PLC0415 - the serving side has NumPy; kept off this module's import

    from kerasllm.export.generate import MAX_SEED  # noqa: PLC0415

    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        return seed  # the predictor's options check refuses it in its own words
    entropy = [seed, *key] if isinstance(key, tuple) else [seed, key]
    # `int` before `%`: NumPy 1.x takes `uint64 % int` in float64, which had given every seeded job other
    # draws than under NumPy 2 (a resume across the two would mix two streams).
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) % (MAX_SEED + 1)


def predict_in_order(predictor: Predictor, batches: Sequence[Sequence[list[int]]],
                     options: dict, batch_options: Sequence[dict] | None = None) -> Iterator[list[dict]]:
    """Each batch's results, batch by batch in order, with `predict_isolating`'s guarantees.

    A predictor with `predict_batches` gets every batch at once (it may decode several at the
    same time, e.g. one per core); when it raises a RecordError at one batch's turn, that batch
    goes through `predict_isolating` and the batches after it are handed over again (work the
    predictor had done on them ahead is lost; errors are rare). Other predictors, and batches
    with options of their own (`batch_options`, one dict a batch: seeded sampling's seeds), get
    `predict` batch by batch. Close the iterator (or exhaust it) to stop the predictor's work.
    """
    many = getattr(predictor, "predict_batches", None)
    if many is None or batch_options is not None:
        for i, batch in enumerate(batches):
            yield predict_isolating(predictor, batch, options if batch_options is None else batch_options[i])
        return
    done = 0
    while done < len(batches):
        with closing(iter(many(batches[done:], **options))) as stream:
            try:
                for results in stream:
                    results = _counted(results, batches[done])
                    done += 1
                    yield results
            except RecordError:
                done += 1
                yield predict_isolating(predictor, batches[done - 1], options)


def predict_planned(predictor: Predictor, ids: dict[int, list[int]], options: dict, batch_size: int,
                    max_batch_tokens: int | None, bucket: bool = True, extra_tokens: int = 0,
                    keys: dict[int, int | tuple[int, ...]] | None = None) -> Iterator[tuple[list[int], list[dict]]]:
    """`ids` (position -> token ids) cut into batches by `plan_batches`, then each batch's
    positions with its results, batch by batch (`predict_in_order`). Close the iterator to
    stop the predictor's work on the batches not yet returned. Seeded sampling gives each
    batch its own seed (`batch_seed`) from its first position's key (`keys`: position -> the
    record's line; default the position)."""
    positions = list(ids)
    plan = [[positions[i] for i in batch] for batch in plan_batches(
        [len(ids[p]) for p in positions], batch_size, max_batch_tokens, bucket, extra_tokens)]
    seed = options.get("seed")
    batch_options = None
    if seed is not None and options.get("temperature"):  # greedy and beam search draw nothing
        batch_options = [{**options, "seed": batch_seed(seed, (keys or {}).get(batch[0], batch[0]))} for batch in plan]
    with closing(predict_in_order(predictor, [[ids[p] for p in batch] for batch in plan], options,
                                  batch_options)) as stream:
        for batch in plan:
            try:
                results = next(stream)
            except Exception as err:
                if not _raised_by_onnxruntime(err):
                    raise
                from kerasllm.export.runtime import ort_message  # noqa: PLC0415 (ONNX Runtime is loaded)

                raise RuntimeFailure(f"ONNX Runtime failed running the model ({ort_message(err)})", batch) from None
            yield batch, results


class RuntimeFailure(KerasLLMError):
    """The runtime failed on the batch of records at `positions`, which no retry would change: the job
    stops there (one line, what is finished written). E.g. a bundle whose manifest promises more than
    its graph has (a max_length past the graph's position table: `bundle.check_graph` cannot see it)."""

    def __init__(self, message: str, positions: list[int]):
        super().__init__(message)
        self.positions = positions


@contextmanager
def runtime_failure(where: Sequence[str]) -> Iterator[None]:
    """ONNX Runtime failing on a batch of the records at `where` ("path: line N", in file order) as one
    line naming the first (KerasLLMError, exit 1), as the batch commands say it (`RuntimeFailure`):
    it had ended `kerasllm evaluate` in a traceback (seen with a manifest whose max_length promised
    more positions than the graph has). No retry: the same batch fails the same way."""
    try:
        yield
    except Exception as err:
        if not _raised_by_onnxruntime(err):
            raise
        from kerasllm.export.runtime import ort_message  # noqa: PLC0415 (ONNX Runtime is loaded)

        others = len(where) - 1
        batch = f" (and {others} other record{'s' if others > 1 else ''} of its batch)" if others else ""
        raise KerasLLMError(f"{where[0]}{batch}: ONNX Runtime failed running the model "
                            f"({ort_message(err)})") from None


def _raised_by_onnxruntime(err: Exception) -> bool:
    if "onnxruntime" not in sys.modules:  # a model dir's job, on Keras
        return False
    from kerasllm.export.runtime import raised_by_onnxruntime  # noqa: PLC0415

    return raised_by_onnxruntime(err)


def _counted(results: Sequence[dict], batch: Sequence) -> list[dict]:
    if len(results) != len(batch):
        raise RuntimeError(f"predictor returned {len(results)} results for a batch of {len(batch)}")
    return list(results)


def check_text(predictor: Predictor, text: str, truncate: str) -> list[int]:
    """`predictor.check(text)` under a truncation policy (only passed when not the default)."""
    return predictor.check(text) if truncate == "error" else predictor.check(text, truncate=truncate)


def require_truncate_support(predictor: Predictor, truncate: str) -> None:
    """UsageError up front when `--truncate left|right` meets a predictor that cannot truncate."""
    if truncate not in TRUNCATE_POLICIES:
        raise UsageError(f"unknown truncate policy {truncate!r} (choose from {', '.join(TRUNCATE_POLICIES)})")
    if truncate != "error" and "truncate" not in inspect.signature(predictor.check).parameters:
        raise UsageError(f"--truncate {truncate}: this {type(predictor).__name__} cannot truncate inputs")


# -- output ------------------------------------------------------------------------------------
def names_a_descriptor(path: str | Path) -> bool:
    """Whether `path` names an open descriptor of this process (/dev/stdout, /dev/stderr, /dev/fd/N,
    /proc/self/fd/N: `-o /dev/stdout | gzip`, bash's `-o >(gzip > out.gz)`), which the job writes as
    the stream it is. Resolved, such a link names a pipe no path opens ("/proc/PID/fd/pipe:[N]") or
    the file the shell opened (`> out.jsonl`, empty: an existing file the job would refuse)."""
    name = os.path.abspath(str(path))
    return name in ("/dev/stdout", "/dev/stderr") or re.fullmatch(r"/(dev/fd|proc/(self|\d+)/fd)/\d+", name) is not None


def _descriptor_number(path: str | Path) -> int | None:
    """The descriptor of this process that `path` names (`names_a_descriptor`), None for another's."""
    name = os.path.abspath(str(path))
    if name in ("/dev/stdout", "/dev/stderr"):
        return 1 if name == "/dev/stdout" else 2
    match = re.fullmatch(r"/(?:dev/fd|proc/(self|\d+)/fd)/(\d+)", name)
    if match is None or match.group(1) not in (None, "self", str(os.getpid())):
        return None
    return int(match.group(2))


def open_descriptor(path: str | Path) -> BinaryIO:
    """A path naming an open descriptor (`names_a_descriptor`) opened for writing as `-` is written:
    the inherited descriptor itself (a duplicate), never opened again with O_TRUNC. Reopened with "wb",
    `-o /dev/stdout >> job.log` had emptied the job's log (whatever earlier steps had written there),
    and `> log 2>&1` shares one offset between stdout and stderr, which a file opened again does not.
    A descriptor not open here for writing (another process's, a read-only one) is opened in append mode."""
    number = _descriptor_number(path)
    if number is not None:
        try:
            import fcntl  # noqa: PLC0415 - POSIX only; elsewhere the path is opened

            writable = (fcntl.fcntl(number, fcntl.F_GETFL) & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        except (ImportError, OSError):
            writable = False
        if writable:
            for stream in (sys.stdout, sys.stderr):  # what went through Python's own layers comes first
                if stream is not None:
                    try:
                        stream.flush()
                    except (OSError, ValueError):
                        pass
            return os.fdopen(os.dup(number), "wb")
    return open(path, "ab")


class OutputInUse(UsageError):
    """--output is held by another job (`OutputLock`)."""

    def __init__(self, path: str):
        super().__init__(f"{path}: in use by another kerasllm job (it holds a lock on the file until it ends: "
                         "wait for it, or choose another --output)")


class OutputLock:
    """Holds a regular --output file for a whole job: an advisory `flock` (exclusive) on the file itself.

    Two jobs on one output (a batch system's retry beside the first attempt, an operator's rerun with
    --resume) had both appended to it and both exited 0, every record then there twice. With the lock
    the job that comes second is refused in one line (`OutputInUse`, exit 2) and writes nothing. The
    kernel drops the lock when the process ends however it ends (SIGKILL included), so nothing is left
    behind to clear. Outputs that are not regular files (`-`, /dev/stdout, /dev/null, a FIFO) are not
    locked; where the file system has no locks (some network and FUSE mounts) the job goes on unguarded.

    `open(create=...)`: a job continuing or replacing its output (`--resume`, `--overwrite`) takes the
    lock before it reads or changes anything there (`resume_point` repairs a torn line); a new output is
    created exclusively (`create=True`) when the writer opens it, and locked at once. `release()` removes
    an output this job created or emptied and wrote nothing to, while still holding the lock, so that a
    job that failed before its first line leaves no empty file (which would pass for a finished job).
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.fd: int | None = None
        self.emptied = False  # created by this job, or truncated by it (--overwrite)
        self.keep = False  # an empty output that is the job's result (a shard without records)
        # An output --resume or --overwrite names that was not there when the job started: created
        # exclusively all the same. Left to O_CREAT, a retry beside a first attempt that finished while
        # the retry loaded its model had appended every record again (its resume point read no file).
        self.create_new = False

    @staticmethod
    def applies(path: str | Path) -> bool:
        """Whether `path` is (or will be) a regular file: what is locked."""
        if str(path) == "-" or names_a_descriptor(path):
            return False
        return not os.path.exists(path) or os.path.isfile(path)

    def open(self, create: bool = False, append: bool = False) -> int | None:
        """Open and lock the output (made, with its directory, where missing); the descriptor, or None
        for an output not locked. `create`: refuse one that exists (its own UsageError, or `OutputInUse`
        where another job holds it)."""
        if self.fd is not None or not self.applies(self.path):
            return self.fd
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A symbolic link's target (O_EXCL does not follow links: one to a new file had been refused).
        name = os.path.realpath(target) if target.is_symlink() else str(target)
        create = create or self.create_new
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | (os.O_EXCL if create else 0)
        existed = os.path.exists(name)
        try:
            fd = os.open(name, flags | (os.O_APPEND if append else 0), 0o666)
        except FileExistsError:
            if output_in_use(self.path):
                raise OutputInUse(self.path) from None
            if self.create_new:
                raise UsageError(f"{self.path} was written by another job while this one started; run this one "
                                 "again (--resume continues what is there)") from None
            raise UsageError(f"{self.path} exists: add --resume to continue it or --overwrite to replace it") from None
        try:
            _lock(fd, self.path)
            if not _names(name, fd):  # the job that held it removed it (it wrote nothing) before this one locked it
                raise OutputInUse(self.path)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.emptied = fd, create or not existed
        return fd

    def truncate(self) -> None:
        """Empty the locked output (--overwrite), once, when its first lines are about to be written."""
        if self.fd is not None and not self.emptied:
            os.ftruncate(self.fd, 0)
            self.emptied = True

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if self.emptied and not self.keep and os.fstat(fd).st_size == 0:
                name = os.path.realpath(self.path)
                if _names(name, fd):
                    os.unlink(name)
        except OSError:
            pass
        finally:
            os.close(fd)


def _lock(fd: int, path: str) -> None:
    try:
        import fcntl  # noqa: PLC0415 - POSIX (the serving side runs on Linux and macOS)
    except ImportError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputInUse(path) from None
    except OSError:
        pass  # no locks on this file system


def _names(path: str, fd: int) -> bool:
    try:
        here, there = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def output_in_use(path: str | Path) -> bool:
    """Whether another job holds `path` (`OutputLock`): a shared lock on it cannot be had."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def same_file(output: str | Path, input_path: str | Path) -> bool:
    """Whether the regular file `output` is the input (`-`: standard input), compared as files
    (device and inode), not as names: a hard link to the input, or `-i - < FILE -o FILE`, had been
    truncated by `--overwrite` while it was read (exit 0, the records past the first buffer lost)."""
    try:
        out = os.stat(output)
        # (standard input as the job reads it: `sys.stdin`, descriptor 0 in a process of the CLI)
        source = os.fstat(sys.stdin.fileno()) if str(input_path) == "-" else os.stat(input_path)
    except (OSError, ValueError, AttributeError):  # (closed, or replaced by an object without a descriptor)
        return False
    import stat  # noqa: PLC0415

    return stat.S_ISREG(out.st_mode) and (out.st_dev, out.st_ino) == (source.st_dev, source.st_ino)


class JsonlWriter:
    """Writes one JSON object per line, whole lines only, flushed after each group of lines.

    `path="-"` writes to standard output. The lines are UTF-8 whatever the locale: written as bytes,
    to standard output's byte stream too (its text layer's encoding had followed the locale: an
    ASCII locale raised at the first non-ASCII character, latin-1 wrote JSONL no UTF-8 reader reads).

    A file is created exclusively (O_EXCL): a file that exists is refused in one line,
    the same refusal whether it was there before the job or a job started beside this one created
    it in the meantime (both had opened it with "w" and each overwrote the other's lines).
    `append=True` continues an existing file, `replace=True` truncates one. A regular file is held
    with an `OutputLock` while the writer is open (`lock`: the job's own, taken earlier; else the
    writer's, released by `close()`). A path naming an open descriptor (/dev/stdout, /dev/fd/N) is
    written as that descriptor (`open_descriptor`: never truncated), and one that is not a regular
    file (/dev/null, a FIFO) is opened for writing as it is.
    """

    def __init__(self, path: str | Path, append: bool = False, replace: bool = False,
                 lock: OutputLock | None = None):
        self.path = str(path)
        self._lock = None
        if self.path == "-":
            self.stream = standard_output()
            self._close = False
            return
        self._close, self._file = True, False
        if names_a_descriptor(self.path):  # the shell's stream: written as it is, like /dev/null
            self.stream = open_descriptor(self.path)
            return
        target = Path(self.path)
        if not OutputLock.applies(target):  # /dev/null, a FIFO
            self.stream = open(target, "ab" if append else "wb")
            return
        if lock is None:
            lock = self._lock = OutputLock(self.path)
        try:
            fd = lock.open(create=not (append or replace), append=append)
            if replace:
                lock.truncate()
            self.stream = os.fdopen(os.dup(fd), "wb")
            self._file = True
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def write(self, rows: Iterable[dict]) -> None:
        # One write call per group of whole lines, then a flush: a kill can cut the OS write
        # short at worst, which `resume_point` repairs by dropping the torn last line.
        text = "".join(json.dumps(row, ensure_ascii=False, default=_plain) + "\n" for row in rows)
        if text:
            with self._naming_errors():
                self.stream.write(text.encode("utf-8"))
                self.stream.flush()

    def close(self) -> None:
        if self._close:
            try:
                # A file removed (or replaced) while the job wrote it: the job had ended "N records, 0
                # errors", exit 0, with nothing on disk.
                gone = self._file and not _names(self.path, self.stream.fileno())
                with self._naming_errors():  # what a failed write left in the buffer is flushed again
                    self.stream.close()
                if gone:
                    raise KerasLLMError(f"{self.path}: the output was removed or replaced while the job wrote "
                                        "it: its records are lost; run the job again")
            finally:
                if self._lock is not None:
                    self._lock.keep = True  # (the job decides about an empty output: `OutputLock.release`)
                    self._lock.release()

    @contextmanager
    def _naming_errors(self):
        """An OSError of a write (a full disk, /dev/full) as one line naming the output: the OS's
        message carries no file name. A reader that went away (`| head`) is no fault of the output."""
        try:
            yield
        except BrokenPipeError:
            raise
        except OSError as err:
            name = "standard output" if self.path == "-" else self.path
            raise KerasLLMError(f"{name}: cannot write the output ({err.strerror or err})") from None


def standard_output() -> BinaryIO:
    """Standard output's byte stream, for output written as UTF-8 bytes; a UsageError where it is
    closed (`cmd >&-`: Python's `sys.stdout` is None, and the first write had raised)."""
    if sys.stdout is None:
        raise UsageError("standard output is closed: pass --output FILE")
    sys.stdout.flush()  # what went through its text layer comes first
    return sys.stdout.buffer


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays in a predictor's results as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


@dataclass
class ResumePoint:
    """What an existing output already holds: its complete lines and their error count."""

    done: int = 0
    errors: int = 0
    ids: Iterator[str] | None = None  # ids of the done lines, in order (streamed from the file)


def resume_point(output: str | Path) -> ResumePoint:
    """Repair `output` (cut a torn last line) and describe the records it already holds.

    The ids are read lazily (`ids`), so checking a 10 GB output against its input takes no
    memory; call `close()` on it (or exhaust it) when done.
    """
    path = Path(output)
    if not path.exists() or path.stat().st_size == 0:
        return ResumePoint()
    # Checked before anything is changed: a file this command did not write is refused as it is.
    done = errors = 0
    tail = b""
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, start=1):
            if not raw.endswith(b"\n"):  # the last line, unterminated
                tail = raw
                break
            try:
                row = json.loads(raw)
                row["id"]  # noqa: B018 (must be there)
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path}: line {number}: not a kerasllm output record; "
                                "--resume continues an output this command wrote") from None
            done += 1
            errors += "error" in row
    if tail:
        # A kill mid-write leaves the start of a record, which the writer begins with its id.
        if not (tail.startswith(RECORD_START) or RECORD_START.startswith(tail)):
            raise DataError(f"{path}: line {done + 1}: not a kerasllm output record; "
                            "--resume continues an output this command wrote")
        with open(path, "rb+") as stream:
            stream.truncate(path.stat().st_size - len(tail))
    return ResumePoint(done, errors, _output_ids(path))


# How every output record's line begins (JsonlWriter writes `{"id": ..., ...}`, the id first).
RECORD_START = b'{"id": '


def _output_ids(path: Path) -> Iterator[str]:
    with open(path, "rb") as stream:
        for raw in stream:
            yield json.loads(raw)["id"]


# -- counting lines (progress totals, shards) --------------------------------------------------
def count_lines(path: str | Path) -> int:
    """Physical lines of a file (a last line without a newline counts), read in 1 MiB chunks."""
    lines, last = 0, b"\n"
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def shard_lines(total_lines: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """Lines `(first, last)` (1-based, inclusive) of shard `shard_index` of `num_shards`.

    Contiguous blocks of lines, so the shards' outputs concatenated in shard order equal the
    unsharded output. Deterministic: depends only on the file's line count.
    """
    if not 0 <= shard_index < num_shards:
        raise UsageError(f"--shard-index {shard_index} is outside 0..{num_shards - 1}")
    first = total_lines * shard_index // num_shards + 1
    last = total_lines * (shard_index + 1) // num_shards
    return first, last


# -- interrupts --------------------------------------------------------------------------------
class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; what was complete has been written."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalGuard:
    """Turns SIGINT/SIGTERM into `Interrupted`, but never in the middle of writing output.

    Inside `with guard.writing():` a signal is held until the block ends, so the lines being
    written are written whole and flushed before the job stops. Outside, the handler raises at
    once, and also records the signal, which `check()` raises: Python runs a handler wherever the
    main thread is, a weakref callback or a `__del__` (`_KVBuffer.__del__`, every batch) included,
    and drops what it raises there, so the runner checks between batches and windows too.
    A signal ignored when the guard starts (SIG_IGN inherited: `cmd &` in a script) stays ignored.
    """

    def __init__(self):
        self._writing = False
        self._pending: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) == signal.SIG_IGN:
                continue
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner's thread)
                pass
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def _handle(self, signum, frame):
        self._pending = signum
        if not self._writing:
            raise Interrupted(signum)

    def check(self) -> None:
        """Raise `Interrupted` for a signal that arrived (its raise may have been dropped)."""
        if self._pending is not None:
            raise Interrupted(self._pending)

    def writing(self):
        guard = self

        class _Writing:
            def __enter__(self):
                guard._writing = True

            def __exit__(self, *exc):
                guard._writing = False
                if guard._pending is not None and exc[0] is None:
                    raise Interrupted(guard._pending)
                return False

        return _Writing()


# -- the runner --------------------------------------------------------------------------------
# The summary names the time a --resume took to skip the done records from this long on.
SKIP_NOTED_SECONDS = 0.5


@dataclass
class Summary:
    """What a job did: counts and throughput (this run only, except `errors_total`)."""

    records: int = 0
    errors: int = 0
    skipped: int = 0  # already in the output (--resume)
    errors_total: int = 0  # errors in the whole output, resumed part included
    tokens: int = 0  # input tokens of the records this run processed
    generated: int = 0  # tokens the predictor generated (generate, translate)
    seconds: float = 0.0  # the run's work, without `skip_seconds`
    skip_seconds: float = 0.0  # reading and checking the records already in the output (--resume)
    interrupted: Interrupted | None = None

    def line(self) -> str:
        rate = self.records / self.seconds if self.seconds > 0 else 0.0
        tokens = self.tokens / self.seconds if self.seconds > 0 else 0.0
        # The skip is not the records' work (it had been timed with it: 1 record after 999,999 skipped
        # in 6 s read "0.2 records/s"), so it is said on its own, where it took noticeable time.
        skip = f", skipped in {self.skip_seconds:.1f} s" if self.skip_seconds >= SKIP_NOTED_SECONDS else ""
        resumed = f" (+{self.skipped} already in the output{skip})" if self.skipped else ""
        generated = (f", {self.generated / self.seconds:.0f} generated tokens/s"
                     if self.generated and self.seconds > 0 else "")
        return (f"{self.records} records{resumed}, {self.errors} errors, {self.seconds:.2f} s, "
                f"{rate:.1f} records/s, {tokens:.0f} input tokens/s{generated}")


class BatchRunner:
    """Runs a predictor over records in bounded windows and writes results in input order.

    Args:
        predictor: the Predictor (bundle or model dir).
        options: decoding/task options passed to `predictor.predict` by name.
        text_field: the record field holding the text.
        tokens_field: the record field holding a list of words (`tag`): a record that has it is
            read as those words, one without it as its text (split on whitespace by the tagger).
        batch_size: most records per batch.
        max_batch_tokens: padded-token budget per batch (None: no budget).
        bucket: sort each window by length before cutting batches.
        window: records read ahead and planned together; bounds memory.
        truncate: "error", "left" or "right" (see `Predictor.check`).
        extra_tokens: tokens each record grows by (max new tokens), counted in the budget.
        on_error: called with each error record's message (e.g. to print the first few).
        on_progress: called with the number of records written after each write.
        on_window: called with the token counts of each window's checked records, before
            they are predicted (e.g. to warn once about their lengths).
    """

    def __init__(self, predictor: Predictor, options: dict | None = None, text_field: str = "text",
                 tokens_field: str | None = None, batch_size: int = 32, max_batch_tokens: int | None = 8192, bucket: bool = True,
                 window: int = 1024, truncate: str = "error", extra_tokens: int = 0,
                 on_error: Callable[[str], None] | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 on_window: Callable[[list[int]], None] | None = None):
        require_truncate_support(predictor, truncate)
        self.predictor = predictor
        self.options = dict(options or {})
        self.text_field = text_field
        self.tokens_field = tokens_field
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.bucket = bucket
        self.window = max(window, 1)
        self.truncate = truncate
        self.extra_tokens = extra_tokens
        self.on_error = on_error or (lambda message: None)
        self.on_progress = on_progress or (lambda count: None)
        self.on_window = on_window or (lambda lengths: None)

    def run(self, records: Iterable[Record], writer: JsonlWriter, summary: Summary | None = None,
            done: Sequence[Record] = ()) -> Summary:
        """Process `records`, writing one line each to `writer`; returns the Summary.

        `done`: records already in the output that begin the first window (`skip_resumed`): they are
        predicted again with it but not written, so that its batches are those of the uninterrupted job.
        On SIGINT/SIGTERM the finished prefix is written and flushed, and the Summary comes
        back with `interrupted` set.
        """
        summary = summary or Summary()
        start = time.perf_counter()
        try:
            with SignalGuard() as guard:
                window: list[Record] = list(done)
                held = len(done)  # records at the window's start not to write
                for record in records:
                    window.append(record)
                    if len(window) >= self.window:
                        guard.check()
                        self._run_window(window, writer, guard, summary, held)
                        window, held = [], 0
                guard.check()
                if len(window) > held:
                    self._run_window(window, writer, guard, summary, held)
        except Interrupted as stop:
            summary.interrupted = stop
        summary.seconds = time.perf_counter() - start
        summary.errors_total += summary.errors
        return summary

    def _run_window(self, window: list[Record], writer: JsonlWriter, guard: SignalGuard, summary: Summary,
                    done: int = 0) -> None:
        """Predict `window` and write its lines, but for its first `done` (already in the output)."""
        rows: list[dict | None] = [None] * len(window)
        ids: dict[int, list[int]] = {}
        for position, record in enumerate(window):
            try:
                text = self._input(record)  # DataError: unreadable record, missing field
                ids[position] = check_text(self.predictor, text, self.truncate)
            except (DataError, RecordError) as err:
                rows[position] = self._error_row(record, err, report=position >= done)
        if ids:
            self.on_window([len(tokens) for tokens in ids.values()])
        written = done
        stream = predict_planned(self.predictor, ids, self.options, self.batch_size, self.max_batch_tokens,
                                 self.bucket, self.extra_tokens, keys={p: window[p].line for p in ids})
        try:
            with closing(stream):  # an interrupt stops the predictor's work on the rest of the window
                for batch_positions, results in stream:
                    for position, result in zip(batch_positions, results):
                        record, new = window[position], position >= done
                        if "error" in result:
                            rows[position] = self._error_row(record, RecordError(result["error"]), report=new)
                        else:
                            # Keys starting with "_" are the predictor's accounting, not output.
                            generated = int(result.pop(GENERATED_TOKENS, 0))
                            rows[position] = {"id": record.id, **result}
                            if new:
                                summary.generated += generated
                                summary.tokens += len(ids[position])
                    written = self._write_ready(rows, written, writer, guard, summary)
                    guard.check()
        except RuntimeFailure as err:
            lines = sorted(window[p].line for p in err.positions)
            named = ", ".join(map(str, lines[:5])) + (f" and {len(lines) - 5} more" if len(lines) > 5 else "")
            raise KerasLLMError(f"line{'s' if len(lines) > 1 else ''} {named}: {err}") from None
        self._write_ready(rows, written, writer, guard, summary)

    def _input(self, record: Record) -> str | list[str]:
        """The record's text, or its list of words under `tokens_field` when it has one."""
        if self.tokens_field and record.error is None:
            if record.has(self.tokens_field):
                return record.words(self.tokens_field)
            if not record.has(self.text_field):
                known = ", ".join(sorted(record.fields)) or "none"
                raise DataError(f"line {record.line}: missing field {self.text_field!r} or {self.tokens_field!r} "
                                f"(fields: {known})")
        return record.get(self.text_field)

    def _write_ready(self, rows, written: int, writer: JsonlWriter, guard: SignalGuard, summary: Summary) -> int:
        """Write the finished rows from `written` on, up to the first unfinished one."""
        end = written
        while end < len(rows) and rows[end] is not None:
            end += 1
        if end > written:
            with guard.writing():
                writer.write(rows[written:end])
                summary.records += end - written
                summary.errors += sum("error" in row for row in rows[written:end])
                self.on_progress(end - written)
        return end

    def _error_row(self, record: Record, err: Exception, report: bool = True) -> dict:
        message = str(err)
        if not message.startswith("line "):
            message = f"line {record.line}: {message}"
        if report:  # not a record already in the output, reported by the run that wrote it
            self.on_error(message)
        return {"id": record.id, "error": message}


def skip_resumed(records: Iterator[Record], point: ResumePoint, output: str | Path, window: int) -> list[Record]:
    """Read the first `point.done` records off `records`, checking their ids against the output's, and
    return the last `point.done % window` of them for `BatchRunner.run(..., done=...)`.

    Those begin the window the stopped job was in. Predicted again with the rest of it (not written),
    they make the resumed job's windows and batches the uninterrupted job's: an encoder's scores depend
    on their batch at float rounding (ONNX Runtime), and a job resumed mid-window that started its
    windows at the first missing record differed from the uninterrupted one in the last digit
    (571 of 200,000 classify lines, by 1e-6). It costs at most a window of records predicted again.
    """
    replay: list[Record] = []
    for number, output_id in enumerate(point.ids or (), start=1):
        record = next(records, None)
        if record is None:
            raise UsageError(f"--resume: {output} holds {point.done} records but the input has only {number - 1}: "
                             "not the output of this input")
        if record.id != output_id:
            raise UsageError(f"--resume: {output} line {number} has id {output_id!r} but input record {number} "
                             f"(line {record.line}) has id {record.id!r}: not the output of this input")
        if (number - 1) % window == 0:  # a window of the uninterrupted job starts at this record
            replay = []
        replay.append(record)
    return replay if len(replay) < window else []  # a whole window: the stopped job had written it all

