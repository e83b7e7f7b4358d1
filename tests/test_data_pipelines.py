"""Input pipelines at their edges: the corpus's last LM target, over-long encoder sequences, seeded
masked-LM masking, the encoder predictors' options and the tokenizer's decode of bad ids."""

import numpy as np
import pytest

from kerasllm import data
from kerasllm.data import TokenSplit, lm_windows
from kerasllm.errors import DataError


# -- lm_windows -----------------------------------------------------------------------------------
def targets(windows, batches: int) -> np.ndarray:
    return np.concatenate([np.asarray(y).ravel() for _, y in windows.take(batches)])


def test_random_windows_reach_the_last_token_and_start_at_zero():
    """Offsets 0 .. len - seq_len - 1 inclusive, as nanoGPT draws them: with 20 tokens and windows of
    16 + 1 the four offsets 0..3 all occur, so 19 (the last token) is a target and 1 is too."""
    ids = np.arange(20, dtype=np.int32)
    windows = lm_windows(ids, 16, 1, mode="random", seed=0)
    starts = {int(np.asarray(x)[0, 0]) for x, _ in windows.take(80)}
    assert starts == {0, 1, 2, 3}
    assert targets(windows, 50).max() == 19
    for x, y in windows.take(5):  # still next-token pairs
        np.testing.assert_array_equal(np.asarray(x)[:, 1:], np.asarray(y)[:, :-1])


@pytest.mark.parametrize("mode", ["random", "packed"])
def test_exactly_seq_len_plus_one_tokens_make_one_window(mode):
    ids = np.arange(17, dtype=np.int32)
    batches = list(lm_windows(ids, 16, 1, mode=mode, repeat=False))
    assert len(batches) == 1
    x, y = batches[0]
    np.testing.assert_array_equal(np.asarray(x)[0], ids[:16])
    np.testing.assert_array_equal(np.asarray(y)[0], ids[1:])
    with pytest.raises(DataError, match="16 tokens cannot fill one window of 16 \\+ 1"):
        lm_windows(ids[:16], 16, 1, mode=mode)


def test_a_split_of_seq_len_plus_one_tokens_a_part_is_enough():
    TokenSplit(np.arange(17), np.arange(17)).checked(0.5, 16)
    with pytest.raises(DataError, match="validation tokens"):
        TokenSplit(np.arange(17), np.arange(16)).checked(0.5, 16)
    with pytest.raises(DataError, match="training tokens"):
        TokenSplit(np.arange(16), np.arange(17)).checked(0.5, 16)


@pytest.mark.parametrize("mode", ["random", "packed"])
def test_memmap_windows_reach_the_last_token_as_in_memory(mode, tmp_path, monkeypatch):
    ids = np.arange(40, dtype=np.uint16)
    ids.tofile(tmp_path / "ids.bin")
    mapped = np.memmap(tmp_path / "ids.bin", dtype=np.uint16, mode="r")
    in_memory = targets(lm_windows(ids.astype(np.int32), 16, 2, mode, seed=4), 40)
    monkeypatch.setattr(data, "IN_MEMORY_TOKENS", 10)
    from_disk = targets(lm_windows(mapped, 16, 2, mode, seed=4), 40)
    np.testing.assert_array_equal(from_disk, in_memory)
    if mode == "random":
        assert from_disk.max() == 39


# -- encoder task pipelines -----------------------------------------------------------------------
SPECIAL = dict(pad=0, unk=1, bos=2, eos=3, mask=4, sep=5)


def test_sequences_longer_than_the_maximum_are_refused_up_front_naming_the_longest():
    from kerasllm.data_tasks import classification_dataset, masked_lm_dataset, token_classification_dataset

    seqs = [list(range(2, 12)), list(range(2, 82)), list(range(2, 70))]
    message = "sequence 1 has 80 tokens, more than the maximum length 64"
    with pytest.raises(DataError, match=message):
        classification_dataset(seqs, np.array([0, 1, 0]), 2, 0, 64, repeat=False)
    with pytest.raises(DataError, match=message):
        token_classification_dataset(seqs, [[-1] * len(s) for s in seqs], 2, 0, 64, repeat=False)
    with pytest.raises(DataError, match=message):
        masked_lm_dataset(seqs, 2, 90, SPECIAL, 64, repeat=False)
    # max_length itself is allowed, and padded to its bucket
    batches = list(classification_dataset([list(range(2, 66)), [2, 7]], np.array([0, 1]), 1, 0, 64,
                                          shuffle=False, repeat=False))
    assert [b[0]["token_ids"].shape[1] for b in batches] == [64, 16]
