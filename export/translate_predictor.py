"""`translate` predictors for the encoder-decoder family: a bundle on ONNX Runtime, or a model dir in Keras.

Both take the same options (names shared with the batch CLI, see predict.py):
max_new_tokens=64, temperature=0.0 (greedy), top_k=None, top_p=None,
repetition_penalty=1.0, stop=None (strings), num_beams=1, n_best=1, seed=None.
Decoding stops at the target tokenizer's `<eos>` and never chooses the model's suppressed ids
(Seq2SeqConfig.suppressed_ids: its other special tokens). Each result is `{"output": str}`, or
with `n_best > 1` `{"output": [str, ...], "scores": [float, ...]}` (mean log-probability
per generated token, EOS included, best first; needs `num_beams >= n_best`).

The bundle predictor imports no TensorFlow: the encoder runs once per batch and the
decoder steps through generate.py's loops with the cross-attention keys/values bound
(seq2seq_runtime.py). On a CPU with several cores, greedy and beam search use one worker
thread per core, each on its own single-threaded sessions: `predict_batches` (what
`kerasllm translate` calls with a window's batches) decodes whole batches at the same time,
one per worker; a batch with no other to share the cores with (a single one, or the last of
a job) is split into shards of at least `SHARD_ROWS` decoder rows instead (see
`BundleTranslator`). The model-dir
predictor runs Keras: greedy, sampling and beam search through `Seq2SeqLM.generate` /
`generate_n_best` (XLA, keras-hub samplers); repetition penalty and stop strings through
generate.py's loops over the Keras model's cached decoder.

`evaluate_seq2seq` is `kerasllm evaluate`'s evaluator for seq2seq sources: BLEU, chrF
and exact match of greedy translations against the references.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from kerasllm.config import Seq2SeqConfig
from kerasllm.distribute import usable_cores
from kerasllm.errors import DataError, UsageError
from kerasllm.export.generate import (DecodingOptions, Hypothesis, check_token_ids, generate, hypotheses_result,
                                      right_pad, truncate_at_stop)
from kerasllm.export.predict import RecordError, check_text, kept_end
from kerasllm.tokenizers import load_seq2seq_tokenizers, token_count

OPTION_NAMES = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "num_beams",
                "n_best", "seed")
# Decoder rows (inputs x beams) a shard gets at least. A decode step of a small model is nearly
# all fixed cost, so even small shards pay off: 'small' preset, 2 cores, greedy sentences/s
# (64 sentences, 32 tokens) unsharded vs shards of >= 4 rows: batch 8 299 vs 457, batch 16 355 vs 635.
SHARD_ROWS = 4
# Every shard thread opens its own sessions, each holding the weights again: sharding is for
# small models (where it pays, see above); bundles whose graphs are larger keep one set of sessions.
SHARD_MAX_GRAPH_BYTES = 256 << 20


class Translator:
    """What both sources share: tokenization, options and results. Subclasses implement `_generate`."""

    task = "translate"

    def __init__(self, source_tokenizer, target_tokenizer, config: dict[str, Any]):
        self.tokenizer = source_tokenizer
        self.target_tokenizer = target_tokenizer
        self.config = config
        self.max_length = int(config["max_length"])
        self.pad_id, self.bos_id, self.eos_id = int(config["pad_id"]), int(config["bos_id"]), int(config["eos_id"])
        seq2seq = Seq2SeqConfig.from_dict(config)
        # The target ids past the target tokenizer's vocabulary (a model's padded past it) cannot be
        # decoded: never chosen either (a sampled one had ended the job in a traceback).
        self.unspoken_ids = tuple(range(getattr(target_tokenizer, "vocab_size", seq2seq.target_vocab),
                                        seq2seq.target_vocab))
        self.suppress_ids = tuple(sorted({*seq2seq.suppressed_ids, *self.unspoken_ids}))  # as Seq2SeqLM.generate
        self.target_vocab = seq2seq.target_vocab

    def check(self, text: str, truncate: str = "error") -> list[int]:
        """Token ids of a source text, at most `max_length`."""
        if not check_text(text, "source").strip():
            raise RecordError("empty source")
        limit = self.max_length
        ids, whole = self.tokenizer.encode_bounded(text, limit, keep=kept_end(truncate))
        if not ids:
            raise RecordError("source has no tokens")
        if len(ids) > limit:
            if truncate == "left":
                return ids[-limit:]
            if truncate == "right":
                return ids[:limit]
            raise RecordError(f"source of {token_count(ids, whole, limit)} tokens is longer than the model's "
                              f"max_length {self.max_length}")
        return ids

    def options(self, **options: Any) -> DecodingOptions:
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise UsageError(f"translate: unknown option {unknown[0]!r}")
        decoding = DecodingOptions(**options, stop_ids=(self.eos_id,), suppress_ids=self.suppress_ids)
        # n-best lists come from beam search only; beams are bounded by the target vocabulary
        decoding.validate(vocab_size=self.target_vocab)
        return decoding

    def predict(self, batch: Sequence[list[int]], **options: Any) -> list[dict]:
        return next(self.predict_batches([batch], **options))

    def predict_batches(self, batches: Sequence[Sequence[list[int]]], **options: Any) -> Iterator[list[dict]]:
        """Each batch's results, batch by batch in order (see predict.Predictor)."""
        decoding = self.options(**options)
        batches = [list(batch) for batch in batches]
        for batch in batches:
            check_token_ids(batch, int(self.config["vocab_size"]), "source", max_length=self.max_length)
        results = self._generate_batches([batch for batch in batches if batch], decoding)
        for batch in batches:  # an empty batch gets no results (its loop needs rows)
            yield [self._result(h, decoding) for h in next(results)] if batch else []

    def translate(self, texts: Sequence[str], **options: Any) -> list[dict]:
        """Translate raw texts (a RecordError for an empty or too long one)."""
        if isinstance(texts, str):
            # A str is a sequence of one-letter texts: "four" had been four translations. Refused, not
            # taken as one text: the results are one per text, and a list of one says which is meant.
            raise UsageError(f"texts must be a list of strings, got a str ({texts[:40]!r}): pass [text] for one")
        return self.predict([self.check(t) for t in texts], **options)

    def _generate(self, batch: list[list[int]], decoding: DecodingOptions) -> list[list[Hypothesis]]:
        raise NotImplementedError

    def _generate_batches(self, batches: list[list[list[int]]],
                          decoding: DecodingOptions) -> Iterator[list[list[Hypothesis]]]:
        """`_generate` of each batch, in order (one at a time unless a subclass does better)."""
        for batch in batches:
            yield self._generate(batch, decoding)

    def _text(self, tokens: list[int], decoding: DecodingOptions) -> str:
        return truncate_at_stop(self.target_tokenizer.decode_generated(tokens), decoding.stop)[0]

    def _result(self, hyps: list[Hypothesis], decoding: DecodingOptions) -> dict:
        return hypotheses_result(hyps, decoding.n_best, lambda tokens: self._text(tokens, decoding))

    def _loop(self, sessions, batch, decoding) -> list[list[Hypothesis]]:
        """generate.py's loops over `sessions` (ONNX Runtime or the Keras reference)."""
        from kerasllm.export.seq2seq_runtime import Seq2SeqStep  # noqa: PLC0415

        step = Seq2SeqStep(sessions, *right_pad(batch, self.pad_id))
        return generate(step, [[self.bos_id]] * len(batch), decoding, pad_id=self.pad_id, max_length=self.max_length,
                        decode=self.target_tokenizer.decode)


