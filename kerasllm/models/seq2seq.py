"""`Seq2SeqLM`: an encoder-decoder (Transformer/T5/BART-like) model, trained with `model.fit`.

The whole family in one file. An encoder stack of non-causal `TransformerBlock`s reads
the (right-padded) source under a padding mask; a decoder stack of causal blocks with
cross-attention reads the target. Each decoder block's cross-attention keys and values
depend only on the encoder output, so they are computed once per input
(`MultiHeadAttention.project_key_value`) and reused at every decoding step.

Vocabularies are shared (`target_vocab_size == 0`: one embedding for source, target and
the output projection, as in the original Transformer) or separate (an encoder and a
decoder embedding; the output projection is tied to the decoder's).

Entry points sharing the same weights:

* `call({"encoder_token_ids", "encoder_padding_mask"?, "decoder_token_ids"})` -> logits
  `[B, T, V_target]`: teacher forcing for training and scoring.
* `encode(input_ids, attention_mask)` and `decode_with_cache(...)`: the two graphs the
  ONNX export traces (encoder once per input; decoder step with a growing
  self-attention cache in the ORT GenAI layout `[B, H, P, D]`).
* `generate(sources, ...)` / `generate_n_best(sources, ...)`: Keras generation (greedy,
  sampling or beam search) in one XLA-compiled while loop over a fixed-size cache,
  using keras-hub's samplers.

Shapes: `B` batch, `S` source tokens, `T` new target tokens, `P` past target tokens,
`L` decoder layers, `H` heads, `D` head size, `C` hidden size, `V` target vocabulary.
"""

from __future__ import annotations

import threading
from typing import Sequence

import keras
import numpy as np
from keras import ops

