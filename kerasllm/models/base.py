"""What every kerasllm model shares: its config, serialization and compile defaults."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from typing import Any

import keras
import numpy as np
from keras import ops

from kerasllm.config import TransformerConfig, config_from_dict
from kerasllm.errors import UsageError
from kerasllm.layers.embedding import check_learned_length
from kerasllm.models.array_inputs import ArrayInputFitMixin
from kerasllm.models.multi_worker import MultiWorkerFitMixin
from kerasllm.models.split_batch import SplitBatchFitMixin
from kerasllm.optimizers import AdamW, WarmupCosineDecay


@keras.saving.register_keras_serializable(package="kerasllm")
class SparseCrossEntropy(keras.losses.Loss):
    """Token-level cross-entropy from logits with optional label smoothing and an ignored id.

    Keras's `SparseCategoricalCrossentropy` has no label smoothing, and the dense
    `CategoricalCrossentropy` needs one-hot targets; this computes the smoothed loss from
    the log-softmax directly (`(1 - eps) * nll + eps * mean(-log p)`) without one-hot.
    Positions whose target equals `ignore_id` (padding) contribute nothing.

    Each example's loss is the mean over its positions (targets `[B, T]`; a classifier's
    targets `[B]` or `[B, 1]` give one loss per example as they are); with `per_token=True` the
    loss of every position is returned as it is (y_true's shape), for Keras's reduction and
    sample weights to average (MaskedLM: the masked positions, weighted, `mean_with_sample_weight`).
    Sample weights of the targets' shape (one per position) weigh each position's loss, as in
    Keras's `SparseCategoricalCrossentropy`; weights of shape `[B]` weigh each example's mean.

    With `ignore_id` the loss is the mean over the batch's kept positions (each weighed by its
    sample weight, a weight per example applying to each of its positions), as torch's
    `CrossEntropyLoss(ignore_index=...)` and Keras's `ignore_class` compute it: weights of ones
    change nothing, and a row that is all padding adds nothing and is not counted.
    """

    def __init__(self, label_smoothing=0.0, ignore_id=None, per_token=False, name="sparse_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        if per_token and ignore_id is not None:
            raise ValueError("per_token leaves the weighting to sample weights: pass ignore_id=None")
        self.label_smoothing = float(label_smoothing)
        self.ignore_id = ignore_id
        self.per_token = bool(per_token)

    def __call__(self, y_true, y_pred, sample_weight=None):
        if ops.ndim(y_true) is None:
            # Rank unknown until run time: Keras retraces a step that has seen targets of two ranks
            # (a classifier's [B] and [B, 1]) with the rank relaxed. Every target shape this loss
            # takes holds one id per row of the logits: read them so.
            y_true = ops.reshape(y_true, ops.shape(y_pred)[:-1])
        if len(ops.shape(y_true)) == len(ops.shape(y_pred)) and ops.shape(y_true)[-1] == 1:
            y_true = ops.squeeze(y_true, axis=-1)  # a classifier's [B, 1] targets: one id per row, as [B]
        target_rank = len(ops.shape(y_true))
        if self.ignore_id is not None:  # (never with per_token: __init__ refuses the pair)
            return self._weigh_positions(y_true, y_pred, self._weight_per_position(sample_weight, y_true))
        if sample_weight is None or self.per_token or target_rank < 2:
            return super().__call__(y_true, y_pred, sample_weight)
        weight_rank = ops.ndim(sample_weight)
        if weight_rank == target_rank:
            return self._weigh_positions(y_true, y_pred, sample_weight)
        if weight_rank is not None:
            return super().__call__(y_true, y_pred, sample_weight)
        # Rank unknown until run time: Keras retraces a step that has seen weights of both ranks
        # ([B] and [B, T]) with the rank relaxed. Both readings, each from a view of the weights
        # that is valid for either rank, and the one of the weights' rank kept (two scalars;
        # XLA knows the rank when it compiles).
        import tensorflow as tf  # noqa: PLC0415 - the TF backend only

        rows = ops.reshape(sample_weight, (ops.shape(y_true)[0], -1))  # [B, 1] or [B, T]
        per_position = self._weigh_positions(y_true, y_pred, ops.broadcast_to(rows, ops.shape(y_true)))
        per_example = super().__call__(y_true, y_pred, rows[:, 0])
        return ops.where(ops.equal(tf.rank(sample_weight), target_rank), per_position, per_example)

    @staticmethod
    def _weight_per_position(sample_weight, y_true):
        """Sample weights of the targets' shape: ones for none; a weight per example (`[B]` or
        `[B, 1]`, rank known or not) repeated over the example's positions."""
        if sample_weight is None:
            return ops.ones(ops.shape(y_true), "float32")
        if ops.ndim(sample_weight) == len(ops.shape(y_true)):
            return sample_weight
        rows = ops.reshape(sample_weight, (ops.shape(y_true)[0], -1))  # [B, 1] or [B, T]
        return rows[:, 0] if len(ops.shape(y_true)) == 1 else ops.broadcast_to(rows, ops.shape(y_true))

    def _weigh_positions(self, y_true, y_pred, sample_weight):
        """The loss with one weight per position (targets' shape): each position's loss weighed by
        Keras's own reduction (a mean per example first would have no place for them). Ignored
        positions weigh nothing and, as Keras's `ignore_class` does (`apply_mask`), are not counted:
        the weighted sum is divided by the positions kept, not by all of them (else the more padding
        a batch held, the less its loss and gradient would weigh)."""
        from keras.src.losses.loss import reduce_weighted_values  # noqa: PLC0415

        with keras.name_scope(self.name):
            y_true = ops.cast(y_true, "int32")
            sample_weight = ops.cast(sample_weight, "float32")
            if self.ignore_id is not None:
                keep = ops.cast(ops.not_equal(y_true, self.ignore_id), "float32")
                sample_weight = sample_weight * keep
                if self.reduction in ("mean", "sum_over_batch_size"):
                    # Keras's apply_mask: the kept positions scaled by all / kept, so that the
                    # reduction's division by all positions becomes one by the kept ones.
                    total = ops.cast(ops.prod(ops.convert_to_tensor(ops.shape(keep), "int32")), "float32")
                    kept, replicas = _summed_over_replicas(ops.sum(keep))
                    sample_weight = sample_weight * (total * replicas / ops.maximum(kept, 1.0))
            return reduce_weighted_values(self._token_losses(y_true, y_pred), sample_weight=sample_weight,
                                          reduction=self.reduction, dtype=self.dtype)

    def _token_losses(self, y_true, y_pred):
        """The (smoothed) loss of every target, y_true's shape."""
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(y_true, "int32")
        if not self.label_smoothing:
            # The fused kernel (tf.nn.sparse_softmax_cross_entropy_with_logits) is faster.
            return ops.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        log_probs = ops.log_softmax(y_pred, axis=-1)
        nll = -ops.take_along_axis(log_probs, ops.expand_dims(y_true, -1), axis=-1)[..., 0]
        smooth = -ops.mean(log_probs, axis=-1)
        return (1.0 - self.label_smoothing) * nll + self.label_smoothing * smooth

    def call(self, y_true, y_pred):
        nll = self._token_losses(y_true, y_pred)
        if self.ignore_id is not None:  # (`__call__` weighs these itself: `_weigh_positions`)
            return nll * ops.cast(ops.not_equal(ops.cast(y_true, "int32"), self.ignore_id), "float32")
        if self.per_token or len(ops.shape(y_true)) < 2:  # per token, or one target per example
            return nll
        return ops.mean(nll, axis=-1)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing, "ignore_id": self.ignore_id,
                "per_token": self.per_token}


