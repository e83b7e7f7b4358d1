"""Distributed training: strategy resolution, input shards, precision, the Keras multi-worker fix,
and (in subprocesses, since TensorFlow fixes devices and clusters at start-up) mirrored and
multi-worker training matching one device, and a killed multi-worker job resuming."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

import distributed_worker as dw
from kerasllm.distribute import (DistributeArgs, parse_tf_config, per_replica_batch_size, resolve_strategy,
                                 scaled_learning_rate, training_strategy)
from kerasllm.errors import UsageError

TOLERANCE = 1e-5  # max |weight difference| after N SGD steps, distributed vs one device


# -- strategy resolution ------------------------------------------------------------------------
def test_local_strategies_resolve():
    import tensorflow as tf

    assert resolve_strategy("auto") is tf.distribute.get_strategy()  # no GPUs here: the default strategy
    one = resolve_strategy("one-device")
    assert isinstance(one, tf.distribute.OneDeviceStrategy)
    assert one.extended.worker_devices[0].endswith("CPU:0")
    mirrored = resolve_strategy("mirrored")
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU"))


@pytest.fixture
def no_cluster_start(monkeypatch):
    """For a faked MultiWorkerMirroredStrategy: no wait for the peers, and TensorFlow's coordination
    service left unconfigured in this process."""
    import kerasllm.distribute as distribute

    monkeypatch.setattr(distribute, "_cluster_workers", lambda resolver: [])
    monkeypatch.setattr(distribute, "wait_for_the_other_workers", lambda workers, wait: None)
    monkeypatch.setattr(distribute, "_bound_tensorflow_registration", lambda resolver, wait: None)


class FakeStrategy:
    def __init__(self, resolver=None, **kwargs):
        self.resolver = resolver or kwargs.get("cluster_resolver")
        self.num_replicas_in_sync = 4


def test_auto_and_one_device_pick_gpus_when_there_are_some(monkeypatch):
    import tensorflow as tf

    class Device:
        def __init__(self, name):
            self.name = name

    gpus = [Device("/device:GPU:0"), Device("/device:GPU:1")]
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.distribute, "MirroredStrategy", lambda devices=None: ("mirrored", devices))
    monkeypatch.setattr(tf.distribute, "OneDeviceStrategy", lambda device: ("one", device))
    assert resolve_strategy("auto") == ("mirrored", None)  # every local GPU
    assert resolve_strategy("mirrored") == ("mirrored", ["/device:GPU:0", "/device:GPU:1"])
    assert resolve_strategy("one-device") == ("one", "/device:GPU:0")
    gpus.pop()
    assert resolve_strategy("auto") is tf.distribute.get_strategy()  # one GPU: no distribution


def test_multi_worker_reads_tf_config(no_cluster_start, monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", FakeStrategy)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
                                                "task": {"type": "worker", "index": 1}}))
    resolver = resolve_strategy("multi-worker").resolver
    assert resolver.cluster_spec().as_dict() == {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)


def test_multi_worker_uses_slurm_without_tf_config(no_cluster_start, monkeypatch):
    import tensorflow as tf

    made = []

    class FakeSlurm:
        def __init__(self, **gpu_slots):
            made.append(self)

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
    monkeypatch.setattr(tf.distribute.cluster_resolver, "SlurmClusterResolver", FakeSlurm)
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", FakeStrategy)
    assert resolve_strategy("multi-worker").resolver is made[0]


def test_slurm_on_cpu_nodes_makes_a_worker_of_every_task(no_cluster_start, monkeypatch, tmp_path):
    """Two tasks of an `srun` step on a node without GPUs (no nvidia-smi on PATH): a cluster of
    two workers. SlurmClusterResolver had run nvidia-smi ("No such file or directory") or, with
    no GPU, failed on "range() arg 3 must not be zero"."""
    import tensorflow as tf

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    for name, value in {"SLURM_PROCID": "1", "SLURM_STEP_NODELIST": "cpu1", "SLURM_STEP_TASKS_PER_NODE": "2",
                        "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", FakeStrategy)
    resolver = resolve_strategy("multi-worker").resolver
    assert resolver.cluster_spec().as_dict() == {"worker": ["cpu1:8888", "cpu1:8889"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_tpu_strategy_with_a_faked_resolver(monkeypatch):
    import tensorflow as tf

    calls = []

    class FakeTPUResolver:
        def __init__(self, tpu):
            calls.append(("resolver", tpu))

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", FakeTPUResolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster", lambda r: calls.append(("connect", r)))
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system", lambda r: calls.append(("init", r)))
    monkeypatch.setattr(tf.distribute, "TPUStrategy", FakeStrategy)
    strategy = resolve_strategy("tpu", tpu="grpc://10.1.2.3:8470")
    assert calls[0] == ("resolver", "grpc://10.1.2.3:8470")
    assert [c[0] for c in calls] == ["resolver", "connect", "init"]
    assert calls[1][1] is calls[2][1] is strategy.resolver

    def unreachable(tpu):
        raise ValueError("Could not lookup TPU metadata from name 'nope'")

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", unreachable)
    with pytest.raises(UsageError, match=r"^tpu: cannot reach --tpu nope: Could not lookup TPU metadata"):
        resolve_strategy("tpu", tpu="nope")

    def off_google_cloud(tpu):  # a TPU name is looked up on GCE's metadata server
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", off_google_cloud)
    with pytest.raises(UsageError, match=r"^tpu: cannot reach --tpu my-tpu: <urlopen error"):
        resolve_strategy("tpu", tpu="my-tpu")


@pytest.mark.parametrize("name, message", [
    ("mirored", r"^unknown --strategy 'mirored'; choose one of: auto, one-device, mirrored"),
    ("parameter-server", r"^--strategy parameter-server is not supported: Keras 3 model.fit"),
])
def test_bad_strategy_names(name, message):
    with pytest.raises(UsageError, match=message):
        resolve_strategy(name)


def test_multi_worker_without_a_cluster(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    with pytest.raises(UsageError, match="needs a cluster: set TF_CONFIG, or run inside a Slurm job"):
        resolve_strategy("multi-worker")


@pytest.mark.parametrize("raw, message", [
    ('{"cluster": {"worker": ["a:1"]', "TF_CONFIG is not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', 'TF_CONFIG has no "cluster" object'),
    ('{"cluster": {"worker": ["a:1", "b"]}, "task": {"type": "worker", "index": 0}}',
     'TF_CONFIG cluster "worker" must be a non-empty list of "host:port" strings'),
    ('{"cluster": {"worker": ["a:1"]}}', 'TF_CONFIG has no "task"'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
     'TF_CONFIG task type "chief" is not a job in the cluster'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
     'TF_CONFIG task index 2 is out of range for the 2 "worker"'),
])
def test_broken_tf_config_is_one_clear_line(raw, message):
    with pytest.raises(UsageError) as err:
        parse_tf_config(raw)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cli_broken_tf_config_exits_2_with_one_line(run_cli, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker"}}')
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", tmp_path / "run", "--steps", "1",
                     "--strategy", "multi-worker")
    assert result.code == 2
    assert result.err.strip() == 'kerasllm: error: TF_CONFIG has no "task" with "type" and "index" ' \
                                 '(e.g. {"type": "worker", "index": 0})'
    assert not (tmp_path / "run").exists()


def test_the_worker_wait_is_bounded_by_an_environment_variable(monkeypatch):
    from kerasllm.distribute import DEFAULT_WORKER_WAIT, worker_wait_seconds

    monkeypatch.delenv("KERASLLM_WORKER_WAIT", raising=False)
    assert worker_wait_seconds() == DEFAULT_WORKER_WAIT == 900
    monkeypatch.setenv("KERASLLM_WORKER_WAIT", "2.5")
    assert worker_wait_seconds() == 2.5
    for bad in ("soon", "0", "-1", "nan", "inf"):
        monkeypatch.setenv("KERASLLM_WORKER_WAIT", bad)
        with pytest.raises(UsageError, match=f"^KERASLLM_WORKER_WAIT='{bad}': give the seconds a worker waits"):
            worker_wait_seconds()


def test_a_registration_timeout_names_the_missing_workers():
    """TensorFlow's barrier timeout names tasks; the line names workers and their addresses."""
    from kerasllm.distribute import _unregistered, _Worker

    workers = [_Worker(i, f"h{i}:2222", f"/job:worker/replica:0/task:{i}", i == 1) for i in range(12)]
    leader = ("Barrier timed out. Id: [Init]Wait_for_all_tasks_to_register::0. ... Some timed out task names:\n"
              "/job:worker/replica:0/task:0\n/job:worker/replica:0/task:11\n")
    assert _unregistered(leader, workers) == "worker 0 (h0:2222), worker 11 (h11:2222)"  # not task 1 in task:11
    assert _unregistered("Deadline Exceeded", workers[:3]) == "worker 0 (h0:2222), worker 2 (h2:2222)"


