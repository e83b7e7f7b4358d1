"""CausalLM and its layers: masking, caches, training, saving, generation."""

import numpy as np
import pytest

import keras
from keras import ops

from kerasllm import CausalLM, DecoderConfig
from kerasllm.data import lm_windows, read_corpus, tokenize_corpus
from kerasllm.models import SparseCrossEntropy
from kerasllm.tokenizers import TextTokenizer

VOCAB = 61
VARIANTS = {
    "learned": dict(),
    "sinusoidal-postln": dict(position="sinusoidal", norm_first=False),
    "rotary-swiglu-untied": dict(position="rotary", activation="swiglu", tie_embeddings=False, use_bias=False),
}


def tiny(**overrides):
    keras.utils.set_random_seed(0)
    return CausalLM(DecoderConfig.preset("tiny", vocab_size=VOCAB, max_length=64, **overrides))


def ids(batch, length, seed=0):
    return np.random.default_rng(seed).integers(6, VOCAB, (batch, length)).astype("int32")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal_masking_keeps_the_past_unchanged(variant):
    model = tiny(**VARIANTS[variant])
    x = ids(2, 12)
    changed = x.copy()
    changed[:, 7] = (changed[:, 7] + 1 - 6) % (VOCAB - 6) + 6
    before, after = np.asarray(model(x)), np.asarray(model(changed))
    np.testing.assert_allclose(before[:, :7], after[:, :7], atol=1e-6)
    assert np.abs(before[:, 7:] - after[:, 7:]).max() > 1e-4  # and the change is seen from t on


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_and_load_give_identical_logits(variant, tmp_path):
    model = tiny(**VARIANTS[variant])
    x = ids(3, 10)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, CausalLM) and loaded.config == model.config
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(loaded(x)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_steps_equal_the_full_forward(variant):
    model = tiny(**VARIANTS[variant])
    c = model.config
    x = ids(2, 11)
    full = np.asarray(model(x))
    empty = [ops.zeros((2, c.num_heads, 0, c.head_dim))] * c.num_layers
    logits, keys, values = model.forward_with_cache(x[:, :6], np.ones((2, 6), "int32"), empty, empty)
    steps = [np.asarray(logits)]
    for t in range(6, 11):
        logits, keys, values = model.forward_with_cache(x[:, t:t + 1], np.ones((2, t + 1), "int32"), keys, values)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_left_padding_with_a_mask_changes_nothing():
    model = tiny(position="rotary")
    short = ids(1, 5, seed=3)
    padded = np.concatenate([np.zeros((1, 3), "int32"), short], axis=1)
    mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1]])
    alone = np.asarray(model(short))
    batched = np.asarray(model({"token_ids": padded, "padding_mask": mask}))
    np.testing.assert_allclose(batched[:, 3:], alone, atol=1e-5)


def test_loss_falls_on_a_small_corpus(corpus_file):
    texts = read_corpus(corpus_file)
    tok = TextTokenizer.train(texts, kind="char")
    token_ids = tokenize_corpus(texts, tok)
    keras.utils.set_random_seed(0)
    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=tok.vocab_size, max_length=64))
    model.compile(learning_rate=1e-2, total_steps=200, warmup_steps=10, jit_compile=False)
    data = lm_windows(token_ids, seq_len=32, batch_size=16, seed=0)
    first = model.evaluate(data.take(5), verbose=0, return_dict=True)["loss"]
    model.fit(data, steps_per_epoch=200, epochs=1, verbose=0)
    last = model.evaluate(data.take(5), verbose=0, return_dict=True)["loss"]
    # A uniform guess costs ln(V) ~ 3.9 nats and character unigram statistics alone ~2.8;
    # below 2.3 the model uses context.
    assert first > 3.0
    assert last < 2.3, (first, last)


def test_greedy_generation_equals_full_recompute():
    model = tiny()
    prompts = [[7, 8, 9], [10, 11, 12, 13, 14]]
    generated = model.generate(prompts, max_new_tokens=10)
    for prompt, row in zip(prompts, generated):
        seq = list(prompt)
        for _ in range(10):
            seq.append(int(np.asarray(model(np.array([seq])))[0, -1].argmax()))
        assert list(row) == seq[len(prompt):]


