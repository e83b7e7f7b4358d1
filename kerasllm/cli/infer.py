"""`kerasllm generate|classify|embed|tag|translate SOURCE`: batch inference, files in, JSONL out.

SOURCE is a bundle (ONNX Runtime, no TensorFlow: the production path) or a model
directory (Keras). Input: plain text (one record a line), JSONL, TSV, CSV or CoNLL (tag);
output: JSONL, one line per input record, in input order:
    {"id": "1", "output": "..."}                        generate, translate
    {"id": "1", "output": ["...", ...], "scores": [...]} with --n-best > 1
    {"id": "1", "label": "pos", "scores": {"pos": 0.9, ...}}   classify
    {"id": "1", "embedding": [...]}                      embed
    {"id": "1", "tokens": ["Anna", ...], "tags": ["B-PER", ...], "scores": [0.99, ...]}   tag
    {"id": "7", "error": "line 7: empty text"}           a record that failed
`id` is the `--id-field` value, else the line number. A TSV/CSV header without the
`--id-field` or `--text-field` column is a usage error before anything runs; a JSONL record
without them is an error record (export/records.py).

Exit codes: 0 every record succeeded; 1 some records failed (error records were written)
or a runtime error; 2 bad usage; 130 interrupted by SIGINT, 143 by SIGTERM (what was
complete is written: rerun the same command with --resume to finish).

This module imports no TensorFlow (the Keras predictor of a model dir does, when loaded).
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import click

from kerasllm.cli.options import FiniteFloatRange, quiet_logging
from kerasllm.errors import DataError, ReaderGone, UsageError, in_chain
from kerasllm.export import job_record
from kerasllm.export.batch import TASK_DEFAULTS

FORMAT_CHOICES = ["auto", "text", "jsonl", "tsv", "csv", "conll"]
_GEN = TASK_DEFAULTS["generate"]  # decoding defaults, shared with the Beam handler


def batch_options(command):
    """Input/output, batching, resuming, sharding and device options shared by every task."""
    options = [
        click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path)),
        click.option("-i", "--input", "input_path", default="-", show_default=True,
                     help="Input file (a pipe such as <(zcat in.gz) is read as a stream), or - for standard input."),
        click.option("-o", "--output", "output_path", default="-", show_default=True,
                     help="Output JSONL file, or - for standard output."),
        click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default="auto", show_default=True,
                     help="Input format (auto: by suffix .jsonl/.json, .tsv, .csv, .conll, else text)."),
        click.option("--text-field", default="text", show_default=True,
                     help="JSONL field or TSV/CSV column holding the text."),
        click.option("--id-field", default=None, help="JSONL field or TSV/CSV column holding the id "
                     "(default: the line number; a JSONL record without it is an error record)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Most records per batch."),
        click.option("--max-batch-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
                     help="Padded tokens per batch: records x longest input (+ new tokens where it generates)."),
        click.option("--bucket/--no-bucket", default=True, show_default=True,
                     help="Sort each window by length so batches hold similar lengths (output order is kept)."),
        click.option("--window", type=click.IntRange(min=1), default=1024, show_default=True,
                     help="Records read ahead and batched together (bounds memory)."),
        click.option("--truncate", type=click.Choice(["error", "left", "right"]), default="error",
                     show_default=True, help="A text longer than the model allows: an error record, or keep "
                     "its end (left) or its start (right)."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run: skip the records already "
                     "in --output and append the rest."),
        click.option("--overwrite", is_flag=True, help="Replace an existing --output."),
        click.option("--num-shards", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Split the input into N contiguous blocks of lines (array jobs)..."),
        click.option("--shard-index", type=click.IntRange(min=0), default=0, show_default=True,
                     help="...and process block I (0-based). Outputs concatenated in shard order "
                     "equal the unsharded output, but for seeded sampling (repeatable for the same "
                     "sharding and --window, not across shardings) and, rarely, a score's last digits "
                     "(a shard's windows and batches start at its own first line)."),
        click.option("--device", default="cpu", show_default=True,
                     help="cpu, cuda, cuda:N or auto (a bundle or a model dir)."),
        click.option("-q", "--quiet", is_flag=True,
                     help="No progress (a bar on a terminal, else a line a minute), device line, per-record "
                          "warnings or summary."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def decoding_options(command):
    """The decoding options of generate and translate (names as `Predictor.predict` takes them)."""
    options = [
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=_GEN["max_new_tokens"],
                     show_default=True, help="New tokens per record at most: fewer where the output ends (the end "
                                             "token, a --stop string) or reaches the model's max_length."),
        click.option("--temperature", type=FiniteFloatRange(min=0), default=_GEN["temperature"], show_default=True,
                     help="0 is greedy decoding; sampling takes 1e-6 or more."),
        click.option("--top-k", type=click.IntRange(min=1), default=None, help="Sample among the k likeliest tokens."),
        click.option("--top-p", type=FiniteFloatRange(min=0, max=1, min_open=True), default=None,
                     help="Sample within the smallest set of tokens of probability >= p."),
        click.option("--repetition-penalty", type=FiniteFloatRange(min=0, min_open=True),
                     default=_GEN["repetition_penalty"], show_default=True,
                     help="Discourage repeats: the logits of tokens already in the prompt or the output are "
                          "divided by this (multiplied where negative, as CTRL's penalty). 1 is off, above 1 "
                          "penalizes (1.1 to 1.3 is usual), below 1 favours repeats."),
        click.option("--stop", multiple=True, help="Stop at this string (repeatable)."),
        click.option("--num-beams", type=click.IntRange(min=1), default=_GEN["num_beams"], show_default=True,
                     help="Beam search width (1: no beam search)."),
        click.option("--n-best", type=click.IntRange(min=1), default=_GEN["n_best"], show_default=True,
                     help="Outputs per record (with scores): at most --num-beams under beam search; generate "
                          "also samples that many under --temperature (translate's come from beam search only)."),
        click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None,
                     help="Seed for reproducible sampling (0 to 2**32 - 1)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def run_job(task: str, source: Path, *, quiet: bool, **settings) -> None:
    """Load the predictor for `task` on `source` and run the batch job; exits with its code."""
    with quiet_logging(quiet):
        try:
            _run_job(task, source, quiet=quiet, **settings)
        except BrokenPipeError:
            raise ReaderGone() from None


def _run_job(task: str, source: Path, *, input_path: str, output_path: str, fmt: str, text_field: str,
             id_field: str | None, batch_size: int, max_batch_tokens: int, bucket: bool, window: int,
             truncate: str, resume: bool, overwrite: bool, num_shards: int, shard_index: int, device: str,
             quiet: bool, options: dict, extra_tokens: int = 0, tokens_field: str | None = None) -> None:
    from kerasllm.export import batch  # noqa: PLC0415
    from kerasllm.export.records import detect_format, stdin_bytes  # noqa: PLC0415

    started = time.perf_counter()
    if input_path == "-" and stdin_bytes().isatty():  # (closed: a UsageError)
        raise UsageError("no --input given and standard input is a terminal (pass --input FILE or pipe records in)")
    if shard_index >= num_shards:
        raise UsageError(f"--shard-index {shard_index} is outside 0..{num_shards - 1} for --num-shards {num_shards}")
    if resume and overwrite:
        # Each names what to do with an existing --output: continue it or replace it. Taking
        # one silently (--resume won) could throw away a run the user meant to start afresh.
        raise UsageError("--resume and --overwrite cannot go together (--resume continues --output, "
                         "--overwrite replaces it): give one")
    if input_path == "-" and num_shards > 1:
        raise UsageError("--num-shards needs an input file (standard input cannot be split into blocks)")
    _check_device(device)
    given_fmt, fmt = fmt, detect_format(input_path, fmt)
    if fmt == "conll" and task != "tag":
        # CoNLL holds a word a line (`tag`'s input): every sentence had become an error record (exit 1).
        how = "--format conll" if given_fmt == "conll" else f"{input_path}: a .conll file"
        raise UsageError(f"{how}: CoNLL input (a word a line) is read by `kerasllm tag`; {task} reads text, "
                         "JSONL, TSV or CSV (see --format)")
    # A pipe (`-i <(zcat big.txt.gz)`, a named FIFO) or a character device is a stream, read once
    # from its start like standard input: counting its lines first (the progress bar's total, the
    # shards' blocks) would consume what the job then reads.
    streamed = input_path == "-"
    if not streamed:
        if Path(input_path).is_dir():
            raise UsageError(f"{input_path}: is a directory, expected a file")
        if not Path(input_path).exists():
            raise UsageError(f"{input_path}: no such file")
        if not os.access(input_path, os.R_OK):
            raise UsageError(f"{input_path}: cannot read it (Permission denied)")
        streamed = not Path(input_path).is_file()
        if streamed and num_shards > 1:
            raise UsageError(f"--num-shards needs a regular input file ({input_path} is a pipe or device: "
                             "read once as a stream, it cannot be split into blocks)")
    if output_path != "-" and Path(output_path).is_dir():  # else open() fails only after the model load
        raise UsageError(f"{output_path}: is a directory, expected a file (--output names the JSONL file to write)")
    if output_path == "-" and resume:
        raise UsageError("--resume needs an --output file")
    if output_path == "-":
        batch.standard_output()  # closed: one line now, not after the model load
    # An empty file too: the writer creates --output exclusively (JsonlWriter), so that a job racing
    # this one for it is refused as well; this says so before the model load.
    if (output_path != "-" and Path(output_path).is_file() and not batch.names_a_descriptor(output_path)
            and not (resume or overwrite)):
        if batch.output_in_use(output_path):
            raise batch.OutputInUse(output_path)
        raise UsageError(f"{output_path} exists: add --resume to continue it or --overwrite to replace it")
    if output_path != "-" and batch.OutputLock.applies(output_path):
        _check_writable(output_path)
    # Compared as files, not names: a hard link to the input, or `-i - < FILE -o FILE`, is the input too.
    if output_path != "-" and (batch.same_file(output_path, input_path) or (
            input_path != "-" and Path(output_path).resolve() == Path(input_path).resolve())):
        raise UsageError(f"{output_path} is also the input")
    # Held for the whole job (an flock the kernel drops when the process ends): a second job on this
    # --output, with --resume or without, is refused in one line instead of appending beside this one.
    # A job continuing or replacing its output takes it now, before it reads or repairs it; a new
    # output is created exclusively and locked when the writer opens it (after the model load). So is
    # one that --resume or --overwrite names but that is not there yet: made here, it had stayed empty
    # after a SIGKILL during the model load (release() never ran), an empty output that reads as a
    # finished job of no records.
    lock = batch.OutputLock(output_path)
    if (resume or overwrite) and os.path.exists(output_path):
        lock.open(append=resume)
    elif resume or overwrite:
        lock.create_new = True
    try:
        _run_locked(task, source, lock, input_path=input_path, output_path=output_path, fmt=fmt, given_fmt=given_fmt,
                    text_field=text_field, id_field=id_field, batch_size=batch_size,
                    max_batch_tokens=max_batch_tokens, bucket=bucket, window=window, truncate=truncate,
                    resume=resume, overwrite=overwrite, num_shards=num_shards, shard_index=shard_index,
                    device=device, quiet=quiet, options=options, extra_tokens=extra_tokens,
                    tokens_field=tokens_field, streamed=streamed, started=started)
    finally:
        lock.release()  # (an output this job created or emptied and wrote nothing to is removed)
        if output_path != "-" and not os.path.lexists(output_path):  # ... and with it the job's record
            job_record.remove(job_record.record_path(output_path))


def _run_locked(task: str, source: Path, lock, *, input_path: str, output_path: str, fmt: str, given_fmt: str,
                text_field: str,
                id_field: str | None, batch_size: int, max_batch_tokens: int, bucket: bool, window: int,
                truncate: str, resume: bool, overwrite: bool, num_shards: int, shard_index: int, device: str,
                quiet: bool, options: dict, extra_tokens: int, tokens_field: str | None, streamed: bool,
                started: float) -> None:
    """`run_job` once its checks are passed and its `OutputLock` made (held, or taken by the writer)."""
    from tqdm import tqdm  # noqa: PLC0415  (kept off `kerasllm --help`'s path)

    from kerasllm.export import batch  # noqa: PLC0415
    from kerasllm.export.predict import load_predictor  # noqa: PLC0415
    from kerasllm.export.records import read_records  # noqa: PLC0415
    from kerasllm.export.runtime import retain_freed_memory  # noqa: PLC0415

    lines = None
    total_lines = None
    if not streamed and (num_shards > 1 or not quiet):
        total_lines = input_lines = batch.count_lines(input_path)
        if num_shards > 1:
            lines = batch.shard_lines(total_lines, num_shards, shard_index)
            total_lines = lines[1] - lines[0] + 1

    point = batch.resume_point(output_path) if resume else batch.ResumePoint()  # before the (slow) model load
    # What this job's records depend on, kept beside the output while it runs (export/job_record.py):
    # a --resume with other options or another model had appended their outputs to the old ones.
    record_file = job_record.record_path(output_path)
    record = job_record.settings(task, source, format=fmt, text_field=text_field, id_field=id_field,
                                 tokens_field=tokens_field, truncate=truncate, shards=[shard_index, num_shards],
                                 options=options)
    unchecked = job_record.check(record_file, record, output_path) if resume and point.done else None
    # (`given_fmt`, "auto" where --format was not given: the reader then looks at a stream's first line)
    records = read_records(input_path, given_fmt, id_field=id_field, lines=lines, text_field=text_field)
    # Read up to the first record now: a TSV/CSV header without the --text-field or --id-field
    # column (or no header at all) stops the job here, before the model loads or the output opens.
    first = next(records, None)
    if first is None and lines is None and not point.done:
        # An empty input is almost always a mistake upstream: say so, before the (slow) model load.
        # (Its one read, of a file, a pipe or standard input alike, found no record.)
        name = "standard input" if input_path == "-" else input_path
        raise DataError(f"{name}: no records to process (the input is empty or holds only blank lines)")
    if first is None and lines is not None and not point.done:
        # This shard's block of lines holds no record (more shards than the input has lines, or a
        # block of blank lines). In an array job that is a task with nothing to do, not a failure:
        # it succeeds, without loading the model, and leaves an empty output, so that the shards'
        # outputs still concatenate (and a `part-$I` a later step lists is there). An input with
        # no record at all is still an error, as unsharded.
        everything = read_records(input_path, fmt, id_field=id_field, text_field=text_field)
        try:
            input_empty = next(everything, None) is None
        finally:
            everything.close()
        if input_empty:
            raise DataError(f"{input_path}: no records to process (the input is empty or holds only blank lines)")
        batch.JsonlWriter(output_path, append=resume, replace=overwrite, lock=lock).close()
        lock.keep = True  # the empty part is this shard's result
        if not quiet:
            block = (f"lines {lines[0]}-{lines[1]} of {input_path} hold none" if lines[0] <= lines[1]
                     else f"{input_path} has {input_lines} lines, fewer than the shards")
            written = "nothing written" if output_path == "-" else f"wrote an empty {output_path}"
            click.echo(f"kerasllm: {task}: --shard-index {shard_index} of {num_shards}: no records in this "
                       f"shard's block ({block}); {written}", err=True)
        return
    records = itertools.chain([first] if first is not None else [], records)
    retain_freed_memory()  # a serving process: freed arrays stay for the next batch (export/runtime.py)
    # Guarded too: Python runs a signal's handler wherever the main thread is, and a KeyboardInterrupt
    # raised in a weakref callback of the model's imports was dropped (the job then ran to its end).
    with batch.SignalGuard() as loading:
        try:
            predictor = load_predictor(task, source, device=device)
            loading.check()
        except Exception as err:
            # The Interrupted itself, or one a C extension's import turned into "ImportError:
            # initialization failed" (TensorFlow's, loading a model dir).
            stop = in_chain(err, batch.Interrupted)
            if stop is None:
                raise
            click.echo(f"kerasllm: interrupted by {signal.Signals(stop.signum).name} while loading the model; "
                       "nothing was written", err=True)
            sys.exit(128 + stop.signum)
    # With standard error closed (`2>&-`: sys.stderr is None) there is nowhere to show progress or
    # warnings: tqdm had been handed None and failed at its first write, before any output.
    if quiet or sys.stderr is None or sys.stderr.isatty():
        bar = tqdm(total=total_lines, unit="rec", desc=task, file=sys.stderr, disable=quiet or sys.stderr is None,
                   dynamic_ncols=True, mininterval=0.5, smoothing=0.1, initial=0)
    else:
        bar = LogProgress(task, total_lines)
    warned = [0]

    def warn(message: str) -> None:
        if sys.stderr is not None:
            tqdm.write(f"kerasllm: warning: {message}", file=sys.stderr)

    def on_error(message: str) -> None:
        warned[0] += 1
        if not quiet and warned[0] <= 10:
            warn(message)
        elif not quiet and warned[0] == 11:
            warn("more failed records; see the \"error\" lines in the output")

    on_window = None
    if task in ("generate", "classify", "embed", "tag"):
        on_window = context_check(predictor, options.get("max_new_tokens", 0), warn)
    if unchecked:  # said when the job first appends (a finished job's output, resumed, appends nothing)
        on_window = _first_call(lambda: warn(unchecked), on_window)  # (under --quiet too: it concerns the output)
    runner = batch.BatchRunner(predictor, options, text_field=text_field, tokens_field=tokens_field,
                               batch_size=batch_size,
                               max_batch_tokens=max_batch_tokens, bucket=bucket, window=window, truncate=truncate,
                               extra_tokens=extra_tokens, on_error=on_error, on_progress=bar.update,
                               on_window=on_window)
    summary = batch.Summary(skipped=point.done, errors_total=point.errors)
    if point.done:
        bar.update(point.done)
    writer = batch.JsonlWriter(output_path, append=resume, replace=overwrite, lock=lock)
    unkept = job_record.write(record_file, record)
    if unkept and not quiet:
        warn(f"cannot keep this job's settings beside {output_path} ({unkept}): a --resume of it will not "
             "check that it runs with the same options")
    try:
        # A guard of its own around the runner's: a signal while the job closes its output and the
        # progress bar waits until they are closed (and the bar freed). The default handler raised a
        # KeyboardInterrupt wherever it landed, a tqdm.__del__ among them ("Exception ignored in ...").
        with batch.SignalGuard() as guard:
            try:
                done = []
                if point.done:  # timed on its own: the records' rate is the work on the new ones
                    skip_start = time.perf_counter()
                    done = batch.skip_resumed(records, point, output_path, runner.window)
                    summary.skip_seconds = time.perf_counter() - skip_start
                summary = runner.run(records, writer, summary, done=done)
                if summary.interrupted is None and bar.total:
                    bar.update(bar.total - bar.n)  # the total counted blank lines and headers too
            finally:
                with guard.writing():
                    writer.close()
                    bar.close()
                    runner = bar = None  # the bar's __del__ runs here (the runner holds bar.update)
                    # An output this run created or emptied and wrote nothing to (the job failed
                    # before its first line) is removed when the lock is released (`run_job`),
                    # still held then: an empty file would pass for a finished job.
    except batch.Interrupted as stop:  # a signal outside the runner's guard (what is complete is written)
        summary.interrupted = summary.interrupted or stop
    if summary.interrupted is None:  # every record done (error records too): nothing left to resume
        job_record.remove(record_file)
    if not quiet:
        click.echo(f"kerasllm: {task}: {summary.line()} (total {time.perf_counter() - started:.2f} s)", err=True)
    if summary.interrupted is not None:
        signum = summary.interrupted.signum
        click.echo(f"kerasllm: interrupted by {signal.Signals(signum).name} after {summary.skipped + summary.records} "
                   f"records; rerun the same command with --resume to finish", err=True)
        sys.exit(128 + signum)
    if summary.errors_total:
        click.echo(f"kerasllm: {summary.errors_total} record(s) failed: see the \"error\" lines in "
                   f"{'the output' if output_path == '-' else output_path}", err=True)
        sys.exit(1)


def _first_call(once: Callable[[], None], then: Callable | None) -> Callable:
    """An `on_window` hook that calls `once` before its first window, then `then` (if any) every window."""
    pending = [once]

    def hook(lengths):
        while pending:
            pending.pop()()
        if then is not None:
            then(lengths)

    return hook


def _check_writable(output_path: str) -> None:
    """UsageError, before the (slow) model load, where this user cannot write `output_path` (a file)
    or create it (its nearest existing directory): it had been a raw "[Errno 13] Permission denied:
    'out.jsonl'" once the model had loaded."""
    path = Path(os.path.realpath(output_path))
    if path.exists():
        if not os.access(path, os.W_OK):
            raise UsageError(f"--output {output_path}: cannot write it (Permission denied)")
        return
    directory = next((p for p in path.parents if p.exists()), None)
    if directory is not None and directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"--output {output_path}: cannot create a file in {directory} (Permission denied)")