def test_collective_mismatches_are_told_apart_from_other_errors():
    import tensorflow as tf

    from kerasllm.distribute import _collective_mismatch

    assert _collective_mismatch(tf.errors.InternalError(None, None, "Collective instance 275 expected type 0"))
    assert _collective_mismatch(tf.errors.InvalidArgumentError(None, None, "Shape mismatch in the collective instance"))
    assert not _collective_mismatch(tf.errors.InvalidArgumentError(None, None, "indices[3] = 70 is not in [0, 64)"))
    assert not _collective_mismatch(ValueError("collective"))


def test_a_restarted_job_takes_back_a_run_dir_its_own_command_started(tmp_path):
    """The chief died before its first checkpoint: the very same command (its train arguments in
    config.json) resumes the directory, which starts over; it had been refused as "exists and is not
    empty". Another command's directory, or a finished run, is not taken."""
    from kerasllm.distribute import started_by_this_command
    from kerasllm.recipes.causal_lm import CausalLMTrainArgs
    from kerasllm.recipes.common import train_record

    args, options = CausalLMTrainArgs(data=["corpus.txt"], steps=40, lr=2e-3), DistributeArgs(strategy="multi-worker")
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.jsonl").write_text('{"step": 10, "loss": 3.2}\n')
    assert not started_by_this_command(out, "causal-lm", args, options)  # no config.json: not a run
    config = {"task": "causal-lm", "model": {}, "train": train_record(args), "distribute": {
        "strategy": "multi-worker", "tpu": None, "precision": "fp32", "scale_lr": False}}
    (out / "config.json").write_text(json.dumps(config))
    assert started_by_this_command(out, "causal-lm", args, options)
    assert not started_by_this_command(out, "causal-lm", CausalLMTrainArgs(data=["corpus.txt"], steps=40),
                                       options)  # another --lr
    assert not started_by_this_command(out, "masked-lm", args, options)
    assert not started_by_this_command(out, "causal-lm", args,
                                       DistributeArgs(strategy="multi-worker", precision="mixed_bfloat16"))
    for malformed in ({**config, "model": "x"}, {**config, "train": [1]}, [config]):  # the directory is refused later
        (out / "config.json").write_text(json.dumps(malformed))
        assert not started_by_this_command(out, "causal-lm", args, options)
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.keras").write_text("finished")
    assert not started_by_this_command(out, "causal-lm", args, options)


