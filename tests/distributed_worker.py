"""One training process for the distributed tests and benchmark (run as a script).

TensorFlow fixes its logical devices and its cluster when it initialises, so every
distributed case runs in fresh processes started by `launch`/`launch_workers`.

    python tests/distributed_worker.py sgd --strategy one-device,mirrored --cpus 2 --steps 3 --out DIR
    python tests/distributed_worker.py bench --strategy multi-worker --steps 20 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve()


# -- launching (used by the tests; imports no TensorFlow) ----------------------------------------
def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def worker_env(index: int = 0, ports: list[int] | None = None, extra: dict | None = None) -> dict:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "",
           # one op at a time per process: the two workers share two cores
           "TF_NUM_INTEROP_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1"}
    env.pop("TF_CONFIG", None)
    if ports:
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                       "task": {"type": "worker", "index": index}})
    env.update(extra or {})
    return env


def launch(args: list[str], env: dict, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env, stdout=out,
                            stderr=subprocess.STDOUT, cwd=ROOT)


def launch_workers(args: list[str], count: int, logs_dir: Path, extra_env: dict | None = None,
                   log_prefix: str = "worker"):
    """`count` worker processes of one multi-worker cluster on free loopback ports."""
    ports = free_ports(count)
    return [launch(args, worker_env(i, ports, extra_env), logs_dir / f"{log_prefix}{i}.log") for i in range(count)]


def wait_all(procs, timeout: float, logs_dir: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    for i, proc in enumerate(procs):
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            code = "timeout"
        if code != 0:
            logs = "" if logs_dir is None else "\n".join(
                f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs_dir.glob("*.log")))
            raise AssertionError(f"process {i} ended with {code}\n{logs}")


# -- what a process runs ---------------------------------------------------------------------------
def configure_cpus(count: int) -> None:
    import tensorflow as tf

    if count > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def tiny_decoder(vocab_size=61, **overrides):
    from kerasllm.config import DecoderConfig

    return DecoderConfig(vocab_size=vocab_size, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
                         max_length=32, dropout=0.0, **overrides)


def fixed_batch(global_batch: int, seq_len: int, vocab_size: int):
    import numpy as np

    ids = np.random.default_rng(7).integers(3, vocab_size, size=(global_batch, seq_len + 1)).astype("int32")
    return ids[:, :-1], ids[:, 1:]


def fixed_pairs(global_batch: int, vocab_size: int):
    """Padded source/target pairs (pad id 0) for the seq2seq model."""
    import numpy as np

    rng = np.random.default_rng(8)
    source = rng.integers(3, vocab_size, size=(global_batch, 10)).astype("int32")
    target = rng.integers(3, vocab_size, size=(global_batch, 9)).astype("int32")
    for row in range(global_batch):  # ragged lengths: padding on both sides
        source[row, 10 - row % 4:] = 0
        target[row, 9 - row % 3:] = 0
    return {"encoder_token_ids": source, "decoder_token_ids": target[:, :-1]}, target[:, 1:]


def sgd_run(opts) -> None:
    """N steps of SGD (or `--optimizer adamw`: kerasllm's default compile) on one fixed global batch
    per model and strategy.

    `--strategy one-device,mirrored`: one strategy after the other; `--models`: the
    decoder (`CausalLM`) and/or the encoder-decoder (`Seq2SeqLM`). The chief writes
    `OUT/{strategy}.npz` (weights) and `OUT/{strategy}.json` (losses, replicas, workers).
    """
    configure_cpus(opts.cpus)
    import keras
    import numpy as np
    import tensorflow as tf

    from kerasllm.config import Seq2SeqConfig
    from kerasllm.distribute import training_strategy
    from kerasllm.models import CausalLM, Seq2SeqLM

    config = tiny_decoder()
    cases = {
        "causal": (lambda: CausalLM(config), fixed_batch(opts.batch, 12, config.vocab_size)),
        "seq2seq": (lambda: Seq2SeqLM(Seq2SeqConfig(vocab_size=53, num_layers=2, num_heads=2, hidden_dim=32,
                                                    intermediate_dim=64, max_length=32)),
                    fixed_pairs(opts.batch, 53)),
    }
    for strategy in opts.strategy.split(","):
        results, weights, compiled = {}, {}, {}
        with training_strategy(strategy, precision="fp32", quiet=True) as dist:
            # Seeded once per strategy, not per model: under multi-worker, tf.random.set_seed
            # clears TensorFlow's caches and desynchronised the workers' collective ops
            # (TF 2.21: "Collective instance ... expected type 1 ... but got type 0").
            keras.utils.set_random_seed(0)
            for name in opts.models.split(","):
                build, (x, y) = cases[name]
                model = build()
                jit = {} if opts.jit == "default" else {"jit_compile": opts.jit == "on"}
                if opts.optimizer == "sgd":
                    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), **jit)
                else:  # kerasllm's defaults: its AdamW (weight decay, clipping) and schedule
                    model.compile(learning_rate=1e-2, warmup_steps=1, total_steps=opts.steps, **jit)
                compiled[name] = bool(model.jit_compile)

                def make_dataset(batch_size, index, count, x=x, y=y):
                    # This process's share of the fixed global batch, repeated.
                    data = tf.data.Dataset.from_tensor_slices((x, y)).shard(count, index)
                    return data.batch(batch_size, drop_remainder=True).repeat()

                # adamw: one step per epoch, so the history has every step's loss
                epochs, per_epoch = (opts.steps, 1) if opts.optimizer == "adamw" else (1, opts.steps)
                history = model.fit(dist.distribute(make_dataset, opts.batch), epochs=epochs,
                                    steps_per_epoch=per_epoch, verbose=0)
                results[name] = history.history["loss"]
                weights.update({f"{name}/{i}": w.numpy() for i, w in enumerate(model.weights)})
        if dist.is_chief:
            out = Path(opts.out)
            out.mkdir(parents=True, exist_ok=True)
            np.savez(out / f"{strategy}.npz", **weights)
            (out / f"{strategy}.json").write_text(json.dumps(
                {"loss": results, "replicas": dist.num_replicas, "workers": dist.num_workers, "jit_compile": compiled,
                 "strategy": type(dist.strategy).__name__}))


def recipe_run(opts) -> None:
    """`train_causal_lm` as the CLI runs it (the fault-tolerance test kills this)."""
    from kerasllm.distribute import DistributeArgs
    from kerasllm.recipes.causal_lm import CausalLMTrainArgs, train_causal_lm

    configure_cpus(opts.cpus)
    args = CausalLMTrainArgs(data=[opts.data], steps=opts.steps, batch_size=opts.batch, seq_len=16, lr=3e-3,
                             eval_interval=opts.eval_interval, eval_steps=opts.eval_steps, window="packed",
                             jit_compile=False, log_every=opts.log_every)
    overrides = dict(num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64, max_length=32, dropout=0.0)
    import keras

    slow = float(os.environ.get("KERASLLM_TEST_STEP_SLEEP", "0"))
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {}).get("index", 0)
    run_dir = Path(opts.run_dir)
    epochs_file = run_dir.parent / f"{run_dir.name}-worker{task}-epochs.json"
    epochs: list[int] = []

    def on_epoch_begin(epoch, logs):
        # The epochs this process ran: a resumed job starts at the restored one.
        epochs.append(epoch)
        epochs_file.write_text(json.dumps(epochs))

    callbacks = [keras.callbacks.LambdaCallback(on_epoch_begin=on_epoch_begin)]
    if slow:  # slows each step so that the test can kill a worker mid-run
        callbacks.append(keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: time.sleep(slow)))
    train_causal_lm(args, opts.run_dir, resume=opts.resume, quiet=True, config_overrides=overrides,
                    distribute=DistributeArgs(strategy=opts.strategy),
                    extra_callbacks=callbacks)


def bench_run(opts) -> None:
    """Training throughput of a preset on one fixed global batch (no XLA: MWMS cannot use it)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from kerasllm.config import DecoderConfig
    from kerasllm.distribute import training_strategy
    from kerasllm.models import CausalLM

    if opts.threads:  # explicit, rather than trusting TF_NUM_*_THREADS to be read
        tf.config.threading.set_intra_op_parallelism_threads(opts.threads)
        tf.config.threading.set_inter_op_parallelism_threads(opts.threads)
    config = DecoderConfig.preset(opts.preset, vocab_size=opts.vocab, dropout=0.0)
    x, y = fixed_batch(opts.batch, opts.seq_len, config.vocab_size)
    with training_strategy(opts.strategy, quiet=True) as dist:
        keras.utils.set_random_seed(0)
        model = CausalLM(config)
        model.compile(learning_rate=1e-3, jit_compile=False)

        def make_dataset(batch_size, index, count):
            data = tf.data.Dataset.from_tensor_slices((x, y)).shard(count, index)
            return data.batch(batch_size, drop_remainder=True).repeat()

        data = dist.distribute(make_dataset, opts.batch)
        model.fit(data, epochs=1, steps_per_epoch=opts.warmup, verbose=0)  # tracing and warm-up
        start = time.perf_counter()
        model.fit(data, epochs=1, steps_per_epoch=opts.steps, verbose=0)
        seconds = time.perf_counter() - start
    if dist.is_chief:
        params = int(sum(np.prod(w.shape) for w in model.trainable_weights))
        Path(opts.out).write_text(json.dumps({"seconds": seconds, "steps": opts.steps, "batch": opts.batch,
                                              "trainable_params": params, "workers": dist.num_workers}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["sgd", "recipe", "bench"])
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--jit", choices=["off", "on", "default"], default="off",
                        help="sgd mode: jit_compile False, True, or compile's default (not passed)")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="sgd mode's optimizer")
    parser.add_argument("--models", default="causal,seq2seq")
    parser.add_argument("--out", default="")
    parser.add_argument("--data", default="")
    parser.add_argument("--run-dir", default="")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--eval-interval", type=int, default=4)
    parser.add_argument("--eval-steps", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=1, help="recipe: the CLI's --log-every (its default is 10)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="bench: TensorFlow threads (0: default)")
    opts = parser.parse_args(argv)
    {"sgd": sgd_run, "recipe": recipe_run, "bench": bench_run}[opts.mode](opts)


if __name__ == "__main__":
    main()
