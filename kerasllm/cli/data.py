"""`kerasllm sample-data`: write the small datasets kerasllm generates itself."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kerasllm import datasets


@click.command("sample-data")
@click.argument("kind", type=click.Choice(["corpus", "numbers", "sentiment", "ner"]))
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="File to write (.txt for the corpus, .jsonl or .tsv for the tasks; ner: .jsonl or .conll).")
@click.option("--count", type=int, default=None, help="Number of stories/rows (default: a demo-sized set).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; the same seed gives the same file.")
def sample_data(kind, out, count, seed):
    """Write a generated sample dataset: a story corpus, number-words->digits pairs, sentiment rows,
    or sentences tagged with people, places and dates (ner, BIO tags).

    \b
    Example:
      kerasllm sample-data corpus --out corpus.txt
      kerasllm sample-data numbers --out numbers.jsonl --count 5000
      kerasllm sample-data ner --out ner.conll      # or ner.jsonl: fields tokens, tags
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "corpus":
        text = datasets.sample_corpus(count or 2000, seed=seed)
    elif kind == "ner":
        sentences = datasets.ner_rows(count or 2000, seed=seed)
        if out.suffix == ".conll":  # a word and its tag a line, a blank line after each sentence
            text = "".join("".join(f"{w}\t{t}\n" for w, t in zip(*row)) + "\n" for row in sentences)
        else:
            text = "".join(json.dumps({"tokens": words, "tags": tags}) + "\n" for words, tags in sentences)
    else:
        rows = (datasets.number_words_pairs(count or 5000, seed=seed) if kind == "numbers"
                else datasets.sentiment_rows(count or 2000, seed=seed))
        keys = ("source", "target") if kind == "numbers" else ("text", "label")
        if out.suffix == ".tsv":
            text = "\t".join(keys) + "\n" + "".join(f"{a}\t{b}\n" for a, b in rows)
        else:
            text = "".join(json.dumps(dict(zip(keys, row))) + "\n" for row in rows)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    click.echo(f"wrote {out} ({len(text):,} characters)", err=True)
