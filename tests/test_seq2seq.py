"""Seq2SeqLM end to end: learning the generated numbers task, export parity, beam search, padding, bad input.

One tiny model is trained once per module (~300 steps, words -> digits with a BPE source
and a character target tokenizer) and exported once; the tests share both.
"""

from __future__ import annotations

import json
import logging
import threading

import keras
import numpy as np
import pytest

from kerasllm import datasets
from kerasllm.config import Seq2SeqConfig
from kerasllm.errors import DataError
from kerasllm.export.predict import GENERATED_TOKENS

TRAIN_STEPS = 300


def write_pairs(path, rows):
    path.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model dir, bundle dir, held-out pairs): trained and exported once for the module."""
    from kerasllm.export.exporter import export_model_dir
    from kerasllm.recipes.seq2seq import Seq2SeqTrainArgs, train_seq2seq

    root = tmp_path_factory.mktemp("seq2seq")
    keras.utils.set_random_seed(0)
    data = write_pairs(root / "train.tsv", datasets.number_words_pairs(3000, max_value=999, seed=0))
    args = Seq2SeqTrainArgs(data=str(data), steps=TRAIN_STEPS, batch_size=32, lr=5e-3, tokenizer="bpe",
                            vocab_size=300, separate_vocab=True, target_tokenizer="char", eval_interval=150,
                            eval_steps=2, jit_compile=False)
    train_seq2seq(args, root / "run", quiet=True, config_overrides={"max_length": 32})
    export_model_dir(root / "run", root / "bundle", log=lambda message: None)
    held_out = write_pairs(root / "test.tsv", datasets.number_words_pairs(200, max_value=999, seed=7))
    return root / "run", root / "bundle", held_out


def test_learns_numbers_to_digits(trained):
    from kerasllm.export.translate_predictor import evaluate_seq2seq

    run, bundle, held_out = trained
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history[-1]["loss"] < history[0]["loss"] / 5
    assert history[-1]["val_loss"] < 0.2
    scores = evaluate_seq2seq(bundle, held_out, device="cpu")
    assert scores["count"] == 200
    assert scores["exact_match"] >= 0.90, scores
    assert scores["chrf"] >= 90.0, scores


def test_fp16_bundle_fuses_attention_and_translates_as_the_fp32_bundle(trained, tmp_path):
    """fp16 (what GPU serving exports) keeps the fp32 bundle's fused attention, the decoder's
    self-attention over an fp16 in-place buffer, picks greedy tokens in the graph, and translates the
    held-out set token for token as the fp32 bundle does (checked on the CPU)."""
    from kerasllm.export.exporter import ExportOptions, export_model_dir
    from kerasllm.export.translate_predictor import BundleTranslator
    from kerasllm.pairs import read_pairs

    run, bundle, held_out = trained
    fp16 = tmp_path / "fp16"
    export_model_dir(run, fp16, ExportOptions(dtype="fp16"), log=lambda message: None)
    manifest = json.loads((fp16 / "manifest.json").read_text())
    assert manifest["dtype"] == "fp16" and min(manifest["validation"]["top1_agreement"].values()) >= 0.99
    layers = manifest["config"]["num_decoder_layers"] or manifest["config"]["num_layers"]
    assert manifest["optimization"]["encoder"]["fusions"]["Attention"] == manifest["config"]["num_layers"]
    decoder = manifest["optimization"]["decoder"]
    assert decoder["fusions"]["MultiHeadAttention"] == decoder["fusions"]["GroupQueryAttention"] == layers
    assert decoder["kv_cache"] == "shared_buffer"
    # Greedy's choice is made in the decoder graph (`next_token`: only ids leave a GPU), checked at
    # export against the choice from its logits; the translations below take that path.
    assert manifest["graphs"]["decoder"]["outputs"]["next_token"] == {"dtype": "int64", "shape": ["batch", 1]}
    assert manifest["validation"]["greedy_on_device"]["identical"] is True
    assert BundleTranslator(fp16, device="cpu").sessions.greedy_on_device
    # `kerasllm train seq2seq` suppresses the target's special tokens but EOS: the graph's choice too.
    assert manifest["config"]["suppress_ids"] == [1, 4, 5]  # <unk>, <mask>, <sep>
    assert decoder["next_token_suppressed_ids"] == [0, 1, 2, 4, 5]  # and <pad>, <bos>
    sources = [pair.source for pair in read_pairs(held_out)]
    outputs = [[r["output"] for r in BundleTranslator(b, device="cpu").translate(sources, max_new_tokens=8)]
               for b in (bundle, fp16)]
    assert len(outputs[0]) == 200 and outputs[0] == outputs[1]


@pytest.mark.parametrize("kv_cache", ["shared", "growing"])
def test_rotary_seq2seq_exports_with_every_attention_fused(tmp_path, kv_cache):
    """Rotary positions in both stacks: the encoder's layers fuse as RotaryEmbedding + MultiHeadAttention
    (ORT's CPU Attention refuses rotation), the decoder's self-attention as GroupQueryAttention with the
    rotation inside (do_rotary; RotaryEmbedding + MultiHeadAttention over a growing cache), its
    cross-attention as before; the export's validation holds (logits within 1e-4, greedy identical)."""
    import onnx

    from kerasllm import Seq2SeqLM
    from kerasllm.export.exporter import ExportOptions, export_model_dir
    from kerasllm.tokenizers import TextTokenizer
    from kerasllm.training import save_model_atomic, write_json_atomic

    keras.utils.set_random_seed(0)
    tokenizer = TextTokenizer.train(["abcdefghijklmnopqrstuvwxyz0123456789 .,"], kind="char")
    config = Seq2SeqConfig.preset("tiny", vocab_size=tokenizer.vocab_size, dropout=0.0, position="rotary")
    model = Seq2SeqLM(config)
    model.generate([[7, 8, 9]], max_new_tokens=2)  # builds the weights
    run = tmp_path / "run"
    run.mkdir()
    tokenizer.save(run)
    write_json_atomic(run / "config.json", {"task": "seq2seq", "model": config.to_dict(), "train": {}})
    save_model_atomic(model, run)
    bundle = export_model_dir(run, tmp_path / "bundle", ExportOptions(shared_kv_buffer=kv_cache == "shared"),
                              log=lambda message: None)
    report, layers = bundle.manifest["optimization"], config.num_layers
    assert "attention_fusion_reverted" not in report
    assert report["encoder"]["fusions"]["MultiHeadAttention"] == layers
    assert report["encoder"]["fusions"]["RotaryEmbedding"] == 2 * layers
    decoder = report["decoder"]["fusions"]
    if kv_cache == "shared":
        assert decoder["GroupQueryAttention"] == decoder["MultiHeadAttention"] == layers
        assert "RotaryEmbedding" not in decoder
        nodes = onnx.load(str(tmp_path / "bundle" / "decoder.onnx")).graph.node
        assert [next(a.i for a in n.attribute if a.name == "do_rotary") for n in nodes
                if n.op_type == "GroupQueryAttention"] == [1] * layers
    else:
        assert decoder["MultiHeadAttention"] == 2 * layers and decoder["RotaryEmbedding"] == 2 * layers
    validation = bundle.manifest["validation"]
    assert max(v for k, v in validation["max_abs_diff"].items() if k.endswith("logits")) <= 1e-4
    assert validation["greedy"]["identical"] is True


def test_suppressed_ids_are_never_generated_in_keras_nor_by_the_bundles(tmp_path):
    """The ids a random model's greedy outputs use most, suppressed (Seq2SeqConfig.suppress_ids):
    Keras greedy and beam n-best route around them, and so do the bundles: fp32 (the choice on the
    host, Keras's greedy tokens) and fp16 (the argmax in the graph, checked at export
    against the host's choice)."""
    from kerasllm import Seq2SeqLM
    from kerasllm.export.exporter import ExportOptions, export_model_dir
    from kerasllm.export.translate_predictor import BundleTranslator
    from kerasllm.tokenizers import TextTokenizer
    from kerasllm.training import save_model_atomic, write_json_atomic

    keras.utils.set_random_seed(1)
    tokenizer = TextTokenizer.train(["abcdefghijklmnopqrstuvwxyz0123456789 .,"], kind="char")
    plain = Seq2SeqConfig.preset("tiny", vocab_size=tokenizer.vocab_size, dropout=0.0)
    rng = np.random.default_rng(0)
    sources = [rng.integers(6, plain.vocab_size, size=n).tolist() for n in (3, 9, 6, 12, 5, 7)]
    model = Seq2SeqLM(plain)
    before = model.generate(sources, max_new_tokens=8)
    favourites = [int(t) for t in np.argsort(-np.bincount(sum(before, []), minlength=plain.vocab_size))[:2]]
    config = plain.replace(suppress_ids=favourites)
    assert set(config.suppressed_ids) == {plain.pad_id, plain.bos_id, *favourites}
    suppressed = Seq2SeqLM(config)
    suppressed.generate(sources[:1], max_new_tokens=1)  # builds the weights
    suppressed.set_weights(model.get_weights())
    greedy = suppressed.generate(sources, max_new_tokens=8)
    n_best = suppressed.generate_n_best(sources, max_new_tokens=8, num_beams=4, n_best=3)
    produced = {t for tokens in greedy for t in tokens} | {t for best in n_best for tokens, _ in best for t in tokens}
    assert produced.isdisjoint(config.suppressed_ids) and greedy != before
    run = tmp_path / "run"
    run.mkdir()
    tokenizer.save(run)
    write_json_atomic(run / "config.json", {"task": "seq2seq", "model": config.to_dict(), "train": {}})
    save_model_atomic(suppressed, run)
    fp32 = BundleTranslator(export_model_dir(run, tmp_path / "fp32", log=lambda m: None).path, device="cpu")
    assert [h[0].tokens for h in fp32._generate(sources, fp32.options(max_new_tokens=8))] == greedy
    beams = fp32._generate(sources, fp32.options(max_new_tokens=8, num_beams=4, n_best=3))
    assert {t for hyps in beams for h in hyps for t in h.tokens}.isdisjoint(config.suppressed_ids)
    assert all(len({tuple(h.tokens) for h in hyps}) == 3 for hyps in beams)
    # The same search rules on both sides (kerasllm.models.beam_search): the same n-best lists, the
    # scores equal to float rounding (the bundle scores in float64).
    assert [[tokens for tokens, _ in best] for best in n_best] == [[h.tokens for h in hyps] for hyps in beams]
    np.testing.assert_allclose([[score for _, score in best] for best in n_best],
                               [[h.score for h in hyps] for hyps in beams], rtol=0, atol=1e-5)
    fp16 = export_model_dir(run, tmp_path / "fp16", ExportOptions(dtype="fp16"), log=lambda m: None)
    assert fp16.manifest["optimization"]["decoder"]["next_token_suppressed_ids"] == list(config.suppressed_ids)
    assert fp16.manifest["validation"]["greedy_on_device"]["identical"] is True
    translator = BundleTranslator(fp16.path, device="cpu")
    assert translator.sessions.suppressed_on_device == config.suppressed_ids
    on_device = translator._generate(sources, translator.options(max_new_tokens=8))
    assert {t for hyps in on_device for t in hyps[0].tokens}.isdisjoint(config.suppressed_ids)


def test_bundle_greedy_is_token_identical_to_keras(trained):
    from kerasllm.export.generate import DecodingOptions
    from kerasllm.export.translate_predictor import BundleTranslator, ModelDirTranslator

    run, bundle, _ = trained
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"encoder", "decoder"}
    assert manifest["target_tokenizer"] == "target_tokenizer.json"
    assert max(v for k, v in manifest["validation"]["max_abs_diff"].items() if k.endswith("logits")) <= 1e-4
    assert manifest["validation"]["greedy"]["identical"]
    # Each decoder layer's self-attention (GroupQueryAttention over an in-place buffer) and
    # cross-attention (MultiHeadAttention over the encoder's keys/values) fused into one kernel each.
    layers = manifest["config"]["num_decoder_layers"] or manifest["config"]["num_layers"]
    decoder = manifest["optimization"]["decoder"]
    assert decoder["fusions"]["MultiHeadAttention"] == decoder["fusions"]["GroupQueryAttention"] == layers
    assert decoder["kv_cache"] == "shared_buffer"
    inputs = manifest["graphs"]["decoder"]["inputs"]
    assert inputs["seqlens_k"] == {"dtype": "int32", "shape": ["batch"]} and "attention_mask" not in inputs
    assert inputs["total_sequence_length"]["shape"] == []
    assert "attention_fusion_reverted" not in manifest["optimization"]["decoder"]
    assert manifest["optimization"]["encoder"]["fusions"]["Attention"] == manifest["config"]["num_layers"]
    texts = [s for s, _ in datasets.number_words_pairs(24, max_value=9999, seed=3)]  # also unseen thousands
    ort_translator, keras_translator = BundleTranslator(bundle, device="cpu"), ModelDirTranslator(run)
    sources = [ort_translator.check(t) for t in texts]
    options = ort_translator.options(max_new_tokens=8)
    on_ort = [h[0].tokens for h in ort_translator._generate(sources, options)]
    in_keras = [h[0].tokens for h in keras_translator._generate(sources, options)]
    assert on_ort == in_keras
    assert isinstance(options, DecodingOptions)


