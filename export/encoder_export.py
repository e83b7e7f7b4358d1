"""The encoder family's export: one graph, `input_ids` + `attention_mask` -> logits / embeddings.

The declaration (`encoder_graph`) is all this family adds to the shared machinery in
`convert.py`: both axes of the inputs are dynamic (any batch, any length up to
`max_length`), and the outputs depend on the task:

    masked-lm         embeddings [B, C], logits [B, T, V]
    classifier        embeddings [B, C], logits [B, L]
    token-classifier  logits [B, T, L]

`export_encoder_family` plugs the family into `exporter.py` (convert, fuse self-attention
into `com.microsoft.Attention` (attention_fusion.py), optimize with ONNX Runtime's "bert"
fusions, validate). `check_parity` is the family's validation: Keras
`export_outputs` against ONNX Runtime on right-padded batches of several sizes; every
output within 1e-4 and, for classifiers, identical labels (token classifiers: identical tags at
every real position). Imports TensorFlow (Keras side).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from kerasllm.errors import KerasLLMError
from kerasllm.export.convert import DEFAULT_OPSET, GraphSpec, TensorDecl, save_onnx, trace_to_onnx
from kerasllm.export.validate import FP16_MIN_TOP1, FP32_TOLERANCE, ValidationError, validated_with_fallback

PARITY_ATOL = FP32_TOLERANCE  # fp32 logits and embeddings, ONNX Runtime vs Keras: 1e-4
FP16_ATOL = 5e-2  # fp16 embeddings (logits are judged by top-1 agreement)
# (batch, length) pairs validated at export; rows get different real lengths (right padding).
PARITY_SHAPES = ((1, 1), (1, 9), (3, 17), (4, 40))
# Tasks whose logits' argmax is the result (a label per text, a tag per token): identical at export.
LABELLED_TASKS = ("classifier", "token-classifier")


def encoder_outputs(task: str, config) -> dict[str, TensorDecl]:
    """The graph's outputs, in name order (the order tf2onnx gives a function's dict outputs)."""
    c = config
    if task == "masked-lm":
        return {"embeddings": TensorDecl("float32", ["batch", c.hidden_dim]),
                "logits": TensorDecl("float32", ["batch", "sequence", c.vocab_size])}
    if task == "classifier":
        return {"embeddings": TensorDecl("float32", ["batch", c.hidden_dim]),
                "logits": TensorDecl("float32", ["batch", c.num_labels])}
    if task == "token-classifier":
        return {"logits": TensorDecl("float32", ["batch", "sequence", c.num_labels])}
    raise KerasLLMError(f"export: {task!r} is not an encoder task")


def encoder_graph(model, task: str) -> GraphSpec:
    """The encoder graph of `model` (a `MaskedLM`, `TextClassifier` or `TokenClassifier`)."""
    import tensorflow as tf  # noqa: PLC0415 - Keras side

    inputs = {"input_ids": TensorDecl("int64", ["batch", "sequence"]),
              "attention_mask": TensorDecl("int64", ["batch", "sequence"])}

    def forward(input_ids, attention_mask):
        return model.export_outputs(tf.cast(input_ids, "int32"), attention_mask)

    return GraphSpec("model", "model.onnx", inputs, encoder_outputs(task, model.config), forward)


def encoder_task(model) -> str:
    """The task name of an encoder model ("masked-lm", "classifier", "token-classifier")."""
    from kerasllm.models.encoder import ENCODER_TASKS  # noqa: PLC0415

    for task, cls in ENCODER_TASKS.items():
        if isinstance(model, cls):
            return task
    raise KerasLLMError(f"export: {type(model).__name__} is not an encoder task model")


def export_encoder(model, path, opset: int = DEFAULT_OPSET):
    """Trace `model` and save its graph at `path` unoptimized; returns `(spec, files written)`."""
    spec = encoder_graph(model, encoder_task(model))
    proto = trace_to_onnx(spec, model, opset=opset)
    return spec, save_onnx(proto, path)


def export_encoder_family(model, scratch: Path, staging: Path, options, log: Callable) -> dict:
    """`FAMILY_EXPORTERS["encoder"]` (see exporter.py): convert, optimize, validate `model.onnx`.

    With `optimize` (fp32), each layer's self-attention becomes one `com.microsoft.Attention`
    node (attention_fusion.py); should that graph fail validation, the export is redone
    without it, as the decoder's, and the manifest says why (`attention_fusion_reverted`).
    """
    from kerasllm.export.attention_fusion import fuse_encoder_attention, fused_attention_ops  # noqa: PLC0415
    from kerasllm.export.optimize import cpu_slower_fusions, optimize_graph  # noqa: PLC0415
    from kerasllm.export.runtime import create_session  # noqa: PLC0415

    c = model.config
    task = encoder_task(model)
    start = time.perf_counter()
    spec, (raw, *_) = export_encoder(model, scratch / "raw.onnx", opset=options.opset)
    log(f"converted the {task} encoder to ONNX (opset {options.opset}) in {time.perf_counter() - start:.1f} s")
    target = staging / spec.file

    def build(fuse_attention: bool) -> tuple[dict, dict]:
        proto = onnx.load(str(raw))
        nodes_before = len(proto.graph.node)
        attention = (fuse_encoder_attention(proto, c.num_heads, c.hidden_dim // c.num_heads, rotary_rows=c.max_length)
                     if fuse_attention else 0)
        made = fused_attention_ops(proto) if attention else {}
        # Left out, besides `cpu_slower_fusions`: EmbedLayerNormalization, whose fusion reads the
        # embedding tables that optimize_graph sets aside (and would save at most the two
        # Gathers, 0.5 ms of ~85).
        disabled = (*cpu_slower_fusions(options.dtype), "embed_layer_norm")
        report = optimize_graph(proto, target, model_type="bert", num_heads=c.num_heads, hidden_size=c.hidden_dim,
                                fuse=options.optimize, dtype=options.dtype, keep_float32_io=tuple(spec.outputs),
                                disabled_fusions=disabled)
        report["nodes_before"] = nodes_before
        del report["kv_cache"]  # optimize_graph's decoder figure: an encoder graph has no KV cache
        if attention:
            report["fusions"] = {**made, **report["fusions"]}
        fusions = ", ".join(f"{op} x{n}" for op, n in report["fusions"].items()) or "none"
        log(f"optimized ({options.dtype}): fusions {fusions}")
        session = create_session(target, options.device)
        figures = check_parity(model, task, session.session, fp16=options.dtype == "fp16")
        worst = ", ".join(f"{k} {v:.2g}" for k, v in figures["max_abs_diff"].items())
        if "labels_compared" in figures:
            worst += (f", labels agree on {figures['top1_agreement']:.1%} of {figures['labels_compared']}"
                      if options.dtype == "fp16" else f", {figures['labels_compared']} labels identical")
        log(f"validated against Keras on {len(figures['shapes'])} padded batches: max |diff| {worst}")
        return report, figures

    fuse_attention = options.optimize  # fp16 too: ORT's Attention kernel takes fp16 on the CPU and CUDA
    report, figures, reverted = validated_with_fallback(build, fuse_attention, log)
    if reverted:
        report["attention_fusion_reverted"] = reverted
    return {"graphs": {spec.name: {**spec.to_dict(), "opset": options.opset}}, "optimization": report,
            "validation": figures}


def parity_inputs(config, shapes=PARITY_SHAPES, seed: int = 0):
    """Right-padded `(input_ids, attention_mask)` int64 batches: BOS first, real lengths 1..T."""
    rng = np.random.default_rng(seed)
    low = min(6, config.vocab_size - 1)
    for batch, length in shapes:
        length = min(length, config.max_length)
        ids = rng.integers(low, config.vocab_size, (batch, length)).astype(np.int64)
        ids[:, 0] = config.bos_id
        mask = np.ones((batch, length), np.int64)
        for row in range(1, batch):  # row 0 is full; the others end in padding
            real = int(rng.integers(1, length + 1))
            ids[row, real:] = config.pad_id
            mask[row, real:] = 0
        yield ids, mask


def check_parity(model, task: str, session, atol: float = PARITY_ATOL, fp16: bool = False) -> dict:
    """Compare Keras and an ONNX Runtime `session` on `parity_inputs`; raise `ValidationError` on a mismatch.

    fp32: every output within `atol` (per-token logits on real positions only) and, for a
    classifier, identical labels (a token classifier: identical tags on the real positions). fp16: no
    NaN/Inf, labels (or per-token top-1) agreeing on at least `FP16_MIN_TOP1` of the cases and
    embeddings within `FP16_ATOL`. Returns the figures for the manifest: `max_abs_diff` holds every
    output's, fp16 logits' too (recorded, not judged: a token classifier's logits are its only output).
    """
    worst: dict[str, float] = {}
    agree, compared, shapes = 0, 0, []
    limit = FP16_ATOL if fp16 else atol
    for ids, mask in parity_inputs(model.config):
        with warnings.catch_warnings():  # Keras warns about a softmax over one key (length 1): intended here
            warnings.simplefilter("ignore", UserWarning)
            expected = {k: np.asarray(v) for k, v in model.export_outputs(ids.astype("int32"), mask).items()}
        names = list(expected)
        got = dict(zip(names, session.run(names, {"input_ids": ids, "attention_mask": mask})))
        shapes.append(list(ids.shape))
        real = mask.astype(bool)
        for name in names:
            if got[name].shape != expected[name].shape:
                raise ValidationError(f"validation: {name} has shape {got[name].shape} in ONNX Runtime, "
                                      f"{expected[name].shape} in Keras (input {list(ids.shape)})")
            per_token = got[name].ndim == 3  # padding positions are don't-care
            actual = got[name].astype(np.float32)[real] if per_token else got[name].astype(np.float32)
            reference = expected[name][real] if per_token else expected[name]
            if not np.isfinite(actual).all():
                raise ValidationError(f"validation: {name} holds NaN/Inf for a batch of shape {list(ids.shape)}")
            diff = float(np.abs(actual - reference).max())
            worst[name] = max(worst.get(name, 0.0), diff)  # recorded for every output, fp16 logits too
            if name == "logits":
                agree += int((actual.argmax(-1) == reference.argmax(-1)).sum())
                compared += int(reference.shape[0])
                if fp16:
                    continue  # fp16 logits are judged by agreement, below
            if not diff <= limit:
                raise ValidationError(f"validation: {name} differs by {diff:.3g} (> {limit:g}) between ONNX Runtime "
                                      f"and Keras for a batch of shape {list(ids.shape)}")
        if task in LABELLED_TASKS and not fp16:
            keras_labels, ort_labels = expected["logits"].argmax(-1), got["logits"].argmax(-1)
            if task == "token-classifier":  # tags at the real positions; padding's are don't-care
                keras_labels, ort_labels = keras_labels[real], ort_labels[real]
            if not np.array_equal(keras_labels, ort_labels):
                raise ValidationError(f"validation: labels differ between ONNX Runtime {ort_labels.tolist()} and "
                                      f"Keras {keras_labels.tolist()} for a batch of shape {list(ids.shape)}")
    rate = agree / max(compared, 1)
    if fp16 and rate < FP16_MIN_TOP1:
        raise ValidationError(f"validation: fp16 top-1 agreement {rate:.2%} < {FP16_MIN_TOP1:.0%}")
    report = {"atol": limit, "max_abs_diff": worst, "shapes": shapes, "top1_agreement": rate}
    if task in LABELLED_TASKS:
        report["labels_compared"] = compared
    return report
