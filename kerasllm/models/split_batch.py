"""Train and evaluate on a CPU with one batch split into parts that run on the cores at once.

Why: XLA on the CPU runs one compiled step as a sequence of kernels. Its matrix products use
TensorFlow's intra-op threads, but the ~120 small fused element-wise kernels of a transformer
step (layer norms, GELU, softmax, residual adds, the optimizer's update) run on one thread
each, and a small matrix product split over two threads spends much of its time waiting. Two
independent XLA programs, each computing the gradients of half the batch, keep both cores
busy for the whole step instead. TensorFlow's executor runs the two calls concurrently on its
inter-op threads; then one more compiled program averages the parts' gradients (weighted as
the loss's reduction weighs them: by rows, or by the sum of the sample weights or the count of
unmasked targets where the loss divides by those, `loss_denominator`) and applies the optimizer,
so the update is the one full-batch gradient gives (to float rounding). A loss whose reduction is
not known there (a `keras.losses.Loss` subclass of the caller's own, `reduction="sum"`) keeps
Keras's own step.

Measured on the 2-core development machine, the 4-layer / 128-wide benchmark model (batch 12
x 64 tokens, AdamW, global-norm clipping, XLA): one compiled step 28.2 ms against 24.8 ms for
two halves plus the update (one process, steps alternated, median of 8 x 25 steps; 12%
faster, ratio per pair 0.85-1.02). With TensorFlow's default threads both parts' kernels share
one pool and finish at different times; `kerasllm train` on a machine whose cores equal the
parts gives TensorFlow one intra-op thread, so each part runs whole on a core of its own
(`give_parts_a_core_each`: ~7% more tokens/s in whole CLI runs). See
tests/benchmarks/bench_train_causal_lm.py for whole-run figures.

When (`batch_split="auto"`, the default of `TransformerModel.compile`): XLA is on, no
distribution strategy is in use (MirroredStrategy, multi-worker and TPU runs keep Keras's own
step: their replicas already use the devices), no GPU or TPU is visible, the process may use
at least two cores, the model has at least `AUTO_MIN_PARAMETERS` weights (below that a step is
a few milliseconds either way), and the model draws no random numbers in training (no dropout): parts
running at the same time would read the same random-seed state and draw the same dropout
masks, so a model with dropout keeps the one-program step; so does a model compiled with several
losses (Keras updates a metric per loss inside `compute_loss`, which parts would race on), and one
whose layers update variables as they run (`updates_state`: a BatchNormalization in a user's head
would take each part's half-batch statistics, and the warm-up's zero batches). In a
process that `give_parts_a_core_each` set to one intra-op thread, the size rule is skipped. An
integer asks for that many parts regardless (1: off); the random-number and state rules still hold. The environment variable
`KERASLLM_BATCH_SPLIT` (an integer) stands in for `"auto"`, e.g. `KERASLLM_BATCH_SPLIT=1
kerasllm train ...` trains with Keras's own step.

What stays Keras's: the loss (`compute_loss`, so `add_loss` terms and loss scaling under
mixed precision apply per part and average out), the loss tracker and compiled metrics (fed
the whole batch's predictions), callbacks, `steps_per_execution`. Only the outer function
that Keras builds around `train_step`/`test_step` is left uncompiled, since the compiled
parts are called from it.

Grappler: TensorFlow's graph optimizer is off while a split-step `fit` runs (`_grappler_off`; the
outer functions only dispatch compiled programs), and as it was afterwards.

Warm-up: `fit` with `tf.data.Dataset`s whose batches have fixed shapes (as `kerasllm train`'s)
traces the parts before the first step, the train step's (`part_gradients`) for the training
data and the evaluation's (`part_loss`) for `validation_data`, and compiles each in a background
thread on zero batches of those shapes as soon as it is traced, while the main thread traces the
rest of the first train step (Python, one core); the step and the first validation then find
them compiled. The parts are pure (no model, optimizer or metric state changes), so results are
unchanged. `apply_mean` writes the weights, so it still compiles at the first step. On the
2-core machine, the benchmark model (tests/benchmarks/bench_train_causal_lm.py):
  * the evaluation's parts: first validation 1.6 -> 0.7 s, ~0.4 s per run in all (12 of 14
    alternated fits faster);
  * the train step's parts too (a 300-step `kerasllm train causal-lm` with validation, 6 runs
    alternated with the evaluation-only warm-up): its first 10 steps done 5.5 s after start
    instead of 6.0 (medians; faster in 6/6), the whole run 13.3 s instead of 13.85 (5/6).
`KERASLLM_WARM_UP=0` turns it off.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from contextlib import contextmanager

import keras
from keras import tree

from kerasllm import distribute
from kerasllm.errors import UsageError

log = logging.getLogger("kerasllm")

MAX_PARTS = 2  # measured on two cores; a larger machine still gives each part intra-op threads
# "auto" leaves smaller models alone: the 2-layer / 32-wide test model's step (8 x 32 tokens) took
# 2.9 ms whole and 2.8 ms split, while the second compiled program costs ~0.5 s at the first step.
AUTO_MIN_PARAMETERS = 200_000


def draws_random_numbers(model: keras.Model) -> bool:
    """Whether any layer of `model` holds a seed generator (dropout with a rate > 0, noise layers)."""
    return any(getattr(layer, "seed_generator", None) is not None for layer in model._flatten_layers())


def updates_state(model: keras.Model) -> bool:
    """Whether any layer of `model` holds variables it updates as it runs, not by gradients (a
    BatchNormalization's moving statistics, in a user's head): each part would update them from half
    a batch, and the warm-up's zero batches twice more. (A frozen layer's weights are not such
    variables: Keras keeps them among its trainable ones, flagged; a seed generator's state is
    `draws_random_numbers`'.)"""
    return any(getattr(layer, "_non_trainable_variables", None) for layer in model._flatten_layers())