def test_model_dir_decodes_stop_strings_and_repetition_penalty_as_the_bundle(trained):
    """These options go through generate.py's loops on both sides (Keras generation lacks them);
    the model dir's loop once crashed on the step's `greedy` argument."""
    from kerasllm.export.translate_predictor import BundleTranslator, ModelDirTranslator

    run, bundle, _ = trained
    texts = [s for s, _ in datasets.number_words_pairs(12, max_value=999, seed=5)]
    ort_translator, keras_translator = BundleTranslator(bundle, device="cpu"), ModelDirTranslator(run)
    sources = [ort_translator.check(t) for t in texts]
    beams = {"num_beams": 3, "n_best": 2}
    for options, without in (({"stop": ["5"]}, {}), ({"repetition_penalty": 5.0}, {}),
                             ({**beams, "repetition_penalty": 5.0}, beams)):
        on_ort = ort_translator.predict(sources, max_new_tokens=8, **options)
        in_keras = keras_translator.predict(sources, max_new_tokens=8, **options)
        assert [r["output"] for r in in_keras] == [r["output"] for r in on_ort], options
        if "scores" in on_ort[0]:
            np.testing.assert_allclose([r["scores"] for r in in_keras], [r["scores"] for r in on_ort], atol=1e-5)
        assert on_ort != ort_translator.predict(sources, max_new_tokens=8, **without), options  # it took effect
    cut = ort_translator.predict(sources, max_new_tokens=8, stop=["5"])
    assert all("5" not in r["output"] for r in cut)


