"""Decoder export end to end at tiny size: parity, bundles, tampering, KV cache, predictors, no TF at serving.

One tiny causal LM is trained briefly (so its next-token distributions are peaked and
greedy decoding has no near-ties), exported once to fp32 through the CLI and once to
fp16 through the API; the tests share those bundles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kerasllm.errors import BundleError

PROMPTS = ["Anna had a", "The fox", "In the garden there was a"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus_file) -> Path:
    """A tiny causal LM trained for 60 steps, saved as a model directory."""
    import keras

    from kerasllm import CausalLM, DecoderConfig
    from kerasllm.data import read_corpus, tokenize_corpus
    from kerasllm.tokenizers import TextTokenizer
    from kerasllm.training import write_json_atomic

    keras.utils.set_random_seed(0)
    texts = read_corpus(corpus_file)
    tokenizer = TextTokenizer.train(texts, kind="char")
    ids = tokenize_corpus(texts, tokenizer)
    config = DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_length=96)
    model = CausalLM(config)
    model.compile(learning_rate=3e-3, jit_compile=False)
    starts = np.random.default_rng(0).integers(0, len(ids) - 33, size=60 * 16)
    windows = np.stack([ids[s:s + 33] for s in starts])
    model.fit(windows[:, :-1], windows[:, 1:], batch_size=16, epochs=1, verbose=0)
    out = tmp_path_factory.mktemp("lm")
    model.save(out / "model.keras")
    tokenizer.save(out)
    # Trained on windows of 32 tokens, recorded as `kerasllm train causal-lm --seq-len 32` would.
    write_json_atomic(out / "config.json", {"task": "causal-lm", "model": config.to_dict(),
                                            "train": {"seq_len": 32}})
    return out


@pytest.fixture(scope="module")
def bundle_dir(model_dir, tmp_path_factory) -> Path:
    """The fp32 bundle, written by `kerasllm export` in-process."""
    from kerasllm.cli import main

    out = tmp_path_factory.mktemp("bundles") / "fp32"
    try:
        main(["export", str(model_dir), "--out", str(out)])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return out


@pytest.fixture(scope="module")
def fp16_bundle(model_dir, tmp_path_factory) -> Path:
    from kerasllm.export.exporter import ExportOptions, export_model_dir

    out = tmp_path_factory.mktemp("bundles") / "fp16"
    export_model_dir(model_dir, out, ExportOptions(dtype="fp16"), log=lambda message: None)
    return out


def test_export_writes_a_validated_bundle_in_ort_genai_layout(bundle_dir, model_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["genai_config.json", "manifest.json", "model.onnx",
                                                           "tokenizer.json"]
    assert manifest["family"] == "decoder" and manifest["task"] == "causal-lm" and manifest["opset"] == 17
    graph = manifest["graphs"]["model"]
    assert list(graph["inputs"]) == ["input_ids", "attention_mask", "past_key_values.0.key",
                                     "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert list(graph["outputs"]) == ["logits", "present.0.key", "present.0.value", "present.1.key",
                                      "present.1.value"]
    # fp32 with fused attention: one KV buffer per tensor, bound as past and present, updated in place.
    assert graph["dynamic_axes"]["past_key_values.0.key"] == {"0": "batch", "2": "max_sequence"}
    assert manifest["optimization"]["kv_cache"] == "shared_buffer"
    assert manifest["optimization"]["logits_to_keep"] is True  # an optional input, not in `inputs`
    # Validation figures: fp32 parity within 1e-4 on every case and output, 32 greedy tokens identical.
    diffs = manifest["validation"]["max_abs_diff"]
    assert len(diffs) >= 10 and max(diffs.values()) <= 1e-4
    assert manifest["validation"]["greedy"] == {"prompts": 3, "new_tokens": 32, "identical": True}
    # LayerNorm (SkipLayerNormalization left out: slower on ORT's CPU provider), 2 blocks x 2 + final.
    assert manifest["optimization"]["fusions"]["LayerNormalization"] == 5
    assert manifest["optimization"]["disabled_fusions"] == ["skip_layer_norm"]
    assert manifest["optimization"]["fusions"]["BiasGelu"] == 2
    assert manifest["optimization"]["fusions"]["GroupQueryAttention"] == 2  # one per layer
    assert "attention_fusion_reverted" not in manifest["optimization"]
    assert set(manifest["files"]) == {"model.onnx", "tokenizer.json", "genai_config.json"}
    assert manifest["tools"]["tf2onnx"] and manifest["tools"]["onnx"]
    # The graph: IR version ORT 1.31 loads, one tied embedding (not a transposed copy), size ~ weights.
    proto = onnx.load(str(bundle_dir / "model.onnx"))
    assert proto.ir_version == 8
    shapes = [tuple(i.dims) for i in proto.graph.initializer]
    config = manifest["config"]
    assert shapes.count((config["vocab_size"], config["hidden_dim"])) == 1
    assert (config["hidden_dim"], config["vocab_size"]) not in shapes
    params = 2 * (4 * 32 * 32 + 2 * 32 * 128 + 32 * 4 + 128 + 4 * 32 + 32) + 2 * 32 + 96 * 32 \
        + config["vocab_size"] * 32
    assert (bundle_dir / "model.onnx").stat().st_size <= 1.05 * 4 * params + 64_000  # graph text at tiny size
    genai = json.loads((bundle_dir / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert genai["search"]["past_present_share_buffer"] is True


def test_bundle_logits_match_keras_on_new_shapes_through_the_cache(bundle_dir, model_dir):
    """Independent of the export's own validation: batch 2, prompts 9 and 4, then 5 decode steps."""
    from kerasllm.export.generate import left_pad
    from kerasllm.export.runtime import DecoderSession, create_session
    from kerasllm.export.validate import KerasDecoderStep
    from kerasllm.modeldir import load_model_dir

    model, tokenizer, _ = load_model_dir(model_dir)
    ours = DecoderSession(create_session(bundle_dir / "model.onnx", "cpu"))
    keras_step = KerasDecoderStep(model)
    ids, mask = left_pad([tokenizer.encode("Once upon"), tokenizer.encode("Milo")], tokenizer.pad_id)
    ref, ref_cache = keras_step(ids, mask, None)
    got, cache = ours(ids, mask, None)
    assert np.abs(got - ref)[mask == 1].max() <= 1e-4
    # The prompt step decoding uses: only the last positions' logits (graph input logits_to_keep).
    last, _ = ours.last_logits(ids, mask)
    assert last.shape == (2, ref.shape[-1]) and np.abs(last - ref[:, -1]).max() <= 1e-4
    for token in (5, 9, 12, 7, 20):
        step_ids = np.full((2, 1), token, np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        ref, ref_cache = keras_step(step_ids, mask, ref_cache)
        got, cache = ours(step_ids, mask, cache)
        assert np.abs(got - ref).max() <= 1e-4
    presents = ours.presents(cache)  # the shared buffer, in the loop's left-padded layout
    assert presents[0].shape == (2, 2, ids.shape[1] + 5, 16)
    real = np.concatenate([mask[:, :ids.shape[1]], np.ones((2, 5), np.int64)], axis=1) == 1
    ref_key = np.transpose(ref_cache[0][0], (0, 2, 1, 3))[real]
    assert np.abs(np.transpose(presents[0], (0, 2, 1, 3))[real] - ref_key).max() <= 1e-4


def test_fp16_bundle_is_the_gpu_fast_path_and_decodes_as_the_fp32_bundle(fp16_bundle, bundle_dir):
    """fp16 is what GPU serving exports: attention fused into GroupQueryAttention over one fp16 KV
    buffer bound as past and present (ORT's CUDA kernel of that op is fp16/bf16 only), layer norms
    fused. Checked here on the CPU: top-1 agreement with Keras at export, and the same greedy
    tokens as the fp32 bundle."""
    manifest = json.loads((fp16_bundle / "manifest.json").read_text())
    agreement = manifest["validation"]["top1_agreement"]
    assert agreement and min(agreement.values()) >= 0.99
    assert manifest["dtype"] == "fp16"
    assert manifest["optimization"]["kv_cache"] == "shared_buffer"
    assert manifest["optimization"]["fusions"]["GroupQueryAttention"] == 2
    fusions = manifest["optimization"]["fusions"]
    assert fusions.get("LayerNormalization", 0) + fusions.get("SkipLayerNormalization", 0) >= 5, fusions
    assert manifest["graphs"]["model"]["inputs"]["past_key_values.0.key"]["dtype"] == "float16"
    assert manifest["graphs"]["model"]["outputs"]["logits"]["dtype"] == "float32"
    assert json.loads((fp16_bundle / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    from kerasllm.export.decoding_predictor import BundleGenerator
    from kerasllm.export.generate import DecodingOptions, generate

    fp16, fp32 = BundleGenerator(fp16_bundle, device="cpu"), BundleGenerator(bundle_dir, device="cpu")
    assert fp16.step.cache_dtype == np.float16
    ids = [fp16.check(p) for p in PROMPTS]
    logits, cache = fp16.step(np.array([ids[0]]), np.ones((1, len(ids[0])), np.int64), None)
    assert np.isfinite(logits).all() and fp16.step.presents(cache)[0].dtype == np.float16
    options = DecodingOptions(max_new_tokens=40)
    tokens = [[h[0].tokens for h in generate(p.step, ids, options, pad_id=p.pad_id)] for p in (fp16, fp32)]
    assert tokens[0] == tokens[1]


class CountingGreedySteps:
    """A step function that counts the steps whose choice its graph made (`greedy_step`)."""

    def __init__(self, step):
        self.inner, self.calls = step, 0

    def __call__(self, *args):
        return self.inner(*args)

    def greedy_step(self, *args):
        self.calls += 1
        return self.inner.greedy_step(*args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_fp16_bundle_outputs_greedy_tokens_and_checks_them_at_export(fp16_bundle, bundle_dir):
    """fp16 graphs (the GPU fast path) output `next_token`, the argmax of the last logits, so on a
    GPU only token ids leave the device; export checks its choice against the logits'. fp32 (CPU)
    graphs have no such output (ORT's CPU ArgMax is slower than NumPy's)."""
    from kerasllm.export.decoding_predictor import BundleGenerator

    manifest = json.loads((fp16_bundle / "manifest.json").read_text())
    assert manifest["graphs"]["model"]["outputs"]["next_token"] == {"dtype": "int64", "shape": ["batch", 1]}
    assert manifest["validation"]["greedy_on_device"]["identical"] is True
    assert "next_token" not in json.loads((bundle_dir / "manifest.json").read_text())["graphs"]["model"]["outputs"]
    assert BundleGenerator(fp16_bundle, device="cpu").step.greedy_on_device
    assert not BundleGenerator(bundle_dir, device="cpu").step.greedy_on_device


@pytest.mark.parametrize("shared_kv_buffer, static_steps", [(True, False), (False, False), (True, True)])
def test_greedy_decoding_takes_the_graphs_choice_and_matches_the_hosts(shared_kv_buffer, static_steps, tmp_path):
    """With `next_token` in the graph, greedy decoding reads only it for every step after the
    prompt's, over the shared buffer and over a growing cache, and gives the tokens the host picks
    from the same logits, also when a stop id ends rows at different steps and they leave the
    batch. Sampling still reads the logits. Random weights (fp16): varied tokens. With static
    steps (what CUDA graphs replay: fixed tensors per shape, inputs uploaded before each run) the
    same, here on the CPU."""
    import keras

    from kerasllm import CausalLM, DecoderConfig
    from kerasllm.export.convert import causal_lm_graph, trace_to_onnx
    from kerasllm.export.generate import ChoiceOnHost, DecodingOptions, generate
    from kerasllm.export.optimize import optimize_graph
    from kerasllm.export.runtime import DecoderSession, create_session

    keras.utils.set_random_seed(0)
    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=50, max_length=64))
    report = optimize_graph(trace_to_onnx(causal_lm_graph(model), model), tmp_path / "m.onnx", model_type="gpt2",
                            num_heads=2, hidden_size=32, dtype="fp16", shape_inference=False, cached_attention=True,
                            shared_kv_buffer=shared_kv_buffer, next_token=True)
    step = DecoderSession(create_session(tmp_path / "m.onnx", "cpu"), static_steps=static_steps)
    assert report["next_token"] and step.greedy_on_device and step.shared_buffer == shared_kv_buffer
    assert step.static_steps == static_steps
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50, n).tolist() for n in (3, 8, 5, 6)]
    plain = DecodingOptions(max_new_tokens=30)
    on_host = [h[0].tokens for h in generate(ChoiceOnHost(step), prompts, plain, pad_id=0)]

    def first(row, token):
        return row.index(token) if token in row else len(row)

    # A stop id that ends the rows at the most different steps, as late as can be.
    stop = max({t for row in on_host for t in row},
               key=lambda t: (len({first(row, t) for row in on_host}), min(first(row, t) for row in on_host)))
    assert len({first(row, stop) for row in on_host}) > 2
    for options in (plain, DecodingOptions(max_new_tokens=30, stop_ids=(stop,))):
        counting = CountingGreedySteps(step)
        got = [h[0].tokens for h in generate(counting, prompts, options, pad_id=0)]
        want = [h[0].tokens for h in generate(ChoiceOnHost(step), prompts, options, pad_id=0)]
        assert got == want
        assert counting.calls == min(max(first(row, stop) + 1 for row in on_host), 30) - 1 if options.stop_ids else 29
    assert [row[:first(row, stop)] for row in on_host] == got
    sampled = CountingGreedySteps(step)
    generate(sampled, prompts, DecodingOptions(max_new_tokens=5, temperature=0.8, seed=1), pad_id=0)
    assert sampled.calls == 0


