"""The causal-LM token cache (kerasllm.token_cache): streamed blocks, the cache's life, memmap windows."""

import numpy as np
import pytest

from kerasllm import data, token_cache
from kerasllm.data import TokenSplit, lm_windows, read_corpus, text_blocks, tokenize_corpus
from kerasllm.errors import DataError
from kerasllm.token_cache import cached_token_split, tokenizer_sample, train_corpus_tokenizer
from kerasllm.tokenizers import TextTokenizer


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 KB instead of 16 MB: a test file of a few hundred KB is read in many."""
    monkeypatch.setattr(data, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(token_cache, "ENCODE_PIECE_BYTES", 4096)
    monkeypatch.setattr(token_cache, "ENCODE_PIECES", 3)


@pytest.fixture
def two_files(tmp_path, corpus_file):
    """Two documents: the story corpus, and lines of indented text with a line of 10k characters."""
    second = tmp_path / "b.txt"
    long_line = "".join(f"word{i} " for i in range(1500))
    second.write_text("".join(f"  indented {i}\n\n" if i % 100 else long_line + "\n" for i in range(2000)),
                      encoding="utf-8")
    return [corpus_file, second]


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "unigram"])
def test_blocks_give_the_ids_of_whole_files(kind, two_files, tmp_path, small_blocks):
    tokenizer = TextTokenizer.train(read_corpus(two_files), kind=kind, vocab_size=300)
    whole = TokenSplit.from_ids(tokenize_corpus(read_corpus(two_files), tokenizer), 0.1, 16)
    assert len(list(text_blocks(two_files[0]))) > 10  # really streamed
    cached = cached_token_split(tmp_path / "tokens", two_files, tokenizer, 0.1, 16)
    assert cached.train.dtype == np.uint16 and isinstance(cached.train, np.memmap)
    np.testing.assert_array_equal(cached.train, whole.train)
    np.testing.assert_array_equal(cached.validation, whole.validation)


def test_the_char_vocabulary_of_a_streamed_corpus_is_that_of_whole_files(two_files, small_blocks):
    streamed = train_corpus_tokenizer(two_files, "char", 0)
    assert streamed.to_json() == TextTokenizer.train(read_corpus(two_files), kind="char").to_json()


def test_a_bad_byte_deep_in_a_streamed_file_names_its_line_and_column(tmp_path, small_blocks):
    path = tmp_path / "deep.txt"
    lines = [f"line {i} of plain text\n".encode() for i in range(3000)]
    lines[2345] = b"caf\xe9 au lait\n"
    lines[2800] = b"x" * 9000 + b"\xff\n"  # in a line longer than two blocks
    for damaged, where in ((b"".join(lines[:2800]), "line 2346, column 4"),
                           (b"".join(lines[:2345] + lines[2346:]), "line 2800, column 9001")):
        path.write_bytes(damaged)
        with pytest.raises(DataError, match=f"deep.txt: {where}: not valid UTF-8"):
            list(text_blocks(path))


def test_a_leading_byte_order_mark_is_not_text(tmp_path, small_blocks):
    """Excel's and Notepad's UTF-8 files start with a BOM: a corpus learnt it as a character."""
    marked = tmp_path / "marked.txt"
    marked.write_bytes(b"\xef\xbb\xbfhello there\nsecond line \xc3\xa9\xff\n")
    with pytest.raises(DataError, match=r"line 2, column 15"):  # columns count from the text's start
        list(text_blocks(marked))
    marked.write_bytes(b"\xef\xbb\xbfhello there\nsecond line\n")
    assert "".join(text_blocks(marked)) == "hello there\nsecond line\n"
    assert "".join(tokenizer_sample([marked], budget=8)).startswith("hello")  # the sampled path too
    assert train_corpus_tokenizer([marked], "char", 0).token_to_id("\ufeff") is None
    only_mark = tmp_path / "only.txt"
    only_mark.write_bytes(b"\xef\xbb\xbf\n")
    with pytest.raises(DataError, match="file is empty"):
        list(text_blocks(only_mark))


def test_empty_files_are_refused_after_streaming(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text(" \n\n\t\n")
    with pytest.raises(DataError, match="blank.txt: file is empty"):
        list(text_blocks(path))


def test_the_cache_is_reused_rebuilt_when_torn_and_invalidated_by_a_change(tmp_path, corpus_file, monkeypatch):
    source = tmp_path / "corpus.txt"
    source.write_bytes(corpus_file.read_bytes())
    tokenizer = train_corpus_tokenizer([source], "char", 0)
    directory = tmp_path / "tokens"
    first = cached_token_split(directory, [source], tokenizer, 0.1, 16)
    stamps = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert sorted(stamps) == ["tokens.json", "train.bin", "validation.bin"]

    builds = []
    build = token_cache.build_cache
    monkeypatch.setattr(token_cache, "build_cache", lambda *a: builds.append(1) or build(*a))
    again = cached_token_split(directory, [source], tokenizer, 0.1, 16)
    assert not builds and {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == stamps
    np.testing.assert_array_equal(again.train, first.train)

    (directory / "tokens.json").unlink()  # torn: killed before the cache was finished
    np.testing.assert_array_equal(cached_token_split(directory, [source], tokenizer, 0.1, 16).train, first.train)
    with open(directory / "train.bin", "r+b") as torn:
        torn.truncate(100)
    np.testing.assert_array_equal(cached_token_split(directory, [source], tokenizer, 0.1, 16).train, first.train)
    assert len(builds) == 2

    with open(source, "a", encoding="utf-8") as changed:
        changed.write("One more line.\n")
    grown = cached_token_split(directory, [source], tokenizer, 0.1, 16)
    assert len(builds) == 3 and len(grown.train) + len(grown.validation) == len(first.train) + len(first.validation) + 15
    cached_token_split(directory, [source], tokenizer, 0.2, 16)  # another split
    cached_token_split(directory, [source], TextTokenizer.train(["other text"] * 9, kind="char"), 0.2, 16)
    assert len(builds) == 5


def test_the_tokenizer_sample_is_bounded_and_spread_over_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, "SAMPLE_PIECE_BYTES", 1000)
    files = []
    for name, size in (("a", 20000), ("b", 60000)):
        files.append(tmp_path / f"{name}.txt")
        files[-1].write_text("".join(f"{name}{i:06d}\n" for i in range(size // 8)))
    sample = list(tokenizer_sample(files, budget=8000))
    assert sum(len(text) for text in sample) <= 8000
    assert sum(text.startswith("a") for text in sample) == 2 and sum(text.startswith("b") for text in sample) == 6
    assert sample[-1].rstrip().endswith("b007496") or int(sample[-1].split()[-1][1:]) > 6000  # reaches the end
    assert "".join(tokenizer_sample(files, budget=10**6)) == "".join(p.read_text() for p in files)


@pytest.mark.parametrize("mode, shards", [("random", 1), ("packed", 1), ("random", 2), ("packed", 3)])
def test_memmap_windows_equal_in_memory_windows(mode, shards, tmp_path, monkeypatch):
    ids = np.random.default_rng(0).integers(0, 60000, 5003).astype(np.uint16)
    ids.tofile(tmp_path / "ids.bin")
    mapped = np.memmap(tmp_path / "ids.bin", dtype=np.uint16, mode="r")

    def batches(tokens, shard):
        windows = lm_windows(tokens, 16, 4, mode, seed=7, shard_index=shard, num_shards=shards)
        return [(x.numpy(), y.numpy()) for x, y in windows.take(30)]

    for shard in range(shards):
        in_memory = batches(ids.astype(np.int32), shard)
        monkeypatch.setattr(data, "IN_MEMORY_TOKENS", 1000)
        from_disk = batches(mapped, shard)
        monkeypatch.undo()
        assert len(from_disk) == 30
        for (x, y), (mx, my) in zip(in_memory, from_disk):
            assert mx.dtype == np.int32 and mx.shape == (4, 16)
            np.testing.assert_array_equal(mx, x)
            np.testing.assert_array_equal(my, y)