def _summed_over_replicas(count):
    """`(count summed over the replicas, replicas)` inside a replicated step, else `(count, 1)`.

    Under a strategy with several replicas Keras divides each replica's loss by the replicas
    (`scale_loss_for_distribution`) and sums the gradients: the mean of the replicas' own token
    means, not the batch's token mean where the replicas keep different numbers of positions.
    Divided by the positions kept on all replicas (times the replicas, which Keras divides out
    again), the summed gradient is the global batch's, as on one device."""
    import tensorflow as tf  # noqa: PLC0415 - the TF backend only

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return count, 1
    return context.all_reduce(tf.distribute.ReduceOp.SUM, count), context.num_replicas_in_sync


def token_id_rows(rows, vocab_size: int, what: str = "prompt") -> list[np.ndarray]:
    """`generate`'s inputs (lists of ids, 1-D arrays, or a 2-D array's rows) as 1-D int arrays.

    UsageError for an empty input or row, a row that is not a list of integer ids, and an id
    outside the vocabulary: the compiled loop would clamp it into the embedding table (XLA's
    gather does) and return tokens all the same.
    """
    import tensorflow as tf  # noqa: PLC0415 - the TF backend only

    if tf.inside_function():  # (iterating a symbolic tensor had failed deep in TensorFlow)
        raise UsageError("generate runs eagerly: it compiles its own XLA loop and takes NumPy arrays or lists; "
                         "call it outside tf.function (to serve from a graph, export the model)")
    rows = [np.asarray(row) for row in rows]
    if not rows or any(row.size == 0 for row in rows):
        raise UsageError(f"generate: every {what} needs at least one token")
    for index, row in enumerate(rows):
        if row.ndim != 1 or row.dtype.kind not in "iu":
            raise UsageError(f"generate: {what} {index} is not a list of token ids: {row!r}")
        bad = row[(row < 0) | (row >= vocab_size)]
        if bad.size:
            raise UsageError(f"generate: {what} {index} has token id {bad[0]}, outside the vocabulary "
                             f"of {vocab_size} ids (0..{vocab_size - 1})")
    return rows