class LogProgress:
    """A batch job's progress where standard error is not a terminal (a log file, a pipe, a scheduler's
    capture): a plain line every `every` seconds, for tqdm's bar, whose carriage-return frames had
    grown into one endless line of the log and started every warning line after them. The part of
    tqdm's interface the job uses: `update`, `n`, `total`, `close`."""

    every = 60.0

    def __init__(self, task: str, total: int | None):
        self.task, self.total, self.n = task, total, 0
        self.started = self.shown = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if n and now - self.shown >= self.every:
            self.shown = now
            of = f"/{self.total}" if self.total else ""
            click.echo(f"kerasllm: {self.task}: {self.n}{of} records ({self.n / (now - self.started):.1f} rec/s)",
                       err=True)

    def close(self) -> None:
        pass


EPILOG = ("Exit codes: 0 every record done; 1 some records failed (see the \"error\" lines) or a runtime "
          "error; 2 bad usage; 130 (SIGINT) or 143 (SIGTERM) interrupted: rerun with --resume; 141 the output's "
          "reader went away (| head).")


def context_check(predictor, max_new_tokens: int, warn):
    """An `on_window` hook warning once when prompts + new tokens (`generate`) or texts (`classify`,
    `embed`: `max_new_tokens` 0) go past the trained --seq-len.

    A model saw positions up to its training `--seq-len` only; text generated past them
    degrades, and so do an encoder's results for longer texts. The records stream in, so each
    window's longest is checked before the window is run, and the first one that goes past
    (capped at the model's max_length, where generation stops) gets one warning for the whole
    job (printed under --quiet too: it is about the outputs, not a record). None when the
    source does not record its training seq-len (older bundles): no warning.
    """
    seq_len = getattr(predictor, "trained_seq_len", None)
    if not seq_len:
        return None
    max_length = getattr(predictor, "max_length", None)
    warned = [False]

    def check(lengths: list[int]) -> None:
        if warned[0] or not lengths:
            return
        reach = max(lengths) + max_new_tokens
        if max_length:
            reach = min(reach, max_length)
        if reach > seq_len:
            warned[0] = True
            what, effect = (("prompts + --max-new-tokens", "text past it degrades") if max_new_tokens
                            else ("texts", "results for such texts may degrade"))
            warn(f"{what} reach {reach} tokens, longer than the --seq-len {seq_len} the model was trained with; "
                 f"{effect}")

    return check