def test_a_restart_matches_the_options_a_recipe_filled_in(tmp_path):
    """seq2seq saves --seq-len as the model's max_length when it is not given: the very same command
    (still without it) had not been taken for the run it started, and was refused on restart."""
    from kerasllm.distribute import started_by_this_command
    from kerasllm.recipes.common import train_record
    from kerasllm.recipes.seq2seq import Seq2SeqTrainArgs

    args, options = Seq2SeqTrainArgs(data="pairs.jsonl", steps=40), DistributeArgs(strategy="multi-worker")
    out = tmp_path / "run"
    out.mkdir()
    distribute = {"strategy": "multi-worker", "tpu": None, "precision": "fp32", "scale_lr": False}
    saved = train_record(Seq2SeqTrainArgs(data="pairs.jsonl", steps=40, seq_len=128))  # as the recipe saves it
    (out / "config.json").write_text(json.dumps({"task": "seq2seq", "model": {}, "train": saved,
                                                 "distribute": distribute}))
    assert started_by_this_command(out, "seq2seq", args, options)
    assert not started_by_this_command(out, "seq2seq", Seq2SeqTrainArgs(data="pairs.jsonl", steps=40, seq_len=64),
                                       options)  # another --seq-len given


# -- batch split, learning rate, input shards ---------------------------------------------------
def test_global_batch_splits_per_replica_and_lr_scales_only_when_asked():
    strategy = FakeStrategy()  # 4 replicas
    assert per_replica_batch_size(12, strategy) == 3
    with pytest.raises(UsageError, match="^--batch-size 10 does not split evenly over 4 replicas; use a multiple of 4"):
        per_replica_batch_size(10, strategy)
    assert scaled_learning_rate(1e-3, strategy, scale=False) == 1e-3
    assert scaled_learning_rate(1e-3, strategy, scale=True) == pytest.approx(4e-3)


