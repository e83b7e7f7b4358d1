"""Training under MirroredStrategy on 2 logical CPUs equals one device's, clipping and encoders included.

Each case runs in a fresh process (TensorFlow fixes its logical devices when it starts); the
process script is below, the launching helpers are tests/distributed_worker.py's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

import distributed_worker as dw

SCRIPT = r'''
import json, sys
import numpy as np
sys.path.insert(0, "tests")
from distributed_worker import configure_cpus, fixed_batch, tiny_decoder
configure_cpus(2)
import keras, tensorflow as tf
from kerasllm.distribute import training_strategy
from kerasllm.models import CausalLM

out = {}
x, y = fixed_batch(8, 12, 61)
for strategy in ("one-device", "mirrored"):
    for clip in (0.05, 1e9):
        with training_strategy(strategy, precision="fp32", quiet=True) as dist:
            keras.utils.set_random_seed(0)
            model = CausalLM(tiny_decoder())
            model.compile(learning_rate=1e-2, warmup_steps=1, total_steps=3, global_clipnorm=clip, jit_compile=False,
                          batch_split=1)
            make = lambda b, i, n: tf.data.Dataset.from_tensor_slices((x, y)).shard(n, i).batch(b).repeat()
            model.fit(dist.distribute(make, 8), epochs=1, steps_per_epoch=3, verbose=0)
            out[f"{strategy}/{clip}"] = [w.numpy().tolist() for w in model.weights]
            out[f"{strategy}/replicas"] = dist.num_replicas
print(json.dumps(out))
'''

# An encoder's batches carry a boolean padding mask, which Keras's first-batch build had averaged. In a
# process of its own: a second model's collectives after the first's under one process's reseeding
# (keras.utils.set_random_seed) can meet the first's instance keys.
ENCODER_SCRIPT = r'''
import json, sys
import numpy as np
sys.path.insert(0, "tests")
from distributed_worker import configure_cpus
configure_cpus(2)
import tensorflow as tf
from kerasllm.config import EncoderConfig
from kerasllm.distribute import training_strategy
from kerasllm.models import TextClassifier

out = {}
rng = np.random.default_rng(1)
ids = rng.integers(6, 40, (8, 10)).astype("int32")
ids[:4, 6:] = 0
labels = rng.integers(0, 2, 8)
with training_strategy("mirrored", precision="fp32", quiet=True) as dist:
    model = TextClassifier(EncoderConfig.preset("tiny", vocab_size=40, num_labels=2, max_length=16))
    model.compile(jit_compile=False)
    make = lambda b, i, n: tf.data.Dataset.from_tensor_slices(
        ({"token_ids": ids, "padding_mask": ids != 0}, labels)).shard(n, i).batch(b).repeat()
    out["encoder_loss"] = model.fit(dist.distribute(make, 8), epochs=1, steps_per_epoch=3, verbose=0).history["loss"]
print(json.dumps(out))
'''


def run(script: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script], env=dw.worker_env(), cwd=dw.ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_mirrored_clips_the_whole_gradient_and_trains_encoders(tmp_path):
    """Keras 3 clips each replica's gradient before summing them: with 2 replicas a clip that fired on
    one device hardly fired (weights 0.03 apart after 3 steps at clip 0.1). And every encoder had
    stopped at its first mirrored step (TensorFlow's AddN refusing the averaged boolean mask)."""
    out = {**run(SCRIPT), **run(ENCODER_SCRIPT)}
    assert out["mirrored/replicas"] == 2 and out["one-device/replicas"] == 1
    gap = lambda a, b: max(np.abs(np.asarray(u) - np.asarray(v)).max() for u, v in zip(out[a], out[b]))  # noqa: E731
    assert gap("one-device/0.05", "one-device/1000000000.0") > 1e-3  # the clip changes these steps
    assert gap("mirrored/0.05", "one-device/0.05") < 1e-5
    assert gap("mirrored/1000000000.0", "one-device/1000000000.0") < 1e-5
    assert len(out["encoder_loss"]) == 1 and np.isfinite(out["encoder_loss"][0])
