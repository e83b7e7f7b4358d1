"""The training defaults' optimizer and schedule: Keras's AdamW and CosineDecay arithmetic in fewer ops.

Why not `keras.optimizers.AdamW` + `keras.optimizers.schedules.CosineDecay` as they are: the
arithmetic is right, but the graph they trace is large for what it computes, and on CPU the
first train step pays for every op twice, once in the Keras/TensorFlow trace and once in XLA's
compilation. For the 4-layer benchmark model (36 variables) the stock pair traced:

* the schedule once per *decayed variable*: Keras's weight-decay pass reads
  `optimizer.learning_rate` inside its per-variable loop, and `CosineDecay` with warmup is a
  `cond` -- 18 conditionals (each its own XLA computation) for one scalar;
* the bias corrections (`beta ** step`, a sqrt and a divide) restated for each variable;
* `tf.clip_by_norm`'s NaN-safe dance (~10 ops) per gradient.

Measured in one process on the 2-core CPU, stock vs these classes: the first step (trace +
XLA compile) 6.2-6.4 s -> see `tests/benchmarks/bench_train_causal_lm.py` for the figures;
the update itself is the same: `test_optimizers.py` checks it against Keras's AdamW to float
rounding, step by step, with and without weight decay, clipping and the schedule.
"""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kerasllm")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine decay to `final` over `decay_steps`.

    The same values as `CosineDecay(0.0, decay_steps, alpha=final / peak, warmup_target=peak,
    warmup_steps=warmup_steps)`, written as one branch-free expression (a `where` of two
    scalars) instead of a `cond`, so XLA compiles no conditional for it.
    """

    def __init__(self, peak, decay_steps, warmup_steps=0, final=0.0, name="WarmupCosineDecay"):
        super().__init__()
        if decay_steps <= 0:
            raise ValueError(f"decay_steps must be > 0, got {decay_steps}")
        self.peak = float(peak)
        self.decay_steps = int(decay_steps)
        self.warmup_steps = int(warmup_steps)
        self.final = float(final)
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = ops.multiply(self.peak / max(self.warmup_steps, 1), step)
        progress = ops.clip((step - self.warmup_steps) / self.decay_steps, 0.0, 1.0)
        cosine = self.final + (self.peak - self.final) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self):
        return {"peak": self.peak, "decay_steps": self.decay_steps, "warmup_steps": self.warmup_steps,
                "final": self.final, "name": self.name}


@keras.saving.register_keras_serializable(package="kerasllm")
class AdamW(keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` (decoupled weight decay, `exclude_from_weight_decay`, `clipnorm`,
    mixed precision and tf.distribute all as in Keras) with the per-variable work cut down.

    * Weight decay reads the learning rate the update step receives (evaluated once per
      step), not the schedule again per variable; it is applied first, then Adam, as in Keras.
    * The scalars every variable's update shares (cast learning rate, step, `beta ** step`,
      constants) are built once per apply, per dtype and device (`_scalars`), not per variable.
    * The Adam update is TensorFlow's fused `ResourceApplyAdam` kernel, one op per variable.
    * `clipnorm` clips each gradient to that L2 norm as Keras does, in four ops
      (`g * min(1, clipnorm / |g|)`).
    """

    def _apply_weight_decay(self, variables):
        if self.amsgrad:  # the folded update below does not cover AMSGrad; Keras's path does
            super()._apply_weight_decay(variables)

    # The per-step scalars shared by every variable's update during one `_backend_update_step`
    # (None outside it): {(dtype, device): (ResourceApplyAdam's scalar arguments, decay factor)}.
    _step_scalars = None

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # Every variable's update takes the same learning rate, step, bias-correction powers and
        # constants: built once per apply (per dtype and device, for mirrored variables) instead of
        # once per variable. The benchmark model's traced update (split_batch's apply_mean, 36
        # variables): 1,209 -> 717 graph ops, its trace 0.34-0.40 -> 0.27-0.29 s and its XLA
        # compile ~0.04 s shorter (3 alternated processes each; the weights after it bit-identical),
        # both on the first step's path.
        self._step_scalars = {}
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
        finally:
            self._step_scalars = None

    def _scalars(self, learning_rate, dtype, device) -> tuple[dict, object]:
        """`(ResourceApplyAdam's scalar arguments, lr * weight_decay or None)` for this step."""
        import tensorflow as tf  # noqa: PLC0415

        cache = self._step_scalars
        if cache is not None and (dtype, device) in cache:
            return cache[(dtype, device)]
        lr = tf.cast(learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        scalars = (dict(lr=lr, beta1=beta_1, beta2=beta_2, beta1_power=tf.pow(beta_1, step),
                        beta2_power=tf.pow(beta_2, step), epsilon=tf.cast(self.epsilon, dtype)),
                   lr * self.weight_decay if self.weight_decay else None)
        if cache is not None:
            cache[(dtype, device)] = scalars
        return scalars

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad:
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf  # noqa: PLC0415 - TensorFlow backend only, like the rest of kerasllm's training

        dtype = variable.dtype
        adam, decay = self._scalars(learning_rate, dtype, variable.device)
        index = self._get_variable_index(variable)
        if decay is not None and self._use_weight_decay(variable):
            variable.assign_sub(variable * decay)
        # One op for Keras's eight: TensorFlow's fused Adam kernel (XLA lowers it too) computes
        # m = b1*m + (1-b1)*g, v = b2*v + (1-b2)*g^2, var -= lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+eps),
        # exactly `keras.optimizers.Adam.update_step`.
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle, v=self._velocities[index].value.handle,
            grad=tf.convert_to_tensor(gradient, dtype), use_locking=False, **adam)

    def _clip_gradients(self, grads):
        # Keras 3 clips first and sums the replicas' gradients after (base_optimizer's
        # `_backend_apply_gradients` calls this, then the TF backend's `_backend_update_step`
        # all-reduces): under MirroredStrategy or MultiWorkerMirroredStrategy each replica clipped
        # its own share of the gradient, so N replicas trained with a clip N times looser than one
        # device's (a global norm of 1.0 clipped at ~N). Summed here first, then clipped, as on one
        # device; `_all_reduce_sum_gradients` below then has nothing left to sum.
        grads = _summed_over_replicas(grads)
        # An embedding's sparse gradient (IndexedSlices, e.g. learned positions: one slice per row for
        # each position) repeats its indices: norms of its values squared each piece on its own, so the
        # global-norm clip took a seq2seq model's gradient norm too large (Keras's own step; the split
        # step's parts are averaged dense). Dense first, as `update_step`'s fused Adam takes it anyway.
        grads = [_dense(g) for g in grads]
        if not (self.clipnorm and self.clipnorm > 0):
            return super()._clip_gradients(grads)
        clipped = []
        for g in grads:
            if g is not None:
                norm = ops.sqrt(ops.sum(ops.square(g)))
                g = ops.multiply(g, ops.minimum(1.0, self.clipnorm / ops.maximum(norm, 1e-12)))
            clipped.append(g)
        return clipped

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)  # summed over the replicas already, before clipping (`_clip_gradients`)


def _dense(gradient):
    """`gradient` as a dense tensor where it is sparse (tf.IndexedSlices: duplicate indices summed)."""
    import tensorflow as tf  # noqa: PLC0415

    return tf.convert_to_tensor(gradient) if isinstance(gradient, tf.IndexedSlices) else gradient


def _summed_over_replicas(grads):
    """`grads` summed over the replicas of the strategy in scope (Keras's `_all_reduce_sum_gradients`
    rule: None gradients stay None); as they are outside a replica context."""
    import tensorflow as tf  # noqa: PLC0415

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1 or all(g is None for g in grads):
        return list(grads)
    # Dense first, as the clip made them before: the replicas' sparse (IndexedSlices) gradients of
    # an embedding differ in length, which the collective all-reduce refuses ("Shape mismatch").
    present = [tf.convert_to_tensor(g) for g in grads if g is not None]
    summed = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
    return [None if g is None else next(summed) for g in grads]