def test_static_steps_keep_one_set_of_tensors_per_shape_and_decode_as_plain_steps(tmp_path):
    """Static steps (what a CUDA-graph session replays, runtime._StepSlot) bind the same tensors at
    every single-token step of a (batch, capacity) shape, across calls: a second call of that shape
    takes the first one's slot back; other shapes get theirs, at most MAX_STEP_SLOTS of them, the
    oldest dropped; a buffer that outgrows its capacity moves to fresh tensors and gives its slot
    back. Tokens equal the plain steps' throughout (greedy and sampled)."""
    import keras

    from kerasllm import CausalLM, DecoderConfig
    from kerasllm.export.convert import causal_lm_graph, trace_to_onnx
    from kerasllm.export.generate import DecodingOptions, generate
    from kerasllm.export.optimize import optimize_graph
    from kerasllm.export.runtime import MAX_STEP_SLOTS, DecoderSession, create_session

    keras.utils.set_random_seed(0)
    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=50, max_length=400))
    optimize_graph(trace_to_onnx(causal_lm_graph(model), model), tmp_path / "m.onnx", model_type="gpt2", num_heads=2,
                   hidden_size=32, dtype="fp16", shape_inference=False, cached_attention=True, shared_kv_buffer=True,
                   next_token=True)
    plain = DecoderSession(create_session(tmp_path / "m.onnx", "cpu"))
    static = DecoderSession(create_session(tmp_path / "m.onnx", "cpu"), static_steps=True)
    rng = np.random.default_rng(1)

    def both(prompts, options):
        want = [h[0].tokens for h in generate(plain, prompts, options, pad_id=0)]
        got = [h[0].tokens for h in generate(static, prompts, options, pad_id=0)]
        assert got == want
        assert not any(slot.in_use for slot in static._slots.values())

    prompts = [rng.integers(0, 50, n).tolist() for n in (3, 7)]
    both(prompts, DecodingOptions(max_new_tokens=12))
    (first,) = static._slots.values()
    both(prompts, DecodingOptions(max_new_tokens=12))
    both(prompts, DecodingOptions(max_new_tokens=12, temperature=0.9, seed=3))
    assert list(static._slots.values()) == [first]
    # More shapes than are kept: 1, 3, 4 and 5 rows. The oldest (the first) is dropped.
    for rows in (1, 3, 4, 5):
        both([rng.integers(0, 50, 4).tolist() for _ in range(rows)], DecodingOptions(max_new_tokens=5))
    assert len(static._slots) == MAX_STEP_SLOTS and first not in static._slots.values()
    # 3-token prompts get 192 slots: 250 new tokens outgrow them.
    both([rng.integers(0, 50, 3).tolist()], DecodingOptions(max_new_tokens=250))