def _check_device(device: str) -> None:
    """Refuse a --device the runtime cannot read (runtime.parse_device's rule; checked here before
    ONNX Runtime or TensorFlow loads). "auto" (the GPU where there is one) had been refused although
    the help offers it and the runtime and `evaluate` take it."""
    name, _, index = device.partition(":")
    if (name not in ("cpu", "cuda", "auto") or (index and not index.isdigit())
            or (name in ("cpu", "auto") and index)):
        raise UsageError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto")


def _decoding(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, num_beams, n_best, seed) -> dict:
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "repetition_penalty": repetition_penalty, "stop": list(stop) or None, "num_beams": num_beams,
            "n_best": n_best, "seed": seed}


def _split_decoding(task: str, kwargs: dict) -> dict:
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "num_beams",
             "n_best", "seed")
    options = _decoding(*(kwargs.pop(name) for name in names))
    check_decoding(task, options)
    return options


def check_decoding(task: str, options: dict) -> None:
    """UsageError, naming the CLI's options, for decoding options that cannot go together.

    The rules are `DecodingOptions.validate`'s (export/generate.py), which the predictor applies
    too (for every caller: the Beam handler, the Python API), but only once the model is loaded
    and the output open; the CLI asks first, so a mistyped command costs no model load and leaves
    no empty output, and puts the messages' option names as the CLI spells them. generate samples
    an n-best list under --temperature > 0; translate's come from beam search only.
    """
    import re  # noqa: PLC0415

    from kerasllm.export.generate import DecodingOptions  # noqa: PLC0415  (numpy only, no TensorFlow)

    try:
        DecodingOptions(**options).validate(sampled_n_best=task == "generate")
    except UsageError as err:
        raise UsageError(re.sub(rf"\b({'|'.join(_DECODING_FLAGS)})\b", lambda m: "--" + m.group(1).replace("_", "-"),
                                str(err))) from None


