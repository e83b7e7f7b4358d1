"""kerasllm.export's predictors served from Python (a long-running service, not the batch CLI).

Tiny random models, exported once per test session (`build_once`): what they output does not
matter here, only that the serving API takes and refuses requests as it promises.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kerasllm.errors import UsageError
from kerasllm.export.predict import RecordError, load_predictor

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,"


def _export_random(root: Path, task: str, config, model, **run_fields) -> None:
    """`model` laid out as `kerasllm train TASK` does (a char tokenizer over CHARS), exported to root/bundle."""
    from kerasllm.export.exporter import ExportOptions, export_model_dir
    from kerasllm.tokenizers import TextTokenizer
    from kerasllm.training import save_model_atomic, write_json_atomic

    run = root / "run"
    run.mkdir()
    TextTokenizer.train([CHARS], kind="char").save(run)
    write_json_atomic(run / "config.json", {"task": task, "model": config.to_dict(), "train": {},
                                                **run_fields})
    save_model_atomic(model, run)
    export_model_dir(run, root / "bundle", ExportOptions(optimize=False), log=lambda message: None)


@pytest.fixture(scope="module")
def lm_bundle(build_once) -> Path:
    """A tiny random causal LM's bundle."""

    def build(root: Path) -> None:
        import keras

        from kerasllm import CausalLM, DecoderConfig
        from kerasllm.tokenizers import TextTokenizer

        keras.utils.set_random_seed(0)
        vocab = TextTokenizer.train([CHARS], kind="char").vocab_size
        config = DecoderConfig.preset("tiny", vocab_size=vocab, max_length=32)
        model = CausalLM(config)
        model(np.zeros((1, 4), np.int32))  # builds the weights
        _export_random(root, "causal-lm", config, model)

    return build_once("serving-api-lm", build) / "bundle"


@pytest.fixture(scope="module")
def clf_bundle(build_once) -> Path:
    """A tiny random three-label classifier's bundle."""

    def build(root: Path) -> None:
        import keras

        from kerasllm import EncoderConfig, TextClassifier
        from kerasllm.tokenizers import TextTokenizer

        keras.utils.set_random_seed(0)
        vocab = TextTokenizer.train([CHARS], kind="char").vocab_size
        config = EncoderConfig.preset("tiny", vocab_size=vocab, num_labels=3, max_length=32)
        _export_random(root, "classifier", config, TextClassifier(config), labels=["neg", "neu", "pos"])

    return build_once("serving-api-clf", build) / "bundle"


@pytest.fixture(scope="module")
def predictors(lm_bundle, clf_bundle, tiny_seq2seq_bundle):
    """One predictor of each kind, by task."""
    return {"generate": load_predictor("generate", lm_bundle, device="cpu"),
            "classify": load_predictor("classify", clf_bundle, device="cpu"),
            "embed": load_predictor("embed", clf_bundle, device="cpu"),
            "translate": load_predictor("translate", tiny_seq2seq_bundle, device="cpu")}


# -- check(): what a request's text may be -----------------------------------------------------
@pytest.mark.parametrize("task", ["generate", "classify", "embed", "translate"])
def test_check_refuses_a_lone_surrogate_as_the_record_reader_does(predictors, task):
    """A JSON request body can hold half of a surrogate pair: the tokenizer had raised "TextInputSequence
    must be str" (it is a str); now the record reader's words, as the CLI gives them for the same text."""
    text = json.loads('"ab\\udcff cd"')
    with pytest.raises(RecordError, match=r"holds half of a surrogate pair \(\\udcff at character 3\), "
                                          r"which is not text"):
        predictors[task].check(text)


@pytest.mark.parametrize("task", ["generate", "classify", "embed", "translate"])
@pytest.mark.parametrize("value, kind", [(b"ab", "bytes"), (123, "int"), (["ab", "cd"], "list"), (None, "NoneType")])
def test_check_names_the_type_of_a_text_that_is_not_a_str(predictors, task, value, kind):
    """bytes, a number or a list had failed inside check() (TypeError, AttributeError 'no attribute strip')."""
    with pytest.raises(UsageError, match=rf"must be a str, got {kind}$"):
        predictors[task].check(value)