def stop_id_tuple(stop_token_ids, vocab_size: int) -> tuple[int, ...]:
    """`generate`'s `stop_token_ids` (None, one id, or any iterable of ids) as a tuple of Python ints.

    UsageError for anything that is not integer ids and for an id outside the vocabulary (the
    model can never emit it, so it would stop nothing).
    """
    if stop_token_ids is None:
        return ()
    given = stop_token_ids
    if isinstance(given, (int, np.integer)):
        given = [given]
    elif isinstance(given, (str, bytes)) or not isinstance(given, Iterable):
        raise UsageError(f"generate: stop_token_ids must be token ids (integers), got {stop_token_ids!r}")
    ids = []
    for value in given:  # a list, tuple, set, array, dict keys or generator of ids
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UsageError(f"generate: stop_token_ids must be token ids (integers), got {value!r} in them")
        if not 0 <= value < vocab_size:
            raise UsageError(f"generate: stop token id {value} is outside the vocabulary of {vocab_size} ids "
                             f"(0..{vocab_size - 1})")
        ids.append(int(value))
    return tuple(ids)


def refuse_ragged(model, name, value) -> None:
    """ValueError for a `tf.RaggedTensor` (or a dataset's spec of one) where `[batch, length]` ids
    are taken: it had failed inside the attention mask ("unsupported operand type(s) for -:
    'NoneType' and 'NoneType')."""
    import tensorflow as tf  # noqa: PLC0415 - the TF backend only

    if isinstance(value, (tf.RaggedTensor, tf.RaggedTensorSpec)):
        raise ValueError(f"{type(model).__name__} expects {name} of shape [batch, length], got a ragged tensor: "
                         f"pad it (`.to_tensor({model.config.pad_id})`, or batch a tf.data.Dataset with "
                         "padded_batch)")


def check_id_range(model, name, value, vocab_size: int, ignored=None):
    """ValueError where the array `value` holds an id outside `0..vocab_size-1`. Under XLA
    (compile's default) an input id past the table is clamped into it (the model reads another
    token) and a target past the logits gives a NaN loss, which one `fit` step spreads to every
    weight; TensorFlow's own kernels raise a multi-line graph error. Tensors and datasets pass:
    their values are seen only when the step runs. `ignored` (a loss's ignored id, e.g. padding)
    may stand anywhere."""
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf" or not value.size:
        return
    if value.dtype.kind == "f" and not np.array_equal(value, np.trunc(value), equal_nan=False):
        # Cast to ids, 0.5 had read as 0 (padding): `x / vocab_size` from a "normalise the inputs" step
        # trained on all-padding rows without a word. (`generate` refuses float prompts.)
        bad = value[value != np.trunc(value)].flat[0].item()
        raise ValueError(f"{type(model).__name__}: {name} holds {bad!r}, not a token id (ids are whole numbers; "
                         "give an integer array)")
    low, high = value.min(), value.max()
    if (low < 0 or high >= vocab_size) and ignored is not None:  # the loss's ignored id is no token
        # Only here, past the quick min/max: a mask and a copy of a large array cost ~20x as much.
        kept = value[value != ignored]
        low, high = (kept.min(), kept.max()) if kept.size else (0, 0)
    if low < 0 or high >= vocab_size:
        bad = (low if low < 0 else high).item()
        bad = int(bad) if float(bad).is_integer() else bad  # 70000, not 7e+04, from a float array
        raise ValueError(f"{type(model).__name__}: {name} holds id {bad}, outside the vocabulary of "
                         f"{vocab_size} ids (0..{vocab_size - 1})")