# The options DecodingOptions.validate's messages name, each the CLI's --flag with "-" for "_".
_DECODING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams", "n_best",
                   "seed")


@click.command(epilog=EPILOG)
@batch_options
@decoding_options
def generate(source, **kwargs):
    """Continue each prompt with a causal LM (GPT-like).

    \b
    Example:
      kerasllm generate bundle/ --input prompts.txt --output out.jsonl --max-new-tokens 64
      kerasllm generate bundle/ -i prompts.jsonl -o out.jsonl --temperature 0.8 --top-p 0.9 --seed 1
      kerasllm generate bundle/ -i prompts.txt -o out.jsonl --resume     # after an interruption
    """
    options = _split_decoding("generate", kwargs)
    run_job("generate", source, options=options, extra_tokens=options["max_new_tokens"], **kwargs)


@click.command(epilog=EPILOG)
@batch_options
@decoding_options
def translate(source, **kwargs):
    """Map each text to a new text with a sequence-to-sequence model (translation, any text-to-text).

    \b
    Example:
      kerasllm translate bundle/ --input source.txt --output out.jsonl --num-beams 4
    """
    options = _split_decoding("translate", kwargs)
    run_job("translate", source, options=options, extra_tokens=options["max_new_tokens"], **kwargs)


@click.command(epilog=EPILOG)
@batch_options
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Scores of the k likeliest labels only (default: all labels).")
def classify(source, top_k, **kwargs):
    """Label each text with a classifier, with the labels' probabilities.

    \b
    Example:
      kerasllm classify bundle/ --input reviews.csv --text-field review --id-field id --output labels.jsonl
    """
    run_job("classify", source, options={"top_k": top_k}, **kwargs)


