"""The split step (kerasllm/models/split_batch.py) trains and evaluates as Keras's own step does."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasllm import CausalLM, DecoderConfig, EncoderConfig, Seq2SeqConfig, Seq2SeqLM, TextClassifier
from kerasllm.models.split_batch import AUTO_MIN_PARAMETERS, resolve_batch_split

TINY = dict(num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64, max_length=32, dropout=0.0)


def _train(make_model, x, y, batch_split, sgd=False, metrics="auto", **fit):
    # AdamW divides each gradient by its running RMS, so where a gradient sums to nearly zero,
    # float rounding between the two ways of summing it can flip an update's sign: runs that
    # compare several steps of a model with such weights use SGD to compare the step's math.
    keras.utils.set_random_seed(1)
    model = make_model()
    optimizer = dict(optimizer=keras.optimizers.SGD(0.1)) if sgd else dict(total_steps=50)
    model.compile(**optimizer, batch_split=batch_split, metrics=metrics)
    history = model.fit(x, y, epochs=3, verbose=0, shuffle=False, **fit).history
    evaluated = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    return model, history, evaluated


def _assert_same_training(one, split):
    (m1, h1, e1), (m2, h2, e2) = one, split
    assert m1.batch_parts == 1 and m2.batch_parts == 2
    for key in h1:
        np.testing.assert_allclose(h2[key], h1[key], rtol=2e-5, err_msg=key)
    for key in e1:
        np.testing.assert_allclose(e2[key], e1[key], rtol=2e-5, err_msg=key)
    for w1, w2 in zip(m1.weights, m2.weights):
        np.testing.assert_allclose(w2.numpy(), w1.numpy(), rtol=0, atol=2e-5, err_msg=w1.path)
    assert h1["loss"][-1] < h1["loss"][0]  # it learned something, so equal weights mean something


def test_causal_lm_split_step_equals_the_whole_step():
    """Odd batches (5 -> 3 + 2 rows) and a last batch of one row (1 + 0): same losses, same weights (AdamW,
    the default optimizer, with its global-norm clipping and schedule)."""
    data = np.random.default_rng(0).integers(0, 64, (11, 17))
    make = lambda: CausalLM(DecoderConfig(vocab_size=64, **TINY))  # noqa: E731
    runs = [_train(make, data[:, :-1], data[:, 1:], split, batch_size=5) for split in (1, 2)]
    _assert_same_training(*runs)


def test_grappler_is_off_only_while_a_split_fit_runs():
    """The split step's fit turns TensorFlow's graph optimizer off (split_batch._grappler_off) and sets
    it back as it was when fit returns; Keras's own step (batch_split=1) leaves it on."""
    import tensorflow as tf

    seen = {}

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.setdefault(self.model.batch_parts, set()).add(
                tf.config.optimizer.get_experimental_options()["disable_meta_optimizer"])

    data = np.random.default_rng(0).integers(0, 64, (8, 17))
    for split in (1, 2):
        model = CausalLM(DecoderConfig(vocab_size=64, **TINY))
        model.compile(total_steps=4, batch_split=split)
        model.fit(data[:, :-1], data[:, 1:], batch_size=4, epochs=1, verbose=0, callbacks=[Record()])
        assert tf.config.optimizer.get_experimental_options()["disable_meta_optimizer"] is False
    assert seen == {1: {False}, 2: {True}}, seen


def test_classifier_metrics_see_the_whole_batch():
    """Compiled metrics (accuracy) get every part's predictions: the same figures as Keras's step."""
    rng = np.random.default_rng(1)
    x = rng.integers(5, 64, (12, 10))
    x[:, 0] = 2  # CLS-like first token
    y = (x[:, 1] > 30).astype("int32")
    make = lambda: TextClassifier(EncoderConfig(vocab_size=64, num_labels=2, **TINY))  # noqa: E731
    runs = [_train(make, x, y, split, sgd=True, metrics=["accuracy"], batch_size=6) for split in (1, 2)]
    _assert_same_training(*runs)
    assert "accuracy" in runs[1][1] and "accuracy" in runs[1][2]


