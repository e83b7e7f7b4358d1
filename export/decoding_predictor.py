"""`generate` predictors for the decoder family: a bundle on ONNX Runtime, or a model dir in Keras.

Both take the same options (names shared with the batch CLI, see predict.py):
max_new_tokens=64, temperature=0.0 (greedy), top_k=None, top_p=None,
repetition_penalty=1.0, stop=None (strings), num_beams=1, n_best=1, seed=None.
Generation also stops at the tokenizer's `<eos>`. Each result is `{"output": str}`, or
with `n_best > 1` `{"output": [str, ...], "scores": [float, ...]}` (mean log-probability
per token, best first). `n_best > 1` needs beam search (`num_beams >= n_best`) or
sampling (`temperature > 0`: independent samples). Samples are scored as beam search scores
its hypotheses: the model's mean log-probability per generated token, `<eos>` included where
the sample ended on it (one that ends at once scores log p(<eos>)); one cut by
`max_new_tokens` (or `max_length`) or a stop string has no `<eos>` term.

The bundle predictor imports no TensorFlow. The model-dir predictor runs Keras: greedy
and plain sampling through `CausalLM.generate` (XLA, keras-hub samplers); beam search,
repetition penalty, stop strings, n-best samples and batches whose longest prompt leaves
fewer than `max_new_tokens` under `max_length` through the same decoding loop as the
bundle (generate.py) over the Keras model's cached forward pass. Seeded sampling
is reproducible within one source; Keras and the bundle draw different random numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kerasllm.errors import UsageError
from kerasllm.export.generate import (DecodingOptions, Hypothesis, check_token_ids, generate, hypotheses_result,
                                      log_softmax, row_limits, truncate_at_stop)
from kerasllm.export.predict import RecordError, check_text, kept_end, trained_seq_len
from kerasllm.tokenizers import token_count

OPTION_NAMES = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "num_beams",
                "n_best", "seed")


class CausalGenerator:
    """What both sources share: tokenization, options, n-best, results. Subclasses set `step`."""

    task = "generate"

    def __init__(self, tokenizer, config: dict[str, Any], train: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.config = config
        self.max_length = int(config["max_length"])
        self.trained_seq_len = trained_seq_len(train)  # the batch CLI warns past it
        self.pad_id = tokenizer.pad_id
        self.eos_id = tokenizer.eos_id
        # A model's vocabulary may be padded past its tokenizer's (tokenizers.check_vocabulary): those
        # ids cannot be decoded, so they are never chosen (a sampled one had ended the job in a traceback).
        vocab_size = int(config["vocab_size"])
        self.unspoken_ids = tuple(range(getattr(tokenizer, "vocab_size", vocab_size), vocab_size))

    def check(self, text: str, truncate: str = "error") -> list[int]:
        """Token ids of a prompt; at most `max_length - 1` so that one new token fits."""
        if not check_text(text, "prompt").strip():
            raise RecordError("empty prompt")
        limit = self.max_length - 1
        ids, whole = self.tokenizer.encode_bounded(text, limit, keep=kept_end(truncate))
        if not ids:
            raise RecordError("prompt has no tokens")
        if len(ids) > limit:
            if truncate == "left":
                return ids[-limit:]
            if truncate == "right":
                return ids[:limit]
            raise RecordError(f"prompt of {token_count(ids, whole, limit)} tokens leaves no room for a new token "
                              f"within the model's max_length {self.max_length} (at most {limit}; --truncate left "
                              "keeps its end)")
        return ids

    def options(self, **options: Any) -> DecodingOptions:
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise UsageError(f"generate: unknown option {unknown[0]!r}")
        decoding = DecodingOptions(**options, stop_ids=(self.eos_id,), suppress_ids=self.unspoken_ids)
        decoding.validate(sampled_n_best=True, vocab_size=int(self.config["vocab_size"]))
        return decoding

    def predict(self, batch: Sequence[list[int]], **options: Any) -> list[dict]:
        decoding = self.options(**options)
        if not len(batch):
            return []
        check_token_ids(batch, int(self.config["vocab_size"]))
        if decoding.n_best > 1 and decoding.num_beams == 1:
            results = self._samples(batch, decoding)
        else:
            results = self._generate(batch, decoding)
        return [self._result(hyps, decoding) for hyps in results]

    # -- decoding ----------------------------------------------------------------------------
    def _generate(self, batch, decoding: DecodingOptions) -> list[list[Hypothesis]]:
        return generate(self.step, batch, decoding, pad_id=self.pad_id, max_length=self.max_length,
                        decode=self.tokenizer.decode)

    def _samples(self, batch, decoding: DecodingOptions) -> list[list[Hypothesis]]:
        """`n_best` independent samples per prompt, scored as beam search scores a finished
        hypothesis (generate._beam_search): the mean log-probability of its tokens, the stop id
        included where the sample ended on one."""
        n = decoding.n_best
        repeated = [prompt for prompt in batch for _ in range(n)]
        single = DecodingOptions(**{**decoding.__dict__, "n_best": 1})
        hyps = [h[0] for h in self._generate(repeated, single)]
        limits = row_limits(repeated, single, self.max_length).tolist()
        for prompt, hyp, limit in zip(repeated, hyps, limits):
            eos = [self.eos_id] if self._ended_on_eos(hyp.tokens, limit, decoding) else []
            hyp.score = self._score(prompt, hyp.tokens + eos)
        grouped = [hyps[i * n:(i + 1) * n] for i in range(len(batch))]
        return [sorted(group, key=lambda h: -h.score) for group in grouped]

    def _ended_on_eos(self, tokens: list[int], limit: int, decoding: DecodingOptions) -> bool:
        """Whether a sample of `tokens` (its stop id left out) ended on `<eos>`. A sample ends on the
        stop id, on reaching its `limit` of new tokens, or on the token that completes a stop string
        (kept): fewer tokens than the limit and no stop string means the stop id."""
        if len(tokens) >= limit:
            return False
        return not (decoding.stop and truncate_at_stop(self.tokenizer.decode(tokens), decoding.stop)[1])

    def _score(self, prompt: list[int], targets: list[int]) -> float:
        """Mean log-probability of `targets` (at least one) after `prompt` under the model (one
        forward pass; the last target is predicted, never fed)."""
        ids = np.array([list(prompt) + targets[:-1]], np.int64)  # (a NumPy row would be added to, not joined)
        logits, _ = self.step(ids, np.ones_like(ids), None)
        logp = log_softmax(logits[0, len(prompt) - 1:].astype(np.float64))
        return float(logp[np.arange(len(targets)), targets].mean())

    def _text(self, tokens: list[int], decoding: DecodingOptions) -> str:
        return truncate_at_stop(self.tokenizer.decode_generated(tokens), decoding.stop)[0]

    def _result(self, hyps: list[Hypothesis], decoding: DecodingOptions) -> dict:
        return hypotheses_result(hyps, decoding.n_best, lambda tokens: self._text(tokens, decoding))


class BundleGenerator(CausalGenerator):
    """Generation from a bundle on ONNX Runtime (KV cache, IO binding on CUDA)."""

    def __init__(self, path: str | Path, device: str | None = None, threads: int | None = None):
        from kerasllm.export.bundle import load_bundle  # noqa: PLC0415
        from kerasllm.export.runtime import DecoderSession  # noqa: PLC0415

        self.bundle = load_bundle(path)
        if self.bundle.family != "decoder":
            raise UsageError(f"{path}: a {self.bundle.family} bundle cannot generate (needs a decoder bundle)")
        super().__init__(self.bundle.tokenizer(), self.bundle.config, self.bundle.manifest.get("train"))
        self.step = DecoderSession(self.bundle.open_session("model", device, threads))

    def predict(self, batch: Sequence[list[int]], **options: Any) -> list[dict]:
        from kerasllm.export.runtime import flush_denormals  # noqa: PLC0415

        # Checked before denormals are flushed: under the flush a denormal temperature compares equal to 0.
        self.options(**options)
        with flush_denormals():  # ORT's kernels run on this thread (see runtime.flush_denormals)
            return super().predict(batch, **options)


class ModelDirGenerator(CausalGenerator):
    """Generation from a trained model directory in Keras (imports TensorFlow)."""

    def __init__(self, path: str | Path, device: str | None = None):
        from kerasllm.export.validate import KerasDecoderStep  # noqa: PLC0415
        from kerasllm.modeldir import load_model_dir  # noqa: PLC0415

        self.model, tokenizer, run = load_model_dir(path, device)
        if run["model"]["family"] != "decoder":
            kind = run.get("task", run["model"]["family"])  # the task's name: 'a encoder' read badly
            raise UsageError(f"{path}: a {kind!r} model cannot generate (needs a causal LM)")
        super().__init__(tokenizer, run["model"], run.get("train"))
        self.step = KerasDecoderStep(self.model)

    def _generate(self, batch, decoding: DecodingOptions) -> list[list[Hypothesis]]:
        # CausalLM.generate gives every row the same number of new tokens; where the longest prompt
        # leaves less room than that, the shared loop caps each row by its own room, as the bundle does.
        fits = max(len(p) for p in batch) + decoding.max_new_tokens <= self.max_length
        plain = (decoding.num_beams == 1 and decoding.repetition_penalty == 1.0 and not decoding.stop and fits
                 and not decoding.suppress_ids)  # CausalLM.generate suppresses nothing
        if not plain:
            return super()._generate(batch, decoding)
        tokens = self.model.generate(batch, max_new_tokens=decoding.max_new_tokens, temperature=decoding.temperature,
                                     top_k=decoding.top_k, top_p=decoding.top_p, seed=decoding.seed,
                                     stop_token_ids=list(decoding.stop_ids))
        results = []
        for row in np.asarray(tokens).tolist():
            cut = next((i for i, t in enumerate(row) if t in decoding.stop_ids), len(row))
            results.append([Hypothesis(row[:cut])])
        return results


def load_bundle(path: Path, device: str | None = None, **kwargs: Any) -> BundleGenerator:
    return BundleGenerator(path, device=device, **kwargs)


def load_modeldir(path: Path, device: str | None = None, **kwargs: Any) -> ModelDirGenerator:
    return ModelDirGenerator(path, device=device)