def test_beam_search_n_best_and_beam_one_is_greedy(trained):
    from kerasllm.export.translate_predictor import BundleTranslator, ModelDirTranslator

    run, bundle, held_out = trained
    pairs = datasets.number_words_pairs(16, max_value=999, seed=11)
    ort_translator = BundleTranslator(bundle, device="cpu")
    sources = [ort_translator.check(s) for s, _ in pairs]
    beams = ort_translator.predict(sources, num_beams=4, n_best=3, max_new_tokens=8)
    greedy = ort_translator.predict(sources, max_new_tokens=8)
    for result, (_, target), plain in zip(beams, pairs, greedy):
        assert len(result["output"]) == 3 and len(set(result["output"])) == 3
        assert result["scores"] == sorted(result["scores"], reverse=True)
        assert all(s <= 0 for s in result["scores"])
    assert np.mean([r["output"][0] == t for r, (_, t) in zip(beams, pairs)]) >= 0.9
    # Keras's beam search (the bundle's rules) gives the bundle's n-best lists and scores.
    keras_beams = ModelDirTranslator(run).predict(sources, num_beams=4, n_best=3, max_new_tokens=8)
    assert [r["output"] for r in keras_beams] == [r["output"] for r in beams]
    np.testing.assert_allclose([r["scores"] for r in keras_beams], [r["scores"] for r in beams], rtol=0, atol=1e-5)
    # Keras: one beam gives exactly the greedy tokens.
    model = ModelDirTranslator(run).model
    one_beam = [best[0][0] for best in model.generate_n_best(sources, max_new_tokens=8, num_beams=1)]
    assert one_beam == model.generate(sources, max_new_tokens=8)
    # Options the search would not use are refused, as the bundle refuses them (DecodingOptions).
    from kerasllm.errors import UsageError

    with pytest.raises(UsageError, match="beam search is deterministic"):
        model.generate(sources, max_new_tokens=8, num_beams=2, temperature=0.7)
    with pytest.raises(UsageError, match="give a temperature > 0"):
        model.generate(sources, max_new_tokens=8, top_k=3)
    assert [ort_translator.target_tokenizer.decode(t) for t in one_beam] == [g["output"] for g in greedy]


def test_decoding_with_device_buffers_equals_decoding_with_host_arrays(trained):
    """The CUDA path of the seq2seq runtime, run on the CPU (`host_buffers=False`): the decoder's
    self-attention buffer as tensors only ORT touches, beam search's reorders and the rows that
    leave the batch gathered by row_gather.py instead of NumPy. Beam search (n-best with scores)
    and greedy decoding give exactly the host path's results."""
    from kerasllm.export.generate import generate
    from kerasllm.export.seq2seq_export import translate_ids
    from kerasllm.export.seq2seq_runtime import Seq2SeqSessions
    from kerasllm.export.translate_predictor import BundleTranslator

    run, bundle, held_out = trained
    translator = BundleTranslator(bundle, device="cpu")
    pairs = datasets.number_words_pairs(12, max_value=999, seed=5)
    sources = [translator.check(s) for s, _ in pairs]
    c = translator.config
    graphs = [bundle / "encoder.onnx", bundle / "decoder.onnx"]
    host, device = (Seq2SeqSessions.open(*graphs, "cpu", host_buffers=flag) for flag in (True, False))
    assert host.shared_buffer and not device.host_buffers
    for options in (translator.options(max_new_tokens=10, num_beams=4, n_best=3),
                    translator.options(max_new_tokens=10)):
        results = [translate_ids(s, sources, options, c["pad_id"], c["bos_id"], c["max_length"], generate)
                   for s in (host, device)]
        assert [[(h.tokens, h.score) for h in r] for r in results[0]] == \
            [[(h.tokens, h.score) for h in r] for r in results[1]]


def test_sharded_batches_decode_as_one(trained, monkeypatch, caplog):
    """A batch cut into shards decoded on parallel threads (BundleTranslator) gives exactly the
    unsharded outputs, greedy and beam n-best with scores; sampling stays unsharded; a bundle
    too large to hold once per shard is not sharded."""
    from kerasllm.export import translate_predictor
    from kerasllm.export.translate_predictor import BundleTranslator

    _, bundle, _ = trained
    one = BundleTranslator(bundle, device="cpu", threads=1)
    sharded = BundleTranslator(bundle, device="cpu")
    sharded.max_shards = 3  # whatever the machine's cores
    texts = [s for s, _ in datasets.number_words_pairs(19, max_value=999, seed=5)]
    sources = [one.check(t) for t in texts]
    assert one.shards(19, one.options()) == 1
    assert [sharded.shards(n, sharded.options()) for n in (19, 8, 7)] == [3, 2, 1]  # >= SHARD_ROWS (4) rows each
    assert sharded.shards(3, sharded.options(num_beams=4)) == 3  # rows are inputs x beams
    assert sharded.shards(19, sharded.options(temperature=0.7)) == 1
    for options in ({"max_new_tokens": 8}, {"max_new_tokens": 8, "num_beams": 4, "n_best": 2}):
        assert sharded.predict(sources, **options) == one.predict(sources, **options)
    # What runs is said once a job: not again for the decoder, nor for each shard thread's sessions.
    from kerasllm.export import runtime

    monkeypatch.setattr(runtime, "_ANNOUNCED", set())  # as in a fresh process
    with caplog.at_level(logging.INFO, logger="kerasllm"):
        quiet = BundleTranslator(bundle, device="cpu")
        quiet.max_shards = 3
        quiet.predict(sources, max_new_tokens=2)
    said = [r for r in caplog.records if r.getMessage().startswith("ONNX Runtime")]
    assert len(said) == 1
    monkeypatch.setattr(translate_predictor, "SHARD_MAX_GRAPH_BYTES", 1000)
    assert BundleTranslator(bundle, device="cpu", threads=2).shards(19, one.options()) == 1


