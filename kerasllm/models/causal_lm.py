"""`CausalLM`: a GPT-like decoder-only language model, trained with plain `model.fit`.

The whole family in one file: token + position embeddings, a stack of causal
`TransformerBlock`s, a final LayerNorm (pre-LN) and an LM head tied to the token
embedding. Three entry points share the same weights:

* `call(token_ids)` -> logits `[B, T, V]`: training and scoring.
* `forward_with_cache(input_ids, attention_mask, past_keys, past_values)`: the
  growing-cache step that the ONNX export traces (past and present in the ORT
  GenAI layout `[B, H, P, D]`).
* `generate(prompts, ...)`: Keras generation with a fixed-size cache buffer in an
  XLA-compiled while loop, using keras-hub's samplers.
"""

from __future__ import annotations

import threading
from typing import Sequence

import keras
import numpy as np
from keras import ops

from kerasllm.config import DecoderConfig
from kerasllm.errors import UsageError
from kerasllm.export.generate import DecodingOptions, narrowing_top_k
from kerasllm.layers import TokenAndPositionEmbedding, TransformerBlock, attention_bias
from kerasllm.models.base import TransformerModel, stop_id_tuple, token_id_rows


def positions_from_mask(attention_mask, query_length):
    """Positions of the last `T` tokens from an `[B, S]` mask (left padding aware).

    Position of a token = number of real tokens before it, as in Hugging Face and
    ORT GenAI; padding gets position 0.
    """
    mask = ops.cast(attention_mask, "int32")
    positions = ops.maximum(ops.cumsum(mask, axis=1) - 1, 0)
    return positions[:, ops.shape(mask)[1] - query_length:]


def positions_from_mask_sum(attention_mask, query_length):
    """Positions of the last `T` tokens from the number of real tokens in each row.

    `max(sum(mask) - T + t, 0)` for t in 0..T-1: the export path's formula (four ONNX
    nodes instead of the CumSum chain, one decode step at a time). It equals
    `positions_from_mask` whenever each row's padding comes before its real tokens (left
    padding, the only layout generate.py builds) and also serves a cache whose rows are
    right-aligned (a shared KV buffer: each row's tokens first, then unused slots).
    """
    mask = ops.cast(attention_mask, "int32")
    count = ops.sum(mask, axis=1, keepdims=True)
    offsets = ops.expand_dims(ops.arange(query_length, dtype="int32"), 0)  # not [None, :]: one node, not two
    return ops.maximum(count - query_length + offsets, 0)


def _top_k_then_top_p_sampler(**kwargs):
    """keras-hub's TopPSampler, its nucleus taken within the top k renormalised (the bundle's rule,
    export/generate.py, and Hugging Face's: top-k, then top-p). keras-hub's cut the cumulative sum
    of the top k's full-vocabulary probabilities, which keeps more tokens: with k=3 and p=0.5 it had
    sampled a third token the rule excludes. Dividing by the top k's sum first changes nothing else
    (the categorical draw ignores the scale). Built on first use: keras-hub is heavy to import."""
    import keras_hub  # noqa: PLC0415

    class TopKThenTopPSampler(keras_hub.samplers.TopPSampler):
        def get_next_token(self, probabilities):
            if self.k is not None:
                top = ops.top_k(probabilities, k=self.k, sorted=False)[0]
                probabilities = probabilities / ops.sum(top, axis=-1, keepdims=True)
            return super().get_next_token(probabilities)

    return TopKThenTopPSampler(**kwargs)