def test_a_cuda_graph_session_names_a_graph_on_every_run(fp16_bundle, monkeypatch):
    """On a session opened with ORT's `enable_cuda_graph` every run must name its graph, or ORT
    replays graph 0 on it: the prompt step and steps outside a slot say -1, the static steps of each
    (batch, capacity) slot their own id, the same at every step and again when a later call takes
    the slot back. Checked on the CPU by marking a CPU session as a CUDA-graph one (ORT's CPU
    provider ignores the run option); only CUDA sessions are opened that way
    (`create_session(..., cuda_graph=True)` on the CPU: a plain session)."""
    import onnxruntime as ort

    from kerasllm.export.decoding_predictor import BundleGenerator
    from kerasllm.export.generate import DecodingOptions, generate
    from kerasllm.export.runtime import DecoderSession, Session, create_session

    assert create_session(fp16_bundle / "model.onnx", "cpu", cuda_graph=True).cuda_graph is False
    plain = BundleGenerator(fp16_bundle, device="cpu").step
    session = plain.session
    step = DecoderSession(Session(session.session, "cpu", 0, "marked", cuda_graph=True))
    assert step.static_steps
    graph_ids, run = [], ort.InferenceSession.run_with_iobinding

    def spy(self, binding, options=None):
        graph_ids.append(None if options is None else options.get_run_config_entry("gpu_graph_id"))
        return run(self, binding, options)

    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", spy)
    ids = [[5, 6, 7], [8, 9]]
    options = DecodingOptions(max_new_tokens=6)
    for _ in range(2):
        graph_ids.clear()
        assert generate(step, ids, options, pad_id=0) == generate(plain, ids, options, pad_id=0)
        assert graph_ids[:7] == ["-1"] + ["1"] * 5 + [None]  # prompt, 5 static steps, then the plain session
    graph_ids.clear()
    generate(step, [[5, 6, 7]], options, pad_id=0)  # another batch size: another slot, another graph
    assert graph_ids[:6] == ["-1"] + ["2"] * 5


@pytest.mark.parametrize("shared_kv_buffer", [True, False])
def test_decoding_with_device_buffers_equals_decoding_with_host_arrays(shared_kv_buffer, tmp_path):
    """The CUDA path of DecoderSession, run on the CPU (`host_buffers=False`): the KV cache as
    tensors only ORT touches, beam search's reorders and the rows that leave the batch gathered by
    row_gather.py instead of NumPy (on a GPU: on the device, not through the host). Beam search
    (n-best with scores) and greedy decoding with a stop id give exactly the host path's results,
    over the shared buffer and over a growing cache."""
    import keras

    from kerasllm import CausalLM, DecoderConfig
    from kerasllm.export.convert import causal_lm_graph, trace_to_onnx
    from kerasllm.export.generate import DecodingOptions, generate
    from kerasllm.export.optimize import optimize_graph
    from kerasllm.export.runtime import DecoderSession, create_session

    keras.utils.set_random_seed(0)
    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=50, max_length=64))
    optimize_graph(trace_to_onnx(causal_lm_graph(model), model), tmp_path / "m.onnx", model_type="gpt2", num_heads=2,
                   hidden_size=32, shape_inference=False, cached_attention=True, shared_kv_buffer=shared_kv_buffer)
    host, device = (DecoderSession(create_session(tmp_path / "m.onnx", "cpu"), host_buffers=flag)
                    for flag in (True, False))
    assert device.shared_buffer == shared_kv_buffer and not device.host_buffers
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 50, n).tolist() for n in (3, 8, 5)]
    on_host = [h[0].tokens for h in generate(host, prompts, DecodingOptions(max_new_tokens=12), pad_id=0)]
    stop = on_host[1][4]  # ends the second row early: its row leaves the batch
    for options in (DecodingOptions(max_new_tokens=12, num_beams=3, n_best=2),
                    DecodingOptions(max_new_tokens=12, stop_ids=(stop,))):
        results = [generate(s, prompts, options, pad_id=0) for s in (host, device)]
        assert [[(h.tokens, h.score) for h in r] for r in results[0]] == \
            [[(h.tokens, h.score) for h in r] for r in results[1]]


@pytest.mark.parametrize("opset", [13, 14, 19, 21])
def test_export_refuses_opsets_it_cannot_write_in_one_line(model_dir, tmp_path, run_cli, opset):
    """tf2onnx 1.17 stops at 18 (19-21 had ended in its traceback); the decoder's rewrites slice
    shapes with Shape start/end (13-14: ONNX Runtime refused the graph after conversion)."""
    result = run_cli("export", model_dir, "--out", tmp_path / "bundle", "--opset", opset)
    assert result.code == 2 and result.err.strip().splitlines() == [
        f"kerasllm: error: --opset must be between 15 and 18, got {opset} (tf2onnx converts up to 18; "
        "the bundle's graph rewrites need 15)"], result.err
    assert not (tmp_path / "bundle").exists()


def test_export_refuses_a_kv_cache_choice_for_an_encoder(tmp_path, run_cli):
    """An encoder's graph has no KV cache: the option had been accepted and ignored. Refused before
    TensorFlow loads (the model file is never read here)."""
    encoder = tmp_path / "encoder-run"
    encoder.mkdir()
    (encoder / "model.keras").write_bytes(b"")
    (encoder / "config.json").write_text(json.dumps({"task": "classifier", "model": {"family": "encoder"}}))
    result = run_cli("export", encoder, "--out", tmp_path / "bundle", "--kv-cache", "growing")
    assert result.code == 2 and result.err.strip().splitlines() == [
        f"kerasllm: error: --kv-cache is for decoder and seq2seq models; {encoder} is an encoder"], result.err