class BundleTranslator(Translator):
    """Translation from a seq2seq bundle on ONNX Runtime (no TensorFlow).

    Concurrency (CPU, greedy and beam search): a decoder step of a small model is mostly fixed
    cost (~100 kernels of a few microseconds each), so ONNX Runtime's intra-op threads barely
    help it ('small' preset, in a 32-step loop: batch 16 on 2 threads 0.86 ms, batch 8 on 1
    thread 0.61 ms). Independent inputs use the cores instead: `max_shards` worker threads
    (one per core), each decoding with generate.py's loop over its own single-threaded
    sessions (opened once per worker, on that thread) while the others run; ONNX Runtime
    releases the GIL during a run. `predict_batches` hands the workers whole batches, each
    worker taking the next one as it finishes the last (no barrier between batches), so each
    decode step spreads its fixed cost over a whole batch's rows: bench_seq2seq's 4 batches of
    16 (2 cores, 32 tokens) took ~70 ms as two 8-row shards per batch, batch after batch, and
    ~55 ms as whole batches two at a time (one 16-row batch on one thread ~25 ms, two 8-row
    halves ~32 ms). Only the batches left when fewer remain than workers (`plan`: one batch
    alone, or the last of a job) are cut into `min(workers, inputs, rows // SHARD_ROWS)`
    contiguous shards. Each input is decoded exactly as in one batch (rows never interact;
    beam search works per input), so outputs are identical however the work is cut. Sampling
    runs batch after batch on the bundle's own sessions: its random draws are the whole
    batch's (a seed reproduces a batch). On a model large enough for its decode step to be
    bound by reading the weights, intra-op threads may be the better use of the cores (each
    worker reads every weight per step, and its sessions hold their own copy of the weights):
    bundles whose graphs exceed `SHARD_MAX_GRAPH_BYTES` get no workers, and `threads=1` turns
    them off.

    Args:
        threads: intra-op threads of the bundle's own sessions, and the most workers (default:
            the cores this process may use).
    """

    def __init__(self, path: str | Path, device: str | None = None, threads: int | None = None):
        from kerasllm.export.bundle import load_bundle  # noqa: PLC0415
        from kerasllm.export.seq2seq_runtime import Seq2SeqSessions  # noqa: PLC0415

        self.bundle = load_bundle(path)
        if self.bundle.family != "seq2seq":
            raise UsageError(f"{path}: a {self.bundle.family} bundle cannot translate (needs a seq2seq bundle)")
        super().__init__(*self.bundle.seq2seq_tokenizers(), self.bundle.config)
        roles = ("encoder", "decoder")
        # The files the graphs are read from, external data included (a glob of *.onnx* had missed
        # external data of another name).
        small = sum(self.bundle.file(name).stat().st_size
                    for role in roles for name in self.bundle.graph_files(role)) <= SHARD_MAX_GRAPH_BYTES
        # A small bundle's graphs are read and checked against the manifest once, here: the bundle's
        # sessions and the worker threads' (opened later, `_shard_loop`) open these bytes, never the
        # files again. The workers had opened the files as they were by then, unchecked: a bundle
        # replaced on disk mid-job decoded with the new model's graphs and the loaded one's tokenizer.
        # Held for the job: at most SHARD_MAX_GRAPH_BYTES, about what one more worker's sessions hold.
        # A graph with external data cannot open from bytes (ONNX Runtime would look for its data in
        # the working directory): each session opens it by path, its files checked again just before
        # (Bundle.open_session).
        self._graphs = {role: self.bundle.graph_bytes(role) for role in roles
                        if small and not self.bundle.external_data[role]}
        self.sessions = Seq2SeqSessions(*(self.bundle.open_session(role, device, threads, self._graphs.get(role))
                                          for role in ("encoder", "decoder")))
        self.max_shards = (threads or usable_cores()) if self.sessions.decoder.device_type == "cpu" and small else 1
        self._pool: tuple[int, ThreadPoolExecutor] | None = None  # (the pid that made it, the pool)
        self._local = threading.local()  # a worker thread's single-threaded sessions

    def workers(self, decoding: DecodingOptions) -> int:
        """How many worker threads decode at the same time (1: none, the bundle's own sessions run)."""
        return 1 if decoding.temperature else self.max_shards

    def shards(self, batch: int, decoding: DecodingOptions, most: int | None = None) -> int:
        """How many shards a batch of `batch` inputs is cut into (1: whole), at most `most` (default: the workers)."""
        workers = self.workers(decoding)
        if workers < 2:
            return 1
        return max(1, min(most or workers, batch, batch * decoding.num_beams // SHARD_ROWS))

    def plan(self, sizes: Sequence[int], decoding: DecodingOptions) -> list[list[int]]:
        """The bounds of the pieces each batch (of `sizes[i]` inputs) is decoded in, one per worker task.

        Whole batches (`[0, n]`) while there are at least as many left as workers; each of the
        `r < workers` last ones is cut into up to `workers // r` shards, so no core idles. With
        2 workers:

        >>> translator.plan([16, 16, 16, 16, 16], options)  # doctest: +SKIP
        [[0, 16], [0, 16], [0, 16], [0, 16], [0, 8, 16]]
        """
        workers = self.workers(decoding)
        tail = len(sizes) % workers
        plan = [[0, n] for n in sizes[:len(sizes) - tail]]
        for n in sizes[len(sizes) - tail:]:
            shards = self.shards(n, decoding, most=workers // tail)
            plan.append(np.linspace(0, n, shards + 1).round().astype(int).tolist())
        return plan

    def _worker_pool(self) -> ThreadPoolExecutor:
        """The worker threads' pool, made at the first use in this process. A forked child (a
        pre-forking server's worker) inherits the parent's pool but none of its threads: its tasks
        would wait forever for workers that are not there (every translate had hung), so the child
        makes its own pool, and drops the thread-local sessions too (those of the forking thread, if
        it was a worker: ONNX Runtime's sessions are not for sharing across a fork)."""
        pool = self._pool  # one read: (pid, pool) stay a pair for threads that race here
        if pool is None or pool[0] != os.getpid():
            if pool is not None:
                self._local = threading.local()
            # (Two threads' first calls at once may each make one: the other's idles and is collected.)
            pool = self._pool = (os.getpid(), ThreadPoolExecutor(self.max_shards, thread_name_prefix="kerasllm-worker"))
        return pool[1]

    def _shard_loop(self, batch, decoding):
        """`_loop` of one piece of work on this worker thread's single-threaded sessions."""
        sessions = getattr(self._local, "sessions", None)
        if sessions is None:  # one set per worker thread, opened there
            from kerasllm.export.seq2seq_runtime import Seq2SeqSessions  # noqa: PLC0415

            # The bundle's sessions already said what runs: the worker threads' copies stay quiet.
            quiet = _ThreadFilter(threading.get_ident())
            logging.getLogger("kerasllm").addFilter(quiet)
            try:
                graphs = self._graphs
                sessions = self._local.sessions = Seq2SeqSessions(
                    *(self.bundle.open_session(role, "cpu", 1, graphs.get(role)) for role in ("encoder", "decoder")))
            finally:
                logging.getLogger("kerasllm").removeFilter(quiet)
        return self._loop(sessions, batch, decoding)

    def _loop(self, sessions, batch, decoding):
        from kerasllm.export.runtime import flush_denormals  # noqa: PLC0415

        with flush_denormals():  # ORT's kernels run on this thread (see runtime.flush_denormals)
            return super()._loop(sessions, batch, decoding)

    def _generate(self, batch, decoding):
        """One batch on the bundle's own sessions (no workers)."""
        return self._loop(self.sessions, batch, decoding)

    def _generate_batches(self, batches, decoding):
        plan = self.plan([len(b) for b in batches], decoding)
        if self.workers(decoding) < 2 or sum(len(bounds) - 1 for bounds in plan) < 2:
            # nothing to run side by side: batch after batch on the bundle's sessions (all intra-op threads)
            yield from super()._generate_batches(batches, decoding)
            return
        # Every piece is queued at once; a worker takes the next as it finishes one.
        pieces = []
        try:
            pool = self._worker_pool()
            for batch, bounds in zip(batches, plan):
                pieces.append([pool.submit(self._shard_loop, batch[a:b], decoding) for a, b in pairwise(bounds)])
        except RuntimeError:
            # "cannot schedule new futures after (interpreter) shutdown": concurrent.futures shuts every
            # pool down once the main thread has returned, while non-daemon threads may still serve
            # (a server started on a thread at the end of a script); every translation had failed so.
            # The bundle's own sessions decode the batches here instead (outputs identical).
            for futures in pieces:
                for future in futures:
                    future.cancel()
            yield from super()._generate_batches(batches, decoding)
            return
        try:
            for futures in pieces:
                yield [hyps for future in futures for hyps in future.result()]
        finally:  # an error, an interrupt or a consumer that stops early: drop what has not started
            for futures in pieces:
                for future in futures:
                    future.cancel()


class _ThreadFilter(logging.Filter):
    """Drops the records one thread logs (the others' pass)."""

    def __init__(self, thread: int):
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


class ModelDirTranslator(Translator):
    """Translation from a trained model directory in Keras (imports TensorFlow)."""

    def __init__(self, path: str | Path, device: str | None = None):
        from kerasllm.modeldir import load_model_dir  # noqa: PLC0415

        self.model, _, run = load_model_dir(path, device)
        if run["model"]["family"] != "seq2seq":
            kind = run.get("task", run["model"]["family"])  # the task's name: 'a encoder' read badly
            raise UsageError(f"{path}: a {kind!r} model cannot translate (needs a seq2seq model)")
        super().__init__(*load_seq2seq_tokenizers(Path(path), run["model"]), run["model"])
        self._sessions = None

    def _generate(self, batch, decoding):
        if decoding.repetition_penalty != 1.0 or decoding.stop or self.unspoken_ids:  # (Keras's loop has neither)
            if self._sessions is None:
                from kerasllm.export.seq2seq_export import KerasSeq2SeqSessions  # noqa: PLC0415

                self._sessions = KerasSeq2SeqSessions(self.model)
            return self._loop(self._sessions, batch, decoding)
        new = min(decoding.max_new_tokens, self.max_length - 1)
        if decoding.num_beams > 1:
            n_best = self.model.generate_n_best(batch, max_new_tokens=new, num_beams=decoding.num_beams,
                                                n_best=decoding.n_best)
            return [[Hypothesis(tokens, score) for tokens, score in best] for best in n_best]
        outputs = self.model.generate(batch, max_new_tokens=new, temperature=decoding.temperature,
                                      top_k=decoding.top_k, top_p=decoding.top_p, seed=decoding.seed)
        return [[Hypothesis(tokens)] for tokens in outputs]


def load_bundle(path: Path, device: str | None = None, **kwargs: Any) -> BundleTranslator:
    return BundleTranslator(path, device=device, **kwargs)


def load_modeldir(path: Path, device: str | None = None, **kwargs: Any) -> ModelDirTranslator:
    return ModelDirTranslator(path, device=device)


def evaluate_seq2seq(source: Path, data: Path | None, *, device: str | None = None, batch_size: int = 32,
                     source_field: str = "source", target_field: str = "target", fmt: str = "auto",
                     max_new_tokens: int | None = None, progress: Any = None, bleu_tokenize: str | None = None,
                     warn: Any = None, parallel: tuple[Path, Path] | None = None, **_: Any) -> dict:
    """`bleu`, `chrf` and `exact_match` of greedy translations of `data`'s sources against its targets
    (or of `parallel`'s: a source file and a target file, line-aligned),
    and `bleu_tokenize`: sacrebleu's tokenizer for BLEU, the one given or (None, "auto") the one for the
    targets' language (`metrics.bleu_tokenizer_for`: `zh` for Chinese, where 13a's words are sentences).
    `progress`: kerasllm.evaluation.Progress's `reset(total)` and `update(n)`, as the other evaluators take it;
    `warn`: where a warning line goes (the references too short for BLEU to mean anything)."""
    from kerasllm import metrics  # noqa: PLC0415
    from kerasllm.export.batch import runtime_failure  # noqa: PLC0415
    from kerasllm.export.predict import load_predictor  # noqa: PLC0415
    from kerasllm.pairs import read_pairs  # noqa: PLC0415

    if parallel is not None:  # line-aligned files, as `kerasllm train seq2seq` takes them
        pairs = read_pairs(source_file=parallel[0], target_file=parallel[1])
    else:
        pairs = read_pairs(data, source_field=source_field, target_field=target_field, fmt=fmt)
    predictor = load_predictor("translate", source, device=device)
    sources = []
    for pair in pairs:
        try:
            sources.append(predictor.check(pair.source))
        except RecordError as err:
            raise DataError(f"{pair.where('source')}: {err}") from None
    hypotheses = [""] * len(pairs)
    new = max_new_tokens or predictor.max_length - 1
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))  # little padding per batch
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    results = iter(predictor.predict_batches([[sources[i] for i in indices] for indices in batches],
                                             max_new_tokens=new))
    if progress is not None:
        progress.reset(len(pairs))
    for indices in batches:
        with runtime_failure([pairs[i].where("source") for i in sorted(indices)]):
            batch_results = next(results)
        for i, result in zip(indices, batch_results):
            hypotheses[i] = result["output"]
        if progress is not None:
            progress.update(len(indices))
    references = [p.target for p in pairs]
    tokenize = bleu_tokenize if bleu_tokenize not in (None, "auto") else metrics.bleu_tokenizer_for(references)
    short = metrics.short_references(references, tokenize)
    if short > 0.5 and warn is not None:
        warn(f"{short:.0%} of the references have fewer than 4 words (BLEU's tokenizer {tokenize}): BLEU, made of "
             "1- to 4-gram precisions, is 0 or near it on such targets however good the model; read chrf and "
             "exact_match")
    return {"count": len(pairs), "bleu": metrics.bleu(hypotheses, references, tokenize), "bleu_tokenize": tokenize,
            "chrf": metrics.chrf(hypotheses, references), "exact_match": metrics.exact_match(hypotheses, references)}