def test_tag_check_takes_a_str_or_a_list_of_str_words(predictors, tmp_path):
    """The tagger's check (its tokenizer the classifier's here: only check runs) had taken any
    iterable apart as words, and passed a word with half a surrogate pair to the tokenizer."""
    from kerasllm.export.encoder_predictor import TagPredictor

    classify = predictors["classify"]
    tagger = TagPredictor("tag", "token-classifier", classify.tokenizer, classify.config, classify.labels,
                          run=None, source=tmp_path)
    assert tagger.check("ab cd").words == tagger.check(["ab", "cd"]).words == tagger.check(("ab", "cd")).words
    with pytest.raises(RecordError, match=r"^word holds half of a surrogate pair \(\\udcff at character 2\)"):
        tagger.check(["ab", json.loads('"c\\udcff"')])
    for value, kind in ((b"ab cd", "bytes"), ({"ab": 1}, "dict"), (5, "int")):
        with pytest.raises(UsageError, match=f"^text must be a str or a list of words, got {kind}$"):
            tagger.check(value)
    with pytest.raises(UsageError, match="^word must be a str, got int$"):
        tagger.check(["ab", 5])


# -- options: checked, by type, before any decoding ------------------------------------------------
@pytest.fixture
def no_decoding(monkeypatch):
    """`no_decoding(predictor)`: the predictor fails the test if it starts to decode."""

    def forbid(predictor):
        def decode(*args, **kwargs):
            raise AssertionError("decoding started")

        for name in ("_generate", "_generate_batches", "_samples", "outputs"):
            if hasattr(predictor, name):
                monkeypatch.setattr(predictor, name, decode)
        return predictor

    return forbid


@pytest.mark.parametrize("value", ["no", "false", 1, None])
def test_embed_normalize_must_be_a_bool(predictors, no_decoding, value):
    """normalize was used for its truth value: "no" (a query parameter's string) normalized."""
    embed = predictors["embed"]
    ids = [embed.check("a text")]
    with pytest.raises(UsageError, match=rf"normalize must be True or False, got {value!r}"):
        no_decoding(embed).predict(ids, normalize=value)


def test_embed_normalize_takes_a_bool(predictors):
    embed = predictors["embed"]
    ids = [embed.check("a text")]
    for value in (True, np.True_):
        assert np.linalg.norm(embed.predict(ids, normalize=value)[0]["embedding"]) == pytest.approx(1, abs=1e-5)
    assert np.linalg.norm(embed.predict(ids, normalize=False)[0]["embedding"]) != pytest.approx(1, abs=1e-3)


@pytest.mark.parametrize("task", ["generate", "translate"])
@pytest.mark.parametrize("stop, message", [
    (5, "stop must be a string or a list of strings, got 5"),
    ({"a": 1}, "stop must be a string or a list of strings"),
    ([None], "stop strings must be non-empty strings, got None"),  # had been accepted and ignored
    ([3], "stop strings must be non-empty strings, got 3"),  # had failed once the whole batch was decoded
    (["a", ""], "stop strings must be non-empty strings, got ''"),
    ("", "stop strings must be non-empty strings, got ''"),
])
def test_stop_must_be_a_string_or_strings_refused_before_decoding(predictors, no_decoding, task, stop, message):
    predictor = predictors[task]
    ids = [predictor.check("four hundred")]
    with pytest.raises(UsageError, match=f"^{message}"):
        no_decoding(predictor).predict(ids, max_new_tokens=2, stop=stop)


@pytest.mark.parametrize("task", ["generate", "translate"])
def test_a_stop_string_and_a_list_of_one_stop_alike(predictors, task):
    predictor = predictors[task]
    ids = [predictor.check("four hundred")]
    one = predictor.predict(ids, max_new_tokens=6, stop="e")
    assert one == predictor.predict(ids, max_new_tokens=6, stop=["e"]) == predictor.predict(ids, max_new_tokens=6,
                                                                                             stop=("e",))


@pytest.mark.parametrize("task", ["generate", "translate"])
def test_num_beams_past_the_vocabulary_is_refused_before_any_allocation(predictors, no_decoding, task):
    """One request of num_beams=1000000 had the serving process allocate batch x num_beams cache rows
    (OOM-killed at 24 GB on a 49-token model)."""
    predictor = predictors[task]
    vocab = predictor.target_vocab if task == "translate" else int(predictor.config["vocab_size"])
    ids = [predictor.check("four hundred")]
    assert len(predictor.predict(ids, max_new_tokens=1, num_beams=vocab, n_best=2)[0]["output"]) == 2
    with pytest.raises(UsageError, match=f"num_beams must be at most the model's vocabulary of {vocab} tokens, "
                                         "got 1000000"):
        no_decoding(predictor).predict(ids, max_new_tokens=1, num_beams=1_000_000)