def test_whole_batches_on_the_workers_decode_as_one_batch_at_a_time(trained, monkeypatch):
    """`predict_batches` (what `kerasllm translate` calls with a window's batches) hands whole
    batches to the worker threads (one per core) and cuts into shards only the batches left
    without a batch for every worker; the results are exactly those of one batch at a time on
    the bundle's own sessions, greedy and beam n-best with scores, batch by batch in order;
    sampling stays on the bundle's sessions, batch after batch."""
    from kerasllm.export.translate_predictor import BundleTranslator

    _, bundle, _ = trained
    one = BundleTranslator(bundle, device="cpu", threads=1)
    many = BundleTranslator(bundle, device="cpu")
    many.max_shards = 2  # whatever the machine's cores
    greedy, beam = many.options(), many.options(num_beams=4, n_best=2)
    assert many.plan([6, 6, 6, 6, 3], greedy) == [[0, 6]] * 4 + [[0, 3]]  # 3 rows: too few to cut
    assert many.plan([6, 6, 6, 6, 3], beam) == [[0, 6]] * 4 + [[0, 2, 3]]  # 12 beam rows: 2 shards
    assert many.plan([8], greedy) == [[0, 4, 8]] and many.plan([8, 8], greedy) == [[0, 8], [0, 8]]
    many.max_shards = 3
    assert many.plan([8] * 4, greedy) == [[0, 8]] * 3 + [[0, 4, 8]]  # the last alone: 2 shards (4 rows each)
    assert many.plan([8] * 5, greedy) == [[0, 8]] * 5  # 2 left for 3 workers: one each
    assert many.plan([8] * 4, many.options(temperature=0.7)) == [[0, 8]] * 4
    pieces = []
    shard_loop = many._shard_loop
    monkeypatch.setattr(many, "_shard_loop", lambda batch, decoding: pieces.append(len(batch)) or
                        shard_loop(batch, decoding))
    texts = [s for s, _ in datasets.number_words_pairs(27, max_value=999, seed=13)]
    sources = [one.check(t) for t in texts]
    batches = [sources[i:i + 6] for i in range(0, len(sources), 6)]  # 6, 6, 6, 6, 3 inputs
    many.max_shards = 2
    for options in ({"max_new_tokens": 8}, {"max_new_tokens": 8, "num_beams": 4, "n_best": 2}):
        pieces.clear()
        assert list(many.predict_batches(batches, **options)) == [one.predict(b, **options) for b in batches]
        expected = [6, 6, 6, 6, 3] if options.get("num_beams", 1) == 1 else [6, 6, 6, 6, 2, 1]
        assert sorted(pieces, reverse=True) == expected  # whole batches on the workers, the last cut if worth it
    pieces.clear()
    sampled = list(many.predict_batches(batches, max_new_tokens=8, temperature=0.9, seed=4))
    assert sampled == [many.predict(b, max_new_tokens=8, temperature=0.9, seed=4) for b in batches]
    assert pieces == []
    # A consumer that stops early (an interrupt) drops the work not yet started: the pieces after
    # the first wait until the stream is closed, so at most 3 of 20 have started by then.
    started, release = [], threading.Event()

    def held(batch, decoding):
        started.append(len(batch))
        if len(started) > 1:
            release.wait(timeout=60)
        return shard_loop(batch, decoding)

    monkeypatch.setattr(many, "_shard_loop", held)
    stream = many.predict_batches(batches[:4] * 5, max_new_tokens=8)
    first = next(stream)
    stream.close()
    release.set()
    many._worker_pool().submit(lambda: None).result()  # the workers are past everything queued before
    assert first == one.predict(batches[0], max_new_tokens=8)
    assert len(started) <= 3  # the first batch, then at most one more on each worker, held until the close


def test_bundle_decoding_flushes_denormals_on_every_thread_it_runs_on(trained, monkeypatch):
    """ONNX Runtime's kernels run on the thread that calls them: the worker threads and the
    caller's thread decode with denormals flushed (runtime.flush_denormals: masked attention
    probabilities are denormals otherwise, and slow), and the caller's thread is left as it was."""
    from kerasllm.export import translate_predictor

    _, bundle, _ = trained
    translator = translate_predictor.BundleTranslator(bundle, device="cpu")
    translator.max_shards = 2
    flushed, generate = [], translate_predictor.generate

    def recording(*args, **kwargs):
        flushed.append((threading.get_ident(), bool(np.float32(1e-38) * np.float32(0.01) == 0)))
        return generate(*args, **kwargs)

    monkeypatch.setattr(translate_predictor, "generate", recording)
    sources = [translator.check(t) for t, _ in datasets.number_words_pairs(12, max_value=99, seed=3)]
    list(translator.predict_batches([sources[:6], sources[6:]], max_new_tokens=4))  # on the two workers
    translator.predict(sources[:3], max_new_tokens=4)  # on this thread
    threads = {thread for thread, _ in flushed}
    assert threading.get_ident() in threads and len(threads) >= 2 and all(on for _, on in flushed)
    assert np.float32(1e-38) * np.float32(0.01) != 0


def test_translate_cli_hands_a_window_of_batches_over_at_once(trained, run_cli, tmp_path, monkeypatch):
    """`kerasllm translate` on a bundle gives each window's batches to `predict_batches` in one
    call; the output is in input order and equal to translating each line alone."""
    from kerasllm.export.translate_predictor import BundleTranslator

    _, bundle, _ = trained
    calls = []
    generate_batches = BundleTranslator._generate_batches
    monkeypatch.setattr(BundleTranslator, "_generate_batches",
                        lambda self, batches, decoding: calls.append(len(batches)) or
                        generate_batches(self, batches, decoding))
    texts = [s for s, _ in datasets.number_words_pairs(18, max_value=999, seed=21)]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = run_cli("translate", bundle, "-i", source, "-o", out, "--batch-size", 4, "--max-new-tokens", 8, "-q")
    assert result.code == 0, result
    assert calls == [5]  # 18 records, one window: 5 batches in one call
    one = BundleTranslator(bundle, device="cpu", threads=1)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [str(i + 1) for i in range(18)]
    assert [r["output"] for r in rows] == [one.translate([t], max_new_tokens=8)[0]["output"] for t in texts]


def test_keras_sampling_seeds_and_top_k_past_the_vocabulary():
    """Seq2SeqLM.generate on an untrained (near uniform) model: without a seed each call samples
    anew (every call had repeated the first); one seed repeats, unseeded calls in between or not;
    top_k >= the target vocabulary filters nothing, the bundle's rule (export/generate.filter_top_k),
    where a k past it had failed in XLA's TopKV2. Four sources of 24 tokens: a row's two unseeded
    draws agree by chance mostly when both begin with EOS (~1/60 each), all four about 1e-14."""
    from kerasllm import Seq2SeqLM

    keras.utils.set_random_seed(0)
    model = Seq2SeqLM(Seq2SeqConfig.preset("tiny", vocab_size=64, dropout=0.0, max_length=64))
    sources = [[7, 8, 9, 10], [11, 12], [13, 14, 15], [16]]
    kwargs = dict(max_new_tokens=24, temperature=1.0)
    assert model.generate(sources, **kwargs) != model.generate(sources, **kwargs)
    seeded = model.generate(sources, seed=3, **kwargs)
    model.generate(sources, **kwargs)
    assert model.generate(sources, seed=3, **kwargs) == seeded
    for k in (model.config.target_vocab, 1000):
        assert model.generate(sources, seed=3, top_k=k, **kwargs) == seeded


def test_keras_generation_refuses_ids_outside_the_vocabulary_and_takes_numpy_sources():
    """Source ids outside the vocabulary are refused (the compiled loop had clamped them); a 2-D
    array of sources decodes as its lists (it had failed on "truth value of an array")."""
    from kerasllm import Seq2SeqLM
    from kerasllm.errors import UsageError

    keras.utils.set_random_seed(0)
    model = Seq2SeqLM(Seq2SeqConfig.preset("tiny", vocab_size=64, target_vocab_size=40, max_length=32))
    for bad in (64, -1):
        with pytest.raises(UsageError, match=rf"source 0 has token id {bad}, outside the vocabulary of 64 ids"):
            model.generate([[7, bad]], max_new_tokens=2)
    with pytest.raises(UsageError, match="source 1 has token id 99"):
        model.generate_n_best([[7], [99]], max_new_tokens=2, num_beams=2)
    sources = np.random.default_rng(0).integers(6, 64, (2, 5))
    assert model.generate(sources, max_new_tokens=4) == model.generate(sources.tolist(), max_new_tokens=4)
    assert (model.generate_n_best(sources, max_new_tokens=4, num_beams=2)
            == model.generate_n_best(sources.tolist(), max_new_tokens=4, num_beams=2))


