"""Bundles as untrusted artifacts: every file the runtime reads is a plain relative path inside the
bundle, listed in the manifest and hashed, and opened from the bytes that were checked; manifest
values that would size allocations or crash a lookup are refused at load in one line.

Most bundles here are test_bundle_tamper's TensorFlow-free decoder stand-ins; the translate
cases use one tiny exported seq2seq bundle, built once per test session.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.external_data_helper import convert_model_to_external_data
from test_bundle_tamper import HEADS, HEAD_DIM, LAYERS, _decoder_graph, make_bundle

from kerasllm import datasets
from kerasllm.errors import BundleError
from kerasllm.export.bundle import load_bundle


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit(bundle: Path, edit) -> Path:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return bundle


def _generate(run_cli, bundle: Path, tmp_path: Path, cwd: Path | None = None):
    """`kerasllm generate` on two prompts: (result, output file)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\na dog\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    if cwd is not None:
        os.chdir(cwd)
    return run_cli("generate", bundle, "-i", prompts, "-o", out, "--max-new-tokens", 2, "-q"), out


def _refused(run_cli, bundle: Path, tmp_path: Path) -> str:
    """The one error line of `generate` on `bundle` (exit 1, no output, no traceback)."""
    result, out = _generate(run_cli, bundle, tmp_path)
    assert result.code == 1, result
    assert "Traceback" not in result.err and not out.exists(), result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    return lines[0]


def _external(bundle: Path, location: str = "w.bin", listed: bool = True) -> Path:
    """Move model.onnx's weights to external data at `location` (relative to the bundle), the graph
    rehashed and the data listed in `files` (or not)."""
    model = onnx.load(str(bundle / "model.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="w.bin", size_threshold=0,
                                   convert_attribute=True)
    onnx.save_model(model, str(bundle / "model.onnx"))  # writes bundle/w.bin
    if location != "w.bin":
        os.replace(bundle / "w.bin", bundle / location)
        model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save_model(model, str(bundle / "model.onnx"))

    def rehash(manifest):
        manifest["files"]["model.onnx"] = _sha(bundle / "model.onnx")
        if listed:
            manifest["files"][location] = _sha(bundle / location)

    return _edit(bundle, rehash)


# -- 1, 14: names that lead out of the bundle ------------------------------------------------------

def _outside(tmp_path: Path) -> tuple[Path, Path]:
    """A graph and a tokenizer outside the bundle (a stand-in bundle's own, moved out)."""
    source = make_bundle(tmp_path / "source")
    secret = tmp_path / "secret"
    secret.mkdir()
    shutil.move(source / "model.onnx", secret / "evil.onnx")
    shutil.move(source / "tokenizer.json", secret / "tok.json")
    return secret / "evil.onnx", secret / "tok.json"


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_manifest_names_outside_the_bundle_are_refused(run_cli, tmp_path, how):
    graph, tokenizer = _outside(tmp_path)
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "model.onnx").unlink()
    (bundle / "tokenizer.json").unlink()
    names = ({"graph": "../secret/evil.onnx", "tokenizer": "../secret/tok.json"} if how == "relative"
             else {"graph": str(graph), "tokenizer": str(tokenizer)})

    def point_out(manifest):
        manifest["graphs"]["model"]["file"], manifest["tokenizer"] = names["graph"], names["tokenizer"]
        manifest["files"] = {names["graph"]: _sha(graph), names["tokenizer"]: _sha(tokenizer)}

    _edit(bundle, point_out)
    line = _refused(run_cli, bundle, tmp_path)
    assert line == (f"kerasllm: error: {bundle / 'manifest.json'}: file name {names['graph']!r} is not a relative "
                    "path inside the bundle (absolute, or with a '..' part)")


def test_a_listed_file_anywhere_on_the_machine_is_refused_before_it_is_read(tmp_path):
    """No oracle: the same line whether /etc/passwd exists or matches."""
    for digest in ("0" * 64, _sha(Path("/etc/passwd"))):
        bundle = make_bundle(tmp_path / digest[:4], edit=lambda m, d=digest: m["files"].update({"/etc/passwd": d}))
        with pytest.raises(BundleError, match=r"manifest\.json: file name '/etc/passwd' is not a relative path "):
            load_bundle(bundle)


def test_files_that_are_links_load_wherever_they_lead_as_their_hashes_match(run_cli, tmp_path):
    """A Hugging Face cache keeps a snapshot's files as links to its blobs: the first confinement had
    refused such bundles (the regression review), though the hashes vouch for what the links hold."""
    graph, tokenizer = _outside(tmp_path)
    bundle = make_bundle(tmp_path / "bundle")
    for name, target in (("model.onnx", graph), ("tokenizer.json", tokenizer)):
        (bundle / name).unlink()
        (bundle / name).symlink_to(target)
    _edit(bundle, lambda m: m["files"].update({"model.onnx": _sha(graph), "tokenizer.json": _sha(tokenizer)}))
    result, out = _generate(run_cli, bundle, tmp_path)
    assert result.code == 0 and len(out.read_text().splitlines()) == 2, result
    graph.write_bytes(graph.read_bytes()[:-1] + b"\x00")  # what a link leads to is checked as any file
    with pytest.raises(BundleError, match="'model.onnx' does not match its sha256"):
        load_bundle(bundle)