def loss_denominator(loss):
    """What Keras's reduction of `loss` divides a batch's weighted loss sum by, as a function
    `(y, sample_weight, rows) -> float32 scalar` of one part of the batch; None where it is not known.

    The whole batch's loss is `sum / D`; a part's is `sum_p / D_p`, so the whole batch's loss (and
    gradient) is the parts' average weighted by `D_p`, not by their rows: e.g. a masked LM's loss
    averages over the masked positions' weights (`mean_with_sample_weight`: D = their sum), a token
    classifier's over the labelled tokens (`ignore_class`: D = their count). Where D counts the loss
    values (`sum_over_batch_size` without a mask), it is proportional to the rows. Keras's rules:
    `keras.src.losses.loss.reduce_weighted_values` and `apply_mask`.
    """
    import tensorflow as tf  # noqa: PLC0415

    if isinstance(loss, str) or (callable(loss) and not isinstance(loss, keras.losses.Loss)):
        reduction, ignore = "sum_over_batch_size", None  # Keras wraps it with its default reduction
    elif isinstance(loss, keras.losses.Loss):
        from kerasllm.models.base import SparseCrossEntropy  # noqa: PLC0415 - base imports this module

        if not isinstance(loss, SparseCrossEntropy) and not hasattr(loss, "_fn_kwargs"):
            return None  # a Loss subclass of its own: it may mask or weigh in ways not seen here
        reduction, ignore = loss.reduction, getattr(loss, "_fn_kwargs", {}).get("ignore_class")
        if isinstance(loss, SparseCrossEntropy) and loss.ignore_id is not None:
            return _per_position_ignore_denominator(reduction, loss.ignore_id)
    else:
        return None
    if reduction not in ("sum_over_batch_size", "mean", "mean_with_sample_weight"):
        return None

    def denominator(y, sample_weight, rows):
        mask = None if ignore is None else tf.cast(tf.not_equal(tf.cast(y, "int64"), ignore), "float32")
        if reduction == "mean_with_sample_weight" and sample_weight is not None:
            weight = tf.cast(sample_weight, "float32")
            if mask is not None:
                while len(weight.shape) < len(mask.shape):  # a weight per row: per position of that row
                    weight = weight[..., None]
                weight = weight * mask
            return tf.reduce_sum(weight)
        if mask is not None:
            return tf.reduce_sum(mask)
        return tf.cast(rows, "float32")

    return denominator