def test_keras_seeded_sampling_from_threads_repeats_the_serial_samples():
    """Concurrent seeded calls had drawn from each other's sampler seed state (CausalLM's fault too)."""
    from concurrent.futures import ThreadPoolExecutor

    from kerasllm import Seq2SeqLM

    keras.utils.set_random_seed(0)
    model = Seq2SeqLM(Seq2SeqConfig.preset("tiny", vocab_size=64, max_length=32))
    sources = [[[7, 8, 9]], [[10, 11, 12]], [[13, 14, 15]], [[16, 17, 18]]]
    kwargs = dict(max_new_tokens=12, temperature=1.0, seed=5)
    serial = [model.generate(r, **kwargs) for r in sources]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda k: model.generate(sources[k % 4], **kwargs), range(16)))
    assert threaded == [serial[k % 4] for k in range(16)]


def test_fewer_rows_stay_in_the_same_self_attention_buffer(trained):
    """Finished rows leaving the batch (greedy) or done inputs (beam search) shrink the shared
    self-attention buffer in place on the CPU: the kept rows' cache and next logits are those of
    a fresh buffer holding only them."""
    from kerasllm.export.generate import right_pad
    from kerasllm.export.seq2seq_runtime import Seq2SeqStep
    from kerasllm.export.translate_predictor import BundleTranslator

    _, bundle, _ = trained
    translator = BundleTranslator(bundle, device="cpu", threads=1)
    sources = [translator.check(t) for t in ("seven", "forty-two", "nine hundred and one", "six hundred")]
    step = Seq2SeqStep(translator.sessions, *right_pad(sources, translator.pad_id))
    tokens = np.full((4, 1), translator.bos_id, np.int64)
    cache = None
    for _ in range(3):
        logits, cache = step(tokens, None, cache)
        tokens = logits[:, -1].argmax(-1)[:, None]
    buffer = cache[0]
    before = translator.sessions.presents(buffer)
    keep = np.array([3, 1])
    fresh = buffer._resized(keep, buffer.capacity)  # a new buffer of those rows (as on CUDA)
    shrunk = step.reorder(cache, keep)
    assert shrunk[0] is buffer and buffer.batch == 2
    for kept, full in zip(translator.sessions.presents(buffer), before):
        np.testing.assert_array_equal(kept, full[keep])
    logits, _ = step(tokens[keep], None, shrunk)
    expected = translator.sessions.step(tokens[keep], step.encoder_mask, step.cross, fresh)[0]
    np.testing.assert_array_equal(logits, expected)


def _mask_contract_bundle(bundle, target):
    """A copy of `bundle` whose decoder takes the shared-buffer contract of bundles exported before
    2026-12-05: `attention_mask [B, M]` (ones in each row's first n columns, n = tokens so far with
    the new one) from which the graph computes GroupQueryAttention's `seqlens_k` and
    `total_sequence_length` itself, instead of taking them as inputs."""
    return _with_edited_decoder(bundle, target, _older_mask_contract)


def _with_edited_decoder(bundle, target, edit):
    """A copy of `bundle` at `target` whose decoder.onnx `edit(model)` changed (manifest hash updated)."""
    import hashlib
    import shutil

    import onnx

    shutil.copytree(bundle, target)
    model = onnx.load(str(target / "decoder.onnx"))
    edit(model)
    onnx.save(model, str(target / "decoder.onnx"))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"]["decoder.onnx"] = hashlib.sha256((target / "decoder.onnx").read_bytes()).hexdigest()
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def _older_mask_contract(model):
    from onnx import TensorProto, helper, numpy_helper

    from kerasllm.export.seq2seq_runtime import SEQLENS_K, TOTAL_SEQUENCE_LENGTH

    graph = model.graph
    kept = [i for i in graph.input if i.name not in (SEQLENS_K, TOTAL_SEQUENCE_LENGTH)]
    del graph.input[:]
    graph.input.extend(kept[:1] + [helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                                 ["batch", "max_sequence"])] + kept[1:])
    graph.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "legacy/axis1"),
                              numpy_helper.from_array(np.array(1, np.int64), "legacy/one")])
    lengths = [helper.make_node("ReduceSum", ["attention_mask", "legacy/axis1"], ["legacy/count"], keepdims=0),
               helper.make_node("Sub", ["legacy/count", "legacy/one"], ["legacy/last"]),
               helper.make_node("Cast", ["legacy/last"], [SEQLENS_K], to=TensorProto.INT32),
               helper.make_node("Shape", ["attention_mask"], ["legacy/width"], start=1, end=2),
               helper.make_node("Cast", ["legacy/width"], ["legacy/width32"], to=TensorProto.INT32),
               helper.make_node("Squeeze", ["legacy/width32"], [TOTAL_SEQUENCE_LENGTH])]
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(lengths + nodes)


def test_bundles_with_the_older_mask_contract_decode_the_same(trained, tmp_path):
    """The shared-buffer decoder takes seqlens_k / total_sequence_length; a bundle whose decoder
    still takes the attention mask (exported before 2026-12-05) runs and gives the same outputs,
    greedy with rows leaving the batch and beam n-best with scores."""
    from kerasllm.export.translate_predictor import BundleTranslator

    _, bundle, _ = trained
    new = BundleTranslator(bundle, device="cpu", threads=1)
    old = BundleTranslator(_mask_contract_bundle(bundle, tmp_path / "old"), device="cpu", threads=1)
    assert new.sessions.lengths_as_inputs and not old.sessions.lengths_as_inputs
    batch = [new.check(t) for t in ("seven", "forty-two", "nine hundred and ninety-nine thousand", "six hundred")]
    assert old.predict(batch, max_new_tokens=8) == new.predict(batch, max_new_tokens=8)
    assert old.predict(batch, max_new_tokens=8, num_beams=3, n_best=2) == \
        new.predict(batch, max_new_tokens=8, num_beams=3, n_best=2)


def test_rows_per_input():
    from kerasllm.export.seq2seq_runtime import rows_per_input

    assert rows_per_input(np.array([0, 0, 0, 1, 1, 1])) == 3  # beams, input by input
    assert rows_per_input(np.array([2, 2, 0, 0])) == 2  # any order of the inputs
    assert rows_per_input(np.array([0, 1, 2])) == 1
    for ragged in ([0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1, 0, 0]):
        assert rows_per_input(np.array(ragged)) == 1


def _drop_cross_rows_metadata(model):
    from kerasllm.export.runtime import CROSS_ROWS_METADATA

    kept = [p for p in model.metadata_props if p.key != CROSS_ROWS_METADATA]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)


