"""The decoding loops (export/generate.py) on a hand-made step function: no TensorFlow, no model.

`MarkovStep` gives logits that depend only on the last token (a fixed table), so every
expectation below can be computed by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from kerasllm.errors import UsageError
from kerasllm.export.generate import (DecodingOptions, FullRecompute, filter_top_k, filter_top_p, generate,
                                      log_softmax, softmax)

VOCAB = 12
PAD = 0


class MarkovStep:
    """Step function whose next-token logits are `table[last token]`; counts its calls."""

    def __init__(self, table: np.ndarray):
        self.table = table
        self.calls = 0

    def __call__(self, input_ids, attention_mask, cache):
        self.calls += 1
        assert attention_mask.shape[1] == (0 if cache is None else cache) + input_ids.shape[1]
        return self.table[input_ids], attention_mask.shape[1]

    def reorder(self, cache, indices):
        return cache


def random_table(seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(size=(VOCAB, VOCAB)).astype(np.float32) * scale


def greedy_by_hand(table, prompt, steps):
    out, token = [], prompt[-1]
    for _ in range(steps):
        token = int(np.argmax(table[token]))
        out.append(token)
    return out


def run(table, prompts, **options):
    return generate(MarkovStep(table), prompts, DecodingOptions(**options), pad_id=PAD,
                    decode=lambda ids: "".join(chr(ord("a") + i) for i in ids))


def test_greedy_follows_the_argmax_chain_for_prompts_of_different_lengths():
    table = random_table()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    results = run(table, prompts, max_new_tokens=10)
    for prompt, hyps in zip(prompts, results):
        assert hyps[0].tokens == greedy_by_hand(table, prompt, 10)


def test_top_k_never_picks_outside_the_k_best():
    table = random_table(1, scale=1.0)  # flat enough that sampling spreads over many tokens
    k = 3
    picked = set()
    for seed in range(40):
        hyps = run(table, [[5]], max_new_tokens=1, temperature=1.5, top_k=k, seed=seed)
        picked.add(hyps[0][0].tokens[0])
    best = set(np.argsort(-table[5])[:k].tolist())
    assert picked <= best
    assert len(picked) >= 2  # it does sample, not just take the argmax


def test_top_p_keeps_the_smallest_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(filter_top_p(logits, 0.7))[0]
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    kept = np.isfinite(filter_top_p(logits, 0.81))[0]
    assert kept.tolist() == [True, True, True, False]
    kept = np.isfinite(filter_top_k(logits, 1))[0]
    assert kept.tolist() == [True, False, False, False]


def test_sampling_frequencies_follow_the_temperature_scaled_distribution():
    table = np.zeros((VOCAB, VOCAB), np.float32)
    table[:, 1], table[:, 2] = 2.0, 1.0
    hyps = run(table, [[3]] * 4000, max_new_tokens=1, temperature=1.0, seed=0)
    counts = np.bincount([h[0].tokens[0] for h in hyps], minlength=VOCAB) / 4000
    expected = softmax(table[3][None])[0]
    assert np.abs(counts - expected).max() < 0.03


def test_same_seed_same_samples_and_another_seed_differs():
    table = random_table(2, scale=0.5)
    first = run(table, [[1], [2]], max_new_tokens=20, temperature=1.0, seed=7)
    again = run(table, [[1], [2]], max_new_tokens=20, temperature=1.0, seed=7)
    other = run(table, [[1], [2]], max_new_tokens=20, temperature=1.0, seed=8)
    assert [h[0].tokens for h in first] == [h[0].tokens for h in again]
    assert [h[0].tokens for h in first] != [h[0].tokens for h in other]


def test_repetition_penalty_moves_away_from_seen_tokens():
    table = np.zeros((VOCAB, VOCAB), np.float32)
    table[:, 4], table[:, 6] = 2.0, 1.5  # 4 always wins without a penalty
    assert run(table, [[1]], max_new_tokens=3)[0][0].tokens == [4, 4, 4]
    # 4 is in the prompt: 2.0 / 1.5 = 1.33 < 1.5, so 6 wins; then 6 is seen too (1.0) and 4 (1.33) wins again.
    assert run(table, [[4]], max_new_tokens=3, repetition_penalty=1.5)[0][0].tokens == [6, 4, 4]
    # Beam search applies it too: one beam is greedy, two keep the penalized best first.
    assert run(table, [[4]], max_new_tokens=3, repetition_penalty=1.5, num_beams=1)[0][0].tokens == [6, 4, 4]
    beams = run(table, [[4]], max_new_tokens=3, repetition_penalty=1.5, num_beams=2, n_best=2)[0]
    assert [h.tokens for h in beams] == [[6, 4, 4], [4, 6, 4]]
    assert run(table, [[4]], max_new_tokens=3, num_beams=2)[0][0].tokens == [4, 4, 4]


def test_stop_ids_and_stop_strings_end_each_row_on_its_own():
    table = np.full((VOCAB, VOCAB), -5.0, np.float32)
    for token in range(1, VOCAB - 1):
        table[token, token + 1] = 5.0  # 1 -> 2 -> 3 -> ...
    step = MarkovStep(table)
    options = DecodingOptions(max_new_tokens=8, stop_ids=(7,))
    results = generate(step, [[1], [5]], options, pad_id=PAD)
    assert results[0][0].tokens == [2, 3, 4, 5, 6]  # stopped before 7, which is not included
    assert results[1][0].tokens == [6]
    assert step.calls == 6  # the loop ends when every row is done, not at max_new_tokens
    decode = lambda ids: "".join(chr(ord("a") + i) for i in ids)  # noqa: E731
    options = DecodingOptions(max_new_tokens=8, stop=["de"])
    results = generate(MarkovStep(table), [[1]], options, pad_id=PAD, decode=decode)
    assert decode(results[0][0].tokens) == "cde"  # generation stops once "de" appears
    options = DecodingOptions(max_new_tokens=8, stop=["de"], num_beams=2, n_best=2)
    beams = generate(MarkovStep(table), [[1]], options, pad_id=PAD, decode=decode)[0]
    assert [decode(h.tokens) for h in beams] == ["cde", "cdbcde"]  # beams end at the stop string too


def test_a_stop_id_that_never_fires_changes_nothing():
    # Without stop ids every row runs to max_new_tokens and the loop skips its per-row
    # bookkeeping; with one (that never comes up) it keeps it: same tokens, same draws.
    table = random_table(4, scale=0.7)
    never = VOCAB  # outside the vocabulary
    for options in [dict(), dict(temperature=1.2, top_k=5, seed=3), dict(temperature=0.8, repetition_penalty=1.3,
                                                                        top_p=0.9, seed=11)]:
        prompts = [[1, 2], [3], [4, 5, 6]]
        plain = run(table, prompts, max_new_tokens=12, **options)
        guarded = run(table, prompts, max_new_tokens=12, stop_ids=(never,), **options)
        assert [h[0].tokens for h in plain] == [h[0].tokens for h in guarded]
        assert all(len(h[0].tokens) == 12 for h in plain)


def stopped_by_hand(table, prompt, steps, stop_ids):
    tokens = greedy_by_hand(table, prompt, steps)
    return tokens[:min((tokens.index(s) for s in stop_ids if s in tokens), default=steps)]


def test_greedy_with_stop_ids_ends_rows_apart_and_drops_them_from_the_batch():
    # Greedy decoding with stop ids (seq2seq's EOS) books rows only at the steps where one stops:
    # each row is its argmax chain cut before its first stop id, and finished rows leave the batch.
    rng = np.random.default_rng(5)
    for seed in range(12):
        table = random_table(seed)
        prompts = [[int(t)] for t in rng.integers(1, VOCAB, 9)]
        stop_ids = tuple(int(t) for t in rng.choice(np.arange(1, VOCAB), 1 + seed % 2, replace=False))
        step = MarkovStep(table)
        batches = []
        inner = step.__call__
        step_call = lambda ids, mask, cache: (batches.append(len(ids)), inner(ids, mask, cache))[1]  # noqa: E731
        wrapped = type("Recorded", (), {"__call__": lambda self, *a: step_call(*a),
                                        "reorder": lambda self, cache, rows: cache})()
        results = generate(wrapped, prompts, DecodingOptions(max_new_tokens=10, stop_ids=stop_ids), pad_id=PAD)
        expected = [stopped_by_hand(table, p, 10, stop_ids) for p in prompts]
        assert [h[0].tokens for h in results] == expected
        done_after = sorted(len(e) for e in expected if len(e) < 10)
        if done_after and len(done_after) < len(prompts):  # the batch shrinks after the first stop
            assert batches[done_after[0] + 1] < len(prompts)
        assert batches == sorted(batches, reverse=True)


def test_max_length_caps_each_row():
    table = random_table()
    results = generate(MarkovStep(table), [[1] * 6, [2]], DecodingOptions(max_new_tokens=10), pad_id=PAD,
                       max_length=8)
    assert [len(h[0].tokens) for h in results] == [2, 7]
    with pytest.raises(UsageError, match="leaving no room"):
        generate(MarkovStep(table), [[1] * 8], DecodingOptions(), pad_id=PAD, max_length=8)


def test_beam_search_of_width_one_is_greedy():
    table = random_table(3)
    prompts = [[1, 2], [3], [4, 5, 6]]
    greedy = run(table, prompts, max_new_tokens=12)
    beam = run(table, prompts, max_new_tokens=12, num_beams=1)
    assert [h[0].tokens for h in beam] == [h[0].tokens for h in greedy]


def test_beam_search_finds_the_better_sequence_and_ranks_n_best():
    # Greedy takes 1 (p=0.6) then faces a flat distribution; 2 (p=0.4) leads to a sure token.
    table = np.full((VOCAB, VOCAB), -20.0, np.float32)
    table[0, 1], table[0, 2] = np.log(0.6), np.log(0.4)
    table[1, 3:VOCAB] = 0.0  # 9 equally likely tokens after 1
    table[2, 5] = 10.0
    for token in range(3, VOCAB):
        table[token, token] = 10.0
    greedy = run(table, [[0]], max_new_tokens=2)[0][0]
    beams = run(table, [[0]], max_new_tokens=2, num_beams=3, n_best=3)[0]
    assert greedy.tokens[0] == 1
    assert beams[0].tokens == [2, 5]
    scores = [h.score for h in beams]
    assert scores == sorted(scores, reverse=True) and len({tuple(h.tokens) for h in beams}) == 3
    expected = float(log_softmax(table[0][None])[0, 2] + log_softmax(table[2][None])[0, 5]) / 2
    assert beams[0].score == pytest.approx(expected, abs=1e-6)


def test_full_recompute_wrapper_gives_the_same_tokens():
    table = random_table(4)

    class NoCache(MarkovStep):
        def __call__(self, input_ids, attention_mask, cache):
            assert cache is None and attention_mask.shape[1] == input_ids.shape[1]
            return self.table[input_ids], None

    prompts = [[1, 2, 3], [4]]
    cached = run(table, prompts, max_new_tokens=6)
    full = generate(FullRecompute(NoCache(table)), prompts, DecodingOptions(max_new_tokens=6), pad_id=PAD)
    assert [h[0].tokens for h in full] == [h[0].tokens for h in cached]


@pytest.mark.parametrize("options, message", [
    (dict(top_p=0.0), "top_p"), (dict(top_k=0), "top_k"), (dict(n_best=2), "n_best"),
    (dict(num_beams=2, temperature=1.0), "deterministic"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_k=5), "give a temperature > 0"), (dict(top_p=0.9), "give a temperature > 0"),
    (dict(num_beams=2, top_k=3), "give a temperature > 0"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(UsageError, match=message):
        run(random_table(), [[1]], **options)


@pytest.mark.parametrize("options, message", [
    # NaN passed every range comparison (garbage tokens: the bundle's NaN probabilities picked the pad id)
    (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number, got nan"),
    (dict(top_p=float("inf"), temperature=1.0), "top_p must be a finite number, got inf"),
    # counts that are not integers had been truncated (2 tokens for 2.5) or failed inside NumPy
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer, got 2.5"),
    (dict(top_k=2.5, temperature=1.0), "top_k must be an integer, got 2.5"),
    (dict(seed=1.5, temperature=1.0), "seed must be an integer, got 1.5"),
    (dict(temperature="0.5"), "temperature must be a number, got '0.5'"),
    (dict(max_new_tokens=None), "max_new_tokens must be an integer, got None"),
    # NumPy's generator refuses negative seeds, Keras's samplers those past int64
    (dict(seed=-5, temperature=1.0), r"seed must be in 0\.\.4294967295, got -5"),
    (dict(seed=2**63, temperature=1.0), r"seed must be in 0\.\.4294967295"),
    # a denormal temperature overflows the logits (and reads as 0 where ORT flushes denormals)
    (dict(temperature=1e-320), "temperature must be 0 .greedy. or at least 1e-06"),
])
def test_options_of_the_wrong_type_or_not_finite_are_refused(options, message):
    with pytest.raises(UsageError, match=message):
        DecodingOptions(**options).validate()


def test_numpy_numbers_are_taken_as_python_ones():
    options = DecodingOptions(max_new_tokens=np.int64(3), temperature=np.float32(0.5), top_k=np.int32(2), seed=np.uint8(7))
    options.validate()
    assert (options.max_new_tokens, options.temperature, options.top_k, options.seed) == (3, 0.5, 2, 7)
    assert all(type(v) in (int, float) for v in (options.max_new_tokens, options.temperature, options.top_k))


def test_top_p_sampling_never_leaves_the_nucleus():
    table = np.zeros((VOCAB, VOCAB), np.float32)
    table[:, 1], table[:, 2], table[:, 3] = 3.0, 2.5, 2.0  # the nucleus at p=0.6 is {1, 2}
    probs = softmax(table[0][None])[0]
    assert probs[1] < 0.6 <= probs[1] + probs[2]
    picked = {h[0].tokens[0] for h in run(table, [[0]] * 300, max_new_tokens=1, temperature=1.0, top_p=0.6, seed=0)}
    assert picked == {1, 2}


@pytest.mark.parametrize("value, expected", [("1", "1"), ("0", "0"), ("off", "0"), ("Yes", "1")])
def test_ort_thread_spinning_follows_the_environment(monkeypatch, value, expected):
    from kerasllm.export import runtime

    monkeypatch.setenv("KERASLLM_ORT_SPINNING", value)
    assert runtime._spinning() == expected
    options = runtime._options(3, None)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == expected


def test_ort_thread_spinning_refuses_a_bad_value(monkeypatch):
    from kerasllm.export import runtime

    monkeypatch.setenv("KERASLLM_ORT_SPINNING", "maybe")
    with pytest.raises(UsageError, match="KERASLLM_ORT_SPINNING"):
        runtime._spinning()


def chain_without(table, prompt, steps, suppressed, stop_ids=()):
    """The greedy chain by hand with `suppressed` columns out of reach, cut before a stop id."""
    allowed = table.copy()
    allowed[:, list(suppressed)] = -np.inf
    out, token = [], prompt[-1]
    for _ in range(steps):
        token = int(np.argmax(allowed[token]))
        if token in stop_ids:
            break
        out.append(token)
    return out


def test_suppressed_ids_are_never_chosen_by_any_decoding():
    # The two ids the plain argmax chains visit most are suppressed: every loop (greedy with and
    # without stop ids, sampling, beam n-best) must route around them.
    table = random_table(6)
    prompts = [[t] for t in range(1, VOCAB)]
    visits = np.bincount([t for h in run(table, prompts, max_new_tokens=10) for t in h[0].tokens], minlength=VOCAB)
    suppressed = tuple(int(t) for t in np.argsort(-visits)[:2])
    stop = int(np.argsort(-visits)[2])
    for stop_ids in ((), (stop,)):
        greedy = run(table, prompts, max_new_tokens=10, stop_ids=stop_ids, suppress_ids=suppressed)
        assert [h[0].tokens for h in greedy] == [chain_without(table, p, 10, suppressed, stop_ids) for p in prompts]
        one_beam = run(table, prompts, max_new_tokens=10, stop_ids=stop_ids, suppress_ids=suppressed, num_beams=1)
        assert [h[0].tokens for h in one_beam] == [h[0].tokens for h in greedy]
    sampled = run(table, prompts * 20, max_new_tokens=10, temperature=2.0, seed=0, suppress_ids=suppressed)
    beams = run(table, prompts, max_new_tokens=10, num_beams=4, n_best=4, suppress_ids=suppressed)
    produced = {t for hyps in sampled + beams for h in hyps for t in h.tokens}
    assert produced.isdisjoint(suppressed) and len(produced) >= VOCAB - 4
    assert all(np.isfinite(h.score) for hyps in beams for h in hyps)


def test_a_stop_id_cannot_be_suppressed():
    with pytest.raises(UsageError, match="stop id cannot be suppressed"):
        run(random_table(), [[1]], stop_ids=(3,), suppress_ids=(2, 3))


class ChoosingStep(MarkovStep):
    """A step whose graph makes the greedy choice (`greedy_step`), skipping `suppressed_on_device`."""

    greedy_on_device = True

    def __init__(self, table, suppressed_on_device):
        super().__init__(table)
        self.suppressed_on_device = suppressed_on_device
        self.choices = 0

    def greedy_step(self, input_ids, attention_mask, cache):
        self.choices += 1
        logits, cache = self(input_ids, attention_mask, cache)
        return chain_choice(logits[:, -1], self.suppressed_on_device), cache


def chain_choice(logits, suppressed):
    logits = logits.copy()
    logits[:, list(suppressed)] = -np.inf
    return logits.argmax(-1)[:, None]


@pytest.mark.parametrize("stop_ids", [(), (5,)])
def test_the_graph_chooses_only_where_it_suppresses_what_the_options_do(stop_ids):
    # A graph that suppresses the same ids chooses; one that suppresses none (a bundle exported
    # before suppression) leaves the choice to the host. Same tokens either way.
    table = random_table(7)
    prompts = [[t] for t in range(1, VOCAB)]
    suppressed = (2, 9)
    expected = [chain_without(table, p, 8, suppressed, stop_ids) for p in prompts]
    options = DecodingOptions(max_new_tokens=8, stop_ids=stop_ids, suppress_ids=suppressed)
    for on_device, choices in ((suppressed, True), ((), False)):
        step = ChoosingStep(table, on_device)
        assert [h[0].tokens for h in generate(step, prompts, options, pad_id=PAD)] == expected
        assert (step.choices > 0) == choices


def test_beam_rows_stay_with_their_parents():
    """A beam search step puts each new beam whose parent no earlier beam claimed in its parent's
    row (generate._parents_in_place), so the cache reorder copies only forks; rank order is kept
    among the rest, and nothing is lost."""
    from kerasllm.export.generate import _parents_in_place

    # Input 1's rows are 4..7; new beams in rank order: parents 4, 4, 5, 4 (row 4 forks three ways).
    rows, tokens, scores = [9, 9, 9, 9, 4, 4, 5, 4], [0, 0, 0, 0, 10, 11, 12, 13], [0, 0, 0, 0, -1, -2, -3, -4]
    _parents_in_place(rows, tokens, scores, 4, 4)
    assert rows[:4] == [9] * 4  # an earlier input's beams untouched
    assert rows[4:] == [4, 5, 4, 4] and tokens[4:] == [10, 12, 11, 13] and scores[4:] == [-1, -3, -2, -4]
    moved = sum(row != 4 + slot for slot, row in enumerate(rows[4:]))
    assert moved == 2  # in rank order three rows would have moved (parents 4, 4, 5, 4 in rows 4-7)
    rows, tokens, scores = [7, 6, 5, 4], [1, 2, 3, 4], [-1, -2, -3, -4]  # all parents distinct: none moves
    _parents_in_place(rows, tokens, scores, 4, 4)
    assert rows == [4, 5, 6, 7] and tokens == [4, 3, 2, 1]


class LetterTokenizer:
    """The tokenizer a CausalGenerator needs: pad 0, `<eos>` 11, token i decodes to a letter."""

    pad_id, eos_id = PAD, VOCAB - 1

    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)

    decode_generated = decode  # (whole characters, one a token)


def markov_generator(table):
    from kerasllm.export.decoding_predictor import CausalGenerator

    generator = CausalGenerator(LetterTokenizer(), {"max_length": 16, "vocab_size": VOCAB})
    generator.step = MarkovStep(table)
    return generator


@pytest.mark.parametrize("options, last", [
    (dict(max_new_tokens=2), [2, 3]),  # ends at max_new_tokens
    (dict(max_new_tokens=5, stop=["e"]), [2, 3, 4]),  # ends at the stop string: token 4 is "e"
])
def test_sampled_n_best_scores_count_eos_as_beam_search_does(options, last):
    # After the prompt [1]: <eos> 0.4, 2 0.6; after 2: 3 0.8, <eos> 0.2; after 3: 4; after 4: 5.
    # Three samples can come out: [] (<eos> at once), [2] (then <eos>) and `last`, which ends
    # without <eos>. Each scores the mean log-probability of its tokens, <eos> included where it
    # ended on it, as beam search scores the same hypotheses.
    eos = VOCAB - 1
    table = np.full((VOCAB, VOCAB), -30.0)
    table[1, eos], table[1, 2] = np.log(0.4), np.log(0.6)
    table[2, 3], table[2, eos] = np.log(0.8), np.log(0.2)
    table[3, 4] = table[4, 5] = 0.0
    logp = log_softmax(table)
    expected = {"": float(logp[1, eos]),  # log p(<eos>): not 0.0, not certainty
                "c": float(logp[1, 2] + logp[2, eos]) / 2,
                "cd": float(sum(logp[a, b] for a, b in zip([1] + last, last))) / len(last)}
    generator = markov_generator(table)
    result = generator.predict([[1]], temperature=1.0, n_best=40, seed=0, **options)[0]
    assert set(result["output"]) == set(expected)  # the seed draws all three
    for text, score in zip(result["output"], result["scores"]):
        assert score == pytest.approx(expected[text], abs=1e-6)
    assert result["scores"] == sorted(result["scores"], reverse=True)
    assert result["output"][0] == "cd" and result["output"][-1] == "c"  # <eos> at once ranks below "cd"
    beams = generator.predict([[1]], num_beams=3, n_best=3, **options)[0]
    assert dict(zip(beams["output"], beams["scores"])) == pytest.approx(expected, abs=1e-6)