from kerasllm.config import Seq2SeqConfig
from kerasllm.errors import UsageError
from kerasllm.export.generate import DecodingOptions, narrowing_top_k
from kerasllm.layers import TokenAndPositionEmbedding, TransformerBlock, attention_bias
from kerasllm.models.base import SparseCrossEntropy, TransformerModel, token_id_rows
from kerasllm.models.causal_lm import CausalLM


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@keras.saving.register_keras_serializable(package="kerasllm")
class Seq2SeqLM(TransformerModel):
    """Encoder-decoder language model (translation, summarization, any text-to-text).

    Args:
        config: a `Seq2SeqConfig` (or its dict).

    Call arguments:
        inputs: a dict with `encoder_token_ids` `[B, S]`, optionally
            `encoder_padding_mask` `[B, S]` (default: ids != pad_id) and
            `decoder_token_ids` `[B, T]` (BOS followed by the target, teacher forcing).
    Returns float32 logits `[B, T, V]` predicting the next target token.

    Example:
    >>> model = Seq2SeqLM(Seq2SeqConfig.preset("tiny", vocab_size=32))
    >>> model.compile(jit_compile=False)
    >>> src = np.random.randint(6, 32, (8, 7))
    >>> tgt = np.random.randint(6, 32, (8, 5))
    >>> x = {"encoder_token_ids": src, "decoder_token_ids": tgt[:, :-1]}
    >>> history = model.fit(x, tgt[:, 1:], epochs=1, verbose=0)
    >>> len(model.generate([[7, 8, 9]], max_new_tokens=4)[0]) <= 4
    True
    """

    config_class = Seq2SeqConfig
    init_build_shape = None
    token_inputs = ("encoder_token_ids", "decoder_token_ids")

    def __init__(self, config, **kwargs):
        kwargs.setdefault("name", "seq2seq_lm")
        super().__init__(config, **kwargs)
        c = self.config
        block = dict(num_heads=c.num_heads, intermediate_dim=c.intermediate_dim, dropout=c.dropout,
                     activation=c.activation, norm_first=c.norm_first, layer_norm_epsilon=c.layer_norm_epsilon,
                     use_bias=c.use_bias, rotary=c.position == "rotary")
        embedding = dict(max_length=c.max_length, hidden_dim=c.hidden_dim, position=c.position, dropout=c.dropout)
        self.encoder_embedding = TokenAndPositionEmbedding(c.vocab_size, name="encoder_embedding", **embedding)
        if c.target_vocab_size:
            self.target_embedding = TokenAndPositionEmbedding(c.target_vocab_size, name="decoder_embedding",
                                                              **embedding)
        self.encoder_blocks = [TransformerBlock(name=f"encoder_block_{i}", **block) for i in range(c.num_layers)]
        self.decoder_blocks = [TransformerBlock(cross_attention=True, name=f"decoder_block_{i}", **block)
                               for i in range(c.decoder_layers)]
        if c.norm_first:
            self.encoder_norm = keras.layers.LayerNormalization(epsilon=c.layer_norm_epsilon, name="encoder_norm")
            self.decoder_norm = keras.layers.LayerNormalization(epsilon=c.layer_norm_epsilon, name="decoder_norm")
        if not c.tie_embeddings:
            self.lm_head = keras.layers.Dense(c.target_vocab, use_bias=False, name="lm_head")
        # A plain dict, not one Keras tracks: it holds compiled functions and the samplers'
        # seed variables, which must not become model state (nor hit Keras's post-build lock).
        object.__setattr__(self, "_generate_functions", {})
        object.__setattr__(self, "_seeded_generation", threading.Lock())  # see CausalLM._run_generate_function

    @property
    def decoder_embedding(self):
        """The target-side embedding: the encoder's own when the vocabulary is shared."""
        return self.target_embedding if self.config.target_vocab_size else self.encoder_embedding

    def build(self, input_shape=None):
        c = self.config
        shape = (None, None, c.hidden_dim)
        self.encoder_embedding.build((None, None))
        if c.target_vocab_size:
            self.target_embedding.build((None, None))
        for block in self.encoder_blocks + self.decoder_blocks:
            block.build(shape)
        if c.norm_first:
            self.encoder_norm.build(shape)
            self.decoder_norm.build(shape)
        if not c.tie_embeddings:
            self.lm_head.build(shape)
        self.built = True

    def input_vocab_size(self, name) -> int:
        return self.config.target_vocab if name == "decoder_token_ids" else self.config.vocab_size

    def default_loss(self, label_smoothing=0.0):
        # Target padding never counts: labels are right-padded with pad_id.
        return SparseCrossEntropy(label_smoothing=label_smoothing, ignore_id=self.config.pad_id)

    # -- encoder --------------------------------------------------------------------------------
    def _encoder_hidden(self, token_ids, padding_mask, training=None):
        """Encoder output `[B, S, C]` for right-padded ids under `padding_mask` `[B, S]`."""
        length = ops.shape(token_ids)[1]
        positions = ops.broadcast_to(ops.arange(length, dtype="int32")[None, :], ops.shape(token_ids))
        bias = attention_bias(length, length, padding_mask, causal=False)
        x = self.encoder_embedding(token_ids, positions, training=training)
        for block in self.encoder_blocks:
            x, _, _ = block(x, self_bias=bias, positions=positions, training=training)
        return self.encoder_norm(x) if self.config.norm_first else x

    def encode(self, input_ids, attention_mask):
        """Run the encoder once per input (the exported `encoder.onnx` graph).

        Args:
            input_ids: `[B, S]` source ids, right-padded.
            attention_mask: `[B, S]`, 1 for real tokens, 0 for padding.
        Returns `(hidden [B, S, C], cross_keys, cross_values)`, the last two one
        `[B, H, S, D]` tensor per decoder layer.
        """
        hidden = self._encoder_hidden(input_ids, attention_mask)
        keys, values = [], []
        for block in self.decoder_blocks:
            key, value = block.cross_attention_layer.project_key_value(hidden)
            keys.append(key)
            values.append(value)
        return hidden, keys, values

    # -- decoder --------------------------------------------------------------------------------
    def _decode(self, token_ids, positions, self_bias, cross_keys, cross_values, cross_bias, past_keys=None,
                past_values=None, cache_update_index=None, training=None):
        x = self.decoder_embedding(token_ids, positions, training=training)
        keys, values = [], []
        for i, block in enumerate(self.decoder_blocks):
            x, key, value = block(
                x, self_bias=self_bias, positions=positions,
                past_key=None if past_keys is None else past_keys[i],
                past_value=None if past_values is None else past_values[i],
                cache_update_index=cache_update_index,
                cross_key=cross_keys[i], cross_value=cross_values[i], cross_bias=cross_bias, training=training,
            )
            keys.append(key)
            values.append(value)
        if self.config.norm_first:
            x = self.decoder_norm(x)
        logits = self.decoder_embedding.logits(x) if self.config.tie_embeddings else self.lm_head(x)
        return ops.cast(logits, "float32"), keys, values

    def call(self, inputs, training=None):
        if not isinstance(inputs, dict):
            raise ValueError(f"Seq2SeqLM expects a dict with {' and '.join(self.token_inputs)}, got "
                             f"{type(inputs).__name__}")
        self.check_input_keys(inputs)  # (a KeyError had quoted Keras's colour codes)
        for name in self.token_inputs:  # 1-D ids, or learned positions past the table
            self.check_token_ids(name, inputs[name])
        source = inputs["encoder_token_ids"]
        mask = inputs.get("encoder_padding_mask")
        if mask is None:
            mask = ops.not_equal(source, self.config.pad_id)
        target = inputs["decoder_token_ids"]
        hidden = self._encoder_hidden(source, mask, training=training)
        cross = [block.cross_attention_layer.project_key_value(hidden) for block in self.decoder_blocks]
        length = ops.shape(target)[1]
        # Targets are right-padded, so causal masking alone keeps padding out of every
        # real token's view; the loss ignores the padded positions.
        positions = ops.broadcast_to(ops.arange(length, dtype="int32")[None, :], ops.shape(target))
        logits, _, _ = self._decode(
            target, positions, attention_bias(length, length, causal=True),
            [k for k, _ in cross], [v for _, v in cross], attention_bias(1, ops.shape(source)[1], mask, causal=False),
            training=training,
        )
        return logits

    def decode_with_cache(self, decoder_input_ids, encoder_attention_mask, cross_keys, cross_values, past_keys,
                          past_values):
        """One decoder step with a growing self-attention cache (the exported `decoder.onnx`).

        Args:
            decoder_input_ids: `[B, T]` new target tokens (BOS first at step 0).
            encoder_attention_mask: `[B, S]` source mask.
            cross_keys, cross_values: per decoder layer `[B, H, S, D]`, from `encode`.
            past_keys, past_values: per decoder layer `[B, H, P, D]` (P may be 0).
        Returns `(logits [B, T, V], present_keys, present_values)`, presents `[B, H, P + T, D]`.
        """
        length = ops.shape(decoder_input_ids)[1]
        past = ops.shape(past_keys[0])[2]
        positions = ops.arange(length, dtype="int32")[None, :] + past
        positions = ops.broadcast_to(positions, ops.shape(decoder_input_ids))
        cross_bias = attention_bias(1, ops.shape(encoder_attention_mask)[1], encoder_attention_mask, causal=False)
        return self._decode(decoder_input_ids, positions, attention_bias(length, past + length, causal=True),
                            cross_keys, cross_values, cross_bias, past_keys, past_values)

    # -- Keras generation -----------------------------------------------------------------------
    def _generate_function(self, key):
        """One compiled function per decoding setting: encode, then one while loop, a keras-hub
        sampler's (greedy, sampling) or kerasllm.models.beam_search's (beam search).

        The sampler's loop state is `(decoder ids [B, T_max], cache)`: the cache holds the
        self-attention buffer `[B, L, 2, H, T_max, D]`, the cross keys/values `[B, L, 2, H, S, D]`
        and the source mask. Beam search repeats the cross keys/values and the mask per beam once,
        and reorders only the buffer as beams move.
        """
        if key in self._generate_functions:
            return self._generate_functions[key]
        import tensorflow as tf  # noqa: PLC0415 - the Keras side runs on the TF backend

        from kerasllm.models.beam_search import beam_search  # noqa: PLC0415

        temperature, top_k, top_p, seeded, num_beams = key  # num_beams 0: sampling, not beam search
        c = self.config
        # Beam search: the bundle's rules (kerasllm.models.beam_search); otherwise the causal LM's
        # keras-hub sampler choice (greedy / top-k / top-p / random), which uses no model state.
        sampler = None if num_beams else CausalLM._make_sampler(self, temperature, top_k, top_p, 0 if seeded else None)
        layers = c.decoder_layers
        # The ids generation never chooses (Seq2SeqConfig.suppressed_ids), as the bundle's loops skip them.
        suppressed = np.isin(np.arange(c.target_vocab), c.suppressed_ids)[None, :]

        def next_token(prompt, cache, index):
            buffer, cross, source_mask = cache
            batch = ops.shape(prompt)[0]
            # ops.slice, not `prompt[:, index - 1:index]` (an XLA miscompile on TF 2.21, see CausalLM).
            token = ops.slice(prompt, [0, index - 1], [batch, 1])
            positions = ops.broadcast_to(ops.reshape(index - 1, (1, 1)), (batch, 1))
            self_bias = attention_bias(1, ops.shape(buffer)[4], causal=True, query_start=index - 1)
            cross_bias = attention_bias(1, ops.shape(source_mask)[1], source_mask, causal=False)
            logits, keys, values = self._decode(
                token, positions, self_bias, [cross[:, i, 0] for i in range(layers)],
                [cross[:, i, 1] for i in range(layers)], cross_bias,
                [buffer[:, i, 0] for i in range(layers)], [buffer[:, i, 1] for i in range(layers)],
                cache_update_index=index - 1,
            )
            # -inf for beam search (a suppressed candidate is no candidate, as in the bundle's search).
            logits = ops.where(suppressed, -np.inf if num_beams else -1e9, logits[:, 0, :])
            buffer = ops.stack([ops.stack([k, v], axis=1) for k, v in zip(keys, values)], axis=1)
            return logits, None, (buffer, cross, source_mask)

        def generate(source_ids, source_mask, prompt, prompt_mask):
            _, keys, values = self.encode(source_ids, source_mask)
            cross = ops.stack([ops.stack([k, v], axis=1) for k, v in zip(keys, values)], axis=1)
            batch, total = ops.shape(prompt)[0], ops.shape(prompt)[1]
            rows = batch * max(num_beams, 1)
            buffer = ops.zeros((rows, layers, 2, c.num_heads, total, c.head_dim), self.compute_dtype)
            if not num_beams:
                return sampler(next_token, prompt, cache=(buffer, cross, source_mask), index=1, mask=prompt_mask,
                               stop_token_ids=[c.eos_id], model=self)
            # Each input's encoder outputs once per beam; beams never leave their input's rows, so
            # only the self-attention buffer moves with them.
            beam_cross, beam_mask = ops.repeat(cross, num_beams, axis=0), ops.repeat(source_mask, num_beams, axis=0)

            def beam_logits(sequences, state, index):
                logits, _, (buffer, _, _) = next_token(sequences, (state[0], beam_cross, beam_mask), index)
                return logits, (buffer,)

            return beam_search(beam_logits, prompt, (buffer,), num_beams=num_beams, eos_id=c.eos_id,
                               pad_id=c.pad_id)

        function = tf.function(generate, jit_compile=True, reduce_retracing=True, autograph=False)  # data.as_written
        # Set from each call's seed only where seeded (as CausalLM): unseeded calls draw afresh.
        seed_states = list(sampler.variables) if sampler is not None and seeded else []
        self._generate_functions[key] = (function, seed_states)
        return self._generate_functions[key]

    def _run_generation(self, sources, max_new_tokens, num_beams, temperature=0.0, top_k=None, top_p=None,
                        seed=None):
        c = self.config
        sources = token_id_rows(sources, c.vocab_size, "source")
        longest = max(len(s) for s in sources)
        if longest > c.max_length:
            raise UsageError(f"generate: a source of {longest} tokens exceeds the model's max_length {c.max_length}")
        if max_new_tokens < 1:
            raise UsageError(f"generate: max_new_tokens must be positive, got {max_new_tokens}")
        max_new_tokens = min(max_new_tokens, c.max_length - 1)
        # Sources rounded up so that nearby lengths share one compiled function; the
        # target buffer is exact, so beam scores never count tokens past max_new_tokens.
        source_length = min(_round_up(longest, 16), c.max_length)
        total = max_new_tokens + 1
        source_ids = np.full((len(sources), source_length), c.pad_id, dtype="int32")
        for row, ids in enumerate(sources):
            source_ids[row, :len(ids)] = ids
        source_mask = (np.arange(source_length)[None, :] < np.array([len(s) for s in sources])[:, None])
        prompt = np.full((len(sources), total), c.pad_id, dtype="int32")
        prompt[:, 0] = c.bos_id
        prompt_mask = np.zeros_like(prompt, dtype=bool)
        prompt_mask[:, 0] = True
        top_k = narrowing_top_k(top_k, c.target_vocab)  # k >= the vocabulary: no filter, as the bundle
        # CausalLM's (seeded calls one at a time), as _make_sampler.
        return CausalLM._run_generate_function(
            self, (float(temperature or 0.0), top_k, top_p, seed is not None, num_beams), source_ids,
            source_mask.astype("int32"), prompt, prompt_mask, seed=seed)

    def _strip(self, row) -> list[int]:
        """Generated ids after BOS, up to (not including) EOS."""
        out = []
        for token in row[1:]:
            if token == self.config.eos_id:
                break
            out.append(int(token))
        return out

    def generate(self, sources: Sequence[Sequence[int]], max_new_tokens: int = 32, num_beams: int = 1,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None) -> list[list[int]]:
        """The best target (list of ids, without BOS/EOS) for each source (a list or 1-D array of
        ids; or the rows of a 2-D array).

        `num_beams > 1`: beam search; otherwise greedy (`temperature=0`) or sampling with
        `top_k` / `top_p`, reproducible with `seed` (without one, each call samples afresh).
        Outputs stop at EOS or after `max_new_tokens` tokens.
        """
        # The bundle's rules for these options (export/generate.py): e.g. a temperature or top-k under beam
        # search is refused, not ignored.
        options = DecodingOptions(max_new_tokens=max_new_tokens, temperature=float(temperature or 0.0), top_k=top_k,
                                  top_p=top_p, num_beams=num_beams, seed=seed)
        options.validate()  # NumPy numbers come back as Python ones (np.int64 seeds had failed inside Keras)
        max_new_tokens, num_beams, temperature, top_k, top_p, seed = (
            options.max_new_tokens, options.num_beams, options.temperature, options.top_k, options.top_p, options.seed)
        if num_beams > 1:
            return [best[0][0] for best in self.generate_n_best(sources, max_new_tokens, num_beams, n_best=1)]
        result = self._run_generation(sources, max_new_tokens, 0, temperature, top_k, top_p, seed)
        return [self._strip(row) for row in np.asarray(result)]

    def generate_n_best(self, sources: Sequence[Sequence[int]], max_new_tokens: int = 32, num_beams: int = 4,
                        n_best: int = 1) -> list[list[tuple[list[int], float]]]:
        """Beam search: for each source, the `n_best` best `(ids, score)` pairs, best first.

        The bundle's search (kerasllm.models.beam_search, as kerasllm.export.generate): beams
        ranked by their sum of log-probabilities; a beam ending in EOS (or at `max_new_tokens`)
        becomes a finished hypothesis scored by its mean log-probability per generated token, EOS
        included; a source is done once it has `num_beams` of them. `num_beams=1` gives the
        greedy output.
        """
        from kerasllm.models.beam_search import n_best_from_beams  # noqa: PLC0415

        options = DecodingOptions(max_new_tokens=max_new_tokens, num_beams=num_beams, n_best=n_best)
        options.validate()  # the bundle's rules, NumPy numbers as Python ones
        max_new_tokens, num_beams, n_best = options.max_new_tokens, options.num_beams, options.n_best
        arrays = [np.asarray(t) for t in self._run_generation(sources, max_new_tokens, num_beams)]
        return n_best_from_beams(*arrays, n_best=n_best, strip=self._strip)
