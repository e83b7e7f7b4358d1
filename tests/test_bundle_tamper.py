"""Bundles whose manifest was edited, or whose graph was replaced with its checksum updated: each is
refused in one line (exit 1, no traceback), at load where the graph's inputs and outputs show it, or
when ONNX Runtime fails running it, with the finished output lines kept.

The bundles here are TensorFlow-free stand-ins: a small decoder-shaped ONNX graph (the decoder
family's I/O names, a growing KV cache that it passes through, logits looked up from a table of
`max_length` rows by each token's position) with a real tokenizer and manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kerasllm.config import DecoderConfig
from kerasllm.errors import BundleError
from kerasllm.export.bundle import write_manifest
from kerasllm.tokenizers import TextTokenizer

LAYERS, HEADS, HEAD_DIM = 2, 2, 16  # the tiny preset's
POSITIONS = 16  # rows of the graph's position table: its true max_length


def _decoder_graph(vocab: int, positions: int = POSITIONS):
    """A decoder-shaped graph: logits [B, T, vocab] of each new token's position (row `position` of a
    table, so a position >= `positions` fails in ORT's Gather), presents equal to the pasts."""
    cache = ["batch", HEADS, "past_sequence", HEAD_DIM]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])]
    nodes = [helper.make_node("Shape", ["input_ids"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["new"], axis=0),
             helper.make_node("Neg", ["new"], ["start"]),
             helper.make_node("CumSum", ["attention_mask", "one_scalar"], ["counts"]),
             helper.make_node("Sub", ["counts", "one"], ["positions"]),
             helper.make_node("Slice", ["positions", "start", "end", "one"], ["new_positions"]),
             helper.make_node("Gather", ["table", "new_positions"], ["logits"], axis=0)]
    table = (np.arange(positions * vocab) % 7).reshape(positions, vocab).astype(np.float32)
    initializers = [numpy_helper.from_array(np.array([1], np.int64), "one"),
                    numpy_helper.from_array(np.array(1, np.int64), "one_scalar"),
                    numpy_helper.from_array(np.array([2**62], np.int64), "end"),
                    numpy_helper.from_array(table, "table")]
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{layer}.{kind}", TensorProto.FLOAT, cache))
            outputs.append(helper.make_tensor_value_info(f"present.{layer}.{kind}", TensorProto.FLOAT, cache))
            nodes.append(helper.make_node("Identity", [f"past_key_values.{layer}.{kind}"], [f"present.{layer}.{kind}"]))
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _io(model) -> dict:
    """The manifest's record of a graph's inputs and outputs (as the exporter writes it)."""
    def decls(values):
        return {v.name: {"dtype": {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64"}[v.type.tensor_type.elem_type],
                         "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values}

    return {"inputs": decls(model.graph.input), "outputs": decls(model.graph.output)}


def make_bundle(directory: Path, edit=None, graph=None) -> Path:
    """A decoder bundle at `directory`; `edit(manifest)` changes its manifest after the hashes are
    written (the manifest does not hash itself), `graph` replaces its model.onnx (bytes, rehashed)."""
    directory.mkdir(parents=True)
    tokenizer = TextTokenizer.train(["the cat saw a duck", "a dog"], kind="char")
    tokenizer.save(directory / "tokenizer.json")
    model = _decoder_graph(tokenizer.vocab_size)
    (directory / "model.onnx").write_bytes(graph if graph is not None else model.SerializeToString())
    config = DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_length=POSITIONS)
    manifest = write_manifest(directory, {"family": "decoder", "task": "causal-lm", "config": config.to_dict(),
                                          "special_ids": tokenizer.special_ids(), "tokenizer": "tokenizer.json",
                                          "dtype": "fp32", "opset": 17,
                                          "graphs": {"model": {"file": "model.onnx", **_io(model)}},
                                          "train": {"seq_len": POSITIONS}})
    if edit is not None:
        edit(manifest)
        (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return directory


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("the cat\na dog\n", encoding="utf-8")
    return path


def _refused(run_cli, bundle: Path, prompts: Path, tmp_path: Path) -> str:
    """Run `generate` on `bundle`: its one error line (exit 1, no output, no traceback)."""
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", prompts, "-o", out, "--max-new-tokens", 2, "-q")
    assert result.code == 1, result
    errors = [line for line in result.err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in result.err, result.err
    assert result.out == "" and not out.exists()
    return errors[0]


def test_the_stand_in_bundle_generates(run_cli, tmp_path, prompts):
    bundle = make_bundle(tmp_path / "bundle")
    result = run_cli("generate", bundle, "-i", prompts, "-o", tmp_path / "out.jsonl", "--max-new-tokens", 2, "-q")
    assert result.code == 0, result
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_a_rehashed_graph_whose_load_error_is_not_utf8_is_refused_in_one_line(run_cli, tmp_path, prompts):
    """A damaged op type in the graph: ORT's message quotes its bytes, its Python binding cannot
    decode them and raised a UnicodeDecodeError (a traceback), after printing its fallback notice
    ("EP Error ... Falling back") on standard output."""
    node = helper.make_node("ReZZZZ", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    damaged = model.SerializeToString().replace(b"ZZZZ", b"\x9a\x9b\xff\xfe")
    bundle = make_bundle(tmp_path / "bundle", graph=damaged)
    line = _refused(run_cli, bundle, prompts, tmp_path)
    assert line.startswith(f"kerasllm: error: {bundle / 'model.onnx'}: ONNX Runtime cannot load this graph ("), line
    assert "No Op registered for Re\ufffd" in line


@pytest.mark.parametrize("train", [[1], "64", {"seq_len": "64"}, {"seq_len": 0}])
def test_a_malformed_train_field_is_refused_in_one_line(run_cli, tmp_path, prompts, train):
    bundle = make_bundle(tmp_path / "bundle", edit=lambda m: m.update(train=train))
    line = _refused(run_cli, bundle, prompts, tmp_path)
    assert line == (f"kerasllm: error: {bundle / 'manifest.json'}: train must be an object whose seq_len is a "
                    f"positive integer, got {json.dumps(train)}")


def _set_config(key, value):
    return lambda manifest: manifest["config"].update({key: value})


@pytest.mark.parametrize("edit, message", [
    # (the tokenizer, loaded first, is checked against the same field: its ids past 10 are named)
    (_set_config("vocab_size", 10), "tokenizer.json: {vocab} token ids, more than the model's vocabulary of 10: "
                                    "not this model's tokenizer"),
    (_set_config("vocab_size", 100000), "model.onnx: the graph's output 'logits' is tensor(float) [?, ?, {vocab}], "
                                        "but the config's vocab_size is 100000"),
    (_set_config("num_layers", 3), "model.onnx: the graph's KV cache has 2 layers, but the config has 3"),
    (_set_config("hidden_dim", 64), "model.onnx: the graph's input 'past_key_values.0.key' is tensor(float) "
                                    "[?, 2, ?, 16], but the config's num_heads 2 and hidden_dim 64 make 2 heads of 32"),
    (lambda m: m.update(dtype="fp16"), "model.onnx: the graph's KV cache is tensor(float) (past_key_values.0.key), "
                                       "but the manifest's dtype is fp16"),
    (lambda m: m.update(dtype="int4"), "manifest.json: dtype must be one of fp32, fp16, got 'int4'"),
    (lambda m: m.update(task="bogus"), "manifest.json: task 'bogus' does not go with family 'decoder' "
                                       "(its tasks: causal-lm)"),
    (_set_config("family", "encoder"), "manifest.json: config: family 'encoder' in a decoder bundle"),
    (lambda m: m["graphs"]["model"]["outputs"]["logits"].update(dtype="float16"),
     "model.onnx: the graph's output 'logits' is tensor(float) [?, ?, {vocab}], the manifest lists float16 "
     "[?, ?, {vocab}]: not this bundle's graph"),
], ids=["vocab-small", "vocab-big", "layers", "hidden", "dtype", "dtype-unknown", "task", "config-family",
        "recorded-io"])
def test_a_manifest_that_disagrees_with_its_graph_is_refused_at_load(run_cli, tmp_path, prompts, edit, message):
    bundle = make_bundle(tmp_path / "bundle", edit=edit)
    vocab = json.loads((bundle / "manifest.json").read_text())["graphs"]["model"]["outputs"]["logits"]["shape"][2]
    line = _refused(run_cli, bundle, prompts, tmp_path)
    assert line == f"kerasllm: error: {bundle / message.format(vocab=vocab)}", line


def test_a_graph_of_another_kind_is_refused_naming_the_missing_output(run_cli, tmp_path, prompts):
    """An encoder's graph (no KV cache) in a decoder bundle, its checksum updated."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
              for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)], "encoder",
                              inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence"])])
    encoder = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    bundle = make_bundle(tmp_path / "bundle", graph=encoder.SerializeToString())
    line = _refused(run_cli, bundle, prompts, tmp_path)
    assert line.startswith(f"kerasllm: error: {bundle / 'model.onnx'}: the graph's output 'logits' is tensor(float) "
                           "[?, ?], the manifest lists float32 [?, ?, "), line


def test_a_decoder_session_over_a_graph_without_a_cache_names_the_file(tmp_path):
    from kerasllm.export.runtime import DecoderSession, create_session

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch", "sequence"])])
    path = tmp_path / "plain.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
                     .SerializeToString())
    with pytest.raises(BundleError, match=f"^{path}: not a decoder graph with a KV cache "):
        DecoderSession(create_session(path, "cpu"))


def test_a_max_length_past_the_graph_fails_when_run_in_one_line_keeping_finished_lines(run_cli, tmp_path):
    """max_length is not in the graph's I/O: a prompt past the graph's position table reaches ONNX
    Runtime, whose failure had come out as a traceback."""
    bundle = make_bundle(tmp_path / "bundle", edit=_set_config("max_length", 1000))
    source = tmp_path / "prompts.txt"
    source.write_text("the cat\na dog\n" + "the cat saw a duck " * 2 + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--max-new-tokens", 2, "--batch-size", 1, "-q")
    assert result.code == 1, result
    assert "Traceback" not in result.err
    assert result.err.splitlines()[-1].startswith(
        "kerasllm: error: line 3: ONNX Runtime failed running the model (Error in execution: "), result.err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["1", "2"]  # finished lines kept


def test_a_graph_in_a_directory_with_another_tools_manifest_opens(tmp_path):
    from kerasllm.export.runtime import create_session

    (tmp_path / "manifest.json").write_text('{"name": "not a kerasllm bundle"}')
    path = tmp_path / "model.onnx"
    path.write_bytes(_decoder_graph(12).SerializeToString())
    assert create_session(path, "cpu").path == str(path)



def test_a_bad_ort_spinning_setting_is_a_usage_error_not_a_broken_graph(run_cli, tmp_path, prompts, monkeypatch):
    """The setting was read inside the graph load's error handling: a healthy bundle was reported as
    "ONNX Runtime cannot load this graph (KERASLLM_ORT_SPINNING ...)", exit 1."""
    bundle = make_bundle(tmp_path / "bundle")
    monkeypatch.setenv("KERASLLM_ORT_SPINNING", "maybe")
    result = run_cli("generate", bundle, "-i", prompts, "-o", tmp_path / "out.jsonl", "--max-new-tokens", 2, "-q")
    assert result.code == 2, result
    assert result.err.strip().splitlines() == [
        "kerasllm: error: KERASLLM_ORT_SPINNING must be 0 or 1 (also true/false, yes/no, on/off), got 'maybe'"]


def test_a_bad_ort_spinning_setting_is_not_taken_for_a_failed_cuda_session(tmp_path, monkeypatch):
    """The CUDA branch had turned the same error into "device cuda: CUDA session failed (...)". ORT's
    CUDA provider is only listed here (this machine may have no GPU); no session is opened."""
    import onnxruntime as ort

    from kerasllm.errors import UsageError
    from kerasllm.export.runtime import create_session

    path = tmp_path / "model.onnx"
    path.write_bytes(_decoder_graph(12).SerializeToString())
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setenv("KERASLLM_ORT_SPINNING", "maybe")
    for device in ("cuda", "auto"):
        with pytest.raises(UsageError, match="^KERASLLM_ORT_SPINNING must be 0 or 1 "):
            create_session(path, device)


def test_a_graph_is_opened_from_the_bytes_checked_against_the_manifest(tmp_path):
    """`Bundle.graph_bytes` reads a graph once and checks it against the loaded manifest; sessions opened
    from those bytes run them whatever the directory holds later (a translate job's worker threads had
    opened the files as they were by then, unchecked: a bundle replaced mid-job gave another model's
    outputs). A graph replaced before it is read is refused in one line."""
    from kerasllm.export.bundle import load_bundle

    bundle = load_bundle(make_bundle(tmp_path / "bundle"))
    graph = bundle.graph_bytes("model")
    (bundle.path / "model.onnx").write_bytes(b"another model")  # replaced after the check
    session = bundle.open_session("model", "cpu", graph=graph)
    assert session.path == str(bundle.path / "model.onnx")  # messages still name its file
    past = np.zeros((1, HEADS, 0, HEAD_DIM), np.float32)
    feeds = {"input_ids": np.array([[1]]), "attention_mask": np.array([[1]]),
             **{f"past_key_values.{layer}.{kind}": past for layer in range(LAYERS) for kind in ("key", "value")}}
    assert session.session.run(["logits"], feeds)[0].shape == (1, 1, bundle.config["vocab_size"])
    with pytest.raises(BundleError, match=r"^\S+: 'model\.onnx' does not match its sha256 in the manifest \(modified or "
                                          r"corrupt\)$"):
        bundle.graph_bytes("model")
    (bundle.path / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"^\S+: 'model\.onnx' cannot be read \(No such file or directory\)$"):
        bundle.graph_bytes("model")