def test_seq2seq_dict_inputs_split_alike_with_the_default_adamw():
    """Dict inputs, and the encoder's learned positions, whose sparse gradient repeats each position once
    per row: the global-norm clip had squared the pieces one by one in Keras's own step (a clip too strong;
    weights 4e-3 apart from the split step's after 60 steps). Dense before the clip, as the fused Adam
    takes it."""
    rng = np.random.default_rng(2)
    config = Seq2SeqConfig(vocab_size=40, **{**TINY, "num_layers": 1})
    source = rng.integers(4, 40, (8, 9))
    target = rng.integers(4, 40, (8, 7))
    x = {"encoder_token_ids": source, "decoder_token_ids": target[:, :-1]}
    runs = [_train(lambda: Seq2SeqLM(config), x, target[:, 1:], split, batch_size=4) for split in (1, 2)]
    _assert_same_training(*runs)


def test_parts_weigh_as_the_loss_divides_not_by_rows():
    """Where the loss divides by the sample weights' sum (MaskedLM, mean_with_sample_weight) or by
    the labelled tokens (TokenClassifier, ignore_class), the parts carry unequal shares of the batch:
    the split step weighs them so (it weighed by rows: a masked LM's loss 4.177 against 4.191, one
    SGD step's weights up to 89 apart). First half of each batch: 1 of 3 positions weighed / labelled
    (a seq2seq model's: 2 of 11 target positions not padding)."""
    from kerasllm import MaskedLM, TokenClassifier

    rng = np.random.default_rng(3)
    tokens = rng.integers(6, 64, (8, 12))
    tokens[:, 0] = 2
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    positions = rng.integers(1, 12, (8, 3))
    weights = np.ones((8, 3), "float32")
    weights[:4, 1:] = 0
    tags = rng.integers(0, 3, (8, 12))
    tags[:4, 2:] = -1  # untagged
    one_layer = {**TINY, "num_layers": 1}  # (the weighing is the loss's: one block shows it, in less compile time)
    config = EncoderConfig(vocab_size=64, num_labels=3, **one_layer)
    s2s_config = Seq2SeqConfig(vocab_size=64, **one_layer)
    target = rng.integers(6, 64, (8, 12))
    target[:4, 3:] = s2s_config.pad_id  # the first part's targets mostly padding
    cases = {
        "masked-lm": (lambda: MaskedLM(config), {**x, "mask_positions": positions},
                      np.take_along_axis(tokens, positions, 1), {"sample_weight": weights}),
        "token-classifier": (lambda: TokenClassifier(config), x, tags, {}),
        # Weights per target position with padded targets: the loss divides by the kept positions.
        "seq2seq": (lambda: Seq2SeqLM(s2s_config), {"encoder_token_ids": tokens, "decoder_token_ids": target[:, :-1]},
                    target[:, 1:], {"sample_weight": np.ones((8, 11), "float32")}),
    }
    for name, (make, inputs, targets, fit) in cases.items():
        runs = [_train(make, inputs, targets, split, sgd=True, batch_size=8, **fit) for split in (1, 2)]
        _assert_same_training(*runs)
        evaluated = [model.evaluate(inputs, targets, batch_size=8, verbose=0, **fit) for model, _, _ in runs]
        np.testing.assert_allclose(evaluated[1], evaluated[0], rtol=2e-5, err_msg=name)


def test_a_loss_of_unknown_reduction_keeps_the_whole_step():
    class Custom(keras.losses.Loss):
        def call(self, y_true, y_pred):
            return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    model = CausalLM(DecoderConfig(vocab_size=64, **TINY))
    model.compile(loss=Custom(), batch_split=2)
    assert model.batch_parts == 1
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum"), batch_split=2)
    assert model.batch_parts == 1
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), batch_split=2)
    assert model.batch_parts == 2