def test_beams_share_their_inputs_cross_attention_rows(trained, tmp_path, monkeypatch):
    """The decoder groups its cross-attention queries per input (metadata
    `kerasllm.cross_attention_rows`): beam search binds one row of cross keys/values per input,
    not per beam, also after done inputs leave, and gives the n-best lists (tokens and scores) of
    the same bundle driven with the keys/values copied for every beam (the metadata removed)."""
    from kerasllm.export.seq2seq_runtime import Seq2SeqSessions
    from kerasllm.export.translate_predictor import BundleTranslator

    _, bundle, _ = trained
    grouped = BundleTranslator(bundle, device="cpu", threads=1)
    per_row = BundleTranslator(_with_edited_decoder(bundle, tmp_path / "per_row", _drop_cross_rows_metadata),
                               device="cpu", threads=1)
    assert grouped.sessions.cross_per_input and not per_row.sessions.cross_per_input
    shapes = []  # (decoder rows, cross rows, encoder mask rows) of every step
    real_step = Seq2SeqSessions.step

    def recording_step(self, input_ids, encoder_mask, cross, past, greedy=False):
        shapes.append((len(input_ids), cross[0].shape()[0], len(encoder_mask)))
        return real_step(self, input_ids, encoder_mask, cross, past, greedy=greedy)

    monkeypatch.setattr(Seq2SeqSessions, "step", recording_step)
    texts = ("seven", "forty-two", "six hundred and one", "thirteen", "nine", "three hundred")
    batch = [grouped.check(t) for t in texts]
    results = {}
    for name, translator in (("grouped", grouped), ("per row", per_row)):
        shapes.clear()
        results[name] = translator._generate(batch, translator.options(max_new_tokens=10, num_beams=3, n_best=3))
        results[name + " shapes"] = list(shapes)
    beam_steps = results["grouped shapes"][1:]  # after the first step, on one row per input
    assert all(rows == 3 * cross == 3 * mask for rows, cross, mask in beam_steps)
    assert len({rows for rows, _, _ in beam_steps}) > 1  # done inputs left the batch on the way
    assert all(rows == cross for rows, cross, _ in results["per row shapes"])
    for got, want in zip(results["grouped"], results["per row"]):
        assert [h.tokens for h in got] == [h.tokens for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)


def test_inputs_leaving_keep_their_beams_cross_attention_rows(trained, tmp_path):
    """Seq2SeqStep with beams grouped per input: as inputs leave (first a gather from the encoder's
    outputs, then twice the kept rows moved up in place) each row of the bound cross keys/values is
    the input of its group of beams, and the logits equal those of per-beam copies within 1e-5."""
    from kerasllm.export.generate import right_pad
    from kerasllm.export.seq2seq_runtime import Seq2SeqStep
    from kerasllm.export.translate_predictor import BundleTranslator

    _, bundle, _ = trained
    translator = BundleTranslator(bundle, device="cpu", threads=1)
    grouped = translator.sessions
    per_row = BundleTranslator(_with_edited_decoder(bundle, tmp_path / "per_row", _drop_cross_rows_metadata),
                               device="cpu", threads=1).sessions
    texts = ("seven", "forty-two", "six hundred and one", "thirteen")
    ids, mask = right_pad([translator.check(t) for t in texts], translator.pad_id)

    def drive(sessions, reorders):
        step = Seq2SeqStep(sessions, ids, mask)
        logits, cache = step(np.full((4, 1), 2, np.int64), None, None)
        cache = step.reorder(cache, np.repeat(np.arange(4), 2))  # two beams per input
        tokens = np.arange(8, dtype=np.int64)[:, None] % 5 + 6
        seen, cross_rows, memory = [], [], []
        for rows in (None, *reorders):
            if rows is not None:
                cache = step.reorder(cache, np.array(rows))
                tokens = tokens[rows] + 1
            logits, cache = step(tokens, None, cache)
            seen.append(logits)
            cross_rows.append(step.cross_rows.tolist())
            # Where the first cross tensor's rows live: None while they are the encoder's outputs.
            memory.append(None if step.cross_arrays is None else step.cross_arrays[0].__array_interface__["data"][0])
        return seen, cross_rows, memory

    # Inputs 0 1 2 3, then 0 2 3 (gathered), 0 3 and 3 (moved up in place), then a same-size reorder.
    reorders = ([0, 1, 4, 5, 6, 7], [1, 0, 4, 5], [3, 2], [1, 1])
    (got, got_rows, memory), (want, want_rows, _) = drive(grouped, reorders), drive(per_row, reorders)
    assert memory[0] is None and memory[1] == memory[2] == memory[3] == memory[4] is not None  # in place
    assert got_rows == [[0, 1, 2, 3], [0, 2, 3], [0, 3], [3], [3]]
    assert want_rows == [[0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 2, 2, 3, 3], [0, 0, 3, 3], [3, 3], [3, 3]]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Rows that stop coming in equal groups (inputs 0 2 3 with two beams each, then one row each, or
    # rows 0 0 2 3 3): one row of cross keys/values per row again, moved up in place while they are no
    # more than the rows bound, else gathered anew.
    for reorders, rows, in_place in ((([0, 1, 4, 5, 6, 7], [0, 2, 4]), [0, 2, 3], True),
                                     (([0, 1, 4, 5, 6, 7], [0, 1, 2, 4, 5]), [0, 0, 2, 3, 3], False)):
        (got, got_rows, memory), (want, _, _) = drive(grouped, reorders), drive(per_row, reorders)
        assert got_rows[-1] == rows and (memory[-1] == memory[-2]) == in_place
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_padding_does_not_change_results(trained):
    from kerasllm.export.seq2seq_export import KerasSeq2SeqSessions
    from kerasllm.export.seq2seq_runtime import Seq2SeqSessions
    from kerasllm.export.translate_predictor import BundleTranslator

    run, bundle, _ = trained
    # The encoder graph runs its token-wise layers on the real tokens only (token_packing.py).
    assert json.loads((bundle / "manifest.json").read_text())["optimization"]["encoder"]["padding_free"]
    translator = BundleTranslator(bundle, device="cpu")
    short = translator.check("forty-two")
    batch = [translator.check("nine hundred and ninety-nine thousand"), short, translator.check("seven")]
    alone = translator.predict([short], max_new_tokens=8)[0]
    assert translator.predict(batch, max_new_tokens=8)[1] == alone == {"output": "42", GENERATED_TOKENS: 2}
    # Logits of the padded row equal the unpadded ones, on ONNX Runtime and in Keras.
    from kerasllm.modeldir import load_model_dir

    model = load_model_dir(run)[0]
    width = max(len(s) for s in batch)
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    for row, source in enumerate(batch):
        ids[row, :len(source)], mask[row, :len(source)] = source, 1
    bos = np.full((1, 1), model.config.bos_id, np.int64)
    for sessions in (translator.sessions, KerasSeq2SeqSessions(model)):
        padded, _ = sessions.step(np.repeat(bos, 3, 0), mask, sessions.encode(ids, mask), None)
        single, _ = sessions.step(bos, mask[1:2, :len(short)], sessions.encode(ids[1:2, :len(short)],
                                                                               mask[1:2, :len(short)]), None)
        assert np.abs(padded[1] - single[0]).max() < 1e-5, type(sessions)
    assert isinstance(translator.sessions, Seq2SeqSessions)


def test_cached_decoding_matches_teacher_forcing_and_keras_file_round_trip(tmp_path):
    from kerasllm.models import Seq2SeqLM

    keras.utils.set_random_seed(1)
    config = Seq2SeqConfig.preset("tiny", vocab_size=40, target_vocab_size=24, max_length=16, num_decoder_layers=3,
                                  tie_embeddings=False)
    model = Seq2SeqLM(config)
    rng = np.random.default_rng(0)
    source = rng.integers(6, 40, (2, 7))
    mask = np.ones_like(source)
    mask[1, 4:] = 0
    target = np.concatenate([np.full((2, 1), config.bos_id), rng.integers(6, 24, (2, 5))], axis=1)
    full = np.asarray(model({"encoder_token_ids": source, "encoder_padding_mask": mask, "decoder_token_ids": target}))
    assert full.shape == (2, 6, 24)
    _, keys, values = model.encode(source, mask)
    assert len(keys) == 3 and tuple(keys[0].shape) == (2, 2, 7, 16)
    empty = [np.zeros((2, 2, 0, 16), np.float32)] * 3
    past_keys, past_values, steps = empty, empty, []
    for t in range(6):
        logits, past_keys, past_values = model.decode_with_cache(target[:, t:t + 1], mask, keys, values, past_keys,
                                                                 past_values)
        steps.append(np.asarray(logits)[:, 0])
    assert np.abs(np.stack(steps, 1) - full).max() < 1e-5
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    again = np.asarray(loaded({"encoder_token_ids": source, "encoder_padding_mask": mask, "decoder_token_ids": target}))
    np.testing.assert_array_equal(again, full)


def test_sources_and_targets_longer_than_the_learned_positions_or_without_a_batch_axis_are_refused():
    """A compiled step clamps positions past max_length (XLA's gather): predict had run on a
    200-token source with max_length 128."""
    import tensorflow as tf

    from kerasllm.models import Seq2SeqLM

    model = Seq2SeqLM(Seq2SeqConfig.preset("tiny", vocab_size=30, max_length=16))
    rng = np.random.default_rng(0)
    short, long = rng.integers(6, 30, (2, 5)), rng.integers(6, 30, (2, 17))
    for name, x in [("encoder_token_ids", {"encoder_token_ids": long, "decoder_token_ids": short}),
                    ("decoder_token_ids", {"encoder_token_ids": short, "decoder_token_ids": long})]:
        message = f"{name}: a sequence of 17 tokens is longer than max_length 16, the number of learned positions"
        y = x["decoder_token_ids"]
        for run in (lambda: model.predict(x, verbose=0), lambda: model.fit(x, y, verbose=0),
                    lambda: model.evaluate(x, y, verbose=0),
                    lambda: model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(2), verbose=0)):
            with pytest.raises(ValueError, match=message):
                run()
    with pytest.raises(ValueError, match=r"Seq2SeqLM expects encoder_token_ids of shape \[batch, length\]"):
        model({"encoder_token_ids": short[0], "decoder_token_ids": short})


