"""`kerasllm sample-data`: write the small datasets kerasllm generates itself."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import click

from kerasllm import datasets
from kerasllm.data import TEXT_SUFFIXES
from kerasllm.errors import KerasLLMError, UsageError

# The format written for each suffix of --out a kind can take (as the readers pick a format by suffix).
SUFFIX_FORMATS = {
    "corpus": {suffix: "text" for suffix in TEXT_SUFFIXES},
    "numbers": {".jsonl": "jsonl", ".tsv": "tsv", ".csv": "csv"},
    "sentiment": {".jsonl": "jsonl", ".tsv": "tsv", ".csv": "csv"},
    "ner": {".jsonl": "jsonl", ".conll": "conll"},
}


@click.command("sample-data")
@click.argument("kind", type=click.Choice(list(SUFFIX_FORMATS)))
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="File to write, in the format its suffix names: corpus .txt (or .text, .md, .raw); numbers "
                   "and sentiment .jsonl, .tsv or .csv (header row); ner .jsonl or .conll.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Number of stories/rows (default: a demo-sized set).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; the same seed gives the same file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def sample_data(kind, out, count, seed, overwrite):
    """Write a generated sample dataset: a story corpus, number-words->digits pairs, sentiment rows,
    or sentences tagged with people, places and dates (ner, BIO tags).

    \b
    Example:
      kerasllm sample-data corpus --out corpus.txt
      kerasllm sample-data numbers --out numbers.jsonl --count 5000
      kerasllm sample-data sentiment --out reviews.csv   # columns text, label
      kerasllm sample-data ner --out ner.conll      # or ner.jsonl: fields tokens, tags
    """
    formats = SUFFIX_FORMATS[kind]
    fmt = formats.get(out.suffix.lower())
    if fmt is None:
        raise click.BadParameter(f"{out.name}: a {kind} sample can be written as {', '.join(formats)} "
                                 "(the format its suffix names)", param_hint="'--out'")
    if out.exists() and not overwrite:  # --out is a likely name for the user's own data (reviews.tsv)
        raise UsageError(f"{out} exists: add --overwrite to replace it")
    if kind == "corpus":
        text = datasets.sample_corpus(count or 2000, seed=seed)
    elif kind == "ner":
        sentences = datasets.ner_rows(count or 2000, seed=seed)
        if fmt == "conll":  # a word and its tag a line, a blank line after each sentence
            text = "".join("".join(f"{w}\t{t}\n" for w, t in zip(*row)) + "\n" for row in sentences)
        else:
            text = "".join(json.dumps({"tokens": words, "tags": tags}) + "\n" for words, tags in sentences)
    else:
        rows = (datasets.number_words_pairs(count or 5000, seed=seed) if kind == "numbers"
                else datasets.sentiment_rows(count or 2000, seed=seed))
        keys = ("source", "target") if kind == "numbers" else ("text", "label")
        if fmt == "jsonl":
            text = "".join(json.dumps(dict(zip(keys, row))) + "\n" for row in rows)
        else:  # a header row, then the rows; fields quoted where they hold the delimiter or a quote
            buffer = io.StringIO()
            writer = csv.writer(buffer, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
            writer.writerow(keys)
            writer.writerows(rows)
            text = buffer.getvalue()
    tmp = out.with_name(f".{out.name}.partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    except OSError as err:  # a full disk had left the partial file and said "[Errno 28] ..." of no file
        with contextlib.suppress(OSError):  # (a read-only file system refuses even this: EROFS, not ENOENT)
            tmp.unlink(missing_ok=True)
        raise KerasLLMError(f"{out}: cannot write the sample data ({err.strerror or err})") from None
    click.echo(f"wrote {out} ({len(text):,} characters)", err=True)