def test_an_export_at_the_lowest_opset_serves(model_dir, tmp_path, run_cli):
    """(--quiet, in a process of its own as a user runs it: nothing printed but errors.)"""
    out = tmp_path / "bundle"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the CLI's own default
    result = subprocess.run([sys.executable, "-m", "kerasllm", "export", str(model_dir), "--out", str(out),
                             "--opset", "15", "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result
    assert json.loads((out / "manifest.json").read_text())["graphs"]["model"]["opset"] == 15
    imports = onnx.load(out / "model.onnx").opset_import
    assert next(o.version for o in imports if o.domain in ("", "ai.onnx")) == 15


def test_export_cli_keeps_a_growing_cache_when_asked(model_dir, tmp_path, run_cli):
    out = tmp_path / "growing"
    result = run_cli("export", model_dir, "--out", out, "--kv-cache", "growing")
    assert result.code == 0, result
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["optimization"]["kv_cache"] == "growing"
    assert manifest["optimization"]["fusions"]["MultiHeadAttention"] == 2
    assert manifest["validation"]["greedy"]["identical"] is True
    assert json.loads((out / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is False


def test_fp16_growing_cache_export_fuses_attention_and_leaves_the_working_directory_alone(
        model_dir, bundle_dir, tmp_path, monkeypatch, run_cli):
    """fp16 with `--kv-cache growing`: MultiHeadAttention fused in fp16, greedy as the fp32 bundle.
    ORT's fp16 converter runs a symbolic shape inference that gives up on this graph and writes
    sym_shape_infer_temp.onnx and .data files into the working directory: none are left there."""
    from kerasllm.export.decoding_predictor import BundleGenerator
    from kerasllm.export.generate import DecodingOptions, generate

    monkeypatch.chdir(tmp_path)
    result = run_cli("export", model_dir, "--out", "growing16", "--dtype", "fp16", "--kv-cache", "growing")
    assert result.code == 0, result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["growing16"]
    manifest = json.loads((tmp_path / "growing16" / "manifest.json").read_text())
    assert manifest["optimization"]["kv_cache"] == "growing"
    assert manifest["optimization"]["fusions"]["MultiHeadAttention"] == 2
    fp16, fp32 = BundleGenerator(tmp_path / "growing16", device="cpu"), BundleGenerator(bundle_dir, device="cpu")
    ids = [fp16.check(p) for p in PROMPTS]
    options = DecodingOptions(max_new_tokens=40)
    tokens = [[h[0].tokens for h in generate(p.step, ids, options, pad_id=p.pad_id)] for p in (fp16, fp32)]
    assert tokens[0] == tokens[1]


def test_an_fp32_shared_buffer_bundle_on_cuda_is_called_out(bundle_dir, caplog):
    """ORT's CUDA GroupQueryAttention is fp16/bf16 only: the user is told in one line (the
    session here is a CPU one labelled CUDA; no GPU is needed to check the message)."""
    import logging

    from kerasllm.export.runtime import DecoderSession, Session, create_session

    cpu = create_session(bundle_dir / "model.onnx", "cpu")
    with caplog.at_level(logging.WARNING, logger="kerasllm"):
        DecoderSession(Session(cpu.session, "cuda", 0, "test"))
    assert [r.getMessage() for r in caplog.records if "--kv-cache growing" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kerasllm"):
        DecoderSession(cpu)
    assert not caplog.records


def test_kv_cache_decoding_equals_full_recompute_token_for_token(bundle_dir):
    from kerasllm.export.decoding_predictor import BundleGenerator
    from kerasllm.export.generate import DecodingOptions, FullRecompute, generate

    predictor = BundleGenerator(bundle_dir, device="cpu")
    prompts = [predictor.check(p) for p in PROMPTS]
    options = DecodingOptions(max_new_tokens=40)
    cached = generate(predictor.step, prompts, options, pad_id=predictor.pad_id)
    full = generate(FullRecompute(predictor.step), prompts, options, pad_id=predictor.pad_id)
    assert [h[0].tokens for h in cached] == [h[0].tokens for h in full]
    assert min(len(h[0].tokens) for h in cached) == 40
    # Left padding changes nothing: each prompt alone gives the same tokens as in the batch.
    alone = [generate(predictor.step, [p], options, pad_id=predictor.pad_id)[0][0].tokens for p in prompts]
    assert alone == [h[0].tokens for h in cached]


def test_bundle_and_model_dir_predictors_agree(bundle_dir, model_dir):
    from kerasllm.export.predict import load_predictor

    bundle = load_predictor("generate", bundle_dir, device="cpu")
    keras_side = load_predictor("generate", model_dir)
    batch = [bundle.check(p) for p in PROMPTS]
    assert bundle.predict(batch, max_new_tokens=24) == keras_side.predict(batch, max_new_tokens=24)
    # Beam search of width 1 is greedy decoding; n-best comes with ranked scores.
    assert bundle.predict(batch, max_new_tokens=24, num_beams=1) == bundle.predict(batch, max_new_tokens=24)
    beams = bundle.predict(batch[:1], max_new_tokens=12, num_beams=4, n_best=3)[0]
    assert len(beams["output"]) == 3 and beams["scores"] == sorted(beams["scores"], reverse=True)
    assert keras_side.predict(batch[:1], max_new_tokens=12, num_beams=4, n_best=3)[0]["output"] == beams["output"]
    # A left-padded batch of beams (cache rows reordered in place, finished inputs dropped) as in Keras.
    beams = [r["output"] for r in bundle.predict(batch, max_new_tokens=12, num_beams=3, n_best=2)]
    assert beams == [r["output"] for r in keras_side.predict(batch, max_new_tokens=12, num_beams=3, n_best=2)]
    # Seeded sampling reproduces; stop strings cut the text.
    sampled = bundle.predict(batch, max_new_tokens=16, temperature=1.0, top_k=5, seed=3)
    assert sampled == bundle.predict(batch, max_new_tokens=16, temperature=1.0, top_k=5, seed=3)
    greedy = bundle.predict(batch[:1], max_new_tokens=24)[0]["output"]
    stop = greedy[3:5]
    assert bundle.predict(batch[:1], max_new_tokens=24, stop=[stop])[0]["output"] == greedy[:greedy.find(stop)]


def test_generate_warns_once_past_the_trained_seq_len_from_a_bundle_or_a_model_dir(bundle_dir, model_dir,
                                                                                     tmp_path, run_cli):
    assert json.loads((bundle_dir / "manifest.json").read_text())["train"] == {"seq_len": 32}
    # Older sources: a bundle exported before the manifest recorded it, a model dir without it.
    old_bundle = tmp_path / "old_bundle"
    shutil.copytree(bundle_dir, old_bundle)
    manifest = json.loads((old_bundle / "manifest.json").read_text())
    del manifest["train"]
    (old_bundle / "manifest.json").write_text(json.dumps(manifest))
    old_model_dir = tmp_path / "old_model_dir"
    shutil.copytree(model_dir, old_model_dir)
    run = json.loads((old_model_dir / "config.json").read_text())
    run.pop("train")
    (old_model_dir / "config.json").write_text(json.dumps(run))
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")  # 7..25 characters (char tokenizer)
    warning = ("kerasllm: warning: prompts + --max-new-tokens reach 45 tokens, longer than the --seq-len 32 the "
               "model was trained with; text past it degrades")
    for name, src in [("bundle", bundle_dir), ("model_dir", model_dir), ("old_bundle", old_bundle),
                      ("old_model_dir", old_model_dir)]:
        past = run_cli("generate", src, "-i", source, "-o", tmp_path / f"{name}-past.jsonl", "--max-new-tokens", 20,
                       "--batch-size", 1)
        within = run_cli("generate", src, "-i", source, "-o", tmp_path / f"{name}-within.jsonl",
                         "--max-new-tokens", 7)
        assert past.code == within.code == 0, (past, within)
        warned = [line for line in past.err.splitlines() if "--seq-len" in line]
        assert warned == ([] if name.startswith("old") else [warning]), (name, past.err)
        assert "--seq-len" not in within.err, (name, within.err)
    for name in ("past", "within"):  # the warning changes no output
        assert (tmp_path / f"bundle-{name}.jsonl").read_bytes() == (tmp_path / f"old_bundle-{name}.jsonl").read_bytes()
        assert ((tmp_path / f"model_dir-{name}.jsonl").read_bytes()
                == (tmp_path / f"old_model_dir-{name}.jsonl").read_bytes())


def test_tampered_or_incomplete_bundles_are_refused(bundle_dir, tmp_path, run_cli):
    from kerasllm.export.bundle import load_bundle

    assert load_bundle(bundle_dir).family == "decoder"
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle_dir, tampered)
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[-100] ^= 0xFF
    (tampered / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="'model.onnx' does not match its sha256"):
        load_bundle(tampered)
    (tmp_path / "prompts.txt").write_text("Anna\n")
    result = run_cli("generate", tampered, "--input", tmp_path / "prompts.txt", "--output", tmp_path / "o.jsonl")
    assert result.code == 1 and "'model.onnx' does not match its sha256" in result.err
    incomplete = tmp_path / "incomplete"
    shutil.copytree(bundle_dir, incomplete)
    (incomplete / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="incomplete bundle, 'tokenizer.json' is missing"):
        load_bundle(incomplete)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    del manifest["graphs"]
    (incomplete / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="missing graphs"):
        load_bundle(incomplete)


def _rewritten_bundle(bundle_dir, path, edit):
    """A copy of the bundle with its manifest changed by `edit` (a hand edit, not a checksum break)."""
    shutil.copytree(bundle_dir, path)
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("name, edit, message", [
    ("graphs-list", lambda m: m.update(graphs=[]), "graphs must map each graph's name"),
    ("graph-no-file", lambda m: m.update(graphs={"model": {}}), "graphs must map each graph's name"),
    ("files-list", lambda m: m.update(files=["model.onnx"]), "files must map each file to its sha256"),
    ("no-max-length", lambda m: m["config"].pop("max_length"), "config is missing max_length"),
    ("max-length-text", lambda m: m["config"].update(max_length="x"), "max_length must be an integer from 2"),
    ("config-list", lambda m: m.update(config=[]), "config must be a JSON object"),
    ("unknown-key", lambda m: m["config"].update(colour=1), "unknown key 'colour'"),
])
def test_a_hand_edited_manifest_is_refused_in_one_line(bundle_dir, tmp_path, run_cli, name, edit, message):
    from kerasllm.export.bundle import load_bundle

    bundle = _rewritten_bundle(bundle_dir, tmp_path / name, edit)
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(bundle)
    (tmp_path / "prompts.txt").write_text("Anna\n")
    result = run_cli("generate", bundle, "--input", tmp_path / "prompts.txt", "--output", tmp_path / "o.jsonl")
    assert result.code == 1 and message in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert not (tmp_path / "o.jsonl").exists()


def test_an_unloadable_graph_with_a_matching_checksum_is_refused_in_one_line(bundle_dir, tmp_path, run_cli):
    from kerasllm.export.bundle import sha256

    bundle = tmp_path / "corrupt"
    shutil.copytree(bundle_dir, bundle)
    graph = bundle / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[100:140] = bytes(40)  # no longer a valid protobuf
    graph.write_bytes(bytes(data))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256(graph)  # the checksum made to match
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "prompts.txt").write_text("Anna\n")
    result = run_cli("generate", bundle, "--input", tmp_path / "prompts.txt", "--output", tmp_path / "o.jsonl")
    assert result.code == 1 and "model.onnx: ONNX Runtime cannot load this graph" in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1, result.err


def test_a_truncated_model_file_is_named_in_one_line(model_dir, tmp_path, run_cli):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    model_file = broken / "model.keras"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    (tmp_path / "prompts.txt").write_text("Anna\n")
    for args in (("generate", broken, "-i", tmp_path / "prompts.txt", "-o", tmp_path / "o.jsonl"),
                 ("export", broken, "--out", tmp_path / "bundle")):
        result = run_cli(*args)
        assert result.code == 1, result
        assert f"{model_file}: cannot be loaded, corrupt or incomplete" in result.err, result.err
        assert "File not found" not in result.err and len(result.err.strip().splitlines()) == 1, result.err
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "bundle").exists()


def test_a_model_dir_runs_on_the_device_asked_for_or_says_it_cannot(model_dir, tmp_path, run_cli):
    """As a bundle: --device cuda without a GPU TensorFlow can use is one line and exit 1, not a
    silent run on the CPU (CI machines have no GPU)."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible: the refusal cannot be shown here")
    (tmp_path / "prompts.txt").write_text("Anna\n")
    for device in ("cuda", "cuda:3"):
        result = run_cli("generate", model_dir, "-i", tmp_path / "prompts.txt", "-o", tmp_path / "o.jsonl",
                         "--device", device)
        assert result.code == 1 and f"device {device}: TensorFlow sees 0 GPU(s)" in result.err, result.err
        assert not (tmp_path / "o.jsonl").exists()
    result = run_cli("generate", model_dir, "-i", tmp_path / "prompts.txt", "-o", tmp_path / "o.jsonl",
                     "--device", "cpu", "--max-new-tokens", 3)
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "o.jsonl").read_text())["output"]


def test_failed_validation_leaves_no_bundle_and_exits_1(model_dir, tmp_path, run_cli, monkeypatch):
    from kerasllm.export import validate

    monkeypatch.setattr(validate, "FP32_TOLERANCE", 0.0)  # no real graph matches to the last bit
    out = tmp_path / "bundle"
    result = run_cli("export", model_dir, "--out", out, "--no-optimize")
    assert result.code == 1
    assert "validation: batch 1, prompt step: logits: max |diff|" in result.err and "> 0" in result.err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nor a staging directory


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_a_committed_bundle_directory_has_the_mode_mkdir_gives_under_the_umask(tmp_path, umask):
    """The staging directory (mkdtemp: always 0700) had been renamed as is, so a bundle could not be
    read by another account (a service user, a container) until someone ran chmod."""
    from kerasllm.export.bundle import commit_bundle, staging_dir

    out = tmp_path / "bundle"
    previous = os.umask(umask)
    try:
        staging = staging_dir(out)
        (staging / "manifest.json").write_text("{}")
        commit_bundle(staging, out)
    finally:
        os.umask(previous)
    assert oct(out.stat().st_mode & 0o7777) == oct(0o777 & ~umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging directory left
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # nor the mode probe


def test_serving_modules_import_without_tensorflow():
    code = ("import sys, time; t = time.perf_counter(); "
            "import kerasllm.export.runtime, kerasllm.export.generate, kerasllm.export.bundle, "
            "kerasllm.export.decoding_predictor, kerasllm.export.row_gather, kerasllm.cli; "
            "print(time.perf_counter() - t, 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False"]
    assert float(out[0]) < 2.0  # ~0.3 s here; TensorFlow alone takes ~4 s


def test_sessions_use_cuda_only_when_it_loads_and_say_so_in_one_line(bundle_dir, caplog, monkeypatch):
    import logging

    import onnxruntime as ort

    from kerasllm.errors import KerasLLMError, UsageError
    from kerasllm.export import runtime
    from kerasllm.export.runtime import create_session, parse_device

    monkeypatch.setattr(runtime, "_ANNOUNCED", set())  # as in a fresh process

    assert parse_device("cuda:1") == ("cuda", 1) and parse_device(None) == ("auto", 0)
    with pytest.raises(UsageError, match="cpu, cuda, cuda:N or auto"):
        parse_device("gpu")
    with caplog.at_level(logging.INFO, logger="kerasllm"):
        session = create_session(bundle_dir / "model.onnx")  # auto
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if session.device_type == "cpu":  # this machine: no GPU, whatever the build lists
        assert session.session.get_providers() == ["CPUExecutionProvider"]
        assert [r.getMessage() for r in caplog.records] == [session.description]
        with caplog.at_level(logging.INFO, logger="kerasllm"):  # a job's further sessions: said once
            create_session(bundle_dir / "model.onnx")
        assert [r.getMessage() for r in caplog.records] == [session.description]
        assert session.description.startswith(f"ONNX Runtime {ort.__version__} on CPUExecutionProvider (")
        with pytest.raises(KerasLLMError, match="device cuda:0: " + ("CUDA provider did not load" if has_cuda
                                                                     else "no CUDA provider")):
            create_session(bundle_dir / "model.onnx", "cuda:0")
    else:
        assert session.session.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.parametrize("refused", [False, True])
def test_cuda_graph_sessions_are_asked_of_ort_and_a_refusal_falls_back_in_one_warning(bundle_dir, caplog, monkeypatch,
                                                                                      refused):
    """`create_session(..., cuda_graph=True)` passes ORT's `enable_cuda_graph`; where ORT refuses
    (its own words quoted in one warning), the session opens without it. ORT's CUDA provider is
    faked here (this machine has no GPU): a CPU session behind it."""
    import logging

    import onnxruntime as ort

    from kerasllm.export import runtime

    real, asked = ort.InferenceSession, []
    refusal = ("[ONNXRuntimeError] : 1 : FAIL : This session cannot use the CUDA Graph feature as requested by "
               "the user  as all compute graph nodes have not been partitioned to the CUDA EP.")

    class FakeCudaSession:
        def __init__(self, path, options, providers):
            asked.append(providers[0][1].get("enable_cuda_graph"))
            if refused and asked[-1] == "1":
                raise RuntimeError(refusal)
            self.inner = real(path, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(runtime, "_ANNOUNCED", set())
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FakeCudaSession)
    with caplog.at_level(logging.INFO, logger="kerasllm"):
        session = runtime.create_session(bundle_dir / "model.onnx", "cuda:0", cuda_graph=True)
    assert session.device_type == "cuda" and session.cuda_graph is (not refused)
    assert asked == (["1", None] if refused else ["1"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if refused:
        assert warnings == ["CUDA graphs refused, running without them: " + refusal]
    else:
        assert warnings == [] and session.description.endswith("(cuda:0), CUDA graphs")


def test_attention_fusion_is_dropped_when_it_fails_validation(model_dir, tmp_path, monkeypatch):
    from kerasllm.export import validate
    from kerasllm.export.exporter import export_model_dir

    real, calls = validate.validate_causal_lm, []

    def first_fails(model, step, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise validate.ValidationError("validation: batch 1, prompt step: logits: max |diff| 0.005 > 0.0001")
        return real(model, step, **kwargs)

    monkeypatch.setattr(validate, "validate_causal_lm", first_fails)
    bundle = export_model_dir(model_dir, tmp_path / "b", log=lambda message: None)
    report = bundle.manifest["optimization"]
    assert len(calls) == 2 and "GroupQueryAttention" not in report["fusions"]
    assert "MultiHeadAttention" not in report["fusions"] and report["kv_cache"] == "growing"
    assert report["attention_fusion_reverted"].endswith("max |diff| 0.005 > 0.0001")
    assert report["fusions"]["LayerNormalization"] == 5  # the other fusions stay


@pytest.mark.parametrize("variant, attention_fused, shared_kv_buffer", [
    (dict(position="rotary"), True, True),  # RoPE inside GroupQueryAttention (do_rotary)
    (dict(position="rotary"), True, False),  # RotaryEmbedding nodes + MultiHeadAttention over a growing cache
    (dict(position="sinusoidal", activation="swiglu"), True, True),
    (dict(norm_first=False, tie_embeddings=False, activation="relu"), True, True),
    (dict(), True, False),  # MultiHeadAttention over a growing cache
    (dict(use_bias=False), True, True),  # the bias-free qkv tensordot next to the heads Reshape (convert.py)
])
def test_other_architectures_export_with_parity(variant, attention_fused, shared_kv_buffer, tmp_path):
    import keras

    from kerasllm import CausalLM, DecoderConfig
    from kerasllm.export.convert import causal_lm_graph, trace_to_onnx
    from kerasllm.export.optimize import optimize_graph
    from kerasllm.export.runtime import DecoderSession, buffer_slots_bound, create_session
    from kerasllm.export.validate import validate_causal_lm

    keras.utils.set_random_seed(0)
    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=50, max_length=64, **variant))
    report = optimize_graph(trace_to_onnx(causal_lm_graph(model), model), tmp_path / "m.onnx", model_type="gpt2",
                            num_heads=2, hidden_size=32, shape_inference=False, cached_attention=True,
                            shared_kv_buffer=shared_kv_buffer, rotary_positions=buffer_slots_bound(64))
    step = DecoderSession(create_session(tmp_path / "m.onnx", "cpu"))
    figures = validate_causal_lm(model, step, greedy=False)
    assert max(figures["max_abs_diff"].values()) <= 1e-4
    fused_as = "GroupQueryAttention" if shared_kv_buffer else "MultiHeadAttention"
    assert (fused_as in report["fusions"]) == attention_fused
    if variant.get("position") == "rotary":  # rotated in the attention kernel, or just before it
        assert report["fusions"].get("RotaryEmbedding", 0) == (0 if shared_kv_buffer else 4)
    assert step.shared_buffer == (report["kv_cache"] == "shared_buffer") == (attention_fused and shared_kv_buffer)
    # Decoding's prompt step (last positions' logits only, through logits_to_keep where the graph has it).
    assert report.get("logits_to_keep", False) == step.shared_buffer
    ids, mask = np.array([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]), np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert np.abs(step.last_logits(ids, mask)[0] - step(ids, mask, None)[0][:, -1]).max() <= 1e-5


def _random_decoder_dir(path: Path, **config) -> tuple[Path, object]:
    """A model directory holding a tiny causal LM with random weights (`DecoderConfig` overrides
    `config`), as `kerasllm train causal-lm` lays it out; returns `(run, model)`."""
    import keras

    from kerasllm import CausalLM, DecoderConfig
    from kerasllm.tokenizers import TextTokenizer
    from kerasllm.training import save_model_atomic, write_json_atomic

    keras.utils.set_random_seed(0)
    tokenizer = TextTokenizer.train(["abcdefghijklmnopqrstuvwxyz0123456789 .,"], kind="char")
    config = DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size, dropout=0.0,
                                  **{"max_length": 64, **config})
    model = CausalLM(config)
    path.mkdir()
    tokenizer.save(path)
    write_json_atomic(path / "config.json", {"task": "causal-lm", "model": config.to_dict(), "train": {}})
    save_model_atomic(model, path)
    return path, model


def _bundle_greedy(bundle_path: Path, prompts, new_tokens: int) -> list[list[int]]:
    from kerasllm.export.decoding_predictor import BundleGenerator
    from kerasllm.export.generate import DecodingOptions, generate

    generator = BundleGenerator(bundle_path, device="cpu")
    return [h[0].tokens for h in generate(generator.step, prompts, DecodingOptions(max_new_tokens=new_tokens),
                                          pad_id=generator.pad_id, max_length=generator.max_length)]


def test_a_one_head_decoder_exports_and_decodes_as_keras(tmp_path):
    """One attention head: tf2onnx traces the head Transpose of a size-1 axis as a Reshape and had
    merged it with the head merge's Reshape [0, 0, C], whose zeros then copied [B, 1, ...] instead of
    [B, T, ...] (ORT: cannot reshape {1,1,5,32} to {1,1,32}); convert.py keeps such merges out."""
    from kerasllm.export.exporter import export_model_dir

    run, model = _random_decoder_dir(tmp_path / "run", num_heads=1)
    bundle = export_model_dir(run, tmp_path / "bundle", log=lambda message: None)
    validation = bundle.manifest["validation"]
    assert max(validation["max_abs_diff"].values()) <= 1e-4 and validation["greedy"]["identical"] is True
    prompts = [[7, 8, 9], [10, 11, 12, 13, 14, 15]]
    assert _bundle_greedy(bundle.path, prompts, 12) == np.asarray(model.generate(prompts, max_new_tokens=12)).tolist()


@pytest.mark.parametrize("variant, head_size", [(dict(num_heads=8), 4), (dict(num_heads=4, position="rotary"), 8)])
def test_heads_group_query_attention_refuses_keep_the_growing_cache(variant, head_size, tmp_path):
    """ORT's GroupQueryAttention takes head sizes that are multiples of 8 (16 with rotary positions)
    and says so only when it runs: the default export had died in validation with its RuntimeError.
    Such heads keep the growing cache (fused MultiHeadAttention) and the manifest says why."""
    from kerasllm.export.exporter import export_model_dir

    run, model = _random_decoder_dir(tmp_path / "run", **variant)
    logs = []
    bundle = export_model_dir(run, tmp_path / "bundle", log=logs.append)
    report = bundle.manifest["optimization"]
    assert report["kv_cache"] == "growing" and report["fusions"]["MultiHeadAttention"] == 2
    assert "attention_fusion_reverted" not in report
    assert report["shared_buffer_unsupported"].endswith(f"this model's is {head_size}")
    assert f"keeping the growing KV cache: {report['shared_buffer_unsupported']}" in logs
    assert bundle.manifest["validation"]["greedy"]["identical"] is True
    prompts = [[7, 8, 9], [10, 11, 12, 13, 14, 15]]
    assert _bundle_greedy(bundle.path, prompts, 12) == np.asarray(model.generate(prompts, max_new_tokens=12)).tolist()


def test_a_fused_graph_onnx_runtime_cannot_run_falls_back_to_the_unfused_graph(tmp_path, monkeypatch):
    """Should ORT refuse the optimized graph when it runs (here GroupQueryAttention forced on heads
    of 4), the export rebuilds it without the attention fusion, as for a failed check."""
    from kerasllm.export import optimize
    from kerasllm.export.exporter import export_model_dir

    monkeypatch.setattr(optimize, "group_query_attention_problem", lambda head_dim, rotary: None)
    run, model = _random_decoder_dir(tmp_path / "run", num_heads=8)
    bundle = export_model_dir(run, tmp_path / "bundle", log=lambda message: None)
    report = bundle.manifest["optimization"]
    assert report["attention_fusion_reverted"].startswith("validation: ONNX Runtime cannot run the graph (")
    assert "GroupQueryAttention" in report["attention_fusion_reverted"]
    assert report["kv_cache"] == "growing" and "MultiHeadAttention" not in report["fusions"]
    assert bundle.manifest["validation"]["greedy"]["identical"] is True


@pytest.mark.filterwarnings("ignore:You are using a softmax over axis -1")  # one key at max_length 2: intended
@pytest.mark.parametrize("max_length", [2, 6])
def test_a_short_decoder_exports_with_validation_cases_that_fit(max_length, tmp_path):
    """The validation's cases had used prompts of 3 tokens and a 4-token step, and greedy runs of
    max_length - 8 new tokens: past max_length 6, where Keras's position lookup fails (a TensorFlow
    traceback). Each case now fits, still with uneven (left-padded) prompts and a multi-token step
    where there is room for them."""
    from kerasllm.export.exporter import export_model_dir

    run, model = _random_decoder_dir(tmp_path / "run", max_length=max_length)
    bundle = export_model_dir(run, tmp_path / "bundle", log=lambda message: None)
    validation = bundle.manifest["validation"]
    cases = validation["cases"]
    assert [max(case["prompt_lengths"]) + case["step_tokens"] <= max_length for case in cases] == [True, True]
    assert max(validation["max_abs_diff"].values()) <= 1e-4
    assert validation["greedy"]["identical"] is True and validation["greedy"]["new_tokens"] >= 1
    if max_length == 6:
        assert len(set(cases[1]["prompt_lengths"])) > 1 and cases[1]["step_tokens"] > 1
    prompts = [[7], [8, 9, 10]] if max_length > 3 else [[7], [8]]
    new = max_length - max(len(p) for p in prompts)
    assert _bundle_greedy(bundle.path, prompts, new) == np.asarray(model.generate(prompts, max_new_tokens=new)).tolist()


def test_a_decoder_too_short_to_generate_is_refused_in_one_line(tmp_path, run_cli):
    """A decoder of max_length 1 (no room for a prompt token and a new one) is refused where a config
    is read: training now refuses it at the start, and a model dir from before is refused at export."""
    run, _ = _random_decoder_dir(tmp_path / "run", max_length=2)
    saved = json.loads((run / "config.json").read_text())
    saved["model"]["max_length"] = 1
    (run / "config.json").write_text(json.dumps(saved))
    result = run_cli("export", run, "--out", tmp_path / "bundle")
    assert result.code == 1 and "Traceback" not in result.err
    assert result.err.strip().splitlines() == [
        f"kerasllm: error: {run / 'config.json'}: model config: max_length must be an integer from 2 (a prompt "
        "token and a new one) up to 1048576, got 1"]
    assert not (tmp_path / "bundle").exists()


def _unrunnable_graph(path: Path) -> Path:
    """A graph ONNX Runtime loads but cannot run: x [N] reshaped to [3]."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("shape", TensorProto.INT64, [1], [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("failure", ["run", "load"])
def test_onnx_runtime_failures_in_validation_fall_back_or_end_in_one_line(failure, tmp_path):
    from kerasllm.export.runtime import create_session
    from kerasllm.export.validate import ValidationError, validated_with_fallback

    graph = _unrunnable_graph(tmp_path / "g.onnx")
    if failure == "load":
        graph.write_bytes(b"not a graph")
    broken = {"unfused": True}  # whether the unfused graph fails too

    def build(fuse_attention):
        if fuse_attention or broken["unfused"]:
            create_session(graph, "cpu").session.run(None, {"x": np.zeros(4, np.float32)})
        return {"fused": fuse_attention}, {}

    with pytest.raises(ValidationError) as refused:
        validated_with_fallback(build, False, log=lambda message: None)
    message = str(refused.value)
    expected = "cannot run the graph (" if failure == "run" else "cannot load this graph ("
    assert message.startswith("validation: ") and expected in message and "\n" not in message
    broken["unfused"] = False  # only the fused graph fails: the export falls back to the unfused one
    logs = []
    report, _, reverted = validated_with_fallback(build, True, log=logs.append)
    assert report == {"fused": False} and reverted == message
    assert logs == [f"fused attention failed validation ({message}); exporting without that fusion"]


def test_rotary_swiglu_decoder_gets_the_fused_fast_path_in_fp32_and_fp16(corpus_file, tmp_path):
    """A Llama-style decoder (rotary positions, SwiGLU, no biases, untied head) exports as fast as
    a learned-position one: each layer's q/k rotation goes into GroupQueryAttention (`do_rotary`,
    cos/sin tables made from the graph's own inverse frequencies) over the shared KV buffer, in
    fp32 (logits within 1e-4 of Keras, greedy identical, checked at export) and fp16 (top-1
    agreement at export; here the same greedy tokens as the fp32 bundle). Trained briefly so its
    next-token choices have no near-ties."""
    import keras

    from kerasllm import CausalLM, DecoderConfig
    from kerasllm.data import read_corpus, tokenize_corpus
    from kerasllm.export.decoding_predictor import BundleGenerator
    from kerasllm.export.exporter import ExportOptions, export_model_dir
    from kerasllm.export.generate import DecodingOptions, generate
    from kerasllm.tokenizers import TextTokenizer
    from kerasllm.training import write_json_atomic

    keras.utils.set_random_seed(1)
    texts = read_corpus(corpus_file)
    tokenizer = TextTokenizer.train(texts, kind="char")
    ids = tokenize_corpus(texts, tokenizer)
    config = DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_length=96, position="rotary",
                                  activation="swiglu", use_bias=False, tie_embeddings=False)
    model = CausalLM(config)
    model.compile(learning_rate=3e-3, jit_compile=False)
    starts = np.random.default_rng(1).integers(0, len(ids) - 33, size=60 * 16)
    windows = np.stack([ids[s:s + 33] for s in starts])
    # Two passes: a model sure of its next characters, so that greedy fp16 decoding meets no near-tie
    # (after one pass a 5th token's top two logits lay within fp16's rounding).
    model.fit(windows[:, :-1], windows[:, 1:], batch_size=16, epochs=2, verbose=0)
    run = tmp_path / "lm"
    run.mkdir()
    model.save(run / "model.keras")
    tokenizer.save(run)
    write_json_atomic(run / "config.json", {"task": "causal-lm", "model": config.to_dict(), "train": {}})

    bundles = {}
    for dtype in ("fp32", "fp16"):
        bundles[dtype] = export_model_dir(run, tmp_path / dtype, ExportOptions(dtype=dtype), log=lambda message: None)
        report = bundles[dtype].manifest["optimization"]
        assert report["kv_cache"] == "shared_buffer" and "attention_fusion_reverted" not in report
        assert report["fusions"]["GroupQueryAttention"] == config.num_layers
        attention = [n for n in onnx.load(str(tmp_path / dtype / "model.onnx")).graph.node
                     if n.op_type == "GroupQueryAttention"]
        assert [next(a.i for a in n.attribute if a.name == "do_rotary") for n in attention] == [1, 1]
        assert not any(n.op_type in ("Sin", "Cos", "RotaryEmbedding")
                       for n in onnx.load(str(tmp_path / dtype / "model.onnx")).graph.node)
    assert bundles["fp32"].manifest["validation"]["greedy"]["identical"] is True
    assert min(bundles["fp16"].manifest["validation"]["top1_agreement"].values()) >= 0.99
    generators = [BundleGenerator(tmp_path / dtype, device="cpu") for dtype in ("fp32", "fp16")]
    prompts = [generators[0].check(p) for p in PROMPTS]
    options = DecodingOptions(max_new_tokens=40)
    tokens = [[h[0].tokens for h in generate(g.step, prompts, options, pad_id=g.pad_id)] for g in generators]
    assert tokens[0] == tokens[1]