@pytest.mark.parametrize("command, beams, hint", [
    ("generate", ["--num-beams", "4"], "--num-beams, --batch-size, --max-batch-tokens or --window"),
    ("translate", ["--num-beams=8"], "--num-beams, --batch-size, --max-batch-tokens or --window"),
    ("generate", ["--num-beams", "1"], "--batch-size, --max-batch-tokens or --window"),
    ("generate", [], "--batch-size, --max-batch-tokens or --window"),
])
def test_the_out_of_memory_line_names_num_beams_when_beams_are_in_use(run_cli, monkeypatch, tmp_path, command,
                                                                      beams, hint):
    """`--num-beams 100000 --max-new-tokens 2` on one record had been told to lower --batch-size,
    --max-batch-tokens or --window, none of which can help a single record."""
    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 2.29 GiB for an array")

    monkeypatch.setattr("kerasllm.cli.infer.run_job", out_of_memory)
    inputs = tmp_path / "in.txt"
    inputs.write_text("a prompt\n")
    result = run_cli(command, tmp_path, "-i", inputs, "-q", *beams)
    assert result.code == 1, result
    assert result.err.splitlines() == [f"kerasllm: error: out of memory (Unable to allocate 2.29 GiB for an array): "
                                       f"lower {hint}"]


# -- the translator's worker threads in a service's life: forks, the main thread returning ------------
def _serve(script: str, bundle: Path) -> list:
    """Run `script` (its `t`: a translator on `bundle` with two worker threads, whatever the cores;
    `batch`: a batch they share) in a fresh interpreter, as a service would (no TensorFlow loaded):
    the JSON lines it printed."""
    import subprocess
    import sys
    import textwrap

    prelude = textwrap.dedent(f"""
        import json, os, sys, threading
        from kerasllm.export.predict import load_predictor
        t = load_predictor("translate", {str(bundle)!r}, device="cpu")
        t.max_shards = 2
        batch = [t.check(text) for text in ("four hundred and two", "nine", "seventy one", "six hundred")] * 2
        def say(value):
            print(json.dumps(value), flush=True)
        """)
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_forked_child_translates_with_workers_of_its_own(tiny_seq2seq_bundle):
    """A pre-forking server (gunicorn --preload): the child had inherited the parent's pool but none
    of its threads, and every translate that used the workers waited for them forever."""
    parent, *children = _serve("""
        import multiprocessing
        before = t.predict(batch, max_new_tokens=8, num_beams=2)  # the parent's workers start
        say(before)
        def child(results):
            results.put([t.predict(batch, max_new_tokens=8, num_beams=2), t.predict(batch, max_new_tokens=8)])
        fork = multiprocessing.get_context("fork")
        results = fork.Queue()
        for _ in range(2):
            process = fork.Process(target=child, args=(results,))
            process.start()
            process.join(20)
            if process.is_alive():
                process.kill()
                say("the child hung")
                break
            else:
                say(results.get(timeout=5))
        """, tiny_seq2seq_bundle)
    assert "the child hung" not in children
    greedy = _serve("say(t.predict(batch, max_new_tokens=8))", tiny_seq2seq_bundle)[0]
    assert children == [[parent, greedy]] * 2


def test_a_forked_child_that_exits_normally_ends(lm_bundle, clf_bundle, tiny_seq2seq_bundle):
    """A child still holding sessions loaded before the fork (their thread pools stayed in the parent)
    had hung at its normal interpreter exit (sys.exit, returning from main) until killed: ONNX Runtime's
    destructor waits for the pool's threads. Inherited sessions are never freed in a child."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, sys, time
        from kerasllm.export import load_predictor
        generator = load_predictor("generate", {str(lm_bundle)!r}, device="cpu", threads=2)
        classifier = load_predictor("classify", {str(clf_bundle)!r}, device="cpu", threads=2)
        translator = load_predictor("translate", {str(tiny_seq2seq_bundle)!r}, device="cpu")
        translator.max_shards = 2
        def serve():
            return [generator.predict([generator.check("abc")], max_new_tokens=3)[0]["output"],
                    classifier.predict([classifier.check("abc")])[0]["label"],
                    translator.translate(["nine", "four hundred and two"] * 4, num_beams=2)[0]["output"]]
        expected = serve()
        pid = os.fork()
        if pid == 0:
            assert serve() == expected
            sys.exit(0)  # the interpreter's normal exit: module teardown, objects freed
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print("exit", os.waitstatus_to_exitcode(status))
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            print("the child hung at exit")
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "exit 0"), done.stderr[-3000:]


def test_translating_goes_on_after_the_main_thread_returns(tiny_seq2seq_bundle):
    """A service whose main thread starts a (non-daemon) serving thread and returns: concurrent.futures
    shuts its pools down then, and every translate that would use the workers had raised "cannot
    schedule new futures after shutdown"; it decodes on the bundle's own sessions instead."""
    before, after = _serve("""
        import concurrent.futures.thread as futures_thread, time
        say(t.predict(batch, max_new_tokens=8, num_beams=2))  # the workers start
        def serve():
            deadline = time.monotonic() + 30
            while not futures_thread._shutdown and time.monotonic() < deadline:  # the pools are shut down
                time.sleep(0.01)
            try:
                say(t.predict(batch, max_new_tokens=8, num_beams=2))
            except RuntimeError as err:
                say(str(err))
        threading.Thread(target=serve).start()
        """, tiny_seq2seq_bundle)
    assert after == before