def test_loss_ignores_target_padding():
    from kerasllm.models import Seq2SeqLM

    keras.utils.set_random_seed(2)
    model = Seq2SeqLM(Seq2SeqConfig.preset("tiny", vocab_size=30, max_length=16))
    model.compile(label_smoothing=0.1, jit_compile=False)
    source = np.array([[7, 8, 9]])
    decoder = np.array([[2, 10, 11]])
    labels = np.array([[10, 11, 3]])
    pad = model.config.pad_id
    padded = model.evaluate({"encoder_token_ids": source, "decoder_token_ids": np.pad(decoder, ((0, 0), (0, 4)),
                                                                                      constant_values=pad)},
                            np.pad(labels, ((0, 0), (0, 4)), constant_values=pad), verbose=0, return_dict=True)
    plain = model.evaluate({"encoder_token_ids": source, "decoder_token_ids": decoder}, labels, verbose=0,
                           return_dict=True)
    assert abs(padded["loss"] - plain["loss"]) < 1e-5


@pytest.mark.parametrize("name, content, message", [
    ("ragged.tsv", "source\ttarget\none\t1\ntwo\t2\textra\n", "ragged.tsv: line 3: expected 2 columns"),
    ("missing.jsonl", '{"source": "one", "target": "1"}\n{"source": "two"}\n', "missing.jsonl: line 2: missing field 'target'"),
    ("empty.tsv", "source\ttarget\none\t1\n \t2\n", "empty.tsv: line 3: empty source"),
    ("long.tsv", "source\ttarget\none\t1\ntwo\t" + "2" * 40 + "\n", "long.tsv: line 3: target is 40 tokens, longer than"),
])
def test_bad_pairs_name_the_line(run_cli, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    result = run_cli("train", "seq2seq", "--data", path, "--out", tmp_path / "run", "--steps", "2",
                     "--max-length", "16", "--quiet")
    assert result.code == 1, result
    assert message in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
    assert not (tmp_path / "run").exists()


def test_parallel_files_empty_line_and_length_mismatch(tmp_path):
    from kerasllm.pairs import read_pairs

    (tmp_path / "src.txt").write_text("one\n\nthree\n", encoding="utf-8")
    (tmp_path / "tgt.txt").write_text("1\n2\n3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"src.txt: line 2: empty source"):
        read_pairs(source_file=tmp_path / "src.txt", target_file=tmp_path / "tgt.txt")
    (tmp_path / "src.txt").write_bytes(b"one\n\xff\nthree\n")
    with pytest.raises(DataError, match=r"src.txt: line 2: not valid UTF-8 \(byte 0xff at column 1\)$"):
        read_pairs(source_file=tmp_path / "src.txt", target_file=tmp_path / "tgt.txt")
    (tmp_path / "src.txt").write_text("one\ntwo\nthree\nfour\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"different numbers of lines: .*src.txt has 4, the other 3$"):
        read_pairs(source_file=tmp_path / "src.txt", target_file=tmp_path / "tgt.txt")


def test_train_from_parallel_files_and_resume(run_cli, tmp_path, monkeypatch):
    from kerasllm import training

    rows = datasets.number_words_pairs(64, max_value=99, seed=4)
    (tmp_path / "src.txt").write_text("".join(s + "\n" for s, _ in rows), encoding="utf-8")
    (tmp_path / "tgt.txt").write_text("".join(t + "\n" for _, t in rows), encoding="utf-8")
    out = tmp_path / "run"
    original = training.ProgressLogger.on_train_batch_end

    def crash_at_step_6(self, batch, logs=None):
        # 2 steps per call here (training.execution_steps: no validation, interval 4), so the
        # callback sees steps 2, 4, 6 and 8.
        original(self, batch, logs)
        if self.step == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.ProgressLogger, "on_train_batch_end", crash_at_step_6)
    interrupted = run_cli("train", "seq2seq", "--source-file", tmp_path / "src.txt", "--target-file",
                          tmp_path / "tgt.txt", "--out", out, "--steps", "8", "--batch-size", "8", "--max-length", "32",
                          "--eval-interval", "4", "--validation-fraction", "0", "--no-jit-compile", "--quiet")
    assert interrupted.code == 130
    assert not (out / "model.keras").exists() and (out / "checkpoints").is_dir()
    monkeypatch.setattr(training.ProgressLogger, "on_train_batch_end", original)
    resumed = run_cli("train", "seq2seq", "--out", out, "--resume", "--quiet")
    assert resumed.code == 0, resumed
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in history]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # steps 5..8 ran again after the step-4 checkpoint
    run = json.loads((out / "config.json").read_text())
    assert run["task"] == "seq2seq" and run["model"]["target_vocab_size"] == 0
    assert (out / "model.keras").is_file() and not (out / "target_tokenizer.json").exists()


def test_evaluate_takes_line_aligned_files_as_training_does(trained, run_cli, tmp_path):
    """`kerasllm train seq2seq` read --source-file/--target-file, `kerasllm evaluate` only a table: the same
    pairs as two files score as the table does; one option alone, or both ways at once, is refused."""
    import csv

    _, bundle, held_out = trained
    with open(held_out, encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file, dialect="excel-tab"))
    (tmp_path / "test.src").write_text("".join(row["source"] + "\n" for row in rows), encoding="utf-8")
    (tmp_path / "test.tgt").write_text("".join(row["target"] + "\n" for row in rows), encoding="utf-8")
    table = run_cli("evaluate", bundle, "--data", held_out, "-q")
    files = run_cli("evaluate", bundle, "--source-file", tmp_path / "test.src", "--target-file", tmp_path / "test.tgt",
                    "-q")
    assert table.code == files.code == 0, (table, files)
    assert json.loads(files.out) == json.loads(table.out) and json.loads(files.out)["count"] == len(rows)
    alone = run_cli("evaluate", bundle, "--source-file", tmp_path / "test.src")
    assert alone.code == 2 and "--target-file is missing" in alone.err, alone
    both = run_cli("evaluate", bundle, "--data", held_out, "--source-file", tmp_path / "test.src", "--target-file",
                   tmp_path / "test.tgt")
    assert both.code == 2 and "give --data, or --source-file and --target-file" in both.err, both
    fields = run_cli("evaluate", bundle, "--source-file", tmp_path / "test.src", "--target-file", tmp_path / "test.tgt",
                     "--source-field", "en")  # options of --data's had been ignored
    assert fields.code == 2 and "--source-file and --target-file are plain text" in fields.err, fields


