"""`kerasllm export MODEL_DIR --out BUNDLE_DIR`: a trained model -> a verified ONNX bundle."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write (new or empty).")
@click.option("--opset", type=int, default=17, show_default=True,
              help="ONNX opset, 15 to 18 (17+ has LayerNormalization).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weights and KV cache precision (fp16: for GPUs; layer norm statistics and softmax are "
                   "computed in fp32).")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Apply ONNX Runtime's transformer fusions (recorded in the manifest).")
@click.option("--kv-cache", type=click.Choice(["shared-buffer", "growing"]), default="shared-buffer",
              show_default=True,
              help="Decoder KV cache: one buffer per layer updated in place by GroupQueryAttention (fastest "
                   "on CPU; on CUDA that kernel takes fp16 only, so serve it there with --dtype fp16), or past + "
                   "new concatenated by MultiHeadAttention (an fp32 bundle served on CUDA).")
@click.option("--quiet", is_flag=True, help="Print nothing but errors (the figures stay in manifest.json).")
def export(model_dir, out, opset, dtype, optimize, kv_cache, quiet):
    """Export a trained model to an ONNX bundle, checked against Keras.

    The bundle (graph, tokenizer.json, manifest.json with hashes and the validation
    figures) is written only if ONNX Runtime reproduces the Keras model: fp32 logits
    within 1e-4 and identical greedy generations, fp16 top-1 agreement >= 99%.
    A failed check writes nothing and exits 1 naming the output and the figure.

    \b
    Example:
      kerasllm export runs/lm --out bundles/lm
      kerasllm export runs/lm --out bundles/lm-fp16 --dtype fp16          # for GPUs
      kerasllm export runs/lm --out bundles/lm-gpu --kv-cache growing   # fp32 on CUDA
    """
    from kerasllm.errors import UsageError  # noqa: PLC0415

    # Checked before TensorFlow loads (seconds), so a wrong path fails at once.
    if not (model_dir / "model.keras").is_file() or not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir}: not a finished model directory (needs model.keras and config.json)")
    if click.get_current_context().get_parameter_source("kv_cache") == click.core.ParameterSource.COMMANDLINE:
        import json  # noqa: PLC0415

        try:
            family = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["model"]["family"]
        except (ValueError, KeyError, TypeError):
            family = None  # load_model_dir names a broken config.json below
        if family == "encoder":  # refused rather than ignored: an encoder's graph has no KV cache
            raise UsageError(f"--kv-cache is for decoder and seq2seq models; {model_dir} is an encoder")
    from kerasllm.export.exporter import ExportOptions, export_model_dir  # noqa: PLC0415 - imports TensorFlow

    from kerasllm import signals  # noqa: PLC0415

    def log(message: str) -> None:
        signals.raise_if_received()  # a stop Python dropped (signals' docstring) ends the export here
        if not quiet:
            click.echo(f"kerasllm: {message}", err=True)

    import logging  # noqa: PLC0415

    # --quiet also hides the runtime's line saying where ONNX Runtime runs (the batch commands keep
    # it under --quiet), for this export only: the logger's level is the process's (in-process callers).
    logger = logging.getLogger("kerasllm")
    level = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        options = ExportOptions(opset=opset, dtype=dtype, optimize=optimize,
                                shared_kv_buffer=kv_cache == "shared-buffer")
        # SIGTERM and SIGHUP stop it as Ctrl-C does, the staging and scratch directories removed (under
        # their default action they had been left beside --out and in $TMPDIR, graph-sized).
        with signals.stops_cleanly():
            export_model_dir(model_dir, out, options, log=log)
    finally:
        logger.setLevel(level)
    log(f"bundle written to {out}")
