"""What every `kerasllm train ...` run takes: the shared arguments, declared once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunArgs:
    """Arguments shared by every training recipe; saved in config.json so `--resume` repeats them.

    Each recipe's dataclass adds its own fields (data, fields, task options) and may
    re-declare a default here (e.g. a larger `batch_size`).
    """

    preset: str = "tiny"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 1e-3
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    label_smoothing: float = 0.0
    tokenizer: str = "char"
    vocab_size: int = 4000
    eval_interval: int = 100
    eval_steps: int = 20
    validation_fraction: float = 0.1
    seed: int = 0
    jit_compile: bool = True
    log_every: int = 10
