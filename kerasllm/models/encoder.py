"""The encoder family (BERT-like): a bidirectional encoder and its task heads.

The whole family in one file: token + position embeddings, a stack of non-causal
`TransformerBlock`s whose attention ignores padding, and four ways to use it:

* `MaskedLM`: pretraining by predicting masked tokens (BERT's 15%, 80/10/10 rule;
  the masking itself happens in tf.data, `kerasllm.data_tasks.bert_masking`: keras-hub's
  `MaskedLMMaskGenerator` rule, from stateless random ops so that a seed repeats the masks).
* `TextClassifier`: one label per text from a pooled vector (CLS or mean pooling).
* `TokenClassifier`: one label per token.
* sentence embeddings: `model.embed(...)` on any of them, the pooled encoder output.

Inputs are right-padded token ids `[B, T]` that start with BOS (the CLS token), plus a
`padding_mask` `[B, T]` (1 for real tokens). Padding never changes a real token's
output: keys at padded positions get a -1e9 attention bias, and mean pooling only
averages real tokens. Every model also has `export_outputs(input_ids, attention_mask)`,
the graph that the ONNX export traces (dynamic batch and length).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kerasllm.config import EncoderConfig
from kerasllm.layers import TokenAndPositionEmbedding, TransformerBlock, attention_bias
from kerasllm.models.base import SparseCrossEntropy, TransformerModel


def pool(hidden, padding_mask, pooling="cls"):
    """Pool `[B, T, C]` hidden states into `[B, C]`: the first (CLS) token or the masked mean."""
    if pooling == "cls":
        return hidden[:, 0, :]
    mask = ops.expand_dims(ops.cast(padding_mask, hidden.dtype), -1)
    return ops.sum(hidden * mask, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1.0)


def check_labels(model, y, no_label=None):
    """ValueError for a label in the array targets `y` outside `0..num_labels-1` (`no_label`, the
    loss's ignored value, aside). Under XLA (compile's default) the loss of such a label is NaN,
    where TensorFlow's own kernel raises; a dataset's labels are seen only when it runs."""
    if y is None:
        return
    labels, count = np.asarray(y), model.config.num_labels
    bad = (labels < 0) | (labels >= count)
    if no_label is not None:
        bad &= labels != no_label
    if bad.any():
        aside = f" nor {no_label} (no label)" if no_label is not None else ""
        raise ValueError(f"{type(model).__name__}: label {labels[bad].flat[0].item()} is not one of the labels "
                         f"0..{count - 1} (config.num_labels {count}){aside}")


@keras.saving.register_keras_serializable(package="kerasllm")
class Encoder(keras.layers.Layer):
    """A bidirectional transformer encoder: embeddings, then non-causal blocks.

    Post-LN (BERT, `norm_first=False`) normalizes the summed embeddings; pre-LN
    normalizes the last block's output instead.

    Args:
        vocab_size, max_length, num_layers, num_heads, hidden_dim, intermediate_dim,
        dropout, activation, position, norm_first, layer_norm_epsilon, use_bias:
            as in `EncoderConfig`.

    Call arguments:
        token_ids: `[B, T]` int ids.
        padding_mask: `[B, T]`, 1 (or True) for real tokens, 0 for padding.
    Returns hidden states `[B, T, C]`.

    Example:
    >>> encoder = Encoder(vocab_size=50, max_length=16, num_layers=2, num_heads=2,
    ...                   hidden_dim=32, intermediate_dim=64)
    >>> tuple(encoder(ops.ones((2, 5), "int32"), ops.ones((2, 5), "int32")).shape)
    (2, 5, 32)
    """

    def __init__(self, vocab_size, max_length, num_layers, num_heads, hidden_dim, intermediate_dim, dropout=0.0,
                 activation="gelu", position="learned", norm_first=False, layer_norm_epsilon=1e-5, use_bias=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.activation = activation
        self.position = position
        self.norm_first = norm_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_bias = use_bias

    @classmethod
    def from_encoder_config(cls, c: EncoderConfig, **kwargs) -> "Encoder":
        return cls(c.vocab_size, c.max_length, c.num_layers, c.num_heads, c.hidden_dim, c.intermediate_dim,
                   dropout=c.dropout, activation=c.activation, position=c.position, norm_first=c.norm_first,
                   layer_norm_epsilon=c.layer_norm_epsilon, use_bias=c.use_bias, **kwargs)

    def build(self, token_ids_shape=None, padding_mask_shape=None):
        shape = (None, None, self.hidden_dim)
        self.embedding = TokenAndPositionEmbedding(self.vocab_size, self.max_length, self.hidden_dim,
                                                   position=self.position, dropout=self.dropout,
                                                   name="embedding", dtype=self.dtype_policy)
        self.embedding.build((None, None))
        self.blocks = []
        for i in range(self.num_layers):
            block = TransformerBlock(
                num_heads=self.num_heads, intermediate_dim=self.intermediate_dim, dropout=self.dropout,
                activation=self.activation, norm_first=self.norm_first, layer_norm_epsilon=self.layer_norm_epsilon,
                use_bias=self.use_bias, rotary=self.position == "rotary", name=f"block_{i}",
                dtype=self.dtype_policy,
            )
            block.build(shape)
            self.blocks.append(block)
        # BERT (post-LN) normalizes the embeddings; pre-LN stacks normalize the output.
        self.norm = keras.layers.LayerNormalization(epsilon=self.layer_norm_epsilon,
                                                    name="final_norm" if self.norm_first else "embedding_norm",
                                                    dtype=self.dtype_policy)
        self.norm.build(shape)
        self.built = True

    def call(self, token_ids, padding_mask, training=None):
        length = ops.shape(token_ids)[1]
        positions = ops.broadcast_to(ops.arange(length, dtype="int32")[None, :], ops.shape(token_ids))
        bias = attention_bias(length, length, padding_mask, causal=False)
        x = self.embedding(token_ids, positions, training=training)
        if not self.norm_first:
            x = self.norm(x)
        for block in self.blocks:
            x, _, _ = block(x, self_bias=bias, positions=positions, training=training)
        if self.norm_first:
            x = self.norm(x)
        return x

    def first_token(self, token_ids, padding_mask):
        """`call(token_ids, padding_mask)[:, 0]` at inference, with less work: export path only.

        For graphs that read only the first (CLS) token: every op but attention is per
        token, so the last block attends from that one query (keys and values still come
        from every token) and runs its feed-forward on that one token. Same math as `call`
        (the export's validation compares them). 'small' preset, classifier bundle, 64 x 128,
        2-core CPU: 671 -> 826 seq/s.
        """
        length = ops.shape(token_ids)[1]
        positions = ops.broadcast_to(ops.arange(length, dtype="int32")[None, :], ops.shape(token_ids))
        bias = attention_bias(length, length, padding_mask, causal=False)
        x = self.embedding(token_ids, positions)
        if not self.norm_first:
            x = self.norm(x)
        for block in self.blocks[:-1]:
            x, _, _ = block(x, self_bias=bias, positions=positions)
        block = self.blocks[-1]
        attention = block.self_attention  # MultiHeadAttention.call, keeping the first query only
        h = block.self_attention_norm(x) if self.norm_first else x
        query, key, value = attention._heads(attention.qkv_dense(h), 3)
        query = ops.transpose(attention._rope(query[:, :1], positions[:, :1]), (0, 2, 1, 3))
        key = ops.transpose(attention._rope(key, positions), (0, 2, 1, 3))
        value = ops.transpose(value, (0, 2, 1, 3))
        # The attention residual of TransformerBlock._residual on that token (inference: no dropout),
        # then the block's own feed-forward residual on it.
        first = x[:, :1] + attention.attend(query, key, value, bias)
        if not self.norm_first:
            first = block.self_attention_norm(first)
        first = block._residual(first, block.feedforward_norm, block.feedforward, training=False)
        if self.norm_first:
            first = self.norm(first)
        return first[:, 0]

    def get_config(self):
        config = super().get_config()
        config.update(vocab_size=self.vocab_size, max_length=self.max_length, num_layers=self.num_layers,
                      num_heads=self.num_heads, hidden_dim=self.hidden_dim, intermediate_dim=self.intermediate_dim,
                      dropout=self.dropout, activation=self.activation, position=self.position,
                      norm_first=self.norm_first, layer_norm_epsilon=self.layer_norm_epsilon,
                      use_bias=self.use_bias)
        return config


class EncoderModel(TransformerModel):
    """What the encoder task models share: the encoder, input parsing, pooling, export outputs."""

    config_class = EncoderConfig

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.encoder = Encoder.from_encoder_config(self.config, name="encoder")

    def _parse(self, inputs):
        """`token_ids` or a dict with `token_ids` and optional `padding_mask` -> (ids, mask)."""
        if isinstance(inputs, dict):
            token_ids, padding_mask = inputs["token_ids"], inputs.get("padding_mask")
        else:
            token_ids, padding_mask = inputs, None
        token_ids = self.token_id_batch("token_ids", token_ids)  # `embed` on lists of rows
        self.check_token_ids("token_ids", token_ids)  # 1-D ids, or learned positions past the table
        if padding_mask is None:
            padding_mask = ops.not_equal(token_ids, self.config.pad_id)
        return token_ids, padding_mask

    def encode(self, inputs, training=None):
        """Hidden states `[B, T, C]` and the padding mask."""
        token_ids, padding_mask = self._parse(inputs)
        return self.encoder(token_ids, padding_mask, training=training), padding_mask

    def embed(self, inputs, normalize=False):
        """Sentence embeddings `[B, C]` (float32): the encoder output pooled per `config.pooling`."""
        hidden, padding_mask = self.encode(inputs)
        vectors = ops.cast(pool(hidden, padding_mask, self.config.pooling), "float32")
        if normalize:
            vectors = vectors / ops.maximum(ops.norm(vectors, axis=-1, keepdims=True), 1e-12)
        return vectors

    def export_outputs(self, input_ids, attention_mask):
        """The exported graph: a dict of named float32 outputs (see each task)."""
        raise NotImplementedError

    # What a model fine-tuned from a pretrained encoder may set anew: the rest is the encoder's shape
    # and vocabulary, which its weights fix.
    FINE_TUNING_SETTINGS = ("dropout", "pooling")

    @classmethod
    def from_masked_lm(cls, masked_lm: "EncoderModel", num_labels: int, **config_changes):
        """A model of this class (TextClassifier, TokenClassifier) whose encoder starts from
        `masked_lm`'s pretrained encoder weights (a MaskedLM, or any encoder model);
        `config_changes` may set `dropout` and `pooling`. A change to the encoder's shape had
        failed in Keras's `set_weights` ("a weight list of length 28, but the layer was expecting 40")."""
        settable = {*cls.FINE_TUNING_SETTINGS, *(("max_length",) if masked_lm.config.position != "learned" else ())}
        fixed = sorted(set(config_changes) - settable)  # (sinusoidal and rotary positions have no table)
        if fixed:
            raise ValueError(f"{cls.__name__}.from_masked_lm: {', '.join(fixed)} cannot change (the pretrained "
                             f"encoder's weights fix them); only {' and '.join(sorted(settable))} can")
        model = cls(masked_lm.config.replace(num_labels=num_labels, **config_changes))
        model.encoder.set_weights(masked_lm.encoder.get_weights())
        return model


@keras.saving.register_keras_serializable(package="kerasllm")
class MaskedLM(EncoderModel):
    """BERT-like masked language model (encoder pretraining).

    The head transforms the hidden state (dense + GELU + LayerNorm, as BERT) and
    projects it with the tied token embedding. Train it on batches from
    `kerasllm.data_tasks.masked_lm_dataset`: inputs `{"token_ids", "padding_mask",
    "mask_positions"}`, targets the original ids at `mask_positions`, sample weights
    1 for real selections and 0 for the padding of `mask_positions`. The loss (and
    accuracy) count masked positions only.

    Args:
        config: an `EncoderConfig` (or its dict).

    Call arguments:
        inputs: token ids `[B, T]` or a dict with `token_ids`, optional `padding_mask`
            and optional `mask_positions` `[B, M]`.
    Returns float32 logits `[B, M, V]` at `mask_positions`, or `[B, T, V]` without them.

    Example:
    >>> model = MaskedLM(EncoderConfig.preset("tiny", vocab_size=64))
    >>> tuple(model(np.ones((2, 8), "int32")).shape)
    (2, 8, 64)
    """

    def __init__(self, config, **kwargs):
        kwargs.setdefault("name", "masked_lm")
        super().__init__(config, **kwargs)
        c = self.config
        self.head_dense = keras.layers.Dense(c.hidden_dim, activation="gelu", name="mlm_dense")
        self.head_norm = keras.layers.LayerNormalization(epsilon=c.layer_norm_epsilon, name="mlm_norm")
        if not c.tie_embeddings:
            self.lm_head = keras.layers.Dense(c.vocab_size, use_bias=False, name="lm_head")

    def build(self, input_shape=None):
        shape = (None, None, self.config.hidden_dim)
        self.encoder.build((None, None))
        self.head_dense.build(shape)
        self.head_norm.build(shape)
        if not self.config.tie_embeddings:
            self.lm_head.build(shape)
        self.built = True

    def _logits(self, hidden):
        x = self.head_norm(self.head_dense(hidden))
        logits = self.encoder.embedding.logits(x) if self.config.tie_embeddings else self.lm_head(x)
        return ops.cast(logits, "float32")

    def call(self, inputs, training=None):
        hidden, _ = self.encode(inputs, training=training)
        if isinstance(inputs, dict) and inputs.get("mask_positions") is not None:
            positions = ops.cast(inputs["mask_positions"], "int32")
            hidden = ops.take_along_axis(hidden, ops.expand_dims(positions, -1), axis=1)
        return self._logits(hidden)

    def default_loss(self, label_smoothing=0.0):
        # Mean over the masked positions of the batch: the sample weights are 0 on the
        # padding of `mask_positions`, and "mean_with_sample_weight" divides by their sum.
        return SparseCrossEntropy(label_smoothing=label_smoothing, per_token=True, reduction="mean_with_sample_weight")

    def compile(self, optimizer="auto", loss="auto", metrics="auto", **kwargs):
        if metrics == "auto":  # accuracy on masked positions only (weighted by the sample weights)
            metrics = None
            kwargs.setdefault("weighted_metrics", [keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def export_outputs(self, input_ids, attention_mask):
        """`logits` `[B, T, V]` at every position and pooled `embeddings` `[B, C]`."""
        hidden = self.encoder(input_ids, attention_mask)
        return {"logits": self._logits(hidden),
                "embeddings": ops.cast(pool(hidden, attention_mask, self.config.pooling), "float32")}


@keras.saving.register_keras_serializable(package="kerasllm")
class TextClassifier(EncoderModel):
    """Encoder + pooled classification head: one of `config.num_labels` labels per text.

    The pooled vector (CLS token or masked mean, per `config.pooling`) goes through
    BERT's pooler (dense + tanh), dropout and a linear layer to the label logits.
    Start from scratch, or from a pretrained `MaskedLM` with `from_masked_lm`.

    Args:
        config: an `EncoderConfig` with `num_labels >= 2`.

    Call arguments:
        inputs: token ids `[B, T]` (BOS first, right padding) or a dict with
            `token_ids` and `padding_mask`.
    Returns float32 logits `[B, num_labels]`.

    Example:
    >>> model = TextClassifier(EncoderConfig.preset("tiny", vocab_size=64, num_labels=3))
    >>> tuple(model(np.ones((2, 8), "int32")).shape)
    (2, 3)
    """

    per_example_targets = True

    def __init__(self, config, **kwargs):
        kwargs.setdefault("name", "text_classifier")
        super().__init__(config, **kwargs)
        c = self.config
        if c.num_labels < 2:
            raise ValueError(f"TextClassifier needs config.num_labels >= 2, got {c.num_labels}")
        self.pooler = keras.layers.Dense(c.hidden_dim, activation="tanh", name="pooler")
        self.head_dropout = keras.layers.Dropout(c.dropout, name="head_dropout")
        self.classifier = keras.layers.Dense(c.num_labels, name="classifier")

    def build(self, input_shape=None):
        self.encoder.build((None, None))
        self.pooler.build((None, self.config.hidden_dim))
        self.classifier.build((None, self.config.hidden_dim))
        self.built = True

    def check_targets(self, y):
        check_labels(self, y)

    def _head(self, pooled, training=None):
        features = self.head_dropout(self.pooler(pooled), training=training)
        return ops.cast(self.classifier(features), "float32")

    def call(self, inputs, training=None):
        hidden, padding_mask = self.encode(inputs, training=training)
        return self._head(pool(hidden, padding_mask, self.config.pooling), training=training)

    def export_outputs(self, input_ids, attention_mask):
        """Label `logits` `[B, L]` and pooled `embeddings` `[B, C]`."""
        if self.config.pooling == "cls":  # the graph needs the first token only
            pooled = self.encoder.first_token(input_ids, attention_mask)
        else:
            pooled = pool(self.encoder(input_ids, attention_mask), attention_mask, self.config.pooling)
        return {"logits": self._head(pooled), "embeddings": ops.cast(pooled, "float32")}


@keras.saving.register_keras_serializable(package="kerasllm")
class TokenClassifier(EncoderModel):
    """Encoder + a linear layer per token: one of `config.num_labels` labels for every token.

    Label -1 marks positions without a label (padding, BOS, sub-word continuations);
    the default loss ignores them.

    Example:
    >>> model = TokenClassifier(EncoderConfig.preset("tiny", vocab_size=64, num_labels=5))
    >>> tuple(model(np.ones((2, 8), "int32")).shape)
    (2, 8, 5)
    """

    def __init__(self, config, **kwargs):
        kwargs.setdefault("name", "token_classifier")
        super().__init__(config, **kwargs)
        c = self.config
        if c.num_labels < 2:
            raise ValueError(f"TokenClassifier needs config.num_labels >= 2, got {c.num_labels}")
        self.head_dropout = keras.layers.Dropout(c.dropout, name="head_dropout")
        self.classifier = keras.layers.Dense(c.num_labels, name="classifier")

    def build(self, input_shape=None):
        self.encoder.build((None, None))
        self.classifier.build((None, None, self.config.hidden_dim))
        self.built = True

    def check_targets(self, y):
        check_labels(self, y, no_label=-1)

    def target_padding(self) -> str:
        return "-1 (no label)"

    def call(self, inputs, training=None):
        hidden, _ = self.encode(inputs, training=training)
        return ops.cast(self.classifier(self.head_dropout(hidden, training=training)), "float32")

    def default_loss(self, label_smoothing=0.0):
        if label_smoothing:
            # Keras's ignore_class skips the untagged tokens (-1) and averages over the rest; a
            # smoothed loss would have to rebuild that masking (the CLI refuses the option too).
            raise ValueError("TokenClassifier does not support label_smoothing")
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)

    def export_outputs(self, input_ids, attention_mask):
        """Per-token label `logits` `[B, T, L]`."""
        return {"logits": self.call({"token_ids": input_ids, "padding_mask": attention_mask})}


ENCODER_TASKS = {"masked-lm": MaskedLM, "classifier": TextClassifier, "token-classifier": TokenClassifier}

__all__ = ["Encoder", "EncoderModel", "MaskedLM", "TextClassifier", "TokenClassifier", "pool", "ENCODER_TASKS"]