def test_bundle_translation_and_evaluation_import_no_tensorflow(trained):
    import subprocess
    import sys

    _, bundle, held_out = trained
    code = (
        "import sys, json\n"
        "from kerasllm.export.predict import load_predictor\n"
        "from kerasllm.evaluation import evaluate\n"
        f"p = load_predictor('translate', {str(bundle)!r}, device='cpu')\n"
        "out = p.predict([p.check('forty-two')], num_beams=2, n_best=2, max_new_tokens=6)\n"
        f"scores = evaluate({str(bundle)!r}, {str(held_out)!r}, device='cpu')\n"
        "print(json.dumps([out[0]['output'][0], scores['task'], 'tensorflow' in sys.modules, 'keras' in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["42", "seq2seq", False, False]


def test_pair_batches_hold_every_pair_once_with_teacher_forcing():
    """One epoch of `pair_batches` (built from one flat array, `kerasllm.data.ragged_slices`) holds
    every pair exactly once: BOS + target in, target + EOS out, padding only after each row."""
    from kerasllm.pairs import pair_batches

    rng = np.random.default_rng(3)
    sources = [rng.integers(5, 50, n).astype(np.int32) for n in rng.integers(1, 30, 57)]
    targets = [rng.integers(5, 50, n).astype(np.int32) for n in rng.integers(1, 30, 57)]
    seen = []
    for inputs, labels in pair_batches(sources, targets, 8, pad_id=0, bos_id=2, eos_id=3, seed=1, repeat=False):
        for src, mask, dec, lab in zip(inputs["encoder_token_ids"].numpy(), inputs["encoder_padding_mask"].numpy(),
                                       inputs["decoder_token_ids"].numpy(), labels.numpy()):
            real = int(mask.sum())
            assert (src[real:] == 0).all() and (src[:real] != 0).all()
            length = int((lab != 0).sum())
            assert dec[0] == 2 and lab[length - 1] == 3 and (dec[1:length] == lab[:length - 1]).all()
            seen.append((tuple(src[:real]), tuple(lab[:length - 1])))
    assert sorted(seen) == sorted((tuple(s), tuple(t)) for s, t in zip(sources, targets))


def test_a_huge_source_is_refused_without_tokenizing_it_whole(trained):
    from kerasllm.export.predict import RecordError, load_predictor

    _, bundle, _ = trained
    predictor = load_predictor("translate", bundle)
    with pytest.raises(RecordError, match="source of more than 32 tokens is longer than the model's max_length 32"):
        predictor.check("one hundred " * 1_000_000)


def test_parallel_files_name_the_target_file_for_a_long_target(tmp_path):
    """Every parallel pair carried the source file's path, so a target's error named the wrong file."""
    from kerasllm.pairs import encode_pairs, read_pairs
    from kerasllm.tokenizers import TextTokenizer

    (tmp_path / "src.txt").write_text("one\ntwo\n")
    (tmp_path / "tgt.txt").write_text("1\n" + "2" * 40 + "\n")
    pairs = read_pairs(source_file=tmp_path / "src.txt", target_file=tmp_path / "tgt.txt")
    tok = TextTokenizer.train(["one two 1 2"], kind="char")
    with pytest.raises(DataError, match=r"tgt\.txt: line 2: target is 40 tokens, longer than the model allows \(15"):
        encode_pairs(pairs, tok, tok, max_length=16)
    (tmp_path / "tgt.txt").write_text("1\n" + "2" * 10_000_000 + "\n")  # refused from its start alone
    pairs = read_pairs(source_file=tmp_path / "src.txt", target_file=tmp_path / "tgt.txt")
    with pytest.raises(DataError, match=r"tgt\.txt: line 2: target is more than 15 tokens"):
        encode_pairs(pairs, tok, tok, max_length=16)


def test_a_missing_or_foreign_target_tokenizer_is_refused(trained, tmp_path):
    """A model dir with its own target vocabulary but no target_tokenizer.json had translated with the
    source tokenizer (garbage, exit 0), and exported to a bundle that did the same for good."""
    import shutil

    from kerasllm.errors import KerasLLMError
    from kerasllm.export.exporter import export_model_dir
    from kerasllm.export.predict import load_predictor
    from kerasllm.tokenizers import TextTokenizer

    run, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "target_tokenizer.json").unlink()
    with pytest.raises(KerasLLMError, match=r"target_tokenizer\.json: missing \(the model has a target vocabulary"):
        load_predictor("translate", copy)
    with pytest.raises(KerasLLMError, match=r"target_tokenizer\.json: missing"):
        export_model_dir(copy, tmp_path / "bundle", log=lambda message: None)
    assert not (tmp_path / "bundle").exists()
    foreign = TextTokenizer.train([" ".join(f"word{i * 7919}" for i in range(5000))], kind="bpe", vocab_size=600)
    assert foreign.vocab_size > 300
    foreign.save(copy)
    shutil.copyfile(run / "target_tokenizer.json", copy / "target_tokenizer.json")
    with pytest.raises(KerasLLMError, match=r"tokenizer\.json: \d+ token ids, more than the model's vocabulary of"):
        load_predictor("translate", copy)


def test_keras_seq2seq_generation_takes_numpy_numbers(trained):
    """The options were checked on a copy and the originals passed on: np.int64 beams failed in TensorFlow."""
    from kerasllm.modeldir import load_model_dir

    model, _, _ = load_model_dir(trained[0])
    sources = [[5, 6, 7], [8, 9]]
    assert model.generate(sources, max_new_tokens=np.int64(4), num_beams=np.int64(2)) == \
        model.generate(sources, max_new_tokens=4, num_beams=2)
    assert model.generate_n_best(sources, max_new_tokens=np.int64(4), num_beams=np.int64(2), n_best=np.int64(2)) == \
        model.generate_n_best(sources, max_new_tokens=4, num_beams=2, n_best=2)
