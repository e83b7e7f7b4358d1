"""`fit`, `evaluate` and `predict` on arrays without tf.data's autotuning.

Why: Keras turns NumPy arrays (and tensors, lists and dicts of them) into a tf.data
pipeline whose stages are `AUTOTUNE`d. Such a pipeline runs a model thread that sleeps
between optimisation passes, the pause growing the longer the iterator lives, and
destroying the iterator waits for that sleep to end (TF 2.21). Keras makes a new iterator
every epoch and every validation, so `fit` could sit idle at an epoch's start. Measured on
the 2-core machine, `CausalLM` tiny on 48,000 rows of 32 tokens (~10 s epochs), 4 epochs,
the dataset Keras builds from the arrays: 7.0 s and 9.7 s idle before the second and third
epochs in one of two runs; with autotuning off, 0.010-0.017 s in both runs
(tests/benchmarks/bench_fit_arrays.py, 4 alternated runs: Keras's path idle 3.2-5.9 s before
3 of 12 epochs, this one at most 0.019 s).
kerasllm's own pipelines already run without it (`kerasllm.data.without_autotune`).

Here arrays go through Keras's own array adapter (the same batches, shuffling, class and
sample weights, `validation_split` and validation batch size as Keras) and the dataset it
makes gets the same option. A `tf.data.Dataset`, generator or `PyDataset` the caller
passes is left as it is (its tuning is the caller's), and so are arrays with
`steps_per_epoch`/`steps` (Keras keeps one iterator for those across epochs).

Before any of that, each method hands what it was given (arrays or a dataset alike) to the
model's `check_inputs`, which refuses inputs the model cannot take (here: it takes anything).
"""

from __future__ import annotations


def _are_arrays(x, y=None, sample_weight=None) -> bool:
    """Whether Keras would batch these inputs with its array adapter (the test Keras itself makes)."""
    from keras.src.trainers.data_adapters import array_data_adapter  # noqa: PLC0415

    return x is not None and array_data_adapter.can_convert_arrays((x, y, sample_weight))


def _array_dataset(x, y, sample_weight, batch_size, shuffle, class_weight=None):
    """Keras's dataset for arrays, untuned; None if the inputs are not arrays Keras would slice."""
    if not _are_arrays(x, y, sample_weight):
        return None
    import tensorflow as tf  # noqa: PLC0415
    from keras.src.trainers.data_adapters import array_data_adapter  # noqa: PLC0415

    from kerasllm.data import without_autotune  # noqa: PLC0415

    adapter = array_data_adapter.ArrayDataAdapter(x, y, sample_weight=sample_weight, batch_size=batch_size,
                                                  shuffle=shuffle, class_weight=class_weight)
    # The adapter's pipeline hides its length from tf.data; stated again, Keras's progress bar
    # knows the steps and an epoch ends on its last batch, not on an out-of-data warning.
    dataset = adapter.get_tf_dataset().apply(tf.data.experimental.assert_cardinality(adapter.num_batches))
    return without_autotune(dataset)


class ArrayInputFitMixin:
    """Mixin for a `keras.Model` (TensorFlow backend): array inputs as untuned datasets (module docs)."""

    def check_inputs(self, x, y=None):
        """The model's check of the inputs `x` (and targets `y`) given to fit/evaluate/predict."""

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None, validation_split=0.0,
            validation_data=None, shuffle=True, class_weight=None, sample_weight=None, initial_epoch=0,
            steps_per_epoch=None, validation_steps=None, validation_batch_size=None, validation_freq=1):
        from keras.src.trainers.data_adapters import array_slicing, data_adapter_utils  # noqa: PLC0415

        self.check_inputs(x, y)
        if validation_data is not None:
            self.check_inputs(*data_adapter_utils.unpack_x_y_sample_weight(validation_data)[:2])
        validation_rows = validation_batch_size or batch_size  # Keras's batch size for validation arrays
        if steps_per_epoch is None and _are_arrays(x, y, sample_weight):
            if validation_split and validation_data is None:
                # Keras's own split (the last `validation_split` of the rows), before batching.
                (x, y, sample_weight), validation_data = array_slicing.train_validation_split(
                    (x, y, sample_weight), validation_split=validation_split)
                validation_split = 0.0
            dataset = _array_dataset(x, y, sample_weight, batch_size, shuffle, class_weight)
            if dataset is not None:
                # shuffle: the dataset shuffles (Keras warns when told to shuffle a dataset)
                x, y, sample_weight, class_weight, batch_size, shuffle = dataset, None, None, None, None, False
        if validation_data is not None and validation_steps is None:
            val_x, val_y, val_weight = data_adapter_utils.unpack_x_y_sample_weight(validation_data)
            dataset = _array_dataset(val_x, val_y, val_weight, validation_rows, shuffle=False)
            if dataset is not None:
                validation_data, validation_batch_size = dataset, None
        return super().fit(x=x, y=y, batch_size=batch_size, epochs=epochs, verbose=verbose, callbacks=callbacks,
                           validation_split=validation_split, validation_data=validation_data, shuffle=shuffle,
                           class_weight=class_weight, sample_weight=sample_weight, initial_epoch=initial_epoch,
                           steps_per_epoch=steps_per_epoch, validation_steps=validation_steps,
                           validation_batch_size=validation_batch_size, validation_freq=validation_freq)

    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None, steps=None,
                 callbacks=None, return_dict=False, **kwargs):
        self.check_inputs(x, y)
        if steps is None and not kwargs.get("_use_cached_eval_dataset"):
            dataset = _array_dataset(x, y, sample_weight, batch_size, shuffle=False)
            if dataset is not None:
                x, y, sample_weight, batch_size = dataset, None, None, None
        return super().evaluate(x=x, y=y, batch_size=batch_size, verbose=verbose, sample_weight=sample_weight,
                                steps=steps, callbacks=callbacks, return_dict=return_dict, **kwargs)

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        self.check_inputs(x)
        if steps is None:
            dataset = _array_dataset(x, None, None, batch_size, shuffle=False)
            if dataset is not None:
                x, batch_size = dataset, None
        return super().predict(x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks)