def test_auto_splits_only_where_it_is_safe_and_pays(monkeypatch):
    monkeypatch.delenv("KERASLLM_BATCH_SPLIT", raising=False)
    monkeypatch.setattr("kerasllm.distribute.usable_cores", lambda: 2)
    big = CausalLM(DecoderConfig.preset("small", vocab_size=64, dropout=0.0))
    assert big.count_params() >= AUTO_MIN_PARAMETERS
    assert resolve_batch_split(big, "auto", jit_compile=True) == 2
    assert resolve_batch_split(big, "auto", jit_compile=False) == 1  # the parts are XLA programs
    assert resolve_batch_split(big, 1, jit_compile=True) == 1
    monkeypatch.setattr("kerasllm.distribute.usable_cores", lambda: 1)
    assert resolve_batch_split(big, "auto", jit_compile=True) == 1
    monkeypatch.setattr("kerasllm.distribute.usable_cores", lambda: 2)
    # Dropout: concurrent parts would draw the same masks from one seed state.
    dropout = CausalLM(DecoderConfig.preset("small", vocab_size=64, dropout=0.1))
    assert resolve_batch_split(dropout, "auto", jit_compile=True) == 1
    assert resolve_batch_split(dropout, 2, jit_compile=True) == 1
    small = CausalLM(DecoderConfig(vocab_size=64, **TINY))
    assert resolve_batch_split(small, "auto", jit_compile=True) == 1  # too small to pay for a second program
    assert resolve_batch_split(small, 2, jit_compile=True) == 2
    # Under a distribution strategy the replicas already use the devices.
    import tensorflow as tf

    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        assert resolve_batch_split(big, "auto", jit_compile=True) == 1
    monkeypatch.setenv("KERASLLM_BATCH_SPLIT", "1")
    assert resolve_batch_split(big, "auto", jit_compile=True) == 1
    from kerasllm.errors import UsageError

    for bad in ("two", "-3"):  # a UsageError: one line from the CLI (a ValueError had been a traceback)
        monkeypatch.setenv("KERASLLM_BATCH_SPLIT", bad)
        with pytest.raises(UsageError, match=rf"^KERASLLM_BATCH_SPLIT must be a whole number of parts \(1: no "
                                             rf"split\), got '{bad}'$"):
            resolve_batch_split(big, "auto", jit_compile=True)
    with pytest.raises(ValueError, match="batch_split must be 'auto' or an integer >= 1"):
        resolve_batch_split(big, "two", jit_compile=True)
    # Several losses: Keras updates a Mean per loss inside compute_loss, which parts would race on.
    monkeypatch.delenv("KERASLLM_BATCH_SPLIT")
    big.compile(batch_split=2)
    assert big.batch_parts == 2
    big.compile(batch_split=2, loss=[big.default_loss(), big.default_loss()])
    assert big.batch_parts == 1


def test_split_step_inside_several_steps_per_execution():
    """kerasllm train runs several steps per call (training.execution_steps): the split step inside
    Keras's loop over them trains as Keras's own step does one call per step."""
    data = np.random.default_rng(3).integers(0, 64, (16, 17))
    runs = []
    for split, per_call in ((1, 1), (2, 4)):
        keras.utils.set_random_seed(1)
        model = CausalLM(DecoderConfig(vocab_size=64, **TINY))
        model.compile(total_steps=50, batch_split=split, steps_per_execution=per_call)
        history = model.fit(data[:, :-1], data[:, 1:], batch_size=4, epochs=2, verbose=0, shuffle=False).history
        runs.append((model, history, {}))
    _assert_same_training(*runs)


# -- warm-up (split_batch module docs) -------------------------------------------
WARM_UP_DATA = np.random.default_rng(4).integers(0, 64, (20, 17))