def test_evaluate_gives_the_same_perplexity_from_the_bundle_and_the_model_dir(bundle_dir, model_dir, corpus_file,
                                                                              tmp_path):
    """`kerasllm evaluate` on a causal LM: perplexity of each line's tokens, equal on ONNX Runtime
    and in Keras, far below a uniform guess on text like the training corpus, higher on scrambled text."""
    from kerasllm.evaluation import evaluate

    lines = [line for line in Path(corpus_file).read_text().splitlines() if line.strip()][:40]
    held = tmp_path / "held.txt"
    held.write_text("\n".join(lines) + "\n")
    scrambled = tmp_path / "scrambled.txt"
    rng = np.random.default_rng(0)
    scrambled.write_text("\n".join("".join(rng.permutation(list(line))) for line in lines) + "\n")
    from_bundle = evaluate(bundle_dir, held, batch_size=7)
    from_keras = evaluate(model_dir, held, batch_size=16)
    assert from_bundle["task"] == "causal-lm" and from_bundle["count"] == len(lines)
    # The context is the trained --seq-len (32), not max_length (96); lines longer than that are
    # scored in windows, every token after the first once (none cut off).
    assert from_bundle["context"] == from_keras["context"] == 32
    from kerasllm.tokenizers import TextTokenizer

    tokenizer = TextTokenizer.load(bundle_dir / "tokenizer.json")
    lengths = [len(tokenizer.encode(line)) for line in lines]
    assert max(lengths) > 96
    assert from_bundle["predicted_tokens"] == from_keras["predicted_tokens"] == sum(n - 1 for n in lengths)
    assert from_bundle["perplexity"] == pytest.approx(from_keras["perplexity"], rel=1e-4)
    vocab = json.loads((model_dir / "config.json").read_text())["model"]["vocab_size"]
    assert from_bundle["perplexity"] < vocab / 2
    assert evaluate(bundle_dir, scrambled)["perplexity"] > from_bundle["perplexity"] * 1.2


