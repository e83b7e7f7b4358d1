"""Export-time validation: Keras and ONNX Runtime must compute the same thing.

Optimum-exporter style: each family declares its cases; each check either passes and
leaves a figure for the manifest, or raises `ValidationError` naming the output, the
case and the figure against its tolerance. The export fails on the first failure.

Decoder family (`validate_causal_lm`), on shapes never used while tracing (the graph
was traced with dynamic axes only), through the KV-cache path:
* prompt step (past length 0) at batch 1 and at batch 3 with left padding;
* one decode step (T = 1) and a multi-token chunk (T = 4; less where max_length < 8) on top of a past;
* fp32: max |logits diff| and max |present diff| <= 1e-4 over every real (unpadded)
  position (prompt step) and every position (steps on top of the past);
* fp16: top-1 agreement >= 99% and no NaN/Inf, over real (unpadded) positions;
* fp32: greedy generations of a few prompts, 32 new tokens, token-identical between
  `CausalLM.generate` (Keras, XLA) and the bundle's KV-cache decoding (generate.py).
"""

from __future__ import annotations

import numpy as np

from kerasllm.errors import BundleError, KerasLLMError

FP32_TOLERANCE = 1e-4
FP16_MIN_TOP1 = 0.99
GREEDY_NEW_TOKENS = 32


class ValidationError(KerasLLMError):
    """The exported graph does not compute what the Keras model computes."""


def validated_with_fallback(build, fuse_attention: bool, log):
    """`build(fuse_attention) -> (report, figures)`, validated; if the graph with fused attention
    fails validation, built once more without that fusion. The fused kernels (ORT's Attention,
    MultiHeadAttention, GroupQueryAttention) compute the softmax their own way; with very
    peaked attention that missed the fp32 tolerance (5e-3 on logits of magnitude 16). A graph
    ONNX Runtime cannot load or run fails validation too (`_checked_build`), in one line.

    Returns `(report, figures, reverted)`: `reverted` is the failed check's message, or None.
    """
    try:
        return (*_checked_build(build, fuse_attention), None)
    except ValidationError as err:
        if not fuse_attention:
            raise
        log(f"fused attention failed validation ({err}); exporting without that fusion")
        return (*_checked_build(build, False), str(err))


def _checked_build(build, fuse_attention: bool):
    """`build(fuse_attention)`, with ONNX Runtime's failures to load or run the graph as a
    `ValidationError`: its kernels check some attributes only when they run (GroupQueryAttention's
    head size: a RuntimeError from the IO binding), and a traceback is no answer to an export."""
    from kerasllm.export.runtime import flush_denormals, raised_by_onnxruntime  # noqa: PLC0415 - as the bundle will run

    try:
        with flush_denormals():
            return build(fuse_attention)
    except BundleError as err:  # runtime.create_session: ONNX Runtime cannot load the graph
        raise ValidationError(f"validation: {err}") from None
    except Exception as err:
        if not raised_by_onnxruntime(err):
            raise
        raise ValidationError(f"validation: ONNX Runtime cannot run the graph "
                              f"({(str(err).splitlines() or [''])[0][:300]})") from None


class KerasDecoderStep:
    """`CausalLM.forward_with_cache` as a step function for generate.py (the Keras reference).

    The cache is a pair of per-layer key and value lists of numpy arrays.
    """

    def __init__(self, model):
        import tensorflow as tf  # noqa: PLC0415 - Keras side

        self.model = model
        c = model.config
        self.shape = (c.num_heads, c.head_dim, c.num_layers)
        self._forward = tf.function(model.forward_with_cache, reduce_retracing=True)

    def __call__(self, input_ids, attention_mask, cache):
        heads, head_dim, layers = self.shape
        if cache is None:
            empty = np.zeros((input_ids.shape[0], heads, 0, head_dim), np.float32)
            cache = ([empty] * layers, [empty] * layers)
        logits, keys, values = self._forward(np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int64),
                                             list(cache[0]), list(cache[1]))
        return np.asarray(logits), ([np.asarray(k) for k in keys], [np.asarray(v) for v in values])

    def reorder(self, cache, indices):
        return [k[indices] for k in cache[0]], [v[indices] for v in cache[1]]