def window_starts(dataset) -> list[int]:
    # ids are 0, 1, 2, ...: a window's first input token is its start offset
    return [int(v) for x, _ in dataset for v in x.numpy()[:, 0]]


def test_packed_windows_shard_over_workers_without_overlap_or_gaps():
    from kerasllm.data import lm_windows

    ids, seq_len = np.arange(16 * 10 + 1, dtype=np.int32), 16  # 10 windows
    every = sorted(window_starts(lm_windows(ids, seq_len, 1, "packed", seed=3, repeat=False)))
    assert every == [16 * i for i in range(10)]
    for workers in (2, 3):
        shards = [window_starts(lm_windows(ids, seq_len, 1, "packed", seed=3, repeat=False, shard_index=i,
                                           num_shards=workers)) for i in range(workers)]
        flat = [s for shard in shards for s in shard]
        assert len(flat) == len(set(flat)), "a window is read by two workers"
        assert {len(shard) for shard in shards} == {10 // workers}, "workers must run epochs of equal length"
        assert set(every) - set(flat) == set([16 * 9] if workers == 3 else []), "only the remainder sits out"


def test_random_windows_are_seeded_per_worker():
    from kerasllm.data import lm_windows

    ids = np.arange(5000, dtype=np.int32)

    def offsets(**shard):
        return window_starts(lm_windows(ids, 8, 16, "random", seed=5, **shard).take(4))

    assert offsets() == offsets(shard_index=0, num_shards=1)  # one worker: the run's own seed
    worker0, worker1 = offsets(shard_index=0, num_shards=2), offsets(shard_index=1, num_shards=2)
    assert worker0 == offsets(shard_index=0, num_shards=2)  # reproducible
    # Independent streams: two draws of 64 offsets among ~5000 share ~1 by chance (which ones depends
    # on the global seed state earlier tests leave); the same stream would share all 64.
    assert len(set(worker0) & set(worker1)) <= len(worker0) // 8 and worker0 != offsets()


def test_shard_batches_splits_a_seeded_pipeline_between_workers():
    """The other recipes' pipelines (here seq2seq's bucketed pair batches): each worker keeps
    every n-th batch of the same seeded pipeline, so together they read each batch once."""
    from kerasllm.distribute import shard_batches
    from kerasllm.pairs import pair_batches

    rng = np.random.default_rng(0)
    sources = [np.arange(i * 10 + 5, i * 10 + 5 + rng.integers(1, 9)) for i in range(40)]  # unique first ids
    targets = [np.array([5, 6])] * 40

    def first_ids(dataset):
        return [tuple(row[:1]) for x, _ in dataset for row in x["encoder_token_ids"].numpy()]

    def pipeline():
        return pair_batches(sources, targets, 4, pad_id=0, bos_id=2, eos_id=3, seed=9, repeat=False)

    whole = first_ids(pipeline())
    parts = [first_ids(shard_batches(pipeline(), i, 2)) for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(whole) and len(whole) == len(set(whole)) >= 36
    assert not set(parts[0]) & set(parts[1])


def test_every_train_recipe_takes_the_strategy_options(run_cli, tmp_path):
    """seq2seq through the CLI with --strategy mirrored and mixed_bfloat16: the shared plumbing."""
    from kerasllm import datasets

    rows = datasets.number_words_pairs(48, max_value=99, seed=4)
    (tmp_path / "src.txt").write_text("".join(s + "\n" for s, _ in rows), encoding="utf-8")
    (tmp_path / "tgt.txt").write_text("".join(t + "\n" for _, t in rows), encoding="utf-8")
    result = run_cli("train", "seq2seq", "--source-file", tmp_path / "src.txt", "--target-file", tmp_path / "tgt.txt",
                     "--out", tmp_path / "run", "--steps", "2", "--batch-size", "8", "--max-length", "32",
                     "--eval-interval", "2", "--eval-steps", "1", "--no-jit-compile", "--quiet",
                     "--strategy", "mirrored", "--precision", "mixed_bfloat16")
    assert result.code == 0, result
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 2 and np.isfinite(history[-1]["val_loss"])
    import keras

    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    assert model.compute_dtype == "float32"  # the training policy is not saved with the model
    from kerasllm.cli.train import train

    for name, command in train.commands.items():
        assert {"strategy", "tpu", "precision", "scale_lr"} <= {p.name for p in command.params}, name


# -- precision ------------------------------------------------------------------------------------
def test_mixed_float16_scales_the_loss_and_the_saved_model_loads_as_float32(tmp_path):
    import keras

    from kerasllm.models import CausalLM

    config = dw.tiny_decoder()
    x, y = dw.fixed_batch(8, 12, config.vocab_size)
    with DistributeArgs(precision="mixed_float16").scope(quiet=True):
        model = CausalLM(config)
        model.compile(learning_rate=1e-2, jit_compile=False)
        assert model.compute_dtype == "float16" and model.weights[0].dtype == "float32"
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        losses = model.fit(x, y, epochs=4, batch_size=8, verbose=0).history["loss"]
    assert keras.config.dtype_policy().name == "float32"  # restored on exit
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert model.predict(x[:2], verbose=0).dtype == np.float32  # logits stay float32
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.compute_dtype == "float32"
    np.testing.assert_allclose(loaded.predict(x[:2], verbose=0), model.predict(x[:2], verbose=0), atol=0.05)


def test_compile_refuses_several_steps_per_execution_on_several_replicas(monkeypatch):
    """Keras 3 cannot run them (keras-team/keras#19246): the first fit had ended in "You must feed a
    value for placeholder tensor"; one replica keeps them."""
    from kerasllm import CausalLM, DecoderConfig

    class TwoReplicas:
        num_replicas_in_sync = 2

    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=61))
    model.compile(jit_compile=False, steps_per_execution=4)
    assert model.steps_per_execution == 4
    monkeypatch.setattr(CausalLM, "distribute_strategy", property(lambda self: TwoReplicas()))
    with pytest.raises(ValueError, match=r"steps_per_execution=4 cannot run on the 2 replicas of TwoReplicas"):
        model.compile(jit_compile=False, steps_per_execution=4)