def _windows(batch):
    import tensorflow as tf

    # Fixed batch shapes (drop_remainder), as kerasllm train's pipelines: the warm-up's condition.
    return tf.data.Dataset.from_tensor_slices((WARM_UP_DATA[:, :-1], WARM_UP_DATA[:, 1:])).repeat().batch(
        batch, drop_remainder=True)


def _fit_with_validation(monkeypatch, warm_up, break_first=None):
    """A split-step fit validated on batches of 5 rows (parts of 3 and 2); returns (model, history, threads)."""
    monkeypatch.setenv("KERASLLM_WARM_UP", "1" if warm_up else "0")
    keras.utils.set_random_seed(1)
    model = CausalLM(DecoderConfig(vocab_size=64, **TINY))
    model.compile(total_steps=10, batch_split=2, steps_per_execution=2)
    threads, start = [], model._start_warm_up

    def spy(train_data, validation_data):
        threads.append(start(train_data, validation_data))
        return threads[-1]

    monkeypatch.setattr(model, "_start_warm_up", spy)
    if break_first is not None:
        break_first(model, monkeypatch)
    history = model.fit(_windows(4), epochs=2, steps_per_epoch=4, validation_data=_windows(5), validation_steps=4,
                        verbose=0).history
    return model, history, threads


def _assert_identical(one, other):
    (m1, h1, _), (m2, h2, _) = one, other
    assert h1 == h2  # losses and val_losses to the last bit
    assert int(m1.optimizer.iterations.numpy()) == int(m2.optimizer.iterations.numpy()) == 8
    for v1, v2 in zip(m1.variables + m1.optimizer.variables, m2.variables + m2.optimizer.variables):
        np.testing.assert_array_equal(v2.numpy(), v1.numpy(), err_msg=v1.path)


def test_warm_up_changes_no_state(monkeypatch):
    """The warm-up runs the train step's and the evaluation's parts on zero batches beside training: losses,
    validation losses, weights, optimizer slots and step count stay exactly those of a run without it."""
    without = _fit_with_validation(monkeypatch, warm_up=False)
    with_warm_up = _fit_with_validation(monkeypatch, warm_up=True)
    assert without[2] == [None]
    (thread,) = with_warm_up[2]
    assert thread is not None and not thread.is_alive()  # it ran, and fit waited for it
    part_gradients, part_loss, _, _ = with_warm_up[0]._functions()
    # The steps found the warm-up's traces: parts of 2 + 2 rows (train), 3 and 2 rows (evaluation).
    assert part_gradients.experimental_get_tracing_count() == 1
    assert part_loss.experimental_get_tracing_count() == 2
    _assert_identical(without, with_warm_up)
    # A later fit on batches of the same shapes finds them compiled: no second warm-up.
    model = with_warm_up[0]
    assert model._start_warm_up(_windows(4), _windows(5)) is None
    assert model._start_warm_up(None, _windows(6)).join() is None  # another shape: warmed up
    assert model._start_warm_up(_windows(6), None).join() is None  # the same shape for training: its own parts


def _fail_trace(model, monkeypatch):
    functions = model._functions
    calls = []

    def first_call_fails():
        calls.append(1)
        if len(calls) == 1:  # the warm-up asks first, before the train step's trace
            raise RuntimeError("warm-up trace fails")
        return functions()

    monkeypatch.setattr(model, "_functions", first_call_fails)


def _fail_run(model, monkeypatch):
    import tensorflow as tf

    split_data = model._split_data
    calls = []

    def first_call_fails_when_run(data):
        calls.append(1)
        if len(calls) == 1:  # the warm-up's trace: its program then fails in the thread
            tf.debugging.Assert(False, ["warm-up run fails"])
        return split_data(data)

    monkeypatch.setattr(model, "_split_data", first_call_fails_when_run)


