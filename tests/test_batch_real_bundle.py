"""The batch CLI on a real bundle (ONNX Runtime): the same results as the predictor in-process.

The machinery is pinned on a fake predictor in test_batch_infer.py; this checks the joint
with the real decoder predictor: options passed by the agreed names, results equal to
one-prompt-at-a-time generation whatever the batching, and a resumed run byte-identical.
The model is a tiny untrained CausalLM (random weights generate deterministic text).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from kerasllm.export.batch import TASK_DEFAULTS


@pytest.fixture(scope="module")
def real_model_dir(tmp_path_factory, corpus_file) -> Path:
    import keras

    from kerasllm import CausalLM, DecoderConfig
    from kerasllm.data import read_corpus
    from kerasllm.tokenizers import TextTokenizer
    from kerasllm.training import write_json_atomic

    keras.utils.set_random_seed(0)
    tokenizer = TextTokenizer.train(read_corpus(corpus_file), kind="char")
    config = DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_length=64)
    model = CausalLM(config)
    model(np.zeros((1, 4), np.int32))  # build the weights
    model_dir = tmp_path_factory.mktemp("batch_lm")
    model.save(model_dir / "model.keras")
    tokenizer.save(model_dir)
    write_json_atomic(model_dir / "config.json", {"task": "causal-lm", "model": config.to_dict(), "train": {}})
    return model_dir


@pytest.fixture(scope="module")
def real_bundle(tmp_path_factory, real_model_dir) -> Path:
    from kerasllm.cli import main

    out = tmp_path_factory.mktemp("batch_bundle") / "bundle"
    try:
        main(["export", str(real_model_dir), "--out", str(out), "--no-optimize"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return out


def test_cli_on_a_real_bundle_equals_generation_one_prompt_at_a_time_and_resumes(run_cli, real_bundle, tmp_path,
                                                                                   corpus_file):
    from kerasllm.export.predict import GENERATED_TOKENS, load_predictor

    words = corpus_file.read_text(encoding="utf-8").split()
    prompts = [" ".join(words[i * 7: i * 7 + 1 + (i * 5) % 9]) for i in range(30)]  # 1..9 words
    rows = [{"key": f"p{i}", "text": p} for i, p in enumerate(prompts)]
    rows[5] = {"key": "empty", "text": " "}
    rows[9] = {"key": "long", "text": "x" * 200}  # the model allows 63 tokens
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = ["generate", real_bundle, "-i", source, "--id-field", "key", "--max-new-tokens", 8, "-q"]
    result = run_cli(*args, "-o", out, "--batch-size", 4)
    assert result.code == 1, result  # two records failed
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [g["id"] for g in got] == [r["key"] for r in rows]
    assert got[5]["error"] == "line 6: empty prompt"
    assert got[9]["error"].startswith("line 10: prompt of 200 tokens leaves no room for a new token within the "
                                      "model's max_length 64 (at most 63")

    assert len({g.get("output") for g in got}) >= 5  # the random model does not emit one string for all

    predictor = load_predictor("generate", real_bundle, device="cpu")
    options = {**TASK_DEFAULTS["generate"], "max_new_tokens": 8}
    for row, g in zip(rows, got):
        if "error" not in g:
            alone = predictor.predict([predictor.check(row["text"])], **options)[0]
            assert 0 < alone.pop(GENERATED_TOKENS) <= 8  # counted for the summary, never written
            assert g == {"id": row["key"], **alone}, row

    unbucketed = tmp_path / "unbucketed.jsonl"
    loud = run_cli(*[a for a in args if a != "-q"], "-o", unbucketed, "--no-bucket", "--batch-size", 7)
    assert loud.code == 1
    assert unbucketed.read_bytes() == out.read_bytes()
    assert re.search(r"30 records, 2 errors, .* [\d.]+ generated tokens/s", loud.err), loud.err

    resumed = tmp_path / "resumed.jsonl"
    lines = out.read_bytes().splitlines(keepends=True)
    resumed.write_bytes(b"".join(lines[:13]) + lines[13][:10])  # 13 whole lines and a torn one
    assert run_cli(*args, "-o", resumed, "--resume", "--batch-size", 4).code == 1
    assert resumed.read_bytes() == out.read_bytes()


def test_a_prompt_near_max_length_leaves_the_other_rows_their_new_tokens(real_model_dir, real_bundle):
    """Each row gets max_new_tokens capped by its own room under max_length (64 here), on the
    bundle and on the model dir alike, whatever the batch (the model dir once capped every row
    at the longest prompt's room)."""
    from kerasllm.export.predict import GENERATED_TOKENS, load_predictor

    bundle, model_dir = load_predictor("generate", real_bundle), load_predictor("generate", real_model_dir)
    short, long = bundle.check("the cat"), bundle.check("a" * 60)  # 60 tokens: room for 4
    for predictor in (bundle, model_dir):
        together = predictor.predict([short, long], max_new_tokens=12)
        alone = [predictor.predict([short], max_new_tokens=12)[0], predictor.predict([long], max_new_tokens=12)[0]]
        assert [r[GENERATED_TOKENS] for r in together] == [12, 4]
        assert together == alone
    assert model_dir.predict([short, long], max_new_tokens=12) == bundle.predict([short, long], max_new_tokens=12)


def test_a_denormal_temperature_is_refused_by_the_bundle_as_by_the_model_dir(real_model_dir, real_bundle):
    """The bundle checked its options where ONNX Runtime's denormals are flushed, so 1e-320 read as 0
    there (greedy, or a top_p refusal naming the wrong option) while Keras sampled from NaNs."""
    from kerasllm.errors import UsageError
    from kerasllm.export.predict import load_predictor

    for source in (real_bundle, real_model_dir):
        predictor = load_predictor("generate", source)
        with pytest.raises(UsageError, match="temperature must be 0 .greedy. or at least 1e-06, got 1e-320"):
            predictor.predict([predictor.check("the cat")], max_new_tokens=2, temperature=1e-320, top_p=0.9)


def test_a_huge_prompt_is_refused_or_cut_without_tokenizing_it_whole(real_model_dir, real_bundle):
    """A 10 MB prompt had been tokenized whole (86 s, 4 GB) before it became an error record or was cut."""
    from kerasllm.export.predict import RecordError, load_predictor

    huge = "the cat sat on the mat. " * 400_000
    for source in (real_bundle, real_model_dir):
        predictor = load_predictor("generate", source)
        with pytest.raises(RecordError, match="prompt of more than 63 tokens leaves no room"):
            predictor.check(huge)
        tail = huge[-2000:]
        assert predictor.check(huge, truncate="left") == predictor.tokenizer.encode(tail)[-63:]
        assert predictor.check(huge, truncate="right") == predictor.tokenizer.encode(huge[:2000])[:63]


def test_predict_takes_an_empty_batch_and_refuses_ids_outside_the_vocabulary(real_model_dir, real_bundle):
    """An empty batch had raised "every prompt needs at least one token"; a negative id wrapped to the
    vocabulary's end in the bundle's Gather and one past it failed inside ONNX Runtime."""
    from kerasllm.errors import UsageError
    from kerasllm.export.predict import load_predictor

    for source in (real_bundle, real_model_dir):
        predictor = load_predictor("generate", source)
        vocab = int(predictor.config["vocab_size"])
        assert predictor.predict([], max_new_tokens=2) == []
        for bad in (-1, vocab):
            with pytest.raises(UsageError, match=f"prompt 1: token id {bad} is outside the vocabulary 0..{vocab - 1}"):
                predictor.predict([[7, 8], [7, bad]], max_new_tokens=2)
        with pytest.raises(UsageError, match="prompt 0: token ids must be integers"):
            predictor.predict([[7.0, 8.0]], max_new_tokens=2)


def test_an_unknown_truncate_mode_is_refused(real_bundle):
    """check(truncate="middle") had been read as "error"."""
    from kerasllm.errors import UsageError
    from kerasllm.export.predict import load_predictor

    with pytest.raises(UsageError, match="truncate must be one of error, left, right, got 'middle'"):
        load_predictor("generate", real_bundle).check("the cat", truncate="middle")


def test_a_bundles_tokenizer_with_ids_the_model_lacks_is_refused_at_load(real_bundle, tmp_path):
    """Swapped in with its hash updated, it loaded, wrote lines, then stopped at the first record
    holding an id past the model's vocabulary."""
    import shutil

    from kerasllm.errors import KerasLLMError
    from kerasllm.export.bundle import sha256
    from kerasllm.export.predict import load_predictor
    from kerasllm.tokenizers import TextTokenizer

    copy = tmp_path / "bundle"
    shutil.copytree(real_bundle, copy)
    TextTokenizer.train([" ".join(f"word{i * 7919}" for i in range(5000))], kind="bpe", vocab_size=600).save(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = sha256(copy / "tokenizer.json")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KerasLLMError, match=r"tokenizer\.json: \d+ token ids, more than the model's vocabulary of"):
        load_predictor("generate", copy)


def test_keras_generation_takes_numpy_numbers(real_model_dir):
    """The options were checked on a copy and the originals passed on: np.int64 seeds failed in Keras."""
    from kerasllm.modeldir import load_model_dir

    model, _, _ = load_model_dir(real_model_dir)
    seeded = model.generate([[7, 8, 9]], max_new_tokens=np.int64(3), temperature=np.float32(1.0),
                            top_k=np.int64(5), seed=np.int64(3))
    again = model.generate([[7, 8, 9]], max_new_tokens=3, temperature=1.0, top_k=5, seed=3)
    np.testing.assert_array_equal(seeded, again)


@pytest.mark.parametrize("source", ["bundle", "model dir"])
def test_a_seeded_job_draws_afresh_in_every_batch_and_again_the_same(run_cli, real_model_dir, real_bundle, tmp_path,
                                                                     source):
    """One prompt 48 times with --seed: each batch had restarted the seed's random stream, so record
    k and record k + batch size were the same sample (1000 records: 31-39 distinct). Each batch now
    draws from a seed of its own (batch.batch_seed): the samples differ across batches, and the
    same job gives the same file again."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the\n" * 48, encoding="utf-8")
    path = real_bundle if source == "bundle" else real_model_dir
    args = ["generate", path, "-i", prompts, "--max-new-tokens", 6, "--temperature", 1.5, "--seed", 3,
            "--batch-size", 8, "-q"]
    assert run_cli(*args, "-o", tmp_path / "a.jsonl").code == 0
    assert run_cli(*args, "-o", tmp_path / "b.jsonl").code == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    outputs = [json.loads(line)["output"] for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    repeats = sum(outputs[k] == outputs[k + 8] for k in range(40))
    assert repeats < 10, outputs  # random samples of 6 characters rarely agree; the old job: 40 of 40
    assert len(set(outputs)) > 24


def test_keras_top_k_with_top_p_takes_the_nucleus_of_the_top_k_renormalised(real_model_dir):
    """The bundle's rule (and Hugging Face's): top-k, renormalise, then the nucleus. keras-hub's
    TopPSampler cut the top k's unnormalised cumulative sum, which kept more tokens: with p just
    under the renormalised top token's probability, the rule keeps that token alone, keras-hub had
    also sampled the second. One compiled function serves every seed."""
    from kerasllm.export.generate import filter_top_k, filter_top_p
    from kerasllm.modeldir import load_model_dir

    model, _, _ = load_model_dir(real_model_dir)
    prompt = [7, 8, 9]
    logits = np.asarray(model(np.array([prompt], np.int32)))[0, -1].astype(np.float64)
    probs = np.exp(logits - logits.max())
    top3 = np.sort(probs / probs.sum())[-3:]
    p = 0.99 * top3[-1] / top3.sum()  # the renormalised top-3's first share, just under
    assert top3[-1] < p  # unnormalised, the first token alone stays under p: keras-hub kept the second too
    kept = np.isfinite(filter_top_p(filter_top_k(logits[None], 3), p))[0]
    assert kept.sum() == 1
    samples = [model.generate([prompt] * 64, max_new_tokens=1, temperature=1.0, top_k=3, top_p=p, seed=s)[:, 0]
               for s in range(3)]
    assert set(np.concatenate(samples).tolist()) == {int(np.argmax(logits))}
    assert sum(key[3] for key in model._generate_functions) == 1  # seeds 0, 1, 2: one seeded function


def test_a_bundle_in_a_directory_whose_name_is_not_utf8_serves(real_bundle, tmp_path):
    """ONNX Runtime takes paths as UTF-8 text: a bundle under such a name had failed to load
    ("incompatible constructor arguments", reported as a broken graph)."""
    import os
    import shutil

    from kerasllm.export.predict import load_predictor

    moved = tmp_path / os.fsdecode(b"bad\xffdir") / "bundle"
    shutil.copytree(real_bundle, moved)
    options = {**TASK_DEFAULTS["generate"], "max_new_tokens": 4}
    here, there = (load_predictor("generate", path, device="cpu") for path in (real_bundle, moved))
    prompt = [here.check("the")]
    assert there.predict(prompt, **options) == here.predict(prompt, **options)


def test_a_quiet_job_that_succeeds_prints_nothing(real_bundle, tmp_path):
    """`-q` had still printed "kerasllm: ONNX Runtime ... on CPUExecutionProvider (CPU requested)" on every
    run (cron mails any stderr). Its own process: the line is said once per process."""
    import subprocess
    import sys

    (tmp_path / "in.txt").write_text("the cat\na dog\n")
    args = ["generate", str(real_bundle), "-i", "in.txt", "-o", "out.jsonl", "--max-new-tokens", "4"]
    run = [sys.executable, "-c", "import sys; from kerasllm.cli import main; main(sys.argv[1:])"]
    quiet = subprocess.run([*run, *args, "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", ""), quiet
    loud = subprocess.run([*run, *args, "--overwrite"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert loud.returncode == 0 and "on CPUExecutionProvider (CPU requested)" in loud.stderr, loud