def test_tensorflow_log_lines_are_not_printed_twice(tmp_path, corpus_file):
    """TensorFlow's INFO records (MirroredStrategy's device list) had come out twice, through its own
    handler and kerasllm's, even under --quiet; now once each through kerasllm's, and only with -v."""
    command = [sys.executable, "-m", "kerasllm", "train", "causal-lm", "--data", str(corpus_file), "--steps", "2",
               "--preset", "tiny", "--seq-len", "16", "--batch-size", "4", "--eval-steps", "1", "--quiet",
               "--strategy", "mirrored"]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the CLI's own default, as a user's
    quiet = subprocess.run([*command, "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300,
                           env=env)
    assert quiet.returncode == 0 and quiet.stderr.splitlines() == [f"kerasllm: model written to {tmp_path / 'a'}"], \
        quiet.stderr
    verbose = subprocess.run([command[0], *command[1:3], "-v", *command[3:], "--out", str(tmp_path / "b")],
                             capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in verbose.stderr.splitlines() if "Using MirroredStrategy" in line]
    assert verbose.returncode == 0 and len(lines) == 1 and lines[0].startswith("kerasllm: "), verbose.stderr


def test_unknown_precision_is_refused():
    with pytest.raises(UsageError, match="^unknown --precision 'fp8'; choose one of: fp32, mixed_float16"):
        with training_strategy("auto", precision="fp8"):
            pass


# -- the Keras multi-worker fix -------------------------------------------------------------------
def test_keras_internals_the_multi_worker_fix_relies_on():
    """Fails when a Keras upgrade changes what `kerasllm/models/multi_worker.py` works around.

    If this fails because Keras fixed keras-team/keras#20585, check that the multi-worker
    test still passes and simplify or drop `MultiWorkerFitMixin`.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer
    from keras.src.trainers.trainer import Trainer

    trainer = tf_trainer.TensorFlowTrainer
    # 1. fit builds through `_maybe_symbolic_build(iterator=...)`, which averages the first
    #    batch with strategy.reduce (what fails under MWMS) and then calls `_symbolic_build`.
    assert "self._maybe_symbolic_build(iterator=epoch_iterator)" in inspect.getsource(trainer.fit)
    assert list(inspect.signature(trainer._maybe_symbolic_build).parameters) == ["self", "iterator", "data_batch"]
    build = inspect.getsource(trainer._maybe_symbolic_build)
    assert "self.distribute_strategy.reduce(" in build and "self._symbolic_build(data_batch=data_batch)" in build
    assert list(inspect.signature(Trainer._symbolic_build).parameters) == ["self", "iterator", "data_batch"]
    # 2. step outputs are reduced with axis=0 in multi-worker mode, so scalars fail.
    assert "reduce_per_replica(" in inspect.getsource(trainer._make_function)
    reduce = inspect.getsource(tf_trainer.reduce_per_replica)
    assert "_collective_all_reduce_multi_worker(strategy)" in reduce
    assert 'strategy.reduce("MEAN", v, axis=0)' in reduce
    # ...and the fix is what every kerasllm model trains with.
    import kerasllm.models as models
    from kerasllm.models.multi_worker import MultiWorkerFitMixin

    classes = [c for c in vars(models).values() if isinstance(c, type) and issubclass(c, models.TransformerModel)]
    assert len(classes) >= 4
    for cls in classes:
        for method in ("_maybe_symbolic_build", "train_step", "test_step"):
            assert getattr(cls, method) is getattr(MultiWorkerFitMixin, method), f"{cls.__name__}.{method}"


# -- several devices and several processes (subprocesses) -----------------------------------------
def test_mirrored_and_multi_worker_match_one_device(tmp_path):
    """3 SGD steps on one fixed global batch of 8: 2 logical CPUs (MirroredStrategy) and 2 worker
    processes on 127.0.0.1 (MultiWorkerMirroredStrategy) end with one device's weights."""
    local = dw.launch(["sgd", "--strategy", "one-device,mirrored", "--cpus", 2, "--out", tmp_path], dw.worker_env(),
                      tmp_path / "local.log")
    workers = dw.launch_workers(["sgd", "--strategy", "multi-worker", "--out", tmp_path], 2, tmp_path)
    dw.wait_all([local, *workers], 300, tmp_path)

    single = np.load(tmp_path / "one-device.npz")
    single_loss = json.loads((tmp_path / "one-device.json").read_text())["loss"]
    assert {k.split("/")[0] for k in single.files} == {"causal", "seq2seq"}
    for name, workers in (("mirrored", 1), ("multi-worker", 2)):
        weights, info = np.load(tmp_path / f"{name}.npz"), json.loads((tmp_path / f"{name}.json").read_text())
        assert info["replicas"] == 2 and info["workers"] == workers, info
        assert weights.files == single.files
        for key in weights.files:
            np.testing.assert_allclose(weights[key], single[key], rtol=0, atol=TOLERANCE, err_msg=f"{name} {key}")
        for model, losses in info["loss"].items():
            np.testing.assert_allclose(losses, single_loss[model], rtol=1e-5, err_msg=f"{name} {model} loss")


def test_mirrored_adamw_matches_one_device(tmp_path):
    """kerasllm's default compile (AdamW with weight decay and global-norm clipping, its per-step
    scalars shared across variables per device, optimizers.AdamW._scalars) under MirroredStrategy
    on 2 logical CPUs ends 3 steps with one device's weights. compile's default jit_compile is
    XLA on one device and off for the replicated step, which XLA cannot compile (it had been on,
    and fit failed: "Trying to access resource ... located in device CPU:1")."""
    local = dw.launch(["sgd", "--optimizer", "adamw", "--models", "causal", "--strategy", "one-device,mirrored",
                       "--cpus", 2, "--jit", "default", "--out", tmp_path], dw.worker_env(), tmp_path / "local.log")
    dw.wait_all([local], 300, tmp_path)
    single, mirrored = np.load(tmp_path / "one-device.npz"), np.load(tmp_path / "mirrored.npz")
    info = json.loads((tmp_path / "mirrored.json").read_text())
    assert info["replicas"] == 2 and info["jit_compile"] == {"causal": False}, info
    assert json.loads((tmp_path / "one-device.json").read_text())["jit_compile"] == {"causal": True}
    assert mirrored.files == single.files
    for key in single.files:
        np.testing.assert_allclose(mirrored[key], single[key], rtol=0, atol=TOLERANCE, err_msg=key)
    losses = json.loads((tmp_path / "one-device.json").read_text())["loss"]["causal"]
    assert losses[-1] < losses[0], losses  # the steps moved the weights (lr 1e-2: far above TOLERANCE)


def test_the_recipe_trains_on_two_replicas_with_the_cli_defaults(tmp_path, corpus_file):
    """The CLI's defaults run 10 steps per call of the train function (training.execution_steps),
    which Keras 3 cannot do on more than one replica (keras-team/keras#19246: "You must feed a
    value for placeholder tensor"): a mirrored or multi-worker run had ended in that traceback."""
    run_dir = tmp_path / "run"
    local = dw.launch(["recipe", "--strategy", "mirrored", "--cpus", 2, "--data", corpus_file, "--run-dir", run_dir,
                       "--steps", 20, "--eval-interval", 10, "--eval-steps", 10, "--log-every", 10, "--batch", 8],
                      dw.worker_env(), tmp_path / "mirrored.log")
    dw.wait_all([local], 300, tmp_path)
    history = read_history(run_dir)
    assert [r["step"] for r in history] == [10, 20] and all("val_loss" in r for r in history), history
    assert (run_dir / "model.keras").is_file()


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_killed_worker_job_resumes_from_the_last_backup(tmp_path, corpus_file):
    """Kill worker 1 (SIGKILL) after the first checkpoint, end the job, start it again with the same
    command: it resumes from the backup, ends at the same step, and the model matches an
    uninterrupted run's quality. The killed worker's scratch backup (in its temp directory) is
    taken over by its restart and removed at the end, not left behind for good."""
    run_dir, steps, interval = tmp_path / "run", 12, 4
    worker_tmp = tmp_path / "worker-tmp"  # the workers' TMPDIR: what they leave there is seen
    worker_tmp.mkdir()
    args = ["recipe", "--strategy", "multi-worker", "--data", corpus_file, "--run-dir", run_dir,
            "--steps", steps, "--eval-interval", interval, "--batch", 8]
    procs = dw.launch_workers(args, 2, tmp_path, log_prefix="first",
                              extra_env={"KERASLLM_TEST_STEP_SLEEP": "0.4", "TMPDIR": str(worker_tmp)})
    deadline = time.monotonic() + 150
    while not any(r["step"] > interval + 1 for r in read_history(run_dir)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "first run ended early"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)  # a worker dies mid-run ...
    procs[0].send_signal(signal.SIGTERM)  # ... and the job manager stops the rest of the job
    for p in procs:
        p.wait(timeout=60)
    assert not (run_dir / "model.keras").exists()
    backed_up = json.loads((run_dir / "checkpoints" / "training_metadata.json").read_text())["epoch"]
    assert backed_up >= 1
    left_by_the_kill = sorted(p.name.split("-")[2] for p in worker_tmp.glob("kerasllm-worker-*"))
    assert left_by_the_kill == ["backup", "tokens"]

    procs = dw.launch_workers(args, 2, tmp_path, log_prefix="restart",  # the very same command
                              extra_env={"TMPDIR": str(worker_tmp)})
    dw.wait_all(procs, 240, tmp_path)
    assert list(worker_tmp.glob("kerasllm-worker-*")) == []
    starts = [json.loads((tmp_path / f"run-worker{i}-epochs.json").read_text()) for i in range(2)]
    assert starts[0] == starts[1] == list(range(backed_up, steps // interval)), "resumed from the backup"
    history = read_history(run_dir)
    assert [r["step"] for r in history] == list(range(1, steps + 1))
    assert not (run_dir / "checkpoints").exists() and (run_dir / "model.keras").is_file()

    # An uninterrupted single-process run of the same recipe, for the loss comparison.
    straight = tmp_path / "straight"
    dw.main(["recipe", "--strategy", "auto", "--data", str(corpus_file), "--run-dir", str(straight),
             "--steps", str(steps), "--eval-interval", str(interval), "--batch", "8"])
    assert loss_on_validation(run_dir) == pytest.approx(loss_on_validation(straight), rel=0.1)


def launch_cli_workers(args: list, tmp_path: Path, log_prefix: str, extra_env: dict | None = None):
    """`kerasllm ARGS` as 2 workers of one multi-worker cluster (the CLI itself, not the test worker),
    their temp directory (the other worker's scratch) in `tmp_path / "worker-tmp"`."""
    (tmp_path / "worker-tmp").mkdir(exist_ok=True)
    extra_env = {"TMPDIR": str(tmp_path / "worker-tmp"), **(extra_env or {})}
    ports = dw.free_ports(2)
    procs = []
    for index in range(2):
        log = open(tmp_path / f"{log_prefix}{index}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([sys.executable, "-m", "kerasllm", *map(str, args)], stdout=log,
                                      stderr=subprocess.STDOUT, env=dw.worker_env(index, ports, extra_env),
                                      cwd=dw.ROOT))
    return procs


CLI_RUN = ["--steps", 40, "--eval-interval", 4, "--eval-steps", 1, "--batch-size", 8, "--seq-len", 16, "--layers", 2,
           "--hidden", 32, "--no-jit-compile", "--quiet", "--strategy", "multi-worker"]


def test_sigterm_stops_multi_worker_training_with_its_backup_kept(tmp_path, corpus_file):
    """SIGTERM to every worker (a job manager stopping the job) ends them as it ends a one-process
    run, the last backup kept; MultiWorkerMirroredStrategy's own SIGTERM handler had left them
    training to the last step."""
    out = tmp_path / "run"
    long_run = [*CLI_RUN[2:], "--steps", 5000]  # minutes of steps: the signal comes long before the end
    procs = launch_cli_workers(["train", "causal-lm", "--data", corpus_file, "--out", out, *long_run], tmp_path, "term")
    deadline = time.monotonic() + 150
    while not (out / "checkpoints" / "training_metadata.json").is_file():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "ended before a backup"
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=60) for p in procs]
    assert codes == [-signal.SIGTERM] * 2, codes
    assert not (out / "model.keras").exists() and (out / "checkpoints" / "training_metadata.json").is_file()
    assert max(r["step"] for r in read_history(out)) < 5000