def _per_position_ignore_denominator(reduction, ignore_id):
    """`loss_denominator` of a `SparseCrossEntropy(ignore_id=...)` (not per token): the loss divides
    by the batch's kept positions, whatever the weights (`_weigh_positions`). None (Keras's own
    step) for other reductions, whose rules for this pair were not worth writing here."""
    import tensorflow as tf  # noqa: PLC0415

    if reduction not in ("sum_over_batch_size", "mean"):
        return None

    def denominator(y, sample_weight, rows):
        return tf.reduce_sum(tf.cast(tf.not_equal(tf.cast(y, "int64"), ignore_id), "float32"))

    return denominator


def _batch_split_from_environment(batch_split):
    """`KERASLLM_BATCH_SPLIT` (an integer) in place of `"auto"`."""
    if batch_split == "auto" and os.environ.get("KERASLLM_BATCH_SPLIT", "").strip():
        raw = os.environ["KERASLLM_BATCH_SPLIT"].strip()
        # A UsageError, as the other settings': the CLI's one line and exit 2, not a traceback.
        if not raw.isdigit():
            raise UsageError(f"KERASLLM_BATCH_SPLIT must be a whole number of parts (1: no split), got {raw!r}")
        return int(raw)
    return batch_split


# True once `give_parts_a_core_each` has set this process's TensorFlow to one intra-op thread.
_one_thread_per_part = False


def give_parts_a_core_each(*, jit_compile: bool, dropout: float, replicas: int = 1) -> bool:
    """One TensorFlow intra-op thread, so that each part of the split step runs on a core of its own.

    For a training process (the `kerasllm train` recipes) on a machine whose cores equal the
    split step's parts (two), called before TensorFlow's runtime starts: the thread count
    cannot change after that. Returns whether the process runs so (set now or before).

    Why: with TensorFlow's default pool (a thread per core), XLA runs both parts' kernels on
    the same two pool threads. The parts then finish at different times (17 and 21 ms in a
    profiled step), so for the last few milliseconds of every step one core waits, and every
    matrix product passes between threads (43 context switches per step against 10). With
    one intra-op thread, each part runs whole on the inter-op thread that calls it and both
    end together. `kerasllm train causal-lm` at tests/benchmarks/bench_train_causal_lm.py's
    shape, 300 steps, 24 alternated pairs against TensorFlow's default on the 2-core machine:
    steady tokens/s higher in 17 (median ratio 1.067), the whole run shorter in 18 (median
    ratio 0.948), the validation loss identical. A model that keeps one program (dropout,
    several devices, no XLA) would run its step on one thread instead of two (2x slower,
    measured), so those keep TensorFlow's default; so does a machine with a GPU or TPU, or
    with more cores than parts (not measured), and a process where `TF_NUM_INTRAOP_THREADS`
    is set.
    With the thread set, `"auto"` splits a model of any size (the size rule weighs the second
    program's compile against a second thread that is no longer there).
    """
    global _one_thread_per_part
    if _one_thread_per_part:
        return True
    parts = _batch_split_from_environment("auto")
    if parts == "auto":
        parts = min(distribute.usable_cores(), MAX_PARTS)
    if (parts < 2 or parts != distribute.usable_cores() or not jit_compile or dropout > 0 or replicas != 1
            or os.environ.get("TF_NUM_INTRAOP_THREADS", "").strip()):
        return False
    import tensorflow as tf  # noqa: PLC0415

    # Physical devices: listing them leaves TensorFlow's runtime unstarted.
    if tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU"):
        return False
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # the runtime has started (e.g. a pretrained model was loaded): keep its threads
        log.debug("split step: TensorFlow already started, its intra-op threads stay as they are")
        return False
    _one_thread_per_part = True
    log.debug("split step: one intra-op thread, each of the %d parts on a core of its own", parts)
    return True


