"""Baseline for bench_train_causal_lm.py: keras-hub's GPT2Backbone + tied LM head, trained
with model.fit on the same character windows and the same optimizer settings as kerasllm,
written as a keras-hub user writes them: Keras's own AdamW and CosineDecay (kerasllm's
`default_optimizer` computes the same updates with its leaner `kerasllm.optimizers` classes).

Prints one JSON line: {"steady_tokens_per_s", "val_loss", "steps"}.
Usage: python kerashub_gpt2_train.py CORPUS STEPS [EVAL_INTERVAL]
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

from kerasllm.data import TokenSplit, lm_windows, read_corpus, tokenize_corpus  # noqa: E402
from kerasllm.models import SparseCrossEntropy  # noqa: E402
from kerasllm.tokenizers import TextTokenizer  # noqa: E402

BATCH, SEQ = 12, 64


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())


def main() -> None:
    corpus, steps = sys.argv[1], int(sys.argv[2])
    eval_interval = int(sys.argv[3]) if len(sys.argv) > 3 else steps
    texts = read_corpus(corpus)
    tokenizer = TextTokenizer.train(texts, kind="char")
    split = TokenSplit.from_ids(tokenize_corpus(texts, tokenizer), 0.1, SEQ)

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocab_size, num_layers=4, num_heads=4, hidden_dim=128, intermediate_dim=512,
        dropout=0.0, max_sequence_length=SEQ,
    )
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.ops.ones_like(token_ids)
    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    logits = backbone.token_embedding(hidden, reverse=True)
    model = keras.Model(token_ids, logits)
    # kerasllm's recipe (lr 1e-3, warmup 100 then cosine to 1e-4 over the planned 2000 steps,
    # AdamW beta2 0.99, weight decay 0.1 off biases/norms/positions, global-norm clipping at 1.0)
    # in stock Keras.
    schedule = keras.optimizers.schedules.CosineDecay(0.0, 2000 - 100, alpha=0.1, warmup_target=1e-3,
                                                      warmup_steps=100)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=0.1, beta_1=0.9, beta_2=0.99,
                                       global_clipnorm=1.0)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "position_embeddings"])
    model.compile(optimizer=optimizer,
                  loss=SparseCrossEntropy(), jit_compile=True)
    timer = StepTimer()
    history = model.fit(
        lm_windows(split.train, SEQ, BATCH, seed=0), steps_per_epoch=eval_interval, epochs=steps // eval_interval,
        validation_data=lm_windows(split.validation, SEQ, BATCH, seed=1), validation_steps=20,
        callbacks=[timer], verbose=0,
    )
    gaps = np.diff(timer.times)
    # Steady state: drop the first 20 steps (tracing, XLA compilation) and validation pauses.
    steady = np.median(gaps[20:]) if len(gaps) > 40 else np.median(gaps)
    print(json.dumps({"steady_tokens_per_s": BATCH * SEQ / steady, "val_loss": history.history["val_loss"][-1],
                      "steps": steps}))


if __name__ == "__main__":
    main()