def _kerasllm_class(model_class: type) -> type:
    """The kerasllm model class `model_class` is or derives from (a user's subclass's base)."""
    return next(c for c in model_class.__mro__ if c.__module__.startswith("kerasllm.models"))


def _static_shape(value) -> tuple | None:
    """`value`'s shape where fully known (an array, a tensor, a dataset's TensorSpec), else None."""
    shape = getattr(value, "shape", None)
    try:
        dims = tuple(None if d is None else int(d) for d in shape) if shape is not None else None
    except TypeError:  # an unknown rank
        return None
    return None if dims is None or None in dims else dims


def _sparse_cross_entropy_ignores(loss):
    """The id a sparse cross-entropy `loss` ignores (None: none), or False where `loss` is not one
    (kerasllm's `SparseCrossEntropy`, Keras's by name, class or function) or not known."""
    if isinstance(loss, SparseCrossEntropy):
        return loss.ignore_id
    if loss in ("sparse_categorical_crossentropy", keras.losses.sparse_categorical_crossentropy):
        return None
    if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        return loss._fn_kwargs.get("ignore_class")
    return False


def default_optimizer(learning_rate=1e-3, total_steps=None, warmup_steps=None, min_learning_rate=None,
                      weight_decay=0.1, beta_2=0.99, global_clipnorm=1.0, clipnorm=None):
    """AdamW with linear warmup then cosine decay, decoupled weight decay and gradient clipping.

    As in nanoGPT and GPT-2: weight decay applies to matrices only, never to biases,
    LayerNorm scales or embeddings' positions; the schedule warms up linearly for
    `warmup_steps` (default 5% of `total_steps`) and decays to `min_learning_rate`
    (default lr / 10). Without `total_steps` the rate is constant. Keras's AdamW and
    CosineDecay arithmetic, traced in fewer ops (`kerasllm.optimizers`): betas 0.9 / `beta_2`
    and Keras's epsilon, 1e-7, added to the bias-corrected step's denominator as Keras and
    TensorFlow's Adam kernel place it (`lr_t * m / (sqrt(v) + eps)` with `lr_t` carrying the
    bias corrections). torch's AdamW adds its 1e-8 to `sqrt(v_hat)`: the two differ only
    where gradients are as small as epsilon (a first step on 1e-5 gradients: 0.91 lr vs
    0.999 lr; over 23 steps of a tiny model the weights agreed within 0.5% of their update).

    Gradients are clipped to a global L2 norm of `global_clipnorm` (nanoGPT's and GPT-2's
    `clip_grad_norm_(1.0)`); `clipnorm` instead clips each gradient to that norm on its own
    (Keras's `clipnorm`) and turns the global clip off. The global clip is also the cheaper
    graph: one norm instead of one per variable (the 4-layer benchmark model's first step,
    trace + XLA compile, 3.5 -> 2.9 s).
    """
    schedule: Any = learning_rate
    if total_steps:
        warmup_steps = int(total_steps * 0.05) if warmup_steps is None else int(warmup_steps)
        min_lr = learning_rate / 10 if min_learning_rate is None else min_learning_rate
        schedule = WarmupCosineDecay(peak=learning_rate, decay_steps=max(int(total_steps) - warmup_steps, 1),
                                     warmup_steps=warmup_steps, final=min_lr)
    optimizer = AdamW(
        learning_rate=schedule, weight_decay=weight_decay, beta_1=0.9, beta_2=beta_2, clipnorm=clipnorm,
        global_clipnorm=None if clipnorm else global_clipnorm,
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "position_embeddings"])
    return optimizer


class _Default(float):
    """A `compile` setting's default, told apart from the same value passed by the caller (`is`):
    settings passed beside an optimizer of one's own are refused, whatever their value."""

    @staticmethod
    def value_of(value):
        return float(value) if isinstance(value, _Default) else value


