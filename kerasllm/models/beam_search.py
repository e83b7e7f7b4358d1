"""Beam search in one XLA while loop, with the bundle's rules (kerasllm.export.generate._beam_search).

Why not keras-hub's `BeamSampler`: it keeps a beam that has ended in its slot to the end of the
loop, ranks beams by their sum of log-probabilities and stops only when every beam has ended. The
bundle's search (Hugging Face's search with early stopping) moves an ended beam into a
pool of finished hypotheses, scored by mean log-probability per token (the sum, EOS's
included, over the tokens with EOS counted; Hugging Face's length penalty 1 counts them without
EOS, so its scores and the order of near ties can differ), refills its
slot with the next best live candidate, and finishes an input once it holds `num_beams` finished
hypotheses. The two gave different n-best lists for the same model (48 of 64 best hypotheses alike
on a random-weight model); with the same rules here, a model directory and its bundle agree (to
float rounding: the bundle scores in float64). No library offers this loop for Keras: keras-hub's
samplers are the only ones, so it is written out.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def beam_search(next_logits: Callable, sequences, state, *, num_beams: int, eos_id: int, pad_id: int):
    """Beam search over `sequences [B, T]` (the first token, BOS, given; `T - 1` new tokens at most).

    Args:
        next_logits: `(sequences [B * k, T], state, index) -> (logits [B * k, V], state)`, the
            logits of the token at `index` given those before it; `state` is a tuple of tensors
            with `B * k` rows (e.g. a KV cache), reordered here as beams move.
        sequences: `[B, T]` int32, the first column the start token.
        state: the step function's state for `B * k` rows (each input's rows repeated `k` times).
        num_beams: `k`.
    Returns `(pool_sequences [B, 2k, T], pool_scores [B, 2k], pool_count [B], in_last_step [B],
    live_sequences [B, k, T], live_scores [B, k])`: the finished hypotheses in the order they
    finished (scores: mean log-probability per new token, EOS included; -inf in empty slots),
    whether each input was still searching in the loop's last step, and the live beams as they were
    before the step that finished their input (scores: sums of log-probabilities). Assemble them as
    `n_best_from_beams` does.
    """
    import tensorflow as tf  # noqa: PLC0415 - the Keras side generates on the TF backend

    k = num_beams
    batch, total = tf.shape(sequences)[0], tf.shape(sequences)[1]
    limit = total - 1  # new tokens allowed
    inputs = tf.range(batch)
    seqs = tf.repeat(sequences, k, axis=0)
    scores = tf.tile(tf.constant([0.0] + [-float("inf")] * (k - 1)), [batch])  # first step: beam 0 only
    pool_seqs = tf.fill([batch, 2 * k, total], tf.cast(pad_id, sequences.dtype))
    pool_scores = tf.fill([batch, 2 * k], -float("inf"))
    pool_count = tf.zeros([batch], tf.int32)
    done = tf.zeros([batch], tf.bool)
    done_step = tf.fill([batch], -1)  # the step in which each input finished
    positions = tf.range(total)

    def write(rows, tokens, index):
        return tf.where(positions == index, tf.cast(tokens, rows.dtype)[..., None], rows)

    def pick(values, onehot):
        """values `[B, C, ...]`, onehot `[B, C, S]` (at most one candidate per slot): `[B, S, ...]`."""
        index = tf.argmax(tf.cast(onehot, tf.int32), axis=1, output_type=tf.int32)
        return tf.gather(values, index, batch_dims=1)

    def body(t, seqs, state, scores, pool_seqs, pool_scores, pool_count, done, done_step):
        index = t + 1
        logits, state = next_logits(seqs, state, index)
        vocab = tf.shape(logits)[-1]
        log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32))
        candidates = tf.reshape(scores[:, None] + log_probs, [batch, k * vocab])
        # The 2k best candidates of each input, best first, the lower index first on ties (as the bundle).
        top_scores, top = tf.math.top_k(candidates, 2 * k, sorted=True)
        source_rows = inputs[:, None] * k + top // vocab
        tokens = top % vocab
        length = tf.cast(index, tf.float32)  # new tokens including this one
        valid = tf.math.is_finite(top_scores)
        ended = valid & ((tokens == eos_id) | (index >= limit))
        live = valid & ~ended
        rank = tf.range(2 * k)[None, :]
        # An ended candidate joins the pool only if it ranks among the k best (it beat the live ones).
        joins = ended & (rank < k) & ~done[:, None]
        candidate_seqs = write(tf.gather(seqs, source_rows), tokens, index)  # [B, 2k, T]
        slot = pool_count[:, None] + tf.cumsum(tf.cast(joins, tf.int32), axis=1) - 1
        into_pool = joins[:, :, None] & (slot[:, :, None] == tf.range(2 * k)[None, None, :])  # [B, 2k, 2k]
        filled = tf.reduce_any(into_pool, axis=1)
        pool_seqs = tf.where(filled[:, :, None], pick(candidate_seqs, into_pool), pool_seqs)
        pool_scores = tf.where(filled, pick(top_scores / length, into_pool), pool_scores)
        pool_count = pool_count + tf.reduce_sum(tf.cast(joins, tf.int32), axis=1)
        # The k best live candidates fill the beams; missing ones leave -inf beams (on beam 0's row).
        live_rank = tf.cumsum(tf.cast(live, tf.int32), axis=1) - 1
        into_beam = (live & (live_rank < k))[:, :, None] & (live_rank[:, :, None] == tf.range(k)[None, None, :])
        has = tf.reduce_any(into_beam, axis=1)  # [B, k]
        rows = tf.reshape(tf.where(has, pick(source_rows, into_beam), inputs[:, None] * k), [-1])
        new_tokens = tf.reshape(tf.where(has, pick(tokens, into_beam), pad_id), [-1])
        now_done = done | (pool_count >= k) | (index >= limit)
        done_step = tf.where(now_done & ~done, t, done_step)
        # The beams of an input that is done keep their last state (the bundle's, which drops it).
        frozen = tf.repeat(now_done, k)
        scores = tf.where(frozen, scores, tf.reshape(tf.where(has, pick(top_scores, into_beam), -float("inf")), [-1]))
        seqs = tf.where(frozen[:, None], seqs, write(tf.gather(seqs, rows), new_tokens, index))
        state = tuple(tf.gather(s, rows) for s in state)
        return t + 1, seqs, state, scores, pool_seqs, pool_scores, pool_count, now_done, done_step

    def cond(t, seqs, state, scores, pool_seqs, pool_scores, pool_count, done, done_step):
        return (t < limit) & ~tf.reduce_all(done)

    steps, seqs, _, scores, pool_seqs, pool_scores, pool_count, _, done_step = tf.while_loop(
        cond, body, (tf.constant(0), seqs, tuple(state), scores, pool_seqs, pool_scores, pool_count, done,
                     done_step))
    return (pool_seqs, pool_scores, pool_count, done_step == steps - 1, tf.reshape(seqs, [batch, k, total]),
            tf.reshape(scores, [batch, k]))


def n_best_from_beams(pool_seqs, pool_scores, pool_count, in_last_step, live_seqs, live_scores, n_best: int,
                      strip: Callable) -> list[list[tuple[list[int], float]]]:
    """Each input's `n_best` `(ids, score)`, best first, from `beam_search`'s arrays (NumPy), as the
    bundle assembles them: the finished hypotheses, and, for an input still searching in the last
    step with fewer than `n_best` of them, its live beams (scored by mean log-probability per token)."""
    results = []
    for b in range(len(pool_count)):
        hyps = [(strip(pool_seqs[b, i]), float(pool_scores[b, i])) for i in range(int(pool_count[b]))]
        if len(hyps) < n_best and in_last_step[b]:
            for row, score in zip(live_seqs[b], live_scores[b]):
                tokens = strip(row)
                if np.isfinite(score) and tokens:
                    hyps.append((tokens, float(score) / len(tokens)))
        hyps.sort(key=lambda h: -h[1])
        results.append(hyps[:n_best])
    return results
