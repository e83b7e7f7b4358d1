"""A translate job decodes with the graphs checked when its bundle loaded, on every thread.

`BundleTranslator`'s worker threads open their own sessions lazily, at their first batch: they had
opened the bundle's files as they were by then, unchecked, so a bundle replaced on disk while a job
ran (a redeploy) decoded with the new model's graphs and the loaded one's manifest and tokenizer.
"""

from __future__ import annotations

import pytest

from kerasllm import datasets



@pytest.fixture(scope="module")
def bundle(tiny_seq2seq_bundle):
    """A tiny seq2seq bundle (conftest's: what it outputs does not matter here)."""
    return tiny_seq2seq_bundle


def test_workers_decode_with_the_graphs_checked_at_load_after_the_bundle_is_replaced(bundle, tmp_path):
    import shutil

    from kerasllm.export.translate_predictor import BundleTranslator

    live = tmp_path / "live"
    shutil.copytree(bundle, live)
    one = BundleTranslator(live, device="cpu", threads=1)
    many = BundleTranslator(live, device="cpu")
    many.max_shards = 2  # worker threads, whatever the machine's cores
    texts = [s for s, _ in datasets.number_words_pairs(24, max_value=999, seed=3)]
    batches = [[one.check(t) for t in texts[i:i + 6]] for i in range(0, len(texts), 6)]
    expected = [one.predict(b, max_new_tokens=6) for b in batches]
    for name in ("encoder.onnx", "decoder.onnx"):  # replaced before any worker opened its sessions
        (live / name).write_bytes(b"not the graph that was loaded")
    pieces = []
    shard_loop = many._shard_loop
    many._shard_loop = lambda batch, decoding: pieces.append(len(batch)) or shard_loop(batch, decoding)
    assert list(many.predict_batches(batches, max_new_tokens=6)) == expected
    assert len(pieces) == len(batches)  # every batch ran on a worker thread
