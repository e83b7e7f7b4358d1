"""Make `model.fit` work under `MultiWorkerMirroredStrategy` for every kerasllm model.

Keras 3 (checked on 3.15 with TF 2.21; upstream keras-team/keras#20585, open) fails
twice when `fit` runs under `tf.distribute.MultiWorkerMirroredStrategy` (MWMS):

1. `TensorFlowTrainer._maybe_symbolic_build` averages the first input batch over the
   replicas with `strategy.reduce("MEAN", batch, axis=None)` only to learn its shapes
   and dtypes. Under MWMS that reduce is a cross-worker collective that cannot take the
   eager `PerReplica` batch: `ValueError: Attempt to convert a value (PerReplica...)`.
2. `reduce_per_replica` then reduces every value `train_step`/`test_step` return (the
   loss and metric results, scalars) with `strategy.reduce("MEAN", v, axis=0)` when in
   multi-worker mode: "Invalid reduction dimension 0 for input with 0 dimensions".

`MultiWorkerFitMixin` (a base of `TransformerModel`) works around both in the model
class itself, so nothing in Keras is patched and single-process training takes exactly
Keras's own code path:

1. its `_maybe_symbolic_build` builds from the first local replica's batch, which has
   the per-replica shapes and dtypes that Keras's symbolic build needs; so it does under
   every strategy of several replicas (MirroredStrategy, TPUStrategy), where Keras's
   averaging of the batch fails for the encoders' boolean `padding_mask` (TensorFlow's AddN
   takes no bools: every encoder recipe had stopped at its first step on two GPUs);
2. its `train_step`/`test_step` return every value with a leading axis of length 1 in
   multi-worker mode, so Keras's `axis=0` reduce gives the mean over replicas of each
   value with its original shape, the same figure `MirroredStrategy` reports.

`tests/test_distribute.py::test_keras_internals_the_multi_worker_fix_relies_on` fails
when a Keras upgrade renames these methods or changes the reductions (for better or
worse), so this module is revisited instead of silently going stale; a subclass that
overrides `train_step` must call `super().train_step` to keep the fix.
"""

from __future__ import annotations

from kerasllm.distribute import is_multi_worker as in_multi_worker_mode


class MultiWorkerFitMixin:
    """Mixin for a `keras.Model` (TensorFlow backend): multi-worker `fit`/`evaluate` (see module docs)."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = getattr(self, "_distribute_strategy", None)
        if strategy is None or iterator is None or strategy.num_replicas_in_sync == 1:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        import tensorflow as tf  # noqa: PLC0415
        from keras import tree  # noqa: PLC0415

        for _, _, batches in iterator:  # Keras's own way of peeking at the first batch
            data_batch = next(batches)
            break

        def local(value):
            if isinstance(value, tf.distribute.DistributedValues):
                return strategy.experimental_local_results(value)[0]
            return value

        with strategy.scope():
            self._symbolic_build(data_batch=tree.map_structure(local, data_batch))

    def _leading_axis_for_multi_worker(self, logs):
        if not in_multi_worker_mode(self.distribute_strategy):
            return logs
        import tensorflow as tf  # noqa: PLC0415
        from keras import tree  # noqa: PLC0415

        return tree.map_structure(lambda value: tf.expand_dims(value, 0), logs)

    def train_step(self, data):
        return self._leading_axis_for_multi_worker(super().train_step(data))

    def test_step(self, data):
        return self._leading_axis_for_multi_worker(super().test_step(data))