@pytest.mark.parametrize("break_first", [_fail_trace, _fail_run], ids=["trace", "run"])
def test_warm_up_failure_leaves_training_alone(monkeypatch, break_first):
    without = _fit_with_validation(monkeypatch, warm_up=False)
    failed = _fit_with_validation(monkeypatch, warm_up=True, break_first=break_first)
    _assert_identical(without, failed)


WARM_UP_SCRIPT = """
import sys, numpy as np, tensorflow as tf, keras
from kerasllm import CausalLM, DecoderConfig
data = np.random.default_rng(0).integers(0, 64, (20, 17))
windows = lambda b: tf.data.Dataset.from_tensor_slices((data[:, :-1], data[:, 1:])).batch(b, drop_remainder=True)
model = CausalLM(DecoderConfig(vocab_size=64, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
                               max_length=32, dropout=0.0))
model.compile(total_steps=4, batch_split=2)
class Mark(keras.callbacks.Callback):
    def on_test_begin(self, logs=None):
        print("EVALUATION BEGINS", file=sys.stderr, flush=True)
model.fit(windows(4), epochs=1, steps_per_epoch=2, validation_data=windows(5), validation_steps=2, verbose=0,
          callbacks=[Mark()])
"""


def test_warm_up_compiles_the_programs_the_steps_run(tmp_path):
    """XLA's log (TensorFlow's device_compiler at verbosity 2) names each program it compiles and counts the
    requests for it. With the warm-up, the train step's part_gradients program is compiled once and the steps
    reuse the one the warm-up asked for; every part_loss program is compiled before the evaluation begins and
    none during it. (A warm-up called from eager code would compile copies under other attributes that the
    steps miss.)"""
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "device_compiler=2",
           "KERASLLM_WARM_UP": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", WARM_UP_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stderr
    if "Instantly compiling for signature" not in log:
        pytest.skip("this TensorFlow build does not log XLA compilations at device_compiler=2")
    before, _, during = log.partition("EVALUATION BEGINS")
    assert during, "no evaluation ran"
    assert before.count("Instantly compiling for signature: __inference_part_loss") == 2  # parts of 3 and 2 rows
    assert "Instantly compiling for signature: __inference_part_loss" not in during
    assert "Already Compiled for signature: __inference_part_loss" in during
    # One part_gradients program, requested 6 times: 2 parts x (the warm-up's call + 2 train steps).
    assert log.count("Instantly compiling for signature: __inference_part_gradients") == 1
    requests = re.findall(r"signature: __inference_part_gradients_\d+ with request count (\d+)", log)
    assert max(map(int, requests)) == 6, requests