def test_prompts_of_other_lengths_reuse_the_compiled_generation():
    """The shortest prompt's length is an argument of the compiled loop, not part of its trace: a
    new length had compiled the loop again (seconds each), and still decodes as a full recompute."""
    model = tiny()
    for prompts in ([[7, 8, 9]], [[7, 8]], [[7, 8, 9, 10, 11, 12]]):
        generated = model.generate(prompts, max_new_tokens=6)
        seq = list(prompts[0])
        for _ in range(6):
            seq.append(int(np.asarray(model(np.array([seq])))[0, -1].argmax()))
        assert list(generated[0]) == seq[len(prompts[0]):]
    function, _ = model._generate_functions[(0.0, None, None, False, ())]
    assert len(function._list_all_concrete_functions()) == 1


def test_sampling_is_reproducible_with_a_seed():
    model = tiny()
    prompts = [[7, 8, 9], [10, 11]]
    kwargs = dict(max_new_tokens=12, temperature=1.5, top_k=20)
    first = model.generate(prompts, seed=5, **kwargs)
    again = model.generate(prompts, seed=5, **kwargs)
    other = model.generate(prompts, seed=6, **kwargs)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_sampling_without_a_seed_draws_afresh_on_every_call():
    """No seed: each call samples anew (it had restarted the sampler's seed state, so every call
    repeated the first). The untrained model is near uniform (top probability ~0.02 over 61 ids),
    so two equal draws of 24 tokens have a chance of about 1e-43. A seed still repeats, even
    with unseeded calls in between."""
    model = tiny()
    kwargs = dict(max_new_tokens=24, temperature=1.0)
    first, second = (model.generate([[7, 8, 9]], **kwargs) for _ in range(2))
    assert not np.array_equal(first, second)
    seeded = model.generate([[7, 8, 9]], seed=5, **kwargs)
    model.generate([[7, 8, 9]], **kwargs)
    np.testing.assert_array_equal(model.generate([[7, 8, 9]], seed=5, **kwargs), seeded)


def test_top_k_of_the_vocabulary_or_more_filters_nothing():
    """The bundle's rule (export/generate.filter_top_k): k >= the vocabulary keeps every token, so a
    seed samples as without top_k (a k past the vocabulary had failed in XLA's TopKV2)."""
    model = tiny()
    prompts = [[7, 8, 9], [10, 11]]
    kwargs = dict(max_new_tokens=12, temperature=1.0, seed=3)
    plain = model.generate(prompts, **kwargs)
    nucleus = model.generate(prompts, top_p=0.9, **kwargs)
    for k in (VOCAB, 1000):
        np.testing.assert_array_equal(model.generate(prompts, top_k=k, **kwargs), plain)
        np.testing.assert_array_equal(model.generate(prompts, top_k=k, top_p=0.9, **kwargs), nucleus)


def test_generation_refuses_prompts_longer_than_the_model():
    from kerasllm.errors import UsageError

    model = tiny()
    with pytest.raises(UsageError, match="exceeds the model's max_length 64"):
        model.generate([[7] * 60], max_new_tokens=10)
    # the bundle's option rules (export/generate.DecodingOptions): top-k without a temperature would decode greedily
    with pytest.raises(UsageError, match="give a temperature > 0"):
        model.generate([[7]], max_new_tokens=2, top_k=5)


def test_generation_refuses_token_ids_outside_the_vocabulary():
    """The compiled loop had clamped them into the embedding table and returned tokens (80 and -1
    gave the same ones)."""
    from kerasllm.errors import UsageError

    model = tiny()
    for bad in (VOCAB, 80, -1):
        with pytest.raises(UsageError, match=rf"prompt 1 has token id {bad}, outside the vocabulary of 61 ids "
                                             r"\(0\.\.60\)"):
            model.generate([[7, 8], [7, bad]], max_new_tokens=2)
    with pytest.raises(UsageError, match="prompt 0 is not a list of token ids"):
        model.generate([[7.5, 8]], max_new_tokens=2)


def test_generation_takes_numpy_prompts():
    """A 2-D array (a slice of the training ids) or a list of 1-D arrays: the lists' outputs
    (it had failed: "The truth value of an array ... is ambiguous")."""
    model = tiny()
    prompts = ids(3, 5)
    expected = model.generate(prompts.tolist(), max_new_tokens=4)
    np.testing.assert_array_equal(model.generate(prompts, max_new_tokens=4), expected)
    np.testing.assert_array_equal(model.generate(list(prompts), max_new_tokens=4), expected)


