"""`model.fit` on NumPy arrays: time idle at each epoch's start, kerasllm's path against Keras's own.

Run: `.venv/bin/python tests/benchmarks/bench_fit_arrays.py [--rows 48000] [--epochs 4] [--repeats 2]`

A `CausalLM` (tiny preset) trains on random token rows given as arrays, once through its own
`fit` (kerasllm/models/array_inputs.py: Keras's array batching without tf.data's autotuning)
and once through `keras.Model.fit` called on the same model class (Keras's pipeline, autotuned),
alternated. For each epoch after the first, the wait from `on_epoch_begin` to the first batch is
what tearing down the last epoch's iterator cost; the epochs' own times show the steady steps.

Measured 2026-12-06 on the 2-core machine (AMD EPYC), defaults but `--repeats 4` (48,000 rows of
32 tokens, batch 32, 4 epochs of 11-16 s; the waits before epochs 2-4 of each run):

    kerasllm fit     0.010 0.011 0.011 | 0.017 0.015 0.019 | 0.015 0.011 0.012 | 0.011 0.012 0.011
    keras.Model.fit  0.014 0.011 0.011 | 0.019 5.931 0.014 | 0.017 0.011 0.012 | 3.180 4.381 0.011
    (steps of an epoch, median: kerasllm 12.20 s, Keras 14.17 s)

Keras's path sat idle 3.2-5.9 s before 3 of its 12 epochs; kerasllm's waited at most 0.019 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def run(fit, model, x, epochs):
    """(waits before epochs 2.., those epochs' seconds after their first batch began) of one `fit`."""
    import keras  # noqa: PLC0415

    class Timer(keras.callbacks.Callback):
        waits, durations = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                self.waits.append(time.perf_counter() - self.start)

        def on_epoch_end(self, epoch, logs=None):
            self.durations.append(time.perf_counter() - self.start)

    timer = Timer()
    timer.waits, timer.durations = [], []
    fit(model, x[:, :-1], x[:, 1:], batch_size=32, epochs=epochs, verbose=0, callbacks=[timer])
    return timer.waits[1:], [d - w for d, w in zip(timer.durations[1:], timer.waits[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from kerasllm import CausalLM, DecoderConfig  # noqa: PLC0415

    x = np.random.default_rng(0).integers(6, 64, (args.rows, 33)).astype("int32")
    ways = {"kerasllm fit": CausalLM.fit, "keras.Model.fit": keras.Model.fit}
    results = {name: ([], []) for name in ways}
    for repeat in range(args.repeats):
        for name, fit in (ways.items() if repeat % 2 == 0 else reversed(ways.items())):
            keras.utils.set_random_seed(repeat)
            model = CausalLM(DecoderConfig.preset("tiny", vocab_size=64))
            model.compile()
            waits, durations = run(fit, model, x, args.epochs)
            results[name][0].extend(waits)
            results[name][1].extend(durations)
            print(f"{name:16s} run {repeat + 1}: waits before epochs 2-{args.epochs} "
                  f"{', '.join(f'{w:.3f}' for w in waits)} s; their steps {', '.join(f'{d:.1f}' for d in durations)} s",
                  flush=True)
    print()
    for name, (waits, durations) in results.items():
        print(f"{name:16s} wait max {max(waits):.3f} s, median {statistics.median(waits):.3f} s; "
              f"steps of an epoch median {statistics.median(durations):.2f} s")


if __name__ == "__main__":
    main()