@keras.saving.register_keras_serializable(package="kerasllm")
class CausalLM(TransformerModel):
    """GPT-like causal language model.

    Args:
        config: a `DecoderConfig` (or its dict).

    Call arguments:
        inputs: token ids `[B, T]`, or a dict with `token_ids` and `padding_mask`.
    Returns float32 logits `[B, T, V]`.

    Example:
    >>> model = CausalLM(DecoderConfig.preset("tiny", vocab_size=64))
    >>> model.compile()
    >>> x = np.random.randint(0, 64, (8, 17))
    >>> history = model.fit(x[:, :-1], x[:, 1:], epochs=1, verbose=0)
    >>> model.generate([[1, 2, 3]], max_new_tokens=4).shape
    (1, 4)
    """

    config_class = DecoderConfig

    def __init__(self, config, **kwargs):
        kwargs.setdefault("name", "causal_lm")
        super().__init__(config, **kwargs)
        c = self.config
        self.embedding = TokenAndPositionEmbedding(
            c.vocab_size, c.max_length, c.hidden_dim, position=c.position, dropout=c.dropout,
            name="embedding",
        )
        self.blocks = [
            TransformerBlock(
                num_heads=c.num_heads, intermediate_dim=c.intermediate_dim, dropout=c.dropout,
                activation=c.activation, norm_first=c.norm_first, layer_norm_epsilon=c.layer_norm_epsilon,
                use_bias=c.use_bias, rotary=c.position == "rotary", name=f"block_{i}",
            )
            for i in range(c.num_layers)
        ]
        if c.norm_first:
            self.final_norm = keras.layers.LayerNormalization(epsilon=c.layer_norm_epsilon, name="final_norm")
        if not c.tie_embeddings:
            self.lm_head = keras.layers.Dense(c.vocab_size, use_bias=False, name="lm_head")
        # Untracked on purpose: Keras locks a built model's tracked state, and the samplers'
        # seed variables must not become model weights.
        object.__setattr__(self, "_generate_functions", {})
        object.__setattr__(self, "_seeded_generation", threading.Lock())  # see _run_generate_function

    def build(self, input_shape=None):
        c = self.config
        shape = (None, None, c.hidden_dim)
        self.embedding.build((None, None))
        for block in self.blocks:
            block.build(shape)
        if c.norm_first:
            self.final_norm.build(shape)
        if not c.tie_embeddings:
            self.lm_head.build(shape)
        self.built = True

    # -- the shared forward pass -------------------------------------------------------------
    def _logits(self, x):
        if self.config.norm_first:
            x = self.final_norm(x)
        logits = self.embedding.logits(x) if self.config.tie_embeddings else self.lm_head(x)
        return ops.cast(logits, "float32")

    def _run_blocks(self, token_ids, positions, bias, past_keys=None, past_values=None, cache_update_index=None,
                    training=None):
        x = self.embedding(token_ids, positions, training=training)
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            x, key, value = block(
                x, self_bias=bias, positions=positions,
                past_key=None if past_keys is None else past_keys[i],
                past_value=None if past_values is None else past_values[i],
                cache_update_index=cache_update_index, training=training,
            )
            keys.append(key)
            values.append(value)
        return self._logits(x), keys, values

    def call(self, inputs, training=None):
        if isinstance(inputs, dict):
            token_ids, padding_mask = inputs["token_ids"], inputs.get("padding_mask")
        else:
            token_ids, padding_mask = inputs, None
        self.check_token_ids("token_ids", token_ids)  # a clear error for 1-D ids, not an IndexError here
        length = ops.shape(token_ids)[1]
        if padding_mask is None:
            positions = None  # 0..T-1 in every row (see TokenAndPositionEmbedding)
        else:
            positions = positions_from_mask(padding_mask, length)
        bias = attention_bias(length, length, padding_mask, causal=True)
        logits, _, _ = self._run_blocks(token_ids, positions, bias, training=training)
        return logits

    def forward_with_cache(self, input_ids, attention_mask, past_keys, past_values):
        """One prompt or decode step with a growing KV cache (the exported graph).

        Args:
            input_ids: `[B, T]` new tokens.
            attention_mask: `[B, P + T]`, 1 for real tokens, 0 for (left) padding; each
                row's zeros come before its ones (positions: `positions_from_mask_sum`).
            past_keys, past_values: one `[B, H, P, D]` tensor per layer (P may be 0).
        Returns `(logits [B, T, V], present_keys, present_values)`, presents `[B, H, P + T, D]`.
        """
        length = ops.shape(input_ids)[1]
        total = ops.shape(attention_mask)[1]
        positions = positions_from_mask_sum(attention_mask, length)
        bias = attention_bias(length, total, attention_mask, causal=True)
        return self._run_blocks(input_ids, positions, bias, past_keys, past_values)

    # -- Keras generation ---------------------------------------------------------------------
    def _step_with_buffer(self, token_ids, cache, index):
        """Run `T` tokens at absolute positions `index..index+T-1` against a fixed cache buffer.

        `cache` is `[B, L, 2, H, S_max, D]` (layers, key/value); returns `(logits, cache)`.
        """
        batch, length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        positions = ops.broadcast_to(ops.arange(length, dtype="int32")[None, :] + index, (batch, length))
        bias = attention_bias(length, ops.shape(cache)[4], causal=True, query_start=index)
        keys = [cache[:, i, 0] for i in range(self.config.num_layers)]
        values = [cache[:, i, 1] for i in range(self.config.num_layers)]
        logits, keys, values = self._run_blocks(token_ids, positions, bias, keys, values, cache_update_index=index)
        cache = ops.stack([ops.stack([k, v], axis=1) for k, v in zip(keys, values)], axis=1)
        return logits, cache

    def _make_sampler(self, temperature, top_k, top_p, seed):
        import keras_hub  # noqa: PLC0415 - heavy, only needed to generate in Keras

        if not temperature:
            return keras_hub.samplers.GreedySampler()
        if top_p is not None:
            return _top_k_then_top_p_sampler(p=top_p, k=top_k, seed=seed, temperature=temperature)
        if top_k is not None:
            return keras_hub.samplers.TopKSampler(k=top_k, seed=seed, temperature=temperature)
        return keras_hub.samplers.RandomSampler(seed=seed, temperature=temperature)

    def _generate_function(self, key):
        """One compiled while-loop per decoding setting; XLA makes Keras generation fast."""
        if key in self._generate_functions:
            return self._generate_functions[key]
        import tensorflow as tf  # noqa: PLC0415 - the Keras side runs on the TF backend

        temperature, top_k, top_p, seeded, stop = key
        sampler = self._make_sampler(temperature, top_k, top_p, 0 if seeded else None)
        c = self.config

        def generate(token_ids, prompt_mask, start):
            batch, total = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
            cache = ops.zeros((batch, c.num_layers, 2, c.num_heads, total, c.head_dim), self.compute_dtype)
            # Prefill every position at once; causal masking makes the later (padding) ones harmless,
            # and each is overwritten before any query attends to it.
            _, cache = self._step_with_buffer(token_ids, cache, 0)

            def next_token(prompt, cache, index):
                # ops.slice, not `prompt[:, index - 1:index]`: XLA miscompiles that dynamic
                # strided slice inside a while loop on TF 2.21 (wrong tokens from step 2 on).
                token = ops.slice(prompt, [0, index - 1], [ops.shape(prompt)[0], 1])
                logits, cache = self._step_with_buffer(token, cache, index - 1)
                return logits[:, 0, :], None, cache

            return sampler(next_token, token_ids, cache=cache, index=start, mask=prompt_mask,
                           stop_token_ids=list(stop) if stop else None, model=self)

        function = tf.function(generate, jit_compile=True, reduce_retracing=True, autograph=False)  # data.as_written
        # A seeded call sets the sampler's seed state from its seed (`_run_generate_function`): same
        # seed, same samples, call after call, and one compiled function for every seed (the seed
        # had been part of the key: a batch job with a seed per batch would compile each batch).
        # Without a seed the state runs on from call to call, so each draws afresh.
        seed_states = list(sampler.variables) if seeded else []
        self._generate_functions[key] = (function, seed_states)
        return self._generate_functions[key]

    def _run_generate_function(self, key, *args, seed=None):
        """Run the compiled generation for `key` on `args` (Seq2SeqLM's too), seeded by `seed`
        where `key` says seeded.

        Seeded calls hold the model's lock: each sets the sampler's seed state (keras's
        SeedGenerator starts from `[seed, 0]`), which `key`'s calls share, then draws from it,
        so concurrent ones would draw from each other's state (different samples from the same
        seed). Unseeded calls run concurrently.
        """
        function, seed_states = self._generate_function(key)
        if not seed_states:  # no seed (see _generate_function)
            return function(*args)
        with self._seeded_generation:
            for variable in seed_states:
                variable.assign(np.asarray([seed, 0], dtype=variable.dtype))
            return function(*args)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_token_ids: Sequence[int] | None = None) -> np.ndarray:
        """Continue each prompt (a list or 1-D array of token ids; or the rows of a 2-D array)
        by up to `max_new_tokens` tokens.

        `temperature=0` is greedy; otherwise sampling with `top_k` and/or `top_p`, made
        reproducible by `seed` (without one, each call samples afresh). Returns int32
        `[B, max_new_tokens]`; after a stop id the row holds `pad_id`.
        """
        prompts = token_id_rows(prompts, self.config.vocab_size)
        # The bundle's rules for these options (one place: export/generate.py, no TensorFlow there).
        options = DecodingOptions(max_new_tokens=max_new_tokens, temperature=float(temperature or 0.0), top_k=top_k,
                                  top_p=top_p, seed=seed)
        options.validate()  # NumPy numbers come back as Python ones (np.int64 seeds had failed inside Keras)
        max_new_tokens, temperature, top_k, top_p, seed = (options.max_new_tokens, options.temperature, options.top_k,
                                                           options.top_p, options.seed)
        lengths = np.array([len(p) for p in prompts])
        needed = int(lengths.max()) + max_new_tokens
        if needed > self.config.max_length:
            raise UsageError(
                f"generate: prompt of {lengths.max()} tokens + {max_new_tokens} new tokens exceeds the "
                f"model's max_length {self.config.max_length}"
            )
        # Round the buffer up so that nearby lengths share one compiled function.
        total = min(-(-needed // 32) * 32, self.config.max_length)
        token_ids = np.full((len(prompts), total), self.config.pad_id, dtype="int32")
        prompt_mask = np.zeros((len(prompts), total), dtype=bool)
        for row, prompt in enumerate(prompts):
            token_ids[row, :len(prompt)] = prompt
            prompt_mask[row, :len(prompt)] = True
        stop = stop_id_tuple(stop_token_ids, self.config.vocab_size)
        # The bundle's rule: k >= the vocabulary filters nothing. keras-hub would pass such a k to
        # ops.top_k, which refuses it; None also shares no-top_k's compiled function (and samples).
        top_k = narrowing_top_k(top_k, self.config.vocab_size)
        output = np.asarray(self._run_generate_function(
            (float(temperature or 0.0), top_k, top_p, seed is not None, stop), token_ids, prompt_mask,
            np.asarray(lengths.min(), np.int32), seed=seed))
        new_tokens = np.full((len(prompts), max_new_tokens), self.config.pad_id, dtype="int32")
        for row, length in enumerate(lengths):
            continuation = output[row, length:length + max_new_tokens]
            for j, token in enumerate(continuation):
                new_tokens[row, j] = token
                if token in stop:
                    break
        return new_tokens