def test_seeded_sampling_from_threads_repeats_the_serial_samples():
    """Each seeded call restarts the sampler's shared seed state, then draws from it: concurrent
    calls had drawn from each other's state (9-17 of 32 threaded results differed)."""
    from concurrent.futures import ThreadPoolExecutor

    model = tiny()
    prompts = [[[7, 8, 9]], [[10, 11, 12]], [[13, 14, 15]], [[16, 17, 18]]]  # one length: one compiled loop
    kwargs = dict(max_new_tokens=12, temperature=1.0, seed=5)
    serial = [model.generate(p, **kwargs).tolist() for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda k: model.generate(prompts[k % 4], **kwargs).tolist(), range(16)))
    assert threaded == [serial[k % 4] for k in range(16)]


def test_inputs_longer_than_the_learned_positions_are_refused_before_running():
    """fit/evaluate/predict refuse ids past max_length with learned positions. A compiled step
    clamps such positions (XLA's gather), so a dict input (explicit positions) had run silently,
    and plain ids after two other lengths (a trace with a dynamic length) had failed with
    "Incompatible shapes"."""
    import tensorflow as tf

    def short(**overrides):
        return CausalLM(DecoderConfig.preset("tiny", vocab_size=VOCAB, max_length=16, **overrides))

    model = short()
    model.compile()
    model.predict(ids(2, 5), verbose=0)
    model.predict(ids(2, 7), verbose=0)  # Keras retraces with the length dynamic
    long = ids(4, 17)
    message = "token_ids: a sequence of 17 tokens is longer than max_length 16, the number of learned positions"
    dict_input = {"token_ids": long, "padding_mask": np.ones_like(long)}
    for run in (lambda: model.predict(long, verbose=0), lambda: model.predict(dict_input, verbose=0),
                lambda: model.fit(dict_input, long, verbose=0), lambda: model.evaluate(long, long, verbose=0),
                lambda: model.fit(ids(4, 9), ids(4, 9), validation_data=(long, long), verbose=0),
                lambda: model.fit(tf.data.Dataset.from_tensor_slices((long, long)).batch(2), verbose=0),
                lambda: model(dict_input)):
        with pytest.raises(ValueError, match=message):
            run()
    # Sinusoidal and rotary positions run at any length.
    assert short(position="sinusoidal")(long).shape == (4, 17, VOCAB)


def test_ids_without_a_batch_axis_are_a_clear_error():
    """One sequence, or an unbatched dataset: it had been an IndexError ("tuple index out of range")."""
    import tensorflow as tf

    model = tiny()
    model.compile()
    message = r"CausalLM expects token_ids of shape \[batch, length\], got shape \(3,\)"
    with pytest.raises(ValueError, match=message):
        model(np.array([7, 8, 9]))
    with pytest.raises(ValueError, match=message):
        model.predict(np.array([7, 8, 9]), verbose=0)
    unbatched = tf.data.Dataset.from_tensor_slices((ids(4, 3), ids(4, 3)))
    with pytest.raises(ValueError, match=message + ".*a tf.data.Dataset: batch it"):
        model.fit(unbatched, verbose=0)


def test_label_smoothing_matches_the_definition():
    logits = np.random.default_rng(0).normal(size=(2, 3, 5)).astype("float32")
    labels = np.array([[1, 2, 0], [4, 4, 3]])
    eps = 0.1
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    expected = ((1 - eps) * nll + eps * -log_probs.mean(-1)).mean()
    got = float(SparseCrossEntropy(label_smoothing=eps)(labels, logits))
    assert got == pytest.approx(expected, rel=1e-5)
    # ignore_id drops padding positions from the mean: the mean over the batch's kept positions
    masked = float(SparseCrossEntropy(ignore_id=0)(labels, logits))
    keep = labels != 0
    assert masked == pytest.approx(nll[keep].mean(), rel=1e-5)