def test_a_worker_whose_chief_stopped_says_so_in_one_line(tmp_path, corpus_file):
    """The chief refuses an --out that holds another run; the other worker, which does not look at
    the directory, had ended in TensorFlow's 79-line collective traceback."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's files")
    procs = launch_cli_workers(["train", "causal-lm", "--data", corpus_file, "--out", out, *CLI_RUN], tmp_path, "stop")
    codes = [p.wait(timeout=240) for p in procs]
    logs = [(tmp_path / f"stop{i}.log").read_text() for i in range(2)]
    assert codes == [2, 1], (codes, logs)
    assert logs[0].strip().endswith("choose a new --out or pass --resume"), logs[0]
    assert "Traceback" not in logs[1], logs[1]
    assert "kerasllm: error: multi-worker: worker 1 lost the other workers" in logs[1], logs[1]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert list((tmp_path / "worker-tmp").glob("kerasllm-worker-*")) == []  # its scratch removed


def loss_on_validation(run_dir: Path) -> float:
    import keras

    from kerasllm.data import TokenSplit, read_corpus, tokenize_corpus
    from kerasllm.tokenizers import TextTokenizer

    config = json.loads((run_dir / "config.json").read_text())["train"]
    model = keras.saving.load_model(run_dir / "model.keras")
    ids = tokenize_corpus(read_corpus(config["data"]), TextTokenizer.load(run_dir))
    val = TokenSplit.from_ids(ids, config["validation_fraction"], config["seq_len"]).validation
    windows = np.stack([val[i:i + config["seq_len"] + 1] for i in range(0, len(val) - config["seq_len"] - 1, 16)])
    model.compile(jit_compile=False)
    return model.evaluate(windows[:, :-1], windows[:, 1:], verbose=0, batch_size=32, return_dict=True)["loss"]


def test_a_checkpoint_torn_by_a_kill_falls_back_to_the_previous_one(run_cli, corpus_file, tmp_path, monkeypatch):
    """A worker killed while writing its backup leaves a torn file: the restart uses the one before."""
    from kerasllm import training

    out, original = tmp_path / "run", training.ProgressLogger.on_train_batch_end

    def crash_at_step_5(self, batch, logs=None):
        original(self, batch, logs)
        if self.step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.ProgressLogger, "on_train_batch_end", crash_at_step_5)
    fast = ["--steps", "6", "--eval-interval", "2", "--eval-steps", "1", "--batch-size", "4", "--seq-len", "16",
            "--layers", "2", "--hidden", "32", "--no-jit-compile", "--quiet"]
    assert run_cli("train", "causal-lm", "--data", corpus_file, "--out", out, *fast).code == 130
    weights = out / "checkpoints" / "latest.weights.h5"
    assert (out / "checkpoints" / "latest.weights.h5.bkp").is_file()  # the backup before (step 2)
    weights.write_bytes(weights.read_bytes()[:1000])  # torn mid-write
    before = read_history(out)
    monkeypatch.setattr(training.ProgressLogger, "on_train_batch_end", original)
    assert run_cli("train", "causal-lm", "--out", out, "--resume", "--quiet").code == 0  # (exit 1 without .bkp)
    history = read_history(out)
    assert [r["step"] for r in history] == [2, 4, 6]  # logged at each validation
    assert history[0] == before[0] and history[1] != before[1]  # restored at step 2: steps 3-4 ran again
    assert (out / "model.keras").is_file() and not (out / "checkpoints").exists()