def test_a_name_with_a_newline_is_quoted_on_one_line(run_cli, tmp_path):
    def rename(manifest):
        manifest["graphs"]["model"]["file"] = "model\n.onnx"
        manifest["files"]["model\n.onnx"] = "0" * 64

    bundle = make_bundle(tmp_path / "bundle", edit=rename)
    assert _refused(run_cli, bundle, tmp_path) == f"kerasllm: error: {bundle}: incomplete bundle, 'model\\n.onnx' is missing"


# -- 2, 3: every file read is listed and hashed; external data from the bundle only ---------------

def test_external_data_is_read_from_the_bundle_never_the_working_directory(run_cli, tmp_path):
    reference = make_bundle(tmp_path / "reference")
    result, out = _generate(run_cli, reference, tmp_path)
    assert result.code == 0, result
    expected = out.read_text()
    out.unlink()
    bundle = _external(make_bundle(tmp_path / "bundle"))
    assert load_bundle(bundle).external_data == {"model": ("w.bin",)}
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    np.zeros((bundle / "w.bin").stat().st_size // 4, np.float32).tofile(decoy / "w.bin")
    cwd = Path.cwd()
    try:
        result, out = _generate(run_cli, bundle, tmp_path, cwd=decoy)
    finally:
        os.chdir(cwd)
    assert result.code == 0, result
    assert out.read_text() == expected


def test_external_data_in_a_directory_whose_name_is_not_utf8_is_refused_in_one_line(tmp_path):
    """ONNX Runtime takes paths as UTF-8: such a graph was opened from its bytes, and its external
    data then looked for in the working directory."""
    _external(make_bundle(tmp_path / "cafe" / "bundle"))  # (onnx cannot save there itself)
    parent = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    os.rename(tmp_path / "cafe", parent)
    bundle = load_bundle(parent / "bundle")
    with pytest.raises(BundleError) as err:
        bundle.open_session("model", "cpu")
    assert str(err.value) == (f"{bundle.path}: graph 'model' keeps its weights in external data, which ONNX Runtime "
                              "reads only from a directory whose path is UTF-8: move the bundle")


def test_unlisted_external_data_is_refused(run_cli, tmp_path):
    bundle = _external(make_bundle(tmp_path / "bundle"), listed=False)
    assert _refused(run_cli, bundle, tmp_path) == (f"kerasllm: error: {bundle / 'manifest.json'}: 'w.bin', the external "
                                                   "data of 'model.onnx', is not listed in the manifest's files")


def test_external_data_outside_the_bundle_is_refused(tmp_path):
    (tmp_path / "bundle").mkdir()
    bundle = _external(make_bundle(tmp_path / "bundle" / "b"), location="../w.bin", listed=False)
    with pytest.raises(BundleError, match=r"manifest\.json: file name '\.\./w\.bin' is not a relative path "):
        load_bundle(bundle)


def test_external_data_of_a_constant_node_counts_too(tmp_path):
    """Tensors in node attributes can keep their data outside the graph as well."""
    bundle = make_bundle(tmp_path / "bundle")
    model = onnx.load(str(bundle / "model.onnx"))
    table = next(t for t in model.graph.initializer if t.name == "table")
    model.graph.initializer.remove(table)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["table"], value=table))
    (bundle / "model.onnx").write_bytes(model.SerializeToString())
    _external(bundle, listed=False)
    with pytest.raises(BundleError, match=r"'w\.bin', the external data of 'model\.onnx', is not listed"):
        load_bundle(bundle)


def test_an_unlisted_target_tokenizer_is_refused(tmp_path):
    def target(manifest):
        manifest["target_tokenizer"] = "target_tokenizer.json"

    bundle = make_bundle(tmp_path / "bundle", edit=target)
    shutil.copy(bundle / "tokenizer.json", bundle / "target_tokenizer.json")
    with pytest.raises(BundleError, match=r"^\S+manifest\.json: 'target_tokenizer\.json' is not listed in the "
                                          r"manifest's files$"):
        load_bundle(bundle)


# -- 4, 7, 12: values that sized allocations, crashed lookups or slipped past the check -----------