def _cases(vocab_size: int, max_length: int, seed: int = 0):
    """(name, prompts, new-token chunk) triples of random ids, each within `max_length` positions
    (prompt + chunk; the Keras reference has no position past it): prompts of 5 and of 7, 3 and 11
    tokens and a 4-token chunk where they fit, shorter ones for short models (max_length >= 2)."""
    rng = np.random.default_rng(seed)
    step = min(4, max(1, max_length // 2))  # the multi-token chunk
    limit = max(1, min(11, max_length - step))  # the longest prompt
    lengths = [[min(5, limit)], [min(7, limit), max(1, min(3, limit - 1)), limit]]  # uneven: left padding
    for name, rows, chunk in (("batch 1", lengths[0], 1), ("batch 3 left-padded", lengths[1], step)):
        prompts = [rng.integers(0, vocab_size, size=n).tolist() for n in rows]
        chunk_ids = rng.integers(0, vocab_size, size=(len(rows), chunk))
        yield name, prompts, chunk_ids


def compare_output(key: str, reference: np.ndarray, actual, fp16: bool, figures: dict, logits: bool = False,
                   real: np.ndarray | None = None) -> None:
    """Check one graph output against Keras's; raises `ValidationError` naming `key` and the figure.

    Always: the same shape and no NaN/Inf. fp32: max |diff| <= FP32_TOLERANCE at every
    position, or at the `real` (unpadded, `[B, T]`) positions when given: a padding
    position's logits are no output (nothing reads them; a shared-buffer graph computes
    them for right padding). fp16: logits agree on the top-1 token on >= FP16_MIN_TOP1 of
    the `real` positions; other fp16 outputs only need to be finite.
    """
    actual = np.asarray(actual.numpy() if hasattr(actual, "numpy") else actual, np.float32)
    if actual.shape != reference.shape:
        raise ValidationError(f"validation: {key}: shape {actual.shape} differs from Keras {reference.shape}")
    values, expected = (actual[real], reference[real]) if real is not None else (actual, reference)
    if not np.isfinite(values).all():
        raise ValidationError(f"validation: {key}: {int((~np.isfinite(values)).sum())} NaN/Inf values on ONNX Runtime")
    if fp16:
        if logits:
            agreement = float((values.argmax(-1) == expected.argmax(-1)).mean())
            figures.setdefault("top1_agreement", {})[key] = agreement
            if agreement < FP16_MIN_TOP1:
                raise ValidationError(f"validation: {key}: fp16 top-1 agreement {agreement:.2%} < {FP16_MIN_TOP1:.0%}")
        return
    diff = float(np.abs(values - expected).max()) if values.size else 0.0
    figures.setdefault("max_abs_diff", {})[key] = diff
    if not diff <= FP32_TOLERANCE:
        raise ValidationError(f"validation: {key}: max |diff| {diff:.3g} > {FP32_TOLERANCE:g}")


def validate_causal_lm(model, step, dtype: str = "fp32", greedy: bool = True) -> dict:
    """Compare `step` (an ONNX Runtime `DecoderSession`) with `model`; returns the figures.

    Raises `ValidationError` on the first failed check.
    """
    from kerasllm.export.generate import DecodingOptions, generate, left_pad  # noqa: PLC0415

    c = model.config
    if c.max_length < 2:  # no room for a new token, nor for any case (not a failed check: no fallback)
        raise KerasLLMError(f"validation: a decoder of max_length {c.max_length} cannot be checked (it needs 2 "
                            "positions or more: a prompt token and a new one)")
    keras_step = KerasDecoderStep(model)
    fp16 = dtype == "fp16"
    figures: dict = {"dtype": dtype, "cases": []}
    for name, prompts, chunk in _cases(c.vocab_size, c.max_length):
        ids, mask = left_pad(prompts, c.pad_id)
        ref_logits, ref_cache = keras_step(ids, mask, None)
        logits, cache = step(ids, mask, None)
        real = mask.astype(bool)
        compare_output(f"{name}, prompt step: logits", ref_logits, logits, fp16, figures, logits=True, real=real)
        # Padding positions are never attended to (and a shared-buffer graph keeps none):
        # the keys/values of real tokens are compared, as `[tokens, H, D]`.
        ref_presents = [x for pair in zip(*ref_cache) for x in pair]
        for i, (ref, got) in enumerate(zip(ref_presents, step.presents(cache))):
            if got.shape != ref.shape:
                raise ValidationError(f"validation: {name}, prompt step: {step.present_names[i]}: shape {got.shape} "
                                      f"differs from Keras {ref.shape}")
            ref_real, got_real = (np.transpose(x, (0, 2, 1, 3))[real] for x in (ref, got))
            compare_output(f"{name}, prompt step: {step.present_names[i]}", ref_real, got_real, fp16, figures)
        # Decode on top of the past: the chunk of new tokens sees every earlier real token.
        mask = np.concatenate([mask, np.ones(chunk.shape, np.int64)], axis=1)
        ref_logits, _ = keras_step(chunk, mask, ref_cache)
        logits, _ = step(chunk, mask, cache)
        compare_output(f"{name}, {chunk.shape[1]}-token step with past: logits", ref_logits, logits, fp16, figures,
                       logits=True)
        figures["cases"].append({"name": name, "prompt_lengths": [len(p) for p in prompts],
                                 "step_tokens": int(chunk.shape[1])})
    if greedy and not fp16:
        figures["greedy"] = check_greedy(model, step, generate, DecodingOptions)
    if getattr(step, "greedy_on_device", False):
        figures["greedy_on_device"] = check_greedy_on_device(c, step)
    return figures


def check_greedy_on_device(config, step) -> dict:
    """The graph's `next_token` output (optimize.add_next_token) must choose as the host does from
    the same logits: greedy generation both ways, token for token."""
    from kerasllm.export.generate import ChoiceOnHost, DecodingOptions, generate  # noqa: PLC0415

    c = config
    prompts, new = _greedy_prompts(np.random.default_rng(3), c.vocab_size, c.max_length)
    options = DecodingOptions(max_new_tokens=new)
    on_device, on_host = (generate(s, prompts, options, pad_id=c.pad_id, max_length=c.max_length)
                          for s in (step, ChoiceOnHost(step)))
    check_same_choices(on_device, on_host, "greedy generation, prompt")
    return {"prompts": len(prompts), "new_tokens": new, "identical": True}


def _greedy_prompts(rng, vocab_size: int, max_length: int) -> tuple[list[list[int]], int]:
    """Random prompts of 3, 8 and 5 tokens and how many to generate (GREEDY_NEW_TOKENS), all within
    `max_length`: short models get prompts of at most half of it and the rest as new tokens."""
    lengths = [min(n, max(1, max_length // 2)) for n in (3, 8, 5)]
    prompts = [rng.integers(0, vocab_size, size=n).tolist() for n in lengths]
    return prompts, min(GREEDY_NEW_TOKENS, max_length - max(lengths))


def check_same_choices(on_device, on_host, what: str) -> None:
    """Raise `ValidationError` on the first row whose best hypothesis differs between the graph's
    `next_token` choices and the host's choices from the logits."""
    for row, (a, b) in enumerate(zip(on_device, on_host)):
        if a[0].tokens != b[0].tokens:
            raise ValidationError(f"validation: {what} {row}: {a[0].tokens} with the graph's next_token, "
                                  f"{b[0].tokens} from its logits")


def check_greedy(model, step, generate, DecodingOptions) -> dict:
    """Greedy generation in Keras (`CausalLM.generate`) and on ONNX Runtime must be identical."""
    c = model.config
    prompts, new = _greedy_prompts(np.random.default_rng(1), c.vocab_size, c.max_length)
    keras_tokens = np.asarray(model.generate(prompts, max_new_tokens=new))
    ours = generate(step, prompts, DecodingOptions(max_new_tokens=new), pad_id=c.pad_id, max_length=c.max_length)
    for row, (expected, hyps) in enumerate(zip(keras_tokens, ours)):
        got = hyps[0].tokens
        for position, (a, b) in enumerate(zip(expected.tolist(), got)):
            if a != b:
                raise ValidationError(f"validation: greedy generation, prompt {row}: token {position} is {b} on "
                                      f"ONNX Runtime, {a} in Keras")
        if len(got) != len(expected):
            raise ValidationError(f"validation: greedy generation, prompt {row}: {len(got)} tokens on ONNX "
                                  f"Runtime, {len(expected)} in Keras")
    return {"prompts": len(prompts), "new_tokens": new, "identical": True}
