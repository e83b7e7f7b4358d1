"""`kerasllm evaluate SOURCE --data PATH`: a model's metrics on a data file, printed and saved as JSON."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click

from kerasllm.cli.options import quiet_logging
from kerasllm.metrics import BLEU_TOKENIZERS


@click.command("evaluate")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path),
              help="TSV/CSV (header row), JSONL or text file to score (token-classifier: JSONL or CoNLL); - is "
                   "standard input (with --format).")
@click.option("--source-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Seq2seq: sources, one a line, line-aligned with --target-file (in place of --data).")
@click.option("--target-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Seq2seq: the reference translations of --source-file, one a line.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Also write the metrics here (JSON).")
@click.option("--format", "fmt", type=click.Choice(["auto", "text", "jsonl", "tsv", "csv", "conll"]), default="auto",
              show_default=True, help="Input format (auto: by file suffix).")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text.")
@click.option("--label-field", default="label", show_default=True, help="Field holding the reference label.")
@click.option("--tokens-field", default="tokens", show_default=True,
              help="Field holding the list of words (token-classifier, JSONL).")
@click.option("--tags-field", default="tags", show_default=True,
              help="Field holding the reference tags (token-classifier, JSONL).")
@click.option("--source-field", default="source", show_default=True, help="Field holding the source (seq2seq).")
@click.option("--target-field", default="target", show_default=True, help="Field holding the reference (seq2seq).")
@click.option("--bleu-tokenize", type=click.Choice(["auto", *BLEU_TOKENIZERS]), default="auto", show_default=True,
              help="sacrebleu's tokenizer for BLEU (seq2seq). auto: zh for Chinese targets, char for Japanese or "
                   "Thai (written without spaces: 13a would take a sentence for one word), else 13a.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Records per batch.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda, cuda:N or auto (a bundle or a model dir).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (shown only on a terminal) or device line.")
def evaluate(source, data, source_file, target_file, output, fmt, text_field, label_field, tokens_field, tags_field,
             source_field, target_field, bleu_tokenize, batch_size, device, overwrite, quiet):
    """Score a model dir or a bundle: accuracy and macro_f1 (classifier), perplexity (causal-lm,
    masked-lm), bleu, chrf and exact_match (seq2seq), word accuracy, macro_f1 and with BIO tags entity_f1,
    entity_precision, entity_recall and entity_types (per type) (token-classifier).

    Prints the metrics as JSON on stdout (keys `accuracy`, `macro_f1`, `perplexity`, ... as apply).
    A causal LM's perplexity uses the context it was trained with (`--seq-len`, reported as
    `context`): longer records are scored in sliding windows, every token once. An encoder reads
    each text whole (up to its max_length), and says once, as `classify` does, when texts go
    past the `--seq-len` it was trained with.

    \b
    Example:
      kerasllm evaluate runs/clf --data test.tsv --output metrics.json
      kerasllm evaluate bundles/lm --data held_out.txt
      kerasllm evaluate bundles/clf --data test.jsonl --text-field review --label-field stars
      kerasllm evaluate bundles/ner --data test.conll          # accuracy per word, entity_f1 (conlleval)
      kerasllm evaluate bundles/mt --source-file test.en --target-file test.de    # bleu, chrf
    """
    from kerasllm.errors import KerasLLMError, UsageError  # noqa: PLC0415
    from kerasllm.evaluation import evaluate as run  # noqa: PLC0415
    from kerasllm.export.batch import OutputLock, names_a_descriptor, open_descriptor  # noqa: PLC0415

    if (data is None) == (source_file is None and target_file is None):
        raise UsageError("give --data, or --source-file and --target-file (seq2seq)")
    if data is None and (source_file is None or target_file is None):
        raise UsageError(f"--{'target' if target_file is None else 'source'}-file is missing: line-aligned pairs need "
                         "both --source-file and --target-file")
    parallel = (source_file, target_file) if data is None else None
    if parallel and (fmt != "auto" or source_field != "source" or target_field != "target"):  # had been ignored
        raise UsageError("--format, --source-field and --target-field read --data; --source-file and --target-file "
                         "are plain text, one pair a line")
    if str(data) == "-":  # ("File '-' does not exist"); read where a path is read, as the batch commands' `-i -`
        if sys.stdin is None:
            raise UsageError("standard input is closed: pass --data FILE")
        data = Path("/dev/stdin")
    for given, option in ((data, "--data"), (source_file, "--source-file"), (target_file, "--target-file")):
        if output and given is not None and output.resolve() == given.resolve():  # the data would be lost
            raise UsageError(f"{output} is also the {option} file")
    # A file of SOURCE's own (--output runs/clf/config.json, a bundle's manifest.json) had been replaced
    # by the metrics, exit 0, and the model with it; another existing file without a word. Refused, as
    # the batch commands' --output and sample-data --out are (--overwrite for a file of one's own).
    if output and output.resolve().is_relative_to(source.resolve()) and output.exists():
        raise UsageError(f"--output {output} is a file of {source}, the model being evaluated")
    # A device or a FIFO (`--output /dev/null`, a named pipe a reader waits on) is written as it is, as
    # the batch commands' --output is: the rename below had put a regular file in its place (as root,
    # the system's /dev/null), and the FIFO's reader waited forever.
    in_place = output is not None and not OutputLock.applies(output)  # (OutputLock's rule: not a regular file)
    if output and not in_place and output.is_file() and not overwrite:
        raise UsageError(f"{output} exists: add --overwrite to replace it")
    if output and not in_place:
        _check_writable(Path(os.path.realpath(output)))
    if sys.stdout is None and not output:  # `>&-`: the metrics had gone nowhere, exit 0
        raise UsageError("standard output is closed: pass --output FILE")
    bar = _ProgressBar(quiet)
    try:
        with quiet_logging(quiet):
            result = run(source, data, parallel=parallel, device=device, batch_size=batch_size, fmt=fmt,
                         text_field=text_field, label_field=label_field, tokens_field=tokens_field, tags_field=tags_field,
                         source_field=source_field, target_field=target_field, bleu_tokenize=bleu_tokenize,
                         progress=bar, warn=lambda message: bar.write(f"kerasllm: warning: {message}"))
    finally:
        bar.close()
    text = json.dumps(result, indent=2, ensure_ascii=False)  # as the batch commands write (tag types, labels)
    stdout_failure = None
    if sys.stdout is not None:
        try:
            click.echo(text)  # first: a --output write that fails (a full disk) loses none of the evaluation
        except OSError as err:  # ... and one to stdout that fails still writes --output
            stdout_failure = err
    if stdout_failure is not None and not output:
        raise KerasLLMError(f"standard output: cannot write the metrics ({stdout_failure.strerror or stdout_failure})")
    if in_place:  # /dev/stdout, /dev/fd/N: the shell's stream; /dev/null, a FIFO: written as they are
        # In place, never truncated: opened again with "w", `--output /dev/stdout >> job.log` had emptied the log.
        try:
            with open_descriptor(output) if names_a_descriptor(output) else open(output, "ab") as stream:
                stream.write((text + "\n").encode("utf-8"))
        except OSError as err:  # /dev/full, a FIFO whose reader went away
            raise KerasLLMError(f"--output {output}: cannot write the metrics ({err.strerror or err})"
                                + ("; they are on standard output above" if stdout_failure is None and
                                   sys.stdout is not None else "")) from None
    elif output:
        output = Path(os.path.realpath(output))  # through a symbolic link (the rename had replaced the link)
        tmp = _partial(output)
        try:
            tmp.write_text(text + "\n", encoding="utf-8")
            tmp.replace(output)
        except OSError as err:
            with contextlib.suppress(OSError):  # (its directory may be what failed)
                tmp.unlink(missing_ok=True)
            raise KerasLLMError(f"--output {output}: cannot write the metrics ({err.strerror or err}); they are "
                                "on standard output above") from None
    if stdout_failure is not None:
        raise KerasLLMError(f"standard output: cannot write the metrics ({stdout_failure.strerror or stdout_failure}); "
                            f"they are in {output}")


class _ProgressBar:
    """The records scored so far, on stderr where it is a terminal (tqdm's own rule: a log or a pipe gets
    no bar), made once the evaluator knows how many (after the model loads) and gone when it ends. A
    40 MB evaluation had run 11 minutes with nothing on the screen."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def reset(self, total: int | None = None) -> None:
        import sys  # noqa: PLC0415

        from tqdm import tqdm  # noqa: PLC0415  (kept off `kerasllm --help`'s path)

        if self.bar is None:
            self.bar = tqdm(total=total, unit="rec", desc="evaluate", file=sys.stderr, dynamic_ncols=True, leave=False,
                            disable=True if self.quiet or sys.stderr is None else None)
        else:
            self.bar.reset(total=total)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, line: str) -> None:
        """`line` on stderr, above the bar."""
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line, file=self.bar.fp)
        else:
            click.echo(line, err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _partial(output: Path) -> Path:
    """Where the metrics are written before they are renamed to `output` (never half a file there)."""
    return output.with_name(f".{output.name}.partial")


def _check_writable(output: Path) -> None:
    """UsageError, before the evaluation runs (it may take long), where `output` cannot be written:
    its directory (made where missing) takes a new file. The metrics had been computed, then lost to
    a message naming the partial file or another path ("[Errno 17] File exists: 'afile'")."""
    from kerasllm.errors import UsageError  # noqa: PLC0415

    tmp = _partial(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()
        tmp.unlink()
    except OSError as err:
        blocking = next((p for p in (output.parent, *output.parent.parents) if p.is_file()), None)
        reason = (f"{blocking} is not a directory" if blocking is not None
                  else f"cannot create a file in {output.parent} ({err.strerror or err})")
        raise UsageError(f"--output {output}: {reason}") from None