def test_an_implausible_max_length_is_refused_at_load(run_cli, tmp_path):
    bundle = make_bundle(tmp_path / "bundle", edit=lambda m: m["config"].update(max_length=10**12))
    assert _refused(run_cli, bundle, tmp_path) == (f"kerasllm: error: {bundle / 'manifest.json'}: config: max_length "
                                                   "must be an integer from 2 (a prompt token and a new one) up to 1048576, "
                                                   "got 1000000000000")


def test_a_long_context_model_without_a_position_table_exports_and_loads(run_cli, tmp_path):
    """The first ceiling (128k positions, at load only) refused the export of a rotary model trained with
    --max-length 200000, after all its work, and bundles the previous version had exported and served."""
    bundle = make_bundle(tmp_path / "bundle", edit=lambda m: m["config"].update(max_length=200_000))
    assert load_bundle(bundle).config["max_length"] == 200_000
    from kerasllm.config import DecoderConfig
    from kerasllm.errors import UsageError

    with pytest.raises(UsageError, match=r"^config: max_length must be an integer from 2 \(a prompt token and a new one\) up to 1048576, got 2000000$"):
        DecoderConfig.preset("tiny", vocab_size=40, max_length=2_000_000)  # refused where it is set, at training


def test_a_max_length_past_the_graphs_position_table_is_refused_at_load(tmp_path):
    """A learned position table (its exported name) bounds max_length to its rows."""
    bundle = make_bundle(tmp_path / "bundle")
    model = onnx.load(str(bundle / "model.onnx"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((16, 4), np.float32),
                                                                "lm/embedding/position_embeddings"))
    (bundle / "model.onnx").write_bytes(model.SerializeToString())
    _edit(bundle, lambda m: m["files"].update({"model.onnx": _sha(bundle / "model.onnx")}))
    assert load_bundle(bundle).config["max_length"] == 16
    _edit(bundle, lambda m: m["config"].update(max_length=17))
    with pytest.raises(BundleError, match=r"config: max_length 17 is more than the 16 positions of the graph's "
                                          r"position table \(model\.onnx\)$"):
        load_bundle(bundle)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(dtype=[1]), "dtype must be one of fp32, fp16, got [1]"),
    (lambda m: m["graphs"]["model"]["outputs"]["logits"].update(dtype=["float32"]),
     "graphs['model'].outputs['logits'] must be {\"dtype\": a name, \"shape\": a list of sizes and axis names}, got "
     "{\"dtype\": [\"float32\"], \"shape\": [\"batch\", \"sequence\", VOCAB]}"),
    (lambda m: m["graphs"]["model"]["inputs"]["input_ids"].update(dtype={"a": 1}),
     "graphs['model'].inputs['input_ids'] must be {\"dtype\": a name, \"shape\": a list of sizes and axis names}, "
     "got {\"dtype\": {\"a\": 1}, \"shape\": [\"batch\", \"sequence\"]}"),
    (lambda m: m["graphs"]["model"].update(outputs=[1]), "graphs['model'].outputs must be a JSON object"),
], ids=["dtype", "output-dtype-list", "input-dtype-object", "outputs-list"])
def test_unhashable_manifest_values_are_refused_in_one_line(run_cli, tmp_path, edit, message):
    bundle = make_bundle(tmp_path / "bundle", edit=edit)
    vocab = load_bundle(make_bundle(tmp_path / "plain")).config["vocab_size"]
    assert _refused(run_cli, bundle, tmp_path) == (f"kerasllm: error: {bundle / 'manifest.json'}: "
                                                   + message.replace("VOCAB", str(vocab)))


