"""End-to-end training recipes behind `kerasllm train ...`: data, tokenizer, model, fit, save.

Each task's module imports TensorFlow; this one does not, so that the CLI can read the values
below to show them in `--help`.
"""

# AdamW's decoupled weight decay: 0.1 pretraining a language model (nanoGPT, GPT-2), BERT's 0.01
# for the encoder tasks. The recipes' argument dataclasses and `kerasllm train`'s --weight-decay
# defaults (kerasllm.cli.train) both read them: the CLI had passed 0.1 to every task.
WEIGHT_DECAY = 0.1
ENCODER_WEIGHT_DECAY = 0.01