@click.command(epilog=EPILOG)
@batch_options
@click.option("--normalize/--no-normalize", default=TASK_DEFAULTS["embed"]["normalize"], show_default=True,
              help="Scale each embedding to unit length.")
def embed(source, normalize, **kwargs):
    """Embed each text as a vector with an encoder.

    \b
    Example:
      kerasllm embed bundle/ --input docs.jsonl --id-field doc_id --output vectors.jsonl --normalize
    """
    run_job("embed", source, options={"normalize": normalize}, **kwargs)


@click.command(epilog=EPILOG)
@batch_options
@click.option("--tokens-field", default="tokens", show_default=True,
              help="JSONL field holding a list of words (a record without it is read from --text-field, "
                   "split on whitespace; a CoNLL input's words are read from its first column).")
def tag(source, tokens_field, **kwargs):
    """Tag each word of each sentence with a token classifier (NER, POS), with each tag's probability.

    Records are a text (split on whitespace into words) or, in JSONL, a list of words under
    --tokens-field. Output: {"id", "tokens", "tags", "scores"}, one tag per word. A sentence
    longer than the model allows is an error record, or with --truncate right (left) keeps
    its first (last) words: "tokens" then lists the words kept.

    \b
    Example:
      kerasllm tag bundles/ner --input sentences.txt --output tags.jsonl
      kerasllm tag bundles/ner -i sentences.jsonl --tokens-field words --id-field id -o tags.jsonl
    """
    run_job("tag", source, options={}, tokens_field=tokens_field, **kwargs)


__all__ = ["classify", "embed", "generate", "tag", "translate"]