def test_a_tokenizer_id_past_the_vocabulary_is_refused_at_load_though_its_count_fits(run_cli, tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    tokenizer = json.loads((bundle / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab[max(vocab, key=vocab.get)] = 1000000
    (bundle / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    _edit(bundle, lambda m: m["files"].update({"tokenizer.json": _sha(bundle / "tokenizer.json")}))
    size = load_bundle(bundle).config["vocab_size"]
    assert _refused(run_cli, bundle, tmp_path) == (
        f"kerasllm: error: {bundle / 'tokenizer.json'}: token id 1000000, outside the model's vocabulary of {size} "
        f"(ids 0..{size - 1}): not this model's tokenizer")


# -- 13: what opens is what was verified -----------------------------------------------------------

def test_a_graph_or_tokenizer_replaced_after_the_load_is_refused_when_opened(tmp_path):
    bundle = load_bundle(make_bundle(tmp_path / "bundle"))
    other = _decoder_graph(bundle.config["vocab_size"])
    other.graph.initializer[-1].CopyFrom(onnx.numpy_helper.from_array(
        np.zeros_like(onnx.numpy_helper.to_array(other.graph.initializer[-1])), "table"))
    (bundle.path / "model.onnx").write_bytes(other.SerializeToString())  # a valid graph of the same shapes
    with pytest.raises(BundleError, match=r": 'model\.onnx' does not match its sha256 in the manifest"):
        bundle.open_session("model", "cpu")
    (bundle.path / "tokenizer.json").write_text((bundle.path / "tokenizer.json").read_text() + " ")
    with pytest.raises(BundleError, match=r": 'tokenizer\.json' does not match its sha256 in the manifest"):
        bundle.tokenizer()


def test_a_graph_with_external_data_is_reverified_when_opened(tmp_path):
    bundle = load_bundle(_external(make_bundle(tmp_path / "bundle")))
    session = bundle.open_session("model", "cpu")
    past = np.zeros((1, HEADS, 0, HEAD_DIM), np.float32)
    feeds = {"input_ids": np.array([[1]]), "attention_mask": np.array([[1]]),
             **{f"past_key_values.{layer}.{kind}": past for layer in range(LAYERS) for kind in ("key", "value")}}
    assert session.session.run(["logits"], feeds)[0].any()
    data = np.fromfile(bundle.path / "w.bin", np.uint8)
    data[:] = 0
    data.tofile(bundle.path / "w.bin")
    with pytest.raises(BundleError, match=r": 'w\.bin' does not match its sha256 in the manifest"):
        bundle.open_session("model", "cpu")
    with pytest.raises(ValueError, match="external data"):  # bytes would resolve it in the working directory
        bundle.open_session("model", "cpu", graph=(bundle.path / "model.onnx").read_bytes())


# -- translate: a real seq2seq bundle --------------------------------------------------------------

@pytest.fixture(scope="session")
def seq2seq_bundle(tiny_seq2seq_bundle) -> Path:
    return tiny_seq2seq_bundle


def test_translate_reads_external_data_from_the_bundle_on_every_worker(seq2seq_bundle, tmp_path, monkeypatch):
    """A graph with external data had been opened from bytes: ONNX Runtime looked for its data in
    the working directory (a decoy there was run, exit 0; the bundle's own was not found)."""
    from kerasllm.export.translate_predictor import BundleTranslator

    texts = [s for s, _ in datasets.number_words_pairs(12, max_value=999, seed=3)]
    one = BundleTranslator(seq2seq_bundle, device="cpu", threads=1)
    expected = one.translate(texts, max_new_tokens=6)
    bundle = tmp_path / "bundle"
    shutil.copytree(seq2seq_bundle, bundle)
    model = onnx.load(str(bundle / "encoder.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="w.bin", size_threshold=1024)
    onnx.save_model(model, str(bundle / "encoder.onnx"))
    _edit(bundle, lambda m: m["files"].update({"encoder.onnx": _sha(bundle / "encoder.onnx"),
                                                "w.bin": _sha(bundle / "w.bin")}))
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    np.zeros((bundle / "w.bin").stat().st_size, np.uint8).tofile(decoy / "w.bin")
    monkeypatch.chdir(decoy)
    many = BundleTranslator(bundle, device="cpu")
    many.max_shards = 2  # worker threads, whatever the machine's cores
    assert many.translate(texts, max_new_tokens=6) == expected
    assert [r for b in many.predict_batches([[many.check(t) for t in texts[i:i + 3]] for i in range(0, 12, 3)],
                                            max_new_tokens=6) for r in b] == expected


def test_a_seq2seq_max_length_past_its_position_table_is_refused_at_load(seq2seq_bundle, tmp_path):
    """evaluate had allocated batch x max_length before decoding a token (3 GB for 4,000,000)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(seq2seq_bundle, bundle)
    _edit(bundle, lambda m: m["config"].update(max_length=400_000))
    with pytest.raises(BundleError, match=r"config: max_length 400000 is more than the 32 positions of the graph's "
                                          r"position table \((de|en)coder\.onnx\)$"):
        load_bundle(bundle)


def test_seq2seq_evaluate_says_an_onnxruntime_failure_in_one_line(seq2seq_bundle, tmp_path, run_cli, monkeypatch):
    """As the other families' evaluations (test_modeldir_untrusted): ONNX Runtime failing on a batch had
    ended `kerasllm evaluate` of a seq2seq bundle in a traceback."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    def fail(*args, **kwargs):
        raise InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : indices element out of data bounds\nmore")

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", fail)
    monkeypatch.setattr(onnxruntime.InferenceSession, "run_with_iobinding", fail)
    data = tmp_path / "pairs.tsv"
    data.write_text("source\ttarget\nseven\t7\ntwenty one\t21\n", encoding="utf-8")
    result = run_cli("evaluate", seq2seq_bundle, "--data", data)
    assert result.code == 1 and "Traceback" not in result.err, result
    assert result.err.splitlines() == [
        f"kerasllm: error: {data}: line 2 (and 1 other record of its batch): ONNX Runtime failed running the model "
        "([ONNXRuntimeError] : 2 : INVALID_ARGUMENT : indices element out of data bounds)"], result.err
