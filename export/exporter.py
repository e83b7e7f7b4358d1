"""`export_model_dir`: a trained model directory -> a verified bundle (the API behind `kerasllm export`).

Steps, the same for every family: load the Keras model, convert (convert.py),
optimize and cast (optimize.py), validate against Keras on ONNX Runtime (validate.py),
then write tokenizer, manifest and hashes (bundle.py) in a staging directory that is
renamed to `out` only when everything passed. A failed check leaves no bundle.

A family plugs in with one function in `FAMILY_EXPORTERS`:

    export_<family>(model, scratch: Path, staging: Path, options: ExportOptions, log) -> dict

that writes its graph file(s) into `staging` and returns the manifest entries it owns:
`{"graphs": {name: GraphSpec.to_dict()}, "optimization": {...}, "validation": {...}}`
(plus, optionally, extra files it wrote, such as `genai_config.json`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kerasllm import signals
from kerasllm.errors import KerasLLMError, UsageError
from kerasllm.export import bundle as bundle_lib
from kerasllm.export.convert import DEFAULT_OPSET, OPSETS
from kerasllm.tokenizers import TARGET_TOKENIZER_FILE, load_seq2seq_tokenizers


@dataclass
class ExportOptions:
    opset: int = DEFAULT_OPSET
    dtype: str = "fp32"  # "fp32" or "fp16"
    optimize: bool = True
    device: str = "cpu"  # where validation runs ONNX Runtime
    # Decoder family, fp32: GroupQueryAttention over an in-place KV buffer when attention fuses
    # (optimize.share_kv_buffer). ORT's CUDA GroupQueryAttention takes fp16/bf16 only, so an fp32
    # bundle meant for a GPU is better exported with False (MultiHeadAttention, growing cache).
    shared_kv_buffer: bool = True

    def validate(self) -> None:
        if self.dtype not in ("fp32", "fp16"):
            raise UsageError(f"--dtype must be fp32 or fp16, got {self.dtype!r}")
        if self.opset not in OPSETS:
            raise UsageError(f"--opset must be between {OPSETS[0]} and {OPSETS[-1]}, got {self.opset} (tf2onnx "
                             f"converts up to {OPSETS[-1]}; the bundle's graph rewrites need {OPSETS[0]})")



def export_decoder(model, scratch: Path, staging: Path, options: ExportOptions, log: Callable) -> dict:
    """The decoder family (`CausalLM`): one graph with a KV cache, `model.onnx`.

    With `optimize`, the self-attention of each layer is fused into ONNX Runtime's
    MultiHeadAttention kernel (optimize.fuse_cached_attention) and, in fp32 when every
    layer fused, into GroupQueryAttention over a KV buffer updated in place
    (optimize.share_kv_buffer; the manifest's `optimization.kv_cache` says which), unless its
    kernel refuses the head size (optimize.group_query_attention_problem; then
    `optimization.shared_buffer_unsupported` says why). These kernels compute the softmax their
    own way; if the result misses the fp32 tolerance (seen with very peaked attention: 5e-3 on
    logits of magnitude 16), or ONNX Runtime cannot run the fused graph, the graph is rebuilt
    without that one fusion, and the manifest says so.
    """
    from kerasllm.export.convert import TensorDecl, causal_lm_graph, trace_to_onnx  # noqa: PLC0415
    from kerasllm.export.optimize import (cpu_slower_fusions, group_query_attention_problem,  # noqa: PLC0415
                                          optimize_graph)
    from kerasllm.export.runtime import NEXT_TOKEN, DecoderSession, buffer_slots_bound, create_session  # noqa: PLC0415
    from kerasllm.export.validate import validate_causal_lm, validated_with_fallback  # noqa: PLC0415

    c = model.config
    spec = causal_lm_graph(model)
    target = staging / spec.file
    # Heads GroupQueryAttention cannot run keep the growing cache (ORT would refuse them in validation).
    buffer_problem = (group_query_attention_problem(c.head_dim, c.position == "rotary")
                      if options.optimize and options.shared_kv_buffer else None)
    if buffer_problem:
        log(f"keeping the growing KV cache: {buffer_problem}")

    def build(fuse_attention: bool) -> tuple[dict, dict]:
        start = time.perf_counter()
        proto = trace_to_onnx(spec, model, opset=options.opset)
        log(f"converted to ONNX (opset {options.opset}) in {time.perf_counter() - start:.1f} s")
        report = optimize_graph(proto, target, model_type="gpt2", num_heads=c.num_heads, hidden_size=c.hidden_dim,
                                fuse=options.optimize, dtype=options.dtype, shape_inference=False,
                                cached_attention=fuse_attention,
                                shared_kv_buffer=fuse_attention and options.shared_kv_buffer and not buffer_problem,
                                rotary_positions=buffer_slots_bound(c.max_length),
                                disabled_fusions=cpu_slower_fusions(options.dtype),
                                next_token=options.dtype == "fp16")
        fusions = ", ".join(f"{op} x{n}" for op, n in report["fusions"].items()) or "none"
        log(f"optimized ({options.dtype}): fusions {fusions}")
        start = time.perf_counter()
        step = DecoderSession(create_session(target, options.device))
        figures = validate_causal_lm(model, step, dtype=options.dtype)
        log(f"validated against Keras in {time.perf_counter() - start:.1f} s: " + _summary(figures))
        return report, figures

    report, figures, reverted = validated_with_fallback(build, options.optimize, log)
    if reverted:
        report["attention_fusion_reverted"] = reverted
    if buffer_problem:
        report["shared_buffer_unsupported"] = buffer_problem
    for name, decl in {**spec.inputs, **spec.outputs}.items():
        if name.startswith(("past_key_values.", "present.")):
            if options.dtype == "fp16":  # the cache travels in fp16 too
                decl.dtype = "float16"
            if report["kv_cache"] == "shared_buffer":  # one buffer, past and present (optimize.share_kv_buffer)
                decl.shape[2] = "max_sequence"
    if report.get(NEXT_TOKEN):  # greedy decoding's choice, made where the graph runs (optimize.add_next_token)
        spec.outputs[NEXT_TOKEN] = TensorDecl("int64", ["batch", 1])
    graph = {**spec.to_dict(), "opset": options.opset}
    return {"graphs": {spec.name: graph}, "optimization": report, "validation": figures}


def _summary(figures: dict) -> str:
    if "max_abs_diff" in figures:
        text = f"max |logits diff| {max(v for k, v in figures['max_abs_diff'].items() if k.endswith('logits')):.2g}"
    else:
        text = f"top-1 agreement {min(figures['top1_agreement'].values()):.2%}"
    if "greedy" in figures:
        text += f", greedy x{figures['greedy']['prompts']} ({figures['greedy']['new_tokens']} tokens) identical"
    return text


def export_encoder(model, scratch: Path, staging: Path, options: ExportOptions, log: Callable) -> dict:
    """The encoder family (masked-lm, classifier, token-classifier): see encoder_export.py."""
    from kerasllm.export.encoder_export import export_encoder_family  # noqa: PLC0415

    return export_encoder_family(model, scratch, staging, options, log)


def export_seq2seq(model, scratch: Path, staging: Path, options: ExportOptions, log: Callable) -> dict:
    """The encoder-decoder family: encoder.onnx + decoder.onnx, see seq2seq_export.py."""
    from kerasllm.export.seq2seq_export import export_seq2seq_family  # noqa: PLC0415

    return export_seq2seq_family(model, scratch, staging, options, log)


FAMILY_EXPORTERS: dict[str, Callable] = {"decoder": export_decoder, "encoder": export_encoder,
                                         "seq2seq": export_seq2seq}


# ONNX Runtime's fused attention operators (the optimizer's names in `optimization.fusions`).
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention")


# Why a CLS-pooled classifier's last block has no fused attention (`note_unfused_attention`).
CLS_QUERY_BLOCK = ("the last block attends from the CLS token only (all a classifier with pooling 'cls' reads: "
                   "Encoder.first_token), as plain ops on purpose: less work than a fused whole block")


def note_unfused_attention(optimization: dict, options: ExportOptions, log: Callable[[str], None],
                           model=None) -> None:
    """Say in the manifest (`attention_unfused`) and in one log line where ONNX Runtime's optimizer
    fused no attention in an optimized graph and nothing else says why: its pattern matcher finds
    none in some shapes (one head; encoders without biases), and the graph then runs attention as
    plain ops, correct but slower. Such bundles had said nothing (a reason is given where kerasllm
    itself keeps a fusion out: `attention_fusion_reverted`, `shared_buffer_unsupported`).

    A CLS-pooled classifier's graph computes its last block for the CLS query alone, which no
    fusion matches: the manifest says so (`cls_query_block`), and a one-layer one gets no note
    (the note had named one head and missing biases, neither the model's, and called it slower)."""
    if not options.optimize:
        return
    reports = [optimization] if "fusions" in optimization else [r for r in optimization.values() if isinstance(r, dict)]
    config = getattr(model, "config", None)
    if type(model).__name__ == "TextClassifier" and getattr(config, "pooling", None) == "cls":
        optimization["cls_query_block"] = CLS_QUERY_BLOCK
        if config.num_layers == 1:
            return
    for report in reports:
        if "attention_fusion_reverted" in report or any(op in report.get("fusions", {}) for op in ATTENTION_OPS):
            continue
        report["attention_unfused"] = ("ONNX Runtime's optimizer found no attention pattern to fuse (seen with one "
                                       "head, and in encoders without biases): attention runs as plain ops, "
                                       "correct but slower")
        log(f"note: {report['attention_unfused']}")


@contextlib.contextmanager
def float32_policy():
    """Keras's global dtype policy float32 inside: the model loads and traces in float32 whatever the
    process set (a training script's `mixed_float16`), and the export writes fp32 or fp16 as
    `ExportOptions.dtype` says. Under a mixed policy the model had loaded with fp16 compute and the
    traced graph mixed fp16 and fp32 nodes, which ONNX Runtime refused after the whole conversion."""
    import keras  # noqa: PLC0415

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def export_model_dir(model_dir: str | Path, out: str | Path, options: ExportOptions | None = None,
                     log: Callable[[str], None] = print) -> bundle_lib.Bundle:
    """Export the model directory `model_dir` to a verified bundle at `out`."""
    import tempfile  # noqa: PLC0415

    options = options or ExportOptions()
    options.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; --out names the bundle's directory (a new or empty one)")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty; choose a new --out")
    if out.is_symlink():
        # A link (to an empty directory, or to none yet) gets the bundle in its target, which it then
        # shows: the finished bundle is renamed into place, and the rename cannot go through a link
        # (commit_bundle's rmdir of it had failed "Not a directory" after the whole export).
        out = Path(os.path.realpath(out))
    from kerasllm.modeldir import load_model_dir  # noqa: PLC0415 - imports TensorFlow (after the quick checks)

    try:  # before TensorFlow and the model load: a read-only --out had failed after them, naming the staging
        staging = bundle_lib.staging_dir(out)
    except OSError as err:
        raise KerasLLMError(f"{out}: cannot write the bundle there ({err.strerror or err})") from None
    try:
        with float32_policy():
            model, tokenizer, run = load_model_dir(model_dir)
        family = run["model"]["family"]
        if family not in FAMILY_EXPORTERS:
            raise UsageError(f"{model_dir}: no export for the {family} family yet")
        target_tokenizer = Path(model_dir) / TARGET_TOKENIZER_FILE
        has_target = bool(run["model"].get("target_vocab_size"))
        if has_target:
            load_seq2seq_tokenizers(model_dir, run["model"])  # the checks translating from the model dir makes
        with tempfile.TemporaryDirectory(prefix="kerasllm-export-") as scratch:
            with float32_policy():
                entries = FAMILY_EXPORTERS[family](model, Path(scratch), staging, options, log)
        note_unfused_attention(entries["optimization"], options, log, model)
        tokenizer_file = tokenizer.save(staging / "tokenizer.json").name
        # seq2seq with separate vocabularies (the config says so; a missing file had been exported as a
        # bundle translating with the source's tokenizer, and passed its own greedy check)
        if has_target:
            shutil.copyfile(target_tokenizer, staging / target_tokenizer.name)
        special_ids = tokenizer.special_ids()
        if family == "decoder":
            genai = bundle_lib.genai_config(run["model"], entries["graphs"]["model"], special_ids,
                                            shared_buffer=entries["optimization"].get("kv_cache") == "shared_buffer")
            (staging / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n", encoding="utf-8")
        manifest = {
            "family": family, "task": run["task"], "config": run["model"], "special_ids": special_ids,
            "tokenizer": tokenizer_file, **({"target_tokenizer": target_tokenizer.name} if has_target else {}),
            "dtype": options.dtype, "opset": options.opset,
            **entries, "tools": bundle_lib.tool_versions(),
        }
        if "labels" in run:  # classifiers: label names by id
            manifest["labels"] = run["labels"]
        seq_len = (run.get("train") or {}).get("seq_len")
        if isinstance(seq_len, int):  # the training window: `generate` warns past it (optional key)
            manifest["train"] = {"seq_len": seq_len}
        bundle_lib.write_manifest(staging, manifest)
        # Loaded (every check a serving command makes) before it takes --out: a bundle refused after
        # the commit had been left there, and the same export was then refused as "not empty".
        bundle_lib.load_bundle(staging)
        signals.raise_if_received()  # a Ctrl-C or SIGTERM that Python dropped (kerasllm.signals): no commit
        bundle_lib.commit_bundle(staging, out)
    except BaseException:
        bundle_lib.discard(staging)
        raise
    return bundle_lib.load_bundle(out, verify=False)  # (its files hashed just above, then renamed into place)