def test_translate_refuses_a_str_for_its_list_of_texts(predictors, no_decoding):
    """translate("four") had translated "f", "o", "u" and "r" (a str is a sequence of texts too)."""
    translator = predictors["translate"]
    assert translator.translate(["four"], max_new_tokens=4) == translator.predict([translator.check("four")],
                                                                                  max_new_tokens=4)
    with pytest.raises(UsageError, match=r"^texts must be a list of strings, got a str \('four'\): pass \[text\]"):
        no_decoding(translator).translate("four", max_new_tokens=2)


# -- batches as NumPy arrays -------------------------------------------------------------------------
GENERATE_OPTIONS = [{"max_new_tokens": 4}, {"max_new_tokens": 4, "num_beams": 3, "n_best": 2},
                    {"max_new_tokens": 4, "temperature": 0.9, "n_best": 2, "seed": 3},
                    {"max_new_tokens": 4, "repetition_penalty": 1.3, "stop": "e"}]


@pytest.mark.parametrize("task, options", [
    *(("generate", options) for options in GENERATE_OPTIONS),
    ("translate", {"max_new_tokens": 4}), ("translate", {"max_new_tokens": 4, "num_beams": 2, "n_best": 2}),
    ("classify", {"top_k": 2}), ("embed", {"normalize": True}),
])
def test_a_2d_numpy_batch_gives_the_results_of_its_list(predictors, task, options):
    """A [B, T] array of ids (the README: ids may be NumPy arrays) had failed in generate and classify
    with NumPy's "truth value of an array ... is ambiguous" (`if not batch`); a sampled n-best list
    had added the prompt array to its tokens instead of joining them."""
    predictor = predictors[task]
    rows = [predictor.check(text) for text in ("four hundred", "nine one two", "seventy six")]
    width = min(len(row) for row in rows)
    rows = [row[:width] for row in rows]  # equal lengths, to make one [3, T] array
    expected = predictor.predict(rows, **options)
    assert predictor.predict(np.array(rows), **options) == expected
    assert predictor.predict([np.array(row, np.int32) for row in rows], **options) == expected
    assert predictor.predict(np.zeros((0, width), np.int64), **options) == []


# -- the documented API ------------------------------------------------------------------------------
def test_kerasllm_export_names_the_serving_entry_points_and_stays_cheap():
    """`from kerasllm.export import load_predictor` had failed (no names, no __all__); the names load
    on first use, so `import kerasllm.export` still imports no predictor, ONNX Runtime or TensorFlow."""
    import subprocess
    import sys

    script = """if True:
        import sys, kerasllm.export as export
        print(sorted(export.__all__))
        print([m for m in ("kerasllm.export.predict", "onnxruntime", "tensorflow", "keras") if m in sys.modules])
        from kerasllm.export import *
        from kerasllm.export.predict import load_predictor as direct
        print(load_predictor is direct, RecordError.__module__, "load_predictor" in dir(export))
        print([m for m in ("tensorflow", "keras") if m in sys.modules])
        """
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "['DecoderSession', 'GENERATED_TOKENS', 'Predictor', 'RecordError', 'TRUNCATE_MODES', 'create_session', "
        "'load_bundle', 'load_predictor']", "[]",
        "True kerasllm.export.predict True", "[]"]


def test_the_readmes_serving_example_runs(lm_bundle, tmp_path):
    """README "Serving from Python": its example, as written, on a bundle at its bundles/lm."""
    import re
    import subprocess
    import sys

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n### Serving from Python\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    (tmp_path / "bundles").mkdir()
    (tmp_path / "bundles" / "lm").symlink_to(lm_bundle)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    greedy, beams, empty, hot = done.stdout.splitlines()
    assert re.fullmatch(r"\{'output': '.*'\}", greedy)
    assert re.fullmatch(r"\{'output': \['.*', '.*'\], 'scores': \[-?[\d.]+, -?[\d.]+\]\}", beams)
    assert empty == "{'error': 'empty prompt'}"
    assert hot == """{'error': "temperature must be a number, got 'hot'"}"""
