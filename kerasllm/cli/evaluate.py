"""`kerasllm evaluate SOURCE --data PATH`: a model's metrics on a data file, printed and saved as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("evaluate")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TSV/CSV (header row), JSONL or text file to score (token-classifier: JSONL or CoNLL).")
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
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Records per batch.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda, cuda:N or auto (a bundle or a model dir).")
def evaluate(source, data, output, fmt, text_field, label_field, tokens_field, tags_field, source_field, target_field,
             batch_size, device):
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
    """
    from kerasllm.errors import UsageError  # noqa: PLC0415
    from kerasllm.evaluation import evaluate as run  # noqa: PLC0415

    if output and output.resolve() == data.resolve():  # before the model loads; the data would be lost
        raise UsageError(f"{output} is also the --data file")
    result = run(source, data, device=device, batch_size=batch_size, fmt=fmt, text_field=text_field,
                 label_field=label_field, tokens_field=tokens_field, tags_field=tags_field,
                 source_field=source_field, target_field=target_field,
                 warn=lambda message: click.echo(f"kerasllm: warning: {message}", err=True))
    text = json.dumps(result, indent=2)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.partial")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(output)
    click.echo(text)