def test_a_causal_lm_is_evaluated_a_bounded_part_at_a_time(bundle_dir, corpus_file, tmp_path, monkeypatch):
    """Every window and every token's loss of the file had been held to the end (2.8 GB for 40 MB of
    text): the windows are now scored `EVAL_WINDOW_TOKENS` at a time, the losses summed as they come."""
    from kerasllm import evaluation

    lines = [line for line in Path(corpus_file).read_text().splitlines() if line.strip()][:40]
    held = tmp_path / "held.txt"
    held.write_text("\n".join(lines) + "\n")
    whole = evaluation.evaluate(bundle_dir, held, batch_size=8)
    scored = []
    original = evaluation._causal_nll
    monkeypatch.setattr(evaluation, "_causal_nll", lambda predictor, windows, *args: scored.append(len(windows))
                        or original(predictor, windows, *args))
    monkeypatch.setattr(evaluation, "EVAL_WINDOW_TOKENS", 100)
    parts = evaluation.evaluate(bundle_dir, held, batch_size=8)
    assert len(scored) > 5 and max(scored) < sum(scored) / 3, scored
    assert parts["predicted_tokens"] == whole["predicted_tokens"] and parts["count"] == whole["count"] == 40
    assert parts["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(0, 300), context=st.integers(1, 100))
def test_context_windows_predict_every_token_once_within_the_context(length, context):
    from kerasllm.evaluation import context_windows

    tokens = list(range(length))
    windows = context_windows(tokens, context)
    predicted = [t for window, scored in windows for t in window[-scored:]]
    assert predicted == tokens[1:]
    width = max(2, context)
    for i, (window, scored) in enumerate(windows):
        assert window == tokens[window[0]:window[0] + len(window)]  # contiguous
        assert len(window) == min(width, length) and 1 <= scored <= len(window) - 1
        if i:  # past the first window, each prediction sees at least half a window before it
            assert len(window) - scored >= width // 2