def resolve_batch_split(model: keras.Model, batch_split, jit_compile: bool) -> int:
    """Parts per batch for `model` (1: Keras's own step). See the module docs for `"auto"`."""
    batch_split = _batch_split_from_environment(batch_split)
    if batch_split in (None, False, 0, 1):
        return 1
    if batch_split != "auto" and (isinstance(batch_split, bool) or not isinstance(batch_split, int) or batch_split < 1):
        raise ValueError(f"batch_split must be 'auto' or an integer >= 1, got {batch_split!r}")
    import tensorflow as tf  # noqa: PLC0415

    distributed = tf.distribute.has_strategy() or getattr(model, "_distribute_strategy", None) is not None
    if not jit_compile or distributed or draws_random_numbers(model) or updates_state(model):
        return 1
    if batch_split != "auto":
        return int(batch_split)
    if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        return 1
    if model.count_params() < AUTO_MIN_PARAMETERS and not _one_thread_per_part:
        return 1
    return min(distribute.usable_cores(), MAX_PARTS)  # 1 on one core


@contextmanager
def _grappler_off(active: bool):
    """TensorFlow's graph optimizer (Grappler) off while a split-step `fit` runs, then as it was.

    Why: the functions Keras builds around the split step only cut the batch, call the compiled
    parts and apply_mean, and update metrics: Grappler's rewrites (constant folding, layout,
    oneDNN remapping, ...) find nothing to gain there, XLA compiles the parts without it, and
    running it when each function is first instantiated costs time on the first train and the
    first evaluation call. Measured with `kerasllm train causal-lm` at the benchmark's shape,
    runs alternated with the tree before: the first validation 0.58 -> 0.48 s (medians of 6
    pairs, 6/6 faster), 60-step runs 0.34 s shorter in median (4/6); whole 300-step runs move
    by more than that between pairs (12 pairs: 6 shorter, 6 longer), and with Grappler off for
    the whole process 4 of 4 were shorter (0.26-0.84 s). In one process, alternated fits:
    steady steps alike (28.0 vs 28.1 ms, best of 8) and the weights bit-identical. The setting
    is process-wide, so it is restored when `fit` returns; a model without the split step
    (replicas, no XLA, dropout, `batch_split=1`) keeps Grappler.
    """
    if not active:
        yield
        return
    import tensorflow as tf  # noqa: PLC0415

    was_off = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": was_off})