CORE_PER_PART_SCRIPT = """
import json, os, sys
import kerasllm
import kerasllm.distribute
kerasllm.distribute.usable_cores = lambda: 2  # the rule is for a machine whose cores equal the parts
from kerasllm.models import split_batch
give = split_batch.give_parts_a_core_each
import tensorflow as tf
checks = {
    "dropout": give(jit_compile=True, dropout=0.1),
    "no_xla": give(jit_compile=False, dropout=0.0),
    "replicas": give(jit_compile=True, dropout=0.0, replicas=2),
}
os.environ["TF_NUM_INTRAOP_THREADS"] = "2"
checks["user_threads"] = give(jit_compile=True, dropout=0.0)
del os.environ["TF_NUM_INTRAOP_THREADS"]
os.environ["KERASLLM_BATCH_SPLIT"] = "1"
checks["split_off"] = give(jit_compile=True, dropout=0.0)
del os.environ["KERASLLM_BATCH_SPLIT"]
kerasllm.distribute.usable_cores = lambda: 4
checks["more_cores_than_parts"] = give(jit_compile=True, dropout=0.0)  # not measured there: left alone
kerasllm.distribute.usable_cores = lambda: 2
checks["threads_before"] = tf.config.threading.get_intra_op_parallelism_threads()
from kerasllm.cli import main
try:
    main(sys.argv[1:])
except SystemExit as done:
    checks["exit"] = done.code
checks["threads_after"] = tf.config.threading.get_intra_op_parallelism_threads()
tiny = kerasllm.CausalLM(kerasllm.DecoderConfig.preset("tiny", vocab_size=40))
checks["tiny_model_parts"] = split_batch.resolve_batch_split(tiny, "auto", True)
checks["after_start"] = give(jit_compile=True, dropout=0.0)  # True where set before; else the runtime runs: no error
print("CHECKS", json.dumps(checks))
"""


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_cli_training_gives_each_part_a_core(tmp_path, corpus_file, dropout):
    """`kerasllm train` on a 2-core machine without a GPU sets TensorFlow's intra-op threads to 1
    before its runtime starts, so each part of the split step runs on a core of its own
    (split_batch.give_parts_a_core_each), and "auto" then splits even a small model. A model with
    dropout keeps one program, so it keeps TensorFlow's default threads; so do XLA off, several
    replicas, KERASLLM_BATCH_SPLIT=1, more cores than parts, and a user's own TF_NUM_INTRAOP_THREADS."""
    import json
    import os
    import subprocess
    import sys

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"family": "decoder", "num_layers": 2, "num_heads": 2, "hidden_dim": 32,
                                  "intermediate_dim": 64, "max_length": 32, "dropout": dropout}))
    env = {k: v for k, v in os.environ.items() if k not in ("TF_NUM_INTRAOP_THREADS", "KERASLLM_BATCH_SPLIT")}
    done = subprocess.run(
        [sys.executable, "-c", CORE_PER_PART_SCRIPT, "train", "causal-lm", "--data", str(corpus_file), "--out",
         str(tmp_path / "run"), "--config", str(config), "--steps", "4", "--batch-size", "4", "--seq-len", "16",
         "--quiet"],
        capture_output=True, text=True, timeout=600, env={**env, "CUDA_VISIBLE_DEVICES": "", "KERASLLM_XLA_CACHE": "off"})
    assert done.returncode == 0, done.stderr[-3000:]
    checks = json.loads(done.stdout.split("CHECKS")[-1])
    assert checks.get("exit") in (None, 0), checks
    refusals = ("dropout", "no_xla", "replicas", "user_threads", "split_off", "more_cores_than_parts")
    assert not any(checks[k] for k in refusals), checks
    assert checks["after_start"] == (not dropout)  # once TensorFlow runs, its threads stay as they are
    assert checks["threads_before"] == 0  # TensorFlow's default: a thread per core
    if dropout:
        assert checks["threads_after"] == 0
        assert checks["tiny_model_parts"] == 1  # below AUTO_MIN_PARAMETERS
    else:
        assert checks["threads_after"] == 1
        assert checks["tiny_model_parts"] == 2  # one thread each: the split is how the second core is used
    assert (tmp_path / "run" / "model.keras").is_file()


def test_a_layer_that_updates_state_as_it_runs_keeps_the_whole_step():
    """A BatchNormalization in a user's head: each part had updated its moving statistics from half the
    batch, and the warm-up's zero batches twice more (4 steps: moving variance 0.910 against 0.964)."""

    class NormedLM(CausalLM):
        def __init__(self, config, **kwargs):
            super().__init__(config, **kwargs)
            self.norm = keras.layers.BatchNormalization(name="user_norm")

        def call(self, inputs, training=None):
            return self.norm(super().call(inputs, training=training), training=training)

    config = DecoderConfig(vocab_size=64, **TINY)
    assert resolve_batch_split(CausalLM(config), 2, jit_compile=True) == 2
    model = NormedLM(config)
    model(np.zeros((1, 4), "int32"))  # builds the user's layer
    assert resolve_batch_split(model, 2, jit_compile=True) == 1
    frozen = CausalLM(config)
    frozen.embedding.trainable = False  # frozen weights are not such state
    assert resolve_batch_split(frozen, 2, jit_compile=True) == 2