AUTOGRAPH_SCRIPT = """
import numpy as np, keras
from tensorflow.python.autograph.impl import api
converted = []
convert = api._convert_actual
def spy(entity, program_ctx):
    converted.append(f"{getattr(entity, '__module__', '?')}.{getattr(entity, '__qualname__', entity)}")
    return convert(entity, program_ctx)
api._convert_actual = spy
from kerasllm import CausalLM, DecoderConfig
from kerasllm.data import lm_windows
ids = np.random.default_rng(0).integers(0, 64, 2000)
model = CausalLM(DecoderConfig(vocab_size=64, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
                               max_length=32, dropout=0.0))
model.compile(total_steps=4, batch_split=2)
model.fit(lm_windows(ids, 16, 4), epochs=1, steps_per_epoch=2, verbose=0,
          validation_data=lm_windows(ids, 16, 4, mode="packed", repeat=False), validation_steps=2)
model.generate([[1, 2, 3]], max_new_tokens=2)
print("CONVERTED", [name for name in converted if name.startswith("kerasllm")])
"""


def test_autograph_rewrites_none_of_the_training_functions():
    """AutoGraph's source rewriting (~15-75 ms a function, kerasllm.data.as_written) is off for the input
    pipeline, the split step's programs, the evaluation warm-up and generation: a fit with validation and a
    generate call convert none of kerasllm's functions (a fresh process: AutoGraph caches conversions)."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", AUTOGRAPH_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CONVERTED []" in done.stdout, done.stdout[-2000:]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_feedforward_training_projection_has_the_plain_product_and_gradients(jit_compile):
    """The feed-forward's output projection in training (narrowing_projection: the kernel gradient
    computed as `(dy^T x)^T` behind an XLA barrier) gives the plain layer's output and the same
    gradients for the input, both kernels and both biases (float32, within 1e-5), compiled by
    XLA or not; SwiGLU without biases too."""
    import tensorflow as tf

    from kerasllm.layers.feedforward import FeedForward

    for activation, use_bias in (("gelu", True), ("swiglu", False)):
        layer = FeedForward(24, activation=activation, use_bias=use_bias)
        x = keras.random.normal((3, 5, 8), seed=1)
        layer(x)

        def outputs_and_gradients(training, x=x, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=training)
                loss = tf.reduce_sum(y * tf.cos(y))  # a non-uniform upstream gradient
            return y, tape.gradient(loss, [x, *layer.trainable_weights])

        run = tf.function(outputs_and_gradients, jit_compile=jit_compile)
        (ours, our_grads), (plain, plain_grads) = run(True), run(False)
        np.testing.assert_allclose(ours.numpy(), plain.numpy(), rtol=1e-5, atol=1e-6)
        assert len(our_grads) == len(plain_grads) == 1 + (4 if use_bias else 2)
        for got, want in zip(our_grads, plain_grads):
            assert got.shape == want.shape
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gelu_for_training_matches_gelu_and_its_gradient(dtype):
    """FeedForward's training GELU (written-out gradient, kerasllm.layers.feedforward) gives the
    exact GELU's values bit for bit, and its gradient matches the exact derivative (float64) over
    the range where erf and exp saturate: as close as TensorFlow's autodiff gradient in float32, and
    within bfloat16 rounding in bfloat16 (largest error 0.006 here; autodiff's gradient: 0.008).
    Inference keeps the plain op."""
    import math

    import tensorflow as tf

    from kerasllm.layers.feedforward import FeedForward, gelu_for_training

    x = tf.cast(tf.linspace(-12.0, 12.0, 2001), dtype)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours, reference = gelu_for_training(x), tf.nn.gelu(x, approximate=False)
    np.testing.assert_array_equal(ours.numpy(), reference.numpy())
    grads = [tape.gradient(y, x) for y in (ours, reference)]
    assert grads[0].dtype == x.dtype
    grad, autodiff = (tf.cast(g, "float64").numpy() for g in grads)
    points = tf.cast(x, "float64").numpy()
    exact = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
                      for v in points])
    if dtype == "float32":
        np.testing.assert_allclose(grad, autodiff, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(grad, exact, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_allclose(grad, exact, rtol=1e-2, atol=4e-3)
    layer = FeedForward(8)
    h = keras.random.normal((2, 3, 4))
    np.testing.assert_array_equal(layer(h, training=True).numpy(), layer(h, training=False).numpy())