def _split(value, parts: int, tf):
    """`value` cut along its first axis into `parts` pieces of near-equal size (earlier ones larger)."""
    rows = tf.shape(value)[0]
    sizes = [rows // parts + tf.cast(i < rows % parts, rows.dtype) for i in range(parts)]
    return tf.split(value, tf.stack(sizes), axis=0, num=parts)


class SplitBatchFitMixin:
    """Mixin for a `keras.Model` (TensorFlow backend): the split step (see module docs).

    `compile` sets `self._batch_parts` through `configure_batch_split`; with 1 part (or
    never configured) every method defers to Keras.
    """

    _batch_parts = 1
    _warmed_up = frozenset()

    def configure_batch_split(self, batch_split="auto", loss=None) -> int:
        self._batch_parts = resolve_batch_split(self, batch_split, bool(self.jit_compile))
        if isinstance(loss, (list, tuple, dict)) and len(tree.flatten(loss)) > 1:
            # Keras tracks each output's loss in a Mean metric updated inside compute_loss:
            # parts running at the same time would race on it.
            self._batch_parts = 1
        if isinstance(loss, (list, tuple, dict)):
            loss = tree.flatten(loss)[0] if tree.flatten(loss) else None
        self._loss_denominator = loss_denominator(loss) if loss is not None else None
        if self._loss_denominator is None:
            # The parts could not be weighed as the whole batch's loss weighs them.
            self._batch_parts = 1
        self._split_functions = None
        self._warmed_up = set()  # (kind, element spec) pairs whose parts were compiled ahead
        return self._batch_parts

    @property
    def batch_parts(self) -> int:
        """Parts each training/evaluation batch is split into (1: Keras's own step)."""
        return self._batch_parts

    @contextmanager
    def _uncompiled_outer_function(self):
        # Keras compiles the function around train_step/test_step when jit_compile is on; the
        # split step calls compiled parts from it instead (nested XLA would fuse them back
        # into one program). Keras reads jit_compile only while it builds that function.
        if self._batch_parts <= 1:
            yield
            return
        saved = self._jit_compile
        self._jit_compile = False
        try:
            yield
        finally:
            self._jit_compile = saved

    def make_train_function(self, force=False):
        with self._uncompiled_outer_function():
            return super().make_train_function(force)

    def make_test_function(self, force=False):
        with self._uncompiled_outer_function():
            return super().make_test_function(force)

    def _functions(self):
        if self._split_functions is None:
            import tensorflow as tf  # noqa: PLC0415

            want_predictions = self._compile_metrics is not None

            def part_gradients(x, y, sample_weight):
                with tf.GradientTape() as tape:
                    y_pred = self(x, training=True) if self._call_has_training_arg else self(x)
                    loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
                    scaled = self.optimizer.scale_loss(loss) if self.optimizer is not None else loss
                gradients = tape.gradient(scaled, self.trainable_weights)
                return loss, gradients, (y_pred if want_predictions else None)

            def part_loss(x, y, sample_weight):
                y_pred = self(x, training=False) if self._call_has_training_arg else self(x)
                loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
                return loss, (y_pred if want_predictions else None)

            def weights_of(part_denominators):
                # Each part's share of the whole batch's loss (loss_denominator); none where all are 0,
                # as Keras's divide_no_nan gives a loss of 0 then.
                total = tf.add_n(part_denominators)
                return [tf.math.divide_no_nan(d, total) for d in part_denominators]

            def record_loss(part_rows, part_denominators, losses):
                from keras.src.losses import loss as loss_module  # noqa: PLC0415

                weights = weights_of(part_denominators)
                loss = tf.add_n([w * tf.cast(l, "float32") for w, l in zip(weights, losses)])
                rows = tf.cast(tf.add_n(part_rows), "float32")  # Keras's tracker weighs a batch by its rows
                self._loss_tracker.update_state(loss_module.unscale_loss_for_distribution(loss), sample_weight=rows)

            def apply_mean(part_rows, part_denominators, losses, gradients):
                weights = weights_of(part_denominators)
                mean = []
                for parts in zip(*gradients):
                    kept = [(w, g) for w, g in zip(weights, parts) if g is not None]
                    mean.append(tf.add_n([tf.cast(w, g.dtype) * g for w, g in kept]) if kept else None)
                self.optimizer.apply_gradients(zip(mean, self.trainable_weights))
                record_loss(part_rows, part_denominators, losses)

            # autograph=False: none of them branches on a tensor (kerasllm.data.as_written).
            compiled = dict(jit_compile=True, reduce_retracing=True, autograph=False)
            self._split_functions = (tf.function(part_gradients, **compiled), tf.function(part_loss, **compiled),
                                     tf.function(apply_mean, **compiled), tf.function(record_loss, **compiled))
        return self._split_functions

    def fit(self, x=None, *args, validation_data=None, **kwargs):
        """`keras.Model.fit`, with the split step's parts compiled beside the first step's trace and
        Grappler off while it runs (module docs)."""
        with _grappler_off(self._batch_parts > 1):
            warm_up = self._start_warm_up(x, validation_data)
            try:
                return super().fit(x, *args, validation_data=validation_data, **kwargs)
            finally:
                if warm_up is not None:
                    warm_up.join()

    def _start_warm_up(self, train_data, validation_data):
        """Trace the parts the batches of `train_data` (`part_gradients`) and `validation_data`
        (`part_loss`) will run, and compile them in a thread, the train step's first (module docs).

        Returns the thread, or None where there is nothing to warm up or tracing failed: the warm-up
        only saves time, so its failures are logged (debug) and the step compiles as before.
        """
        if self._batch_parts <= 1 or os.environ.get("KERASLLM_WARM_UP", "").strip() == "0":
            return None
        # Not built: the warm-up's trace would create the weights, outside Keras's own build.
        if not self.built:
            return None
        compiles = queue.SimpleQueue()  # (kind, traced function, its zero batch), then None: the end
        thread = None

        def run():
            # The parts are pure (gradients or losses, no variable written): running them once on
            # zeros changes nothing but XLA's cache.
            while (job := compiles.get()) is not None:
                kind, compile_parts, batch = job
                try:
                    compile_parts(batch)
                except Exception:  # noqa: BLE001
                    log.debug("%s warm-up: compiling failed", kind, exc_info=True)

        try:
            for kind, data in (("train", train_data), ("evaluation", validation_data)):
                job = self._warm_up_job(kind, data)
                if job is None:
                    continue
                compiles.put(job)
                if thread is None:
                    thread = threading.Thread(target=run, name="kerasllm-warm-up", daemon=True)
                    thread.start()
        finally:
            compiles.put(None)  # the thread ends after the last job
        return thread

    def _warm_up_job(self, kind: str, data):
        """`(kind, traced function, zero batch)` compiling the parts of `data`'s batches, or None.

        `kind` "train": `part_gradients`, "evaluation": `part_loss`.
        """
        import tensorflow as tf  # noqa: PLC0415

        if not isinstance(data, tf.data.Dataset):
            return None
        spec = data.element_spec
        if not all(isinstance(s, tf.TensorSpec) and s.shape.is_fully_defined() for s in tf.nest.flatten(spec)):
            return None  # XLA compiles per shape: unknown batch shapes cannot be compiled ahead
        if (kind, str(spec)) in self._warmed_up:
            return None  # an earlier fit compiled them (a new wrapper would be traced again for nothing)
        self._warmed_up.add((kind, str(spec)))
        try:
            batch = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), spec)
            part_gradients, part_loss, _, _ = self._functions()
            # Called from a plain tf.function as from train_step/test_step: XLA caches a program
            # under its caller's attributes, and an eager call would compile a copy the step never uses.
            parts = tf.function(self._over_parts(part_gradients if kind == "train" else part_loss),
                                autograph=False)
            # Traced here, before the train step's trace (which then finds the parts traced): both are
            # Python and would take turns on the GIL anyway. The compile (C++, GIL released) starts at
            # once, beside the traces that follow, on the idle core.
            return kind, parts.get_concrete_function(batch), batch
        except Exception:  # noqa: BLE001
            log.debug("%s warm-up: tracing failed", kind, exc_info=True)
            return None

    def _over_parts(self, part):
        """A function of a batch calling `part` on each of its parts."""
        return lambda data: [part(*p) for p in self._split_data(data)[1]]

    def _split_data(self, data):
        import tensorflow as tf  # noqa: PLC0415
        from keras.src.trainers import data_adapters  # noqa: PLC0415

        x, y, sample_weight = data_adapters.data_adapter_utils.unpack_x_y_sample_weight(data)

        def cut(structure):
            if structure is None:
                return [None] * self._batch_parts
            pieces = [_split(t, self._batch_parts, tf) if t is not None else [None] * self._batch_parts
                      for t in tree.flatten(structure)]
            return [tree.pack_sequence_as(structure, [p[i] for p in pieces]) for i in range(self._batch_parts)]

        parts = list(zip(cut(x), cut(y), cut(sample_weight)))
        part_rows = [tf.shape(next(t for t in tree.flatten(px) if t is not None))[0] for px, _, _ in parts]
        part_denominators = [self._loss_denominator(tree.flatten(py)[0], sw, rows)
                             for (_, py, sw), rows in zip(parts, part_rows)]
        return (x, y, sample_weight), parts, (part_rows, part_denominators)

    def _metrics_result(self, whole, predictions):
        import tensorflow as tf  # noqa: PLC0415

        x, y, sample_weight = whole
        y_pred = None
        if predictions[0] is not None:  # compiled metrics: the whole batch's predictions
            y_pred = tree.map_structure(lambda *p: tf.concat(p, axis=0), *predictions)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def train_step(self, data):
        if self._batch_parts <= 1:
            return super().train_step(data)
        part_gradients, _, apply_mean, _ = self._functions()
        whole, parts, (part_rows, part_denominators) = self._split_data(data)
        # Independent calls: TensorFlow's executor runs them at the same time (module docs).
        results = [part_gradients(*part) for part in parts]
        apply_mean(part_rows, part_denominators, [loss for loss, _, _ in results],
                   [gradients for _, gradients, _ in results])
        return self._metrics_result(whole, [p for _, _, p in results])

    def test_step(self, data):
        if self._batch_parts <= 1:
            return super().test_step(data)
        _, part_loss, _, record_loss = self._functions()
        whole, parts, (part_rows, part_denominators) = self._split_data(data)
        results = [part_loss(*part) for part in parts]
        record_loss(part_rows, part_denominators, [loss for loss, _ in results])
        return self._metrics_result(whole, [p for _, p in results])
