"""Faults found running kerasllm at production scale (QA round 14, area "scale"), pinned small.

4: `train causal-lm` said nothing while it trained a bpe tokenizer and built the token cache (a minute
   for 107 MB); 5: a batch job resumed mid-window batched the rest of that window differently from the
   uninterrupted job (an encoder's scores then differ at float rounding); 6: the summary after `--resume`
   counted the time spent skipping the records already in the output as the new records' work.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time

import pytest

import fake_predictor
from kerasllm import token_cache
from kerasllm.export import batch
from kerasllm.export.predict import PREDICTORS
from kerasllm.export.records import Record


@pytest.fixture(autouse=True)
def fake_predictors(monkeypatch):
    for task in fake_predictor.TASKS:
        monkeypatch.setitem(PREDICTORS, (task, "bundle"), "fake_predictor:load")
    fake_predictor.FakePredictor.batches.clear()


def _texts(n: int) -> str:
    return "".join(f"t{i}" + "x" * ((i * 7919) % 36) + "\n" for i in range(n))


# -- 5: a resumed job batches as the uninterrupted one -------------------------------------------
@pytest.fixture
def batch_dependent_scores(monkeypatch):
    """Classify scores that move with their batch's shape at the 1e-6 level, as ONNX Runtime's do."""
    predict = fake_predictor.FakePredictor.predict

    def predict_by_batch(self, ids_batch, **options):
        results = predict(self, ids_batch, **options)
        shape = len(ids_batch) * max(map(len, ids_batch))
        for result in results:
            result["scores"] = {label: round(p + shape * 1e-6, 6) for label, p in result["scores"].items()}
        return results

    monkeypatch.setattr(fake_predictor.FakePredictor, "predict", predict_by_batch)


@pytest.mark.parametrize("done", [13, 16, 47, 50])  # mid-window, on a boundary, in the last window, all done
def test_a_job_resumed_mid_window_equals_the_uninterrupted_job(run_cli, tmp_path, batch_dependent_scores, done):
    bundle = fake_predictor.make_bundle(tmp_path / "bundle", "classify")
    source = tmp_path / "in.txt"
    source.write_text(_texts(50))
    args = ("classify", bundle, "-i", source, "--window", 8, "--batch-size", 3, "-q")
    full = tmp_path / "full.jsonl"
    assert run_cli(*args, "-o", full).code == 0
    full_batches = list(fake_predictor.FakePredictor.batches)

    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(full.read_bytes().splitlines(keepends=True)[:done]))
    fake_predictor.FakePredictor.batches.clear()
    result = run_cli(*args, "-o", out, "--resume")
    assert result.code == 0, result
    assert out.read_bytes() == full.read_bytes()
    # The window the stopped job was in is predicted again whole (its done records not written):
    # the resumed batches are the uninterrupted job's from that window on, and nothing when all is done.
    resumed = fake_predictor.FakePredictor.batches
    assert sum(map(len, resumed)) == (50 - done // 8 * 8 if done < 50 else 0)
    assert resumed == full_batches[len(full_batches) - len(resumed):]


def test_records_predicted_again_on_resume_are_not_counted_or_reported_again(run_cli, tmp_path):
    """The done records of the replayed window: no second warning for their errors, no tokens counted."""
    bundle = fake_predictor.make_bundle(tmp_path / "bundle", "generate")
    source = tmp_path / "in.txt"
    source.write_text("aa\nboom\nbb\ncc\ndd\n")
    out = tmp_path / "out.jsonl"
    assert run_cli("generate", bundle, "-i", source, "-o", out, "--window", 4).code == 1
    out.write_bytes(b"".join(out.read_bytes().splitlines(keepends=True)[:3]))
    before = out.read_bytes()
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--window", 4, "--resume")
    assert result.code == 1 and "the model failed" not in result.err, result  # reported by the first run
    assert "kerasllm: generate: 2 records (+3 already in the output), 0 errors" in result.err
    assert re.search(r" (\d+) input tokens/s", result.err)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert out.read_bytes().startswith(before) and [row["id"] for row in rows] == ["1", "2", "3", "4", "5"]


def test_skip_resumed_returns_the_start_of_the_stopped_window():
    records = [Record(id=str(i), line=i, fields={"text": "x"}) for i in range(1, 21)]
    for done, window, expected in [(0, 8, []), (5, 8, ["1", "2", "3", "4", "5"]), (8, 8, []),
                                   (11, 8, ["9", "10", "11"]), (7, 1, [])]:
        stream = iter(records)
        point = batch.ResumePoint(done, 0, iter(str(i) for i in range(1, done + 1)))
        assert [r.id for r in batch.skip_resumed(stream, point, "out.jsonl", window)] == expected
        assert next(stream).id == str(done + 1)  # the rest is left to read


# -- 6: the summary of a resumed job ------------------------------------------------------------
def _finished_job(run_cli, tmp_path):
    """`(bundle, input, output, the output's lines)` of a finished 6-record generate job."""
    bundle = fake_predictor.make_bundle(tmp_path / "bundle", "generate")
    source = tmp_path / "in.txt"
    source.write_text(_texts(6))
    out = tmp_path / "out.jsonl"
    assert run_cli("generate", bundle, "-i", source, "-o", out, "-q").code == 0
    return bundle, source, out, out.read_bytes().splitlines(keepends=True)


def test_the_resumed_summary_rates_the_new_records_and_names_a_slow_skip_on_its_own(run_cli, tmp_path,
                                                                                    monkeypatch):
    bundle, source, out, lines = _finished_job(run_cli, tmp_path)

    # Fast: no word about the skip, the summary as before.
    out.write_bytes(b"".join(lines[:5]))
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--resume")
    assert result.code == 0 and "kerasllm: generate: 1 records (+5 already in the output), 0 errors, " in result.err

    # Slow (reading the done ids takes 0.8 s): said on its own, and out of the records' time and rate.
    output_ids = batch._output_ids

    def slow_ids(path):
        for output_id in output_ids(path):
            time.sleep(0.16)
            yield output_id

    monkeypatch.setattr(batch, "_output_ids", slow_ids)
    out.write_bytes(b"".join(lines[:5]))
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--resume")
    assert result.code == 0, result
    found = re.search(r"generate: 1 records \(\+5 already in the output, skipped in (\d+\.\d) s\), 0 errors, "
                      r"(\d+\.\d+) s, (\d+\.\d) records/s", result.err)
    assert found, result.err
    skip, seconds, rate = map(float, found.groups())
    assert skip >= 0.7 and seconds < 0.5 and rate > 2, result.err
    assert out.read_bytes() == b"".join(lines)


def test_a_signal_while_the_done_records_are_skipped_stops_the_job_as_anywhere_else(run_cli, tmp_path,
                                                                                   monkeypatch):
    bundle, source, out, lines = _finished_job(run_cli, tmp_path)
    out.write_bytes(b"".join(lines[:5]))
    before = out.read_bytes()
    output_ids = batch._output_ids

    def interrupted_ids(path):
        for number, output_id in enumerate(output_ids(path)):
            if number == 3:
                os.kill(os.getpid(), signal.SIGINT)
            yield output_id

    monkeypatch.setattr(batch, "_output_ids", interrupted_ids)
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--resume")
    assert result.code == 130 and "interrupted by SIGINT after 5 records; rerun" in result.err, result
    assert "Traceback" not in result.err and out.read_bytes() == before


# -- 4: train causal-lm says what it does on a large corpus --------------------------------------
@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"the cat {i} sat on the mat {i % 7}.\n" for i in range(3000)), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_large_corpus_says_it_trains_the_tokenizer_and_builds_the_cache(corpus, tmp_path, caplog, capsys,
                                                                          monkeypatch, kind):
    size = corpus.stat().st_size
    monkeypatch.setattr(token_cache, "ANNOUNCE_BYTES", size)  # this corpus counts as large
    caplog.set_level(logging.INFO, logger="kerasllm")
    tokenizer = token_cache.train_corpus_tokenizer([corpus], kind, 300, progress=True)
    token_cache.cached_token_split(tmp_path / "tokens", [corpus], tokenizer, 0.1, 16, progress=True)
    megabytes = token_cache.megabytes(size)
    assert caplog.messages == [
        f"causal-lm: training the {kind} tokenizer on {megabytes} of text",
        f"causal-lm: tokenizing {megabytes} into {tmp_path / 'tokens'} (once; reruns and --resume read it)"]
    assert "tokenize" in capsys.readouterr().err  # the bar over the bytes

    # The cache read again: nothing to say.
    caplog.clear()
    token_cache.cached_token_split(tmp_path / "tokens", [corpus], tokenizer, 0.1, 16, progress=True)
    assert caplog.messages == [] and capsys.readouterr().err == ""


def test_a_sampled_corpus_names_the_sample_and_the_whole(corpus, caplog, monkeypatch):
    monkeypatch.setattr(token_cache, "ANNOUNCE_BYTES", 1000)
    monkeypatch.setattr(token_cache, "TOKENIZER_SAMPLE_BYTES", 50_000)  # the corpus is twice that
    monkeypatch.setattr(token_cache, "megabytes", lambda size: f"{size:,} bytes")
    caplog.set_level(logging.INFO, logger="kerasllm")
    token_cache.train_corpus_tokenizer([corpus], "bpe", 300, progress=True)
    assert caplog.messages == [f"causal-lm: training the bpe tokenizer on 50,000 bytes of the "
                               f"{corpus.stat().st_size:,} bytes of text"]


def test_a_small_corpus_or_no_progress_says_nothing(corpus, tmp_path, caplog, capsys, monkeypatch):
    caplog.set_level(logging.INFO, logger="kerasllm")
    tokenizer = token_cache.train_corpus_tokenizer([corpus], "bpe", 300, progress=True)  # under ANNOUNCE_BYTES
    token_cache.cached_token_split(tmp_path / "small", [corpus], tokenizer, 0.1, 16, progress=True)
    monkeypatch.setattr(token_cache, "ANNOUNCE_BYTES", 1, raising=False)
    tokenizer = token_cache.train_corpus_tokenizer([corpus], "bpe", 300)  # --quiet
    token_cache.cached_token_split(tmp_path / "quiet", [corpus], tokenizer, 0.1, 16)
    assert caplog.messages == [] and capsys.readouterr().err == ""


def test_train_causal_lm_says_it_before_its_first_line_and_not_under_quiet(run_cli, corpus, tmp_path, caplog,
                                                                           monkeypatch):
    monkeypatch.setattr(token_cache, "ANNOUNCE_BYTES", 1, raising=False)
    caplog.set_level(logging.INFO, logger="kerasllm")
    args = ["train", "causal-lm", "--data", corpus, "--tokenizer", "bpe", "--vocab-size", "300", "--steps", "2",
            "--eval-interval", "2", "--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--no-jit-compile"]
    assert run_cli(*args, "--out", tmp_path / "run").code == 0
    said = [m for m in caplog.messages if m.startswith("causal-lm:")]
    assert said[0].startswith("causal-lm: training the bpe tokenizer on ")
    assert said[1].startswith("causal-lm: tokenizing ") and f" into {tmp_path / 'run' / 'tokens'} " in said[1]
    assert "parameters" in said[2]
    caplog.clear()
    assert run_cli(*args, "--out", tmp_path / "quiet", "--quiet").code == 0
    assert not [m for m in caplog.messages if m.startswith("causal-lm:")]