class TransformerModel(ArrayInputFitMixin, MultiWorkerFitMixin, SplitBatchFitMixin, keras.Model):
    """Base class: holds a family config and rebuilds from it when loading `.keras` files.

    `ArrayInputFitMixin` feeds arrays given to `fit`/`evaluate`/`predict` through Keras's own
    batching without tf.data's autotuning, whose iterators could hold an epoch's start for
    seconds (see `kerasllm/models/array_inputs.py`).
    `MultiWorkerFitMixin` makes `fit` work under `MultiWorkerMirroredStrategy` (Keras 3 bug,
    see `kerasllm/models/multi_worker.py`); outside multi-worker training it changes nothing.
    `SplitBatchFitMixin` runs a CPU step as concurrent parts of the batch
    (`compile(batch_split=...)`, see `kerasllm/models/split_batch.py`).
    """

    config_class: type[TransformerConfig] = TransformerConfig
    # The input dict's keys that hold token ids `[B, T]` (the first: the ids given without a dict).
    token_inputs: tuple[str, ...] = ("token_ids",)
    # One target per example (a text classifier's label), not one per token: what `class_weight` weighs.
    per_example_targets: bool = False

    # What the model is built from once constructed (each model's `build` takes it; `Seq2SeqLM`: None).
    init_build_shape: tuple | None = (None, None)

    def __init_subclass__(cls, **kwargs):
        """Build a model at the end of its kerasllm class's `__init__`, and let a user's subclass add
        state until its own `__init__` returns.

        Built (so that its weights exist before any call: `count_params`, `summary`, `load_weights`
        right after `super().__init__()`), a model is locked by Keras: a subclass's `__init__` could not
        add a layer after `super().__init__()` (a value head on a CausalLM: "You cannot add new elements
        of state ... to a layer that is already built"), as keras-hub's models allow. Keras's tracker is
        unlocked while the subclass's `__init__` runs and locked when it returns (Keras's own
        `quantize` unlocks and relocks it so). A subclass with a `build()` of its own (building the
        layers it adds, after `super().build()`) is built once its `__init__` has returned instead.
        """
        super().__init_subclass__(**kwargs)
        # Its own __init__ or the one it inherits (a mixin's put first: `class M(Mixin, CausalLM)`), so that
        # every model class's __init__ is the outermost one for its own instances.
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kw):
            depth = self.__dict__.get("_init_depth", 0)
            object.__setattr__(self, "_init_depth", depth + 1)  # (untracked: not model state)
            try:
                init(self, *args, **kw)
            finally:
                object.__setattr__(self, "_init_depth", depth)
            own_build = type(self).build is cls.build  # (a subclass's own build() builds what it adds)
            if cls is _kerasllm_class(type(self)) and not self.built and (own_build or not depth):
                self.build(self.init_build_shape)
                if depth:  # a subclass's __init__ goes on after super().__init__()
                    self._tracker.unlock()
            if not depth:
                if not self.built:  # a subclass with a build() of its own: once its __init__ has made its layers
                    self.build(self.init_build_shape)
                self._lock_state()

        # Keras reads the constructor's arguments (its auto-config) through both inspect.signature, which
        # follows `__wrapped__`, and inspect.getfullargspec, which does not: one signature for both.
        __init__.__signature__ = inspect.signature(init)
        cls.__init__ = __init__

    def __init__(self, config: TransformerConfig | dict, **kwargs):
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = config_from_dict(config)
        if not isinstance(config, self.config_class):
            # Another family's config lacks this model's fields (or, worse, has them all and saves
            # under the wrong family).
            raise TypeError(f"{type(self).__name__} expects a config of class {self.config_class.__name__} "
                            f"(or its dict), got {type(config).__name__}")
        self.config = config

    def token_id_batch(self, name, value):
        """`value` as the model takes it: token ids given as a list of rows (what a tokenizer returns,
        and `CausalLM.generate` takes) or a NumPy object array of rows, as the `[batch, length]`
        array of them; anything else as it is. Rows of different lengths are a ValueError saying
        how to pad them (Keras had refused a list as an "Unrecognized data type", and an object
        array of rows had read as one sequence)."""
        if not isinstance(value, list) and not (isinstance(value, np.ndarray) and value.dtype == object):
            return value
        rows = value.tolist() if isinstance(value, np.ndarray) else value
        lengths = sorted({len(row) for row in rows if isinstance(row, (list, tuple, np.ndarray))})
        if len(lengths) > 1:
            padding = self.target_padding() if name == "targets" else f"pad_id {self.config.pad_id}"
            raise ValueError(f"{type(self).__name__} expects {name} of shape [batch, length], got rows of "
                             f"{lengths[0]} to {lengths[-1]} tokens: pad the rows to one length with {padding} "
                             f"(after each row's tokens)")
        return np.asarray(rows)

    def target_padding(self) -> str:
        """What rows of targets are padded with, as `token_id_batch`'s message says it: the id the
        default loss ignores where it ignores one (a token classifier's -1: its pad_id is a label)."""
        return f"pad_id {self.config.pad_id}"

    def token_batches(self, x):
        """The inputs `x` (ids, or a dict of them) with `token_id_batch` applied to the token ids."""
        if isinstance(x, dict):
            return {key: self.token_id_batch(key, value) if key in self.token_inputs else value
                    for key, value in x.items()}
        return self.token_id_batch(self.token_inputs[0], x)

    def predict(self, x, *args, **kwargs):
        """`keras.Model.predict`, with token ids as lists of rows too (`token_id_batch`)."""
        return super().predict(self.token_batches(x), *args, **kwargs)

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`, with token ids and targets as lists of rows too (`token_id_batch`),
        in `validation_data` too."""
        if kwargs.get("class_weight") is not None and not self.per_example_targets:
            # Keras weighs each example by the class `argmax(y, -1)`, which for [B, T] targets is the
            # position of a row's largest id: a CausalLM's loss had become 0.0, a TokenClassifier's
            # fit a graph error.
            raise ValueError(f"{type(self).__name__}: class_weight weighs each example by its one class, and "
                             f"{type(self).__name__}'s targets are per token: give the weights per token as "
                             "sample_weight of shape [batch, length] instead")
        schedule = getattr(getattr(self, "optimizer", None), "_learning_rate", None)  # (none before compile)
        callbacks = kwargs.get("callbacks") or ()
        if isinstance(callbacks, keras.callbacks.CallbackList):  # (not iterable itself)
            callbacks = callbacks.callbacks
        setting = [type(c).__name__ for c in callbacks
                   if isinstance(c, (keras.callbacks.ReduceLROnPlateau, keras.callbacks.LearningRateScheduler))]
        if setting and isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            # Keras's own refusal comes at the callback's first change, maybe hours in, and tells to build
            # "the optimizer with a float learning_rate", which compile() built.
            raise ValueError(f"{type(self).__name__}: {setting[0]} sets the learning rate, which follows a schedule "
                             f"here ({type(schedule).__name__}, from compile(total_steps=...)): compile without "
                             "total_steps for a constant learning rate the callback can change")
        validation = kwargs.get("validation_data")
        if isinstance(validation, tuple) and len(validation) in (2, 3):
            kwargs["validation_data"] = (self.token_batches(validation[0]),
                                         self.token_id_batch("targets", validation[1]), *validation[2:])
        return super().fit(self.token_batches(x), self.token_id_batch("targets", y), *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.evaluate`, with token ids and targets as lists of rows too (`token_id_batch`)."""
        return super().evaluate(self.token_batches(x), self.token_id_batch("targets", y), *args, **kwargs)

    def input_vocab_size(self, name) -> int:
        """How many ids the token input `name` indexes (a Seq2SeqLM's decoder: its target vocabulary)."""
        return self.config.vocab_size

    def check_token_ids(self, name, value):
        """ValueError unless `value` (an array, tensor or `tf.TensorSpec`) holds `[batch, length]`
        token ids, within `max_length` with learned positions. Dimensions unknown until run time
        pass: there XLA's gather clamps positions past the table (see TokenAndPositionEmbedding)."""
        refuse_ragged(self, name, value)
        shape = getattr(value, "shape", None)
        if shape is None or getattr(shape, "rank", 0) is None:  # no shape, or a tf.TensorShape of unknown rank
            return
        shape = tuple(shape)
        if len(shape) != 2:
            raise ValueError(f"{type(self).__name__} expects {name} of shape [batch, length], got shape {shape} "
                             f"(one sequence: add a batch axis; a tf.data.Dataset: batch it)")
        if self.config.position == "learned":
            check_learned_length(shape[1], self.config.max_length, f"{name}: a sequence")

    def check_inputs(self, x, y=None):
        """Refuse what `fit`/`evaluate`/`predict` were given (`ArrayInputFitMixin` calls this first):
        a dict without the token inputs the model needs (or, for a model of several, no dict),
        token ids by their shape (`check_token_ids`), from arrays, tensors or dicts of them, or from
        a `tf.data.Dataset`'s element_spec, and arrays' ids and targets by their values
        (`check_id_range`, `check_targets`). Where a length is unknown until run time it passes,
        and a compiled step silently clamps positions past max_length (learned positions); a
        dataset's or a tensor's values are seen only when the step runs.
        """
        import tensorflow as tf  # noqa: PLC0415 - the TF backend only
        from keras.src.trainers.data_adapters import data_adapter_utils  # noqa: PLC0415

        if isinstance(x, tf.data.Dataset):
            x, target_spec, _ = data_adapter_utils.unpack_x_y_sample_weight(x.element_spec)
        else:
            target_spec = None
        expected = " and ".join(self.token_inputs)
        if isinstance(x, dict):
            self.check_input_keys(x)
            for name in self.token_inputs:
                self.check_token_ids(name, x[name])
                check_id_range(self, name, x[name], self.input_vocab_size(name))
            for name, value in x.items():  # (a mask of another shape had failed deep in the attention's broadcast)
                ids = x.get(name.replace("padding_mask", "token_ids")) if name.endswith("padding_mask") else None
                mask_shape, ids_shape = _static_shape(value), _static_shape(ids)
                if ids is not None and None not in (mask_shape, ids_shape) and mask_shape != ids_shape:
                    raise ValueError(f"{type(self).__name__}: {name} of shape {list(mask_shape)} for "
                                     f"{name.replace('padding_mask', 'token_ids')} of shape {list(ids_shape)}: "
                                     "give one mask value per token")
        elif len(self.token_inputs) > 1:
            if hasattr(x, "shape") or isinstance(x, (list, tuple)):  # generators and PyDatasets are seen when run
                raise ValueError(f"{type(self).__name__} expects a dict with {expected}, got {type(x).__name__}")
        else:
            self.check_token_ids(self.token_inputs[0], x)
            check_id_range(self, self.token_inputs[0], x, self.input_vocab_size(self.token_inputs[0]))
        refuse_ragged(self, "targets", target_spec if target_spec is not None else y)
        self.check_targets(y)

    def check_input_keys(self, x: dict) -> None:
        """ValueError where the dict `x` lacks a token input the model needs."""
        missing = [name for name in self.token_inputs if x.get(name) is None]
        if missing:
            raise ValueError(f"{type(self).__name__} expects a dict with {' and '.join(self.token_inputs)}; "
                             f"{', '.join(missing)} missing (got {', '.join(map(str, x)) or 'no keys'})")

    def check_targets(self, y):
        """Refuse array targets the loss cannot take: here token ids outside the vocabulary of the
        logits (the last token input's), its ignored id aside, where the loss is kerasllm's or
        Keras's sparse cross-entropy (a loss of the caller's own may read other values); models
        that predict labels check those instead."""
        ignored = _sparse_cross_entropy_ignores(self.loss)
        if ignored is False or y is None:
            return
        check_id_range(self, "targets", y, self.input_vocab_size(self.token_inputs[-1]), ignored=ignored)

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Keras's `Model.export` (a SavedModel for TF Serving, ...), its serving function taking int32
        token ids `[batch, length]` by default (a dict of them where the model takes several). Keras's
        default follows `input_dtype`, float32: kerasllm's models build from shapes, not int32 Inputs as
        keras-hub's, so TF Serving clients' integer ids were refused (and Seq2SeqLM did not export).
        kerasllm's own ONNX export is `kerasllm export` / `kerasllm.export.exporter.export_model_dir`."""
        if input_signature is None:
            input_signature = [self._token_ids_spec()]
        return super().export(filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)

    def _token_ids_spec(self):
        """int32 `[batch, length]` token ids, a dict of them where the model takes several."""
        import tensorflow as tf  # noqa: PLC0415 - the TF backend only

        specs = {name: tf.TensorSpec([None, None], tf.int32, name=name) for name in self.token_inputs}
        return specs if len(specs) > 1 else specs[self.token_inputs[0]]

    @property
    def _default_save_signature(self):
        """The serving signature a SavedModel of the model gets (Keras's, from the build shapes and
        `input_dtype`, took float32 ids and, where the model builds from no shape, failed)."""
        import tensorflow as tf  # noqa: PLC0415 - the TF backend only

        @tf.function(input_signature=[self._token_ids_spec()])
        def serving_default(inputs):
            return self(inputs)

        return serving_default

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def get_compile_config(self):
        # Optimizer and schedule are rebuilt by `compile()` (or restored from a training
        # checkpoint), so `.keras` files carry weights and architecture only.
        return None

    def default_metrics(self):
        return None

    def default_loss(self, label_smoothing=0.0):
        return SparseCrossEntropy(label_smoothing=label_smoothing)

    def compile(self, optimizer="auto", loss="auto", metrics="auto", *, learning_rate=_Default(1e-3), total_steps=None,
                warmup_steps=None, weight_decay=_Default(0.1), global_clipnorm=_Default(1.0), clipnorm=None,
                label_smoothing=0.0, jit_compile="auto", batch_split="auto", **kwargs):
        """`keras.Model.compile` with defaults that train transformers well.

        `optimizer="auto"`: AdamW with global-norm clipping (`default_optimizer`); its rate warms
        up then decays on a cosine when `total_steps` is given, and is a constant `learning_rate`
        without it. `learning_rate`, `total_steps`, `warmup_steps`, `weight_decay`,
        `global_clipnorm` and `clipnorm` configure that optimizer: with an optimizer of your own,
        set them on it (passing them too is a ValueError, not silently ignored).
        `loss="auto"`: token cross-entropy from logits, with `label_smoothing` (likewise only
        with the default loss).
        `metrics="auto"`: none for language models (perplexity is exp(loss); an argmax
        over the vocabulary every step costs throughput), task heads may define theirs in
        `default_metrics`. `jit_compile="auto"`: XLA, whose steps are ~1.7x faster on CPU
        too (Keras's own "auto" only turns it on for GPUs and TPUs), wherever it can compile
        the step: not under a strategy with several CPU/GPU replicas, such as
        MirroredStrategy (`kerasllm.distribute.xla_compiles_step`).
        `batch_split="auto"`: on a multi-core CPU without a distribution strategy and
        without dropout, each batch's gradients are computed in two parts at once, one
        compiled program per core (~12% faster steps; `kerasllm/models/split_batch.py`);
        an integer sets the parts, 1 turns it off.
        Anything passed explicitly is used as is.
        """
        # Passed at all, not "other than the default": `global_clipnorm=1.0` beside an optimizer of one's
        # own had been dropped without a word (no clipping), as the default's value.
        settings = [name for name, value in (
            ("learning_rate", learning_rate), ("total_steps", total_steps), ("warmup_steps", warmup_steps),
            ("weight_decay", weight_decay), ("global_clipnorm", global_clipnorm), ("clipnorm", clipnorm))
            if value is not None and not isinstance(value, _Default)]
        if optimizer != "auto" and settings:
            raise ValueError(f"compile: {', '.join(settings)} {'configures' if len(settings) == 1 else 'configure'} "
                             "the default optimizer (optimizer='auto'); with an optimizer of your own, set "
                             f"{'it' if len(settings) == 1 else 'them'} there")
        learning_rate, weight_decay, global_clipnorm = (_Default.value_of(v) for v in (learning_rate, weight_decay,
                                                                                       global_clipnorm))
        if loss != "auto" and label_smoothing:
            raise ValueError("compile: label_smoothing applies to the default loss (loss='auto'); with a loss of "
                             "your own, set it on that loss")
        if optimizer == "auto":
            optimizer = default_optimizer(learning_rate, total_steps, warmup_steps, weight_decay=weight_decay,
                                          global_clipnorm=global_clipnorm, clipnorm=clipnorm)
        if loss == "auto":
            loss = self.default_loss(label_smoothing)
        if metrics == "auto":
            metrics = self.default_metrics()
        if jit_compile == "auto":
            from kerasllm.distribute import xla_compiles_step  # noqa: PLC0415

            jit_compile = xla_compiles_step(self.distribute_strategy)
        replicas = self.distribute_strategy.num_replicas_in_sync
        if kwargs.get("steps_per_execution", 1) > 1 and replicas > 1:
            # Keras 3's several-step loop fails there at the first fit (keras-team/keras#19246:
            # "You must feed a value for placeholder tensor"); kerasllm's own runs use 1 (fit_run).
            raise ValueError(f"steps_per_execution={kwargs['steps_per_execution']} cannot run on the "
                             f"{replicas} replicas of {type(self.distribute_strategy).__name__} in Keras 3 "
                             "(keras-team/keras#19246); use steps_per_execution=1")
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit_compile, **kwargs)
        self.configure_batch_split(batch_split, loss)
        if self.built and self.optimizer is not None and not self.optimizer.built:
            # Create the optimizer's slots now. Without a distribution strategy Keras 3 (TF
            # backend) defers them to the trace of the first train step, and TensorFlow
            # then traces that step a second time (variables created on a first call):
            # ~1.2 s of the first step for the 4-layer benchmark model.
            self.optimizer.build(self.trainable_variables)
