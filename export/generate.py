"""Decoding loops on NumPy logits: greedy, sampling, beam search. Never imports TensorFlow.

The loops know nothing about ONNX Runtime or Keras: they drive a *step function*

    step(input_ids [B, T] int64, attention_mask [B, S] int64, cache) -> (logits [B, T, V], cache)

whose `cache` is opaque (None before the first call), plus, for beam search,
`reorder(cache, indices) -> cache`, and optionally `last_logits(input_ids, attention_mask) ->
(logits [B, V], cache)`, the first step computing only what decoding needs (`prompt_step`).
`DecoderSession` (runtime.py) is one; a
seq2seq decoder with its encoder output bound in a closure is another; `FullRecompute`
wraps any step function to rerun the whole sequence each step (the no-cache baseline).

Prompts of different lengths are left-padded and masked; positions come from the
attention mask, so each row sees exactly what it would see alone.

Options (names shared with the batch CLI): `max_new_tokens`, `temperature` (0 = greedy),
`top_k`, `top_p`, `repetition_penalty`, `stop` (strings), `stop_ids`, `suppress_ids`,
`num_beams`, `n_best`, `seed`. Sampling draws from `numpy.random.Generator(seed)`: the same seed and
the same batch give the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from kerasllm.errors import UsageError


class StepFunction(Protocol):
    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache) -> tuple[np.ndarray, object]:
        ...

    def reorder(self, cache, indices: np.ndarray):
        ...


# The largest seed (the training command's --seed range too) and the smallest temperature above 0.
MAX_SEED = 2**32 - 1
MIN_TEMPERATURE = 1e-6


def _integer(name: str, value, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _finite(name: str, value, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UsageError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}")
    return float(value)


def _stop_strings(stop) -> list[str] | None:
    """`stop` as a list of stop strings (a str is one), None for none; UsageError for anything else,
    before any decoding: `stop=5` had failed in `list()`, `[3]` only once the whole batch was decoded
    (in truncate_at_stop), and `[None]` or `[""]` had passed and stopped nothing."""
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, (list, tuple)):
        raise UsageError(f"stop must be a string or a list of strings, got {stop!r}")
    for text in stop:
        if not isinstance(text, str) or not text:
            raise UsageError(f"stop strings must be non-empty strings, got {text!r}")
    return list(stop) or None


@dataclass
class DecodingOptions:
    """How to decode; see the module docstring. `stop_ids` end a sequence (not included in it);
    `suppress_ids` are never chosen (their logits set to -inf first, as Hugging Face's
    `suppress_tokens`: a seq2seq model's special tokens but EOS, Seq2SeqConfig.suppressed_ids)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: Sequence[str] | None = None
    stop_ids: Sequence[int] = field(default_factory=tuple)
    suppress_ids: Sequence[int] = field(default_factory=tuple)
    num_beams: int = 1
    n_best: int = 1
    seed: int | None = None

    def validate(self, sampled_n_best: bool = False, vocab_size: int | None = None) -> None:
        """UsageError for options of the wrong type, out of range or that cannot go together.
        `n_best > 1` needs beam search (`num_beams >= n_best`), or with `sampled_n_best` (causal
        generation: independent samples, decoding_predictor) sampling instead (`temperature > 0`,
        one beam). NumPy numbers are taken (and kept as Python ones); `stop` is kept as a list
        of strings (or None). `vocab_size` (the model's, where the caller knows it: the
        predictors) bounds `num_beams`."""
        # Types first: a float where a count goes had been truncated (max_new_tokens=2.5 gave 2
        # tokens) or failed deep in NumPy, and NaN passed every range comparison below.
        for name in ("max_new_tokens", "num_beams", "n_best", "top_k", "seed"):
            setattr(self, name, _integer(name, getattr(self, name), optional=name in ("top_k", "seed")))
        for name in ("temperature", "top_p", "repetition_penalty"):
            setattr(self, name, _finite(name, getattr(self, name), optional=name == "top_p"))
        self.stop = _stop_strings(self.stop)
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            # NumPy's generator refuses negative seeds, Keras's samplers seeds past int64: one range for both.
            raise UsageError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            # Logits divided by a denormal overflow to inf (NaN probabilities in float32), and where
            # denormals are flushed (ONNX Runtime's threads) it compares equal to 0: refused, not guessed.
            raise UsageError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UsageError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams < 1:
            raise UsageError(f"num_beams must be at least 1, got {self.num_beams}")
        if vocab_size is not None and self.num_beams > vocab_size:
            # Beam search copies the prompt's KV cache for batch x num_beams rows before its first
            # step, whatever max_new_tokens: num_beams=1000000 on a 49-token model had the process
            # OOM-killed. More beams than the vocabulary has tokens cannot be filled at the first step
            # (its candidates are the prompt's vocab_size continuations) and no decoding uses so many,
            # so the vocabulary bounds it for every model (not a memory estimate: a large-vocabulary
            # model's bound still allows more beams than memory may hold).
            raise UsageError(f"num_beams must be at most the model's vocabulary of {vocab_size} tokens, "
                             f"got {self.num_beams}")
        if self.n_best < 1:
            raise UsageError(f"n_best must be at least 1, got {self.n_best}")
        if self.n_best > 1 and self.num_beams == 1:
            if not sampled_n_best:
                raise UsageError(f"n_best {self.n_best} needs beam search (num_beams {self.n_best} or more)")
            if not self.temperature:
                raise UsageError(f"n_best {self.n_best} needs beam search (num_beams {self.n_best} or more) or "
                                 "sampling (temperature > 0)")
        elif self.n_best > self.num_beams:
            raise UsageError(f"n_best {self.n_best} is more than num_beams {self.num_beams} (beam search keeps "
                             f"{self.num_beams} hypotheses)")
        if self.num_beams > 1 and self.temperature > 0:
            raise UsageError("beam search is deterministic: use temperature 0 with num_beams > 1")
        if self.temperature == 0 and (self.top_k is not None or (self.top_p is not None and self.top_p < 1.0)):
            # Refused rather than ignored: without it `--top-k 50` alone decoded greedily, silently.
            raise UsageError("top_k and top_p narrow sampling: give a temperature > 0 (0 decodes greedily)")
        if set(self.suppress_ids) & set(self.stop_ids):
            raise UsageError("a stop id cannot be suppressed (generation could never stop)")


@dataclass
class Hypothesis:
    """One generated continuation: its token ids (stop id excluded) and score (mean log-prob)."""

    tokens: list[int]
    score: float | None = None


def hypotheses_result(hyps: list[Hypothesis], n_best: int, text: Callable[[list[int]], str]) -> dict:
    """A generate/translate predictor's result for one input (see export/predict.py).

    `{"output": str}`, or `{"output": [str...], "scores": [...]}` for n-best; the tokens
    generated are counted under GENERATED_TOKENS for the batch runner's throughput line.
    """
    from kerasllm.export.predict import GENERATED_TOKENS  # noqa: PLC0415 - predict imports nothing heavy

    generated = sum(len(h.tokens) for h in hyps[:n_best])
    if n_best == 1:
        return {"output": text(hyps[0].tokens), GENERATED_TOKENS: generated}
    return {"output": [text(h.tokens) for h in hyps[:n_best]],
            "scores": [round(float(h.score), 6) for h in hyps[:n_best]], GENERATED_TOKENS: generated}


# -- logits processing -------------------------------------------------------------------------
def suppress(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`logits [..., V]` with columns `ids` at -inf: in place where the array is writable (the
    steps' logits are fresh copies: one NumPy call a step), else in a copy."""
    if ids.size:
        if not logits.flags.writeable:
            logits = logits.copy()
        logits[..., ids] = -np.inf
    return logits


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty (as in Hugging Face): seen tokens' logits divided by `penalty` if positive,
    multiplied if negative. `seen` is a `[B, V]` boolean mask."""
    if penalty == 1.0:
        return logits
    penalized = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalized, logits)


def narrowing_top_k(top_k: int | None, vocab_size: int) -> int | None:
    """`top_k` where it narrows sampling, else None: a k of the vocabulary or more filters nothing
    (`filter_top_k`; Keras's samplers take the same rule from here)."""
    return None if top_k is not None and top_k >= vocab_size else top_k


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the `k` largest logits of each row (ties at the boundary kept), others -inf."""
    if narrowing_top_k(k, logits.shape[-1]) is None:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits >= kth, logits, -np.inf)


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches `p`."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = softmax(sorted_logits)
    # A token is kept when the tokens before it have not yet reached p (the first always is).
    keep_sorted = (np.cumsum(probs, axis=-1) - probs) < p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def next_tokens(logits: np.ndarray, seen: np.ndarray, options: DecodingOptions,
                rng: np.random.Generator, suppressed: np.ndarray) -> np.ndarray:
    """One token per row from last-position logits `[B, V]`, never one of `suppressed`
    (`options.suppress_ids` as an array, made once per call of the loop)."""
    logits = suppress(logits, suppressed)
    if not options.temperature and options.repetition_penalty == 1.0:
        return np.argmax(logits, axis=-1)
    logits = apply_repetition_penalty(logits.astype(np.float64), seen, options.repetition_penalty)
    if not options.temperature:
        return np.argmax(logits, axis=-1)
    logits = logits / options.temperature
    if options.top_k is not None:
        logits = filter_top_k(logits, options.top_k)
    if options.top_p is not None:
        logits = filter_top_p(logits, options.top_p)
    cumulative = np.cumsum(softmax(logits), axis=-1)
    # Inverse-CDF sampling, one uniform in (0, 1] per row: vectorized, reproducible from the
    # seed, and never lands on a filtered (zero-probability) token.
    uniform = 1.0 - rng.random((cumulative.shape[0], 1))
    return (cumulative < uniform * cumulative[:, -1:]).sum(-1)


# -- helpers -----------------------------------------------------------------------------------
def check_token_ids(rows: Sequence[Sequence[int]], vocab_size: int, what: str = "prompt",
                    max_length: int | None = None) -> None:
    """UsageError naming the row for ids a predictor's `predict` cannot take: none, not integers,
    outside `0 .. vocab_size - 1` (a negative id had wrapped to the vocabulary's end in a Gather,
    one past it had failed inside ONNX Runtime) or, given `max_length`, more of them (learned
    positions had failed inside ONNX Runtime, sinusoidal and rotary ones run past what was trained)."""
    for i, row in enumerate(rows):
        ids = np.asarray(row)
        if ids.ndim != 1 or not len(ids):
            raise UsageError(f"{what} {i}: needs a list of at least one token id")
        if max_length is not None and len(ids) > max_length:
            raise UsageError(f"{what} {i} has {len(ids)} tokens, more than the model's max_length {max_length}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise UsageError(f"{what} {i}: token ids must be integers, got {ids.dtype}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise UsageError(f"{what} {i}: token id {low if low < 0 else high} is outside the vocabulary "
                             f"0..{vocab_size - 1}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`[B, L]` ids and attention mask, prompts aligned to the right."""
    if not len(prompts) or any(len(p) == 0 for p in prompts):  # (len: a 2-D array has no truth value)
        raise UsageError("generate: every prompt needs at least one token")
    return _padded(prompts, pad_id, left=True)


def right_pad(sources: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`[B, S]` ids and attention mask, sources aligned to the left (an encoder's input)."""
    return _padded(sources, pad_id, left=False)


def _padded(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = row
        mask[i, span] = 1
    return ids, mask


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> tuple[str, bool]:
    """Cut `text` before the first stop string it contains; returns (text, stopped)."""
    cut = min((text.find(s) for s in stop or () if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def row_limits(prompts, options: DecodingOptions, max_length: int | None) -> np.ndarray:
    """New tokens allowed per row: `max_new_tokens`, capped so prompt + new fits `max_length`."""
    limits = np.full(len(prompts), options.max_new_tokens)
    if max_length is not None:
        limits = np.minimum(limits, max_length - np.array([len(p) for p in prompts]))
    if (limits < 1).any():
        row = int(np.argmin(limits))
        raise UsageError(f"generate: prompt {row} has {len(prompts[row])} tokens, leaving no room under the "
                         f"model's max_length {max_length}")
    return limits


# -- the loops ---------------------------------------------------------------------------------
def prompt_step(step: StepFunction, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, object]:
    """The first step: `(logits [B, V] at each row's last position, cache)`. A step function
    with a `last_logits(ids, mask)` method (DecoderSession) computes only those."""
    last_logits = getattr(step, "last_logits", None)
    if last_logits is not None:
        return last_logits(ids, mask)
    logits, cache = step(ids, mask, None)
    return logits[:, -1], cache


def greedy_on_device(step: StepFunction, options: DecodingOptions) -> Callable | None:
    """The step function's `greedy_step(ids [B, 1], mask, cache) -> (next ids [B, 1], cache)` when it
    has one (a graph with the `next_token` output, runtime.DecoderSession) and the options are plain
    greedy with the ids the graph suppresses (`suppressed_on_device`, optimize.add_next_token): the
    choice is made where the graph runs and only token ids come back."""
    if options.temperature or options.repetition_penalty != 1.0 or not getattr(step, "greedy_on_device", False):
        return None
    if set(getattr(step, "suppressed_on_device", ())) != set(options.suppress_ids):
        return None  # e.g. a bundle exported before suppression: the host chooses
    return step.greedy_step


class ChoiceOnHost:
    """A step function seen without its `greedy_step`: greedy decoding takes the logits to the host
    and picks there (how validation checks the graph's choice, and benchmarks measure it)."""

    greedy_on_device = False

    def __init__(self, step: StepFunction):
        self.inner = step

    def __call__(self, input_ids, attention_mask, cache):
        return self.inner(input_ids, attention_mask, cache)

    def __getattr__(self, name):  # reorder, last_logits, ...: the wrapped step's
        return getattr(self.inner, name)


def generate(step: StepFunction, prompts: Sequence[Sequence[int]], options: DecodingOptions, *, pad_id: int,
             vocab_size: int | None = None, max_length: int | None = None,
             decode: Callable[[list[int]], str] | None = None) -> list[list[Hypothesis]]:
    """Continue each prompt; returns, per prompt, `n_best` hypotheses (best first).

    Args:
        step: the step function (see the module docstring).
        prompts: token id lists, any lengths.
        options: `DecodingOptions`.
        pad_id: id fed for padding and for rows already finished.
        max_length: the model's longest sequence; rows stop when they reach it.
        decode: ids -> text, needed for `options.stop` (stop strings).
    """
    options.validate()
    if options.stop and decode is None:
        raise UsageError("stop strings need a decode function")
    if options.num_beams > 1:
        return _beam_search(step, prompts, options, pad_id, max_length, decode)
    return [[h] for h in _sample(step, prompts, options, pad_id, max_length, decode)]


def _sample(step, prompts, options, pad_id, max_length, decode) -> list[Hypothesis]:
    ids, mask = left_pad(prompts, pad_id)
    batch = len(prompts)
    limits = row_limits(prompts, options, max_length)
    rng = np.random.default_rng(options.seed)
    stop_ids = set(int(i) for i in options.stop_ids)
    logits, cache = prompt_step(step, ids, mask)
    seen = np.zeros(logits.shape, dtype=bool)
    if options.repetition_penalty != 1.0:
        for row, prompt in enumerate(prompts):
            seen[row, list(prompt)] = True
    # The bookkeeping is vectorized over rows and allocates little: at small sizes a step
    # of Python costs as much as a step of the model. `active` are the rows still in the
    # model's batch: greedy decoding drops finished rows (a cache copy once an eighth of
    # the batch is done, against every later step of theirs); sampling keeps every row,
    # so that its random draws stay those of the whole batch (a seed reproduces).
    steps = int(limits.max())
    generated = np.full((batch, steps), pad_id, dtype=np.int64)
    lengths = np.zeros(batch, dtype=np.int64)
    done = np.zeros(batch, dtype=bool)
    stop_array = np.array(sorted(stop_ids), dtype=np.int64)
    suppressed = np.asarray(options.suppress_ids, np.int64)
    penalize = options.repetition_penalty != 1.0
    compact = not options.temperature
    width = mask.shape[1]
    # The mask of every step is a prefix of one array (each step adds a column of ones).
    masks = np.concatenate([mask, np.ones((batch, steps), np.int64)], axis=1)
    if not stop_array.size and not options.stop and (limits == steps).all():
        # No row can end before the others: every row takes `steps` tokens, so the loop below
        # reduces to this one (same tokens, same random draws) without its per-row
        # bookkeeping, a third of a batch-8 step's Python on a small model.
        rows = np.arange(batch)
        choose = greedy_on_device(step, options)
        if choose is not None:
            tokens = next_tokens(logits, seen, options, rng, suppressed)  # the prompt step's choice, from its logits
            for t in range(steps):
                generated[:, t] = tokens
                if t + 1 < steps:
                    ids, cache = choose(tokens[:, None], masks[:, :width + t + 1], cache)
                    tokens = ids[:, 0]
            return [Hypothesis(row.tolist()) for row in generated]
        for t in range(steps):
            tokens = next_tokens(logits, seen, options, rng, suppressed)
            generated[:, t] = tokens
            if penalize:
                seen[rows, tokens] = True
            if t + 1 < steps:
                logits, cache = step(tokens[:, None], masks[:, :width + t + 1], cache)
                logits = logits[:, -1]
        return [Hypothesis(row.tolist()) for row in generated]
    if compact and not penalize and not options.stop and (limits == steps).all():
        return _greedy_with_stops(step, logits, cache, masks, width, steps, stop_array, pad_id, suppressed,
                                  greedy_on_device(step, options))
    active = np.arange(batch)
    for t in range(steps):
        tokens = next_tokens(logits, seen, options, rng, suppressed)
        live = ~done[active]
        stopped = live & (tokens[:, None] == stop_array).any(axis=1) if stop_array.size else np.zeros_like(live)
        keep = live & ~stopped
        generated[active, t] = np.where(keep, tokens, pad_id)
        lengths[active] += keep
        if penalize:
            seen[np.flatnonzero(keep), tokens[keep]] = True
        done[active] |= stopped | (lengths[active] >= limits[active])
        if options.stop:
            for row in active[keep & ~done[active]]:
                if truncate_at_stop(decode(generated[row, :lengths[row]].tolist()), options.stop)[1]:
                    done[row] = True
        if done.all():
            break
        finished = done[active]
        tokens = np.where(finished, pad_id, tokens)
        if compact and finished.sum() >= max(1, len(active) // 8):
            rows = np.flatnonzero(~finished)
            cache = step.reorder(cache, rows)
            active, tokens, seen, masks = active[rows], tokens[rows], seen[rows], masks[rows]
        logits, cache = step(tokens[:, None], masks[:, :width + t + 1], cache)
        logits = logits[:, -1]
    # Rows keep their tokens contiguous: a row stops for good at its first stop id.
    return [Hypothesis(generated[row, :lengths[row]].tolist()) for row in range(batch)]


def _greedy_with_stops(step, logits, cache, masks, width, steps, stop_array, pad_id, suppressed: np.ndarray,
                       choose: Callable | None = None) -> list[Hypothesis]:
    """`_sample`'s loop for greedy decoding with stop ids (seq2seq's EOS) and one limit for all
    rows: the same tokens, fed tokens and batch compaction, with per-row bookkeeping only at
    the steps where a row stops (rare) instead of a dozen array ops at every step.

    Between two model runs every NumPy call costs ~5-9 us (caches cold after the run; 'small'
    seq2seq preset, 8 rows, a run ~0.4-0.5 ms), so a step does as few as it can: the argmax
    straight into the next input's shape, a set test on the tokens as a list (an array compare
    and its any() cost ~13 us), and the tokens kept per step to be written out after the loop.
    A row that stopped at step t has length t (the stop id excluded); what it is given while it
    waits in the batch to be dropped (pads) is never read. `choose` (`greedy_on_device`): the steps
    after the prompt's return their choice instead of logits. `suppressed`: ids never chosen."""
    batch = len(logits)
    lengths = np.full(batch, steps, dtype=np.int64)
    stops = set(stop_array.tolist())
    columns = []  # per step: (the rows in the model's batch or None for all, their tokens [n, 1])
    active = None  # the rows in the model's batch (None: all of them, in order)
    finished = None  # which of those have stopped (None: none yet)
    tokens = suppress(logits, suppressed).argmax(-1)[:, None]  # [B, 1]: the next input's shape
    for t in range(steps):
        columns.append((active, tokens))
        if not stops.isdisjoint(tokens.ravel().tolist()):
            hits = np.isin(tokens[:, 0], stop_array)
            if finished is not None:
                hits &= ~finished
            if hits.any():
                lengths[np.flatnonzero(hits) if active is None else active[hits]] = t
                finished = hits if finished is None else finished | hits
                if finished.all():
                    break
        if t + 1 == steps:
            break
        if finished is not None:
            tokens = np.where(finished[:, None], pad_id, tokens)
            if np.count_nonzero(finished) >= max(1, len(tokens) // 8):
                rows = np.flatnonzero(~finished)
                cache = step.reorder(cache, rows)
                active = rows if active is None else active[rows]
                tokens, masks, finished = tokens[rows], masks[rows], None
        if choose is not None:
            tokens, cache = choose(tokens, masks[:, :width + t + 1], cache)
        else:
            logits, cache = step(tokens, masks[:, :width + t + 1], cache)
            tokens = suppress(logits, suppressed).argmax(-1)
    generated = np.empty((batch, len(columns)), dtype=np.int64)
    for t, (rows, tokens) in enumerate(columns):
        generated[slice(None) if rows is None else rows, t] = tokens[:, 0]
    return [Hypothesis(generated[row, :lengths[row]].tolist()) for row in range(batch)]


def _parents_in_place(rows: list, tokens: list, scores: list, first: int, beams: int) -> None:
    """Put the last `beams` new beams (one input's, whose rows start at `first`) in slots where each
    beam whose parent row no earlier beam has claimed sits in its parent's row; the others fill the
    rows left. The cache reorder then copies only the beams that fork from a shared parent or move
    to a row whose beam ended.

    Why: the reorder copies every moved row's filled cache slots, memory-bound copies that took ~11
    ms of a ~100 ms beam-4 batch of 16 (bench_seq2seq's small model, one thread) with beams kept in
    rank order, where most rows moved. A beam's row changes nothing but the order in which equal
    scores are ranked at the next step (row, then token); the beams, scores and results stay.
    """
    start = len(rows) - beams
    slots: list = [None] * beams
    forks = []
    for entry in zip(rows[start:], tokens[start:], scores[start:]):
        slot = entry[0] - first
        if slots[slot] is None:
            slots[slot] = entry
        else:
            forks.append(entry)
    empty = [slot for slot in range(beams) if slots[slot] is None]
    for slot, entry in zip(empty, forks):
        slots[slot] = entry
    rows[start:], tokens[start:], scores[start:] = (list(column) for column in zip(*slots))


def _beam_search(step, prompts, options, pad_id, max_length, decode) -> list[list[Hypothesis]]:
    """Beam search with early stopping (an input is done when it has `num_beams` finished
    hypotheses), scores = mean log-probability per generated token (length penalty 1).

    The rows of inputs that are done leave the batch (their cache rows are dropped), so
    later steps run only live inputs: with early stopping a quarter of the rows were dead
    weight on random-weight seq2seq beams (bench_seq2seq)."""
    beams = options.num_beams
    batch = len(prompts)
    limits = row_limits(prompts, options, max_length)
    stop_ids = set(int(i) for i in options.stop_ids)
    suppressed = np.asarray(options.suppress_ids, np.int64)
    ids, mask = left_pad(prompts, pad_id)
    logits, cache = prompt_step(step, ids, mask)
    # Run each prompt once, then copy its cache for every beam.
    expand = np.repeat(np.arange(batch), beams)
    cache = step.reorder(cache, expand)
    mask = mask[expand]
    logits = logits[expand]
    vocab = logits.shape[-1]
    # The tokens each beam has seen, for the repetition penalty only (without one, no `[rows, V]`
    # mask to gather at every step: 2 MB a step for 64 beams over a 32k vocabulary).
    seen = None
    if options.repetition_penalty != 1.0:
        seen = np.zeros((batch * beams, vocab), dtype=bool)
        for row, prompt in enumerate(prompts):
            seen[row * beams:(row + 1) * beams, list(prompt)] = True
    scores = np.tile(np.array([0.0] + [-np.inf] * (beams - 1)), batch)  # first step: beam 0 only
    sequences: list[list[int]] = [[] for _ in range(batch * beams)]
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    active = np.arange(batch)  # the inputs in the batch; row i * beams + k is beam k of active[i]
    limit_list = limits.tolist()
    for t in range(int(limits.max())):
        logp = log_softmax(suppress(apply_repetition_penalty(logits.astype(np.float64), seen,
                                                             options.repetition_penalty), suppressed))
        candidates = (scores[:, None] + logp).reshape(len(active), beams * vocab)
        # The 2 * beams best candidates of every input at once: best first, lowest id on ties.
        tops = np.argpartition(-candidates, 2 * beams, axis=1)[:, :2 * beams]
        top_scores = np.take_along_axis(candidates, tops, axis=1)
        order = np.lexsort((tops, -top_scores), axis=1)
        tops, top_scores = np.take_along_axis(tops, order, axis=1), np.take_along_axis(top_scores, order, axis=1)
        new_rows, new_tokens, new_scores = [], [], []
        # Python scalars from here on: the loop below reads each candidate once (NumPy scalars and
        # per-row conversions cost more than the work; a step on all inputs at once in NumPy did too).
        for i, (b, input_tops, input_scores) in enumerate(zip(active.tolist(), tops.tolist(), top_scores.tolist())):
            chosen = 0
            for rank, (flat, score) in enumerate(zip(input_tops, input_scores)):
                if not math.isfinite(score):
                    break
                row, token = i * beams + flat // vocab, flat % vocab
                length = len(sequences[row]) + 1  # with the new token (the list is made only if needed)
                stop_id = token in stop_ids
                stopped = stop_id or bool(options.stop and truncate_at_stop(decode(sequences[row] + [token]),
                                                                            options.stop)[1])
                if stopped or length >= limit_list[b]:
                    if rank < beams:  # a finished hypothesis only counts if it beat the live ones
                        kept = list(sequences[row]) if stop_id else sequences[row] + [token]
                        finished[b].append(Hypothesis(kept, score / length))
                    continue
                new_rows.append(row)
                new_tokens.append(token)
                new_scores.append(score)
                chosen += 1
                if chosen == beams:
                    break
            while chosen < beams:  # fewer live candidates than beams
                new_rows.append(i * beams)
                new_tokens.append(pad_id)
                new_scores.append(-np.inf)
                chosen += 1
            _parents_in_place(new_rows, new_tokens, new_scores, i * beams, beams)
            if len(finished[b]) >= beams or t + 1 >= limit_list[b]:
                done[b] = True
        if done.all():
            break
        live = ~done[active]
        if not live.all():  # drop the inputs that are done
            keep = np.repeat(live, beams)
            active = active[live]
            new_rows = [r for r, k in zip(new_rows, keep) if k]
            new_tokens = [x for x, k in zip(new_tokens, keep) if k]
            new_scores = [x for x, k in zip(new_scores, keep) if k]
        sequences = [sequences[r] + [tok] for r, tok in zip(new_rows, new_tokens)]
        rows = np.array(new_rows)
        scores = np.array(new_scores)
        if seen is not None:
            seen = seen[rows]
            seen[np.arange(len(rows)), new_tokens] = True
        cache = step.reorder(cache, rows)
        mask = np.concatenate([mask[rows], np.ones((len(rows), 1), np.int64)], axis=1)
        logits, cache = step(np.array(new_tokens, np.int64)[:, None], mask, cache)
        logits = logits[:, -1]
    results = []
    position = {int(b): i for i, b in enumerate(active)}
    for b in range(batch):
        hyps = finished[b]
        if len(hyps) < options.n_best and b in position:  # not enough finished: add the live beams
            for k in range(beams):
                row = position[b] * beams + k
                if np.isfinite(scores[row]) and sequences[row]:
                    hyps.append(Hypothesis(sequences[row], float(scores[row]) / len(sequences[row])))
        hyps.sort(key=lambda h: -h.score)
        results.append(hyps[:options.n_best])
    return results


class FullRecompute:
    """Wrap a step function to rerun the whole sequence every step with an empty cache.

    The baseline a KV cache is measured against (and a check of it: the tokens must match).
    """

    def __init__(self, step: StepFunction):
        self.inner = step

    def __call__(self, input_ids, attention_mask, cache):
        ids = input_ids if cache is None else np.concatenate([cache, input_ids], axis=1)
        logits, _ = self.inner(ids, attention_mask, None)
        return logits[:, -input_ids.shape[1]:], ids

    def reorder(self, cache, indices):
        return cache[indices]
