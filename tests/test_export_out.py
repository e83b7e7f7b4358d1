"""Where `kerasllm export --out` puts the bundle: a symbolic link gets it in its target.

The model and its graph are stand-ins (the export's own steps are tested in test_export_*.py):
what is checked here is where the finished bundle lands.
"""

from __future__ import annotations

import pytest

from kerasllm.config import DecoderConfig
from kerasllm.tokenizers import TextTokenizer


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    """A model directory whose load and graph export are stand-ins (a file for the graph)."""
    from kerasllm import modeldir
    from kerasllm.export import exporter

    tokenizer = TextTokenizer.train(["the cat saw a duck"], kind="char")
    config = DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size)
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.keras", "config.json"):  # what `kerasllm export` checks before loading
        (run / name).write_text("{}")
    monkeypatch.setattr(modeldir, "load_model_dir", lambda path, device=None: (
        None, tokenizer, {"task": "causal-lm", "model": config.to_dict()}))

    def export_graph(model, scratch, staging, options, log):
        import onnx  # noqa: PLC0415

        # An empty graph: the bundle's load reads a graph's tensors (for external data) and needs a protobuf.
        (staging / "model.onnx").write_bytes(onnx.helper.make_model(onnx.helper.make_graph([], "stand-in", [], []))
                                             .SerializeToString())
        return {"graphs": {"model": {"file": "model.onnx"}}, "optimization": {}}

    monkeypatch.setitem(exporter.FAMILY_EXPORTERS, "decoder", export_graph)
    return run


def test_an_out_that_is_a_symbolic_link_gets_the_bundle_in_its_target(run_cli, model_dir, tmp_path):
    """A link to an empty directory passed the check at the start, then failed after the whole export:
    "[Errno 20] Not a directory", the work lost."""
    from kerasllm.export.bundle import load_bundle

    bundles = tmp_path / "bundles"
    bundles.mkdir()
    for target in (tmp_path / "empty", tmp_path / "new"):  # an empty directory, and none yet
        if target.name == "empty":
            target.mkdir()
        link = bundles / f"to-{target.name}"
        link.symlink_to(target)
        result = run_cli("export", model_dir, "--out", link, "--quiet")
        assert (result.code, result.err) == (0, ""), result
        assert link.is_symlink() and load_bundle(link).manifest["files"]["model.onnx"]
        assert sorted(p.name for p in target.iterdir()) == ["genai_config.json", "manifest.json", "model.onnx",
                                                            "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundles", "empty", "new", "run"]  # no staging left
    assert sorted(p.name for p in bundles.iterdir()) == ["to-empty", "to-new"]
    # A link to a directory that is not empty is refused at the start, naming the link.
    result = run_cli("export", model_dir, "--out", bundles / "to-empty", "--quiet")
    assert (result.code, result.err.splitlines()) == (2, [f"kerasllm: error: {bundles / 'to-empty'} exists and is "
                                                          "not empty; choose a new --out"])


def test_an_export_its_own_load_refuses_leaves_out_as_it_was(run_cli, model_dir, tmp_path, monkeypatch):
    """The bundle was loaded (checked) only after it had taken --out: one refused there stayed, and the
    same export was then refused as "exists and is not empty"."""
    from kerasllm.export import exporter

    def export_graph(model, scratch, staging, options, log):
        (staging / "model.onnx").write_bytes(b"\x0f not a protobuf")
        return {"graphs": {"model": {"file": "model.onnx"}}, "optimization": {}}

    monkeypatch.setitem(exporter.FAMILY_EXPORTERS, "decoder", export_graph)
    out = tmp_path / "bundle"
    result = run_cli("export", model_dir, "--out", out, "--quiet")
    assert result.code == 1 and "not an ONNX graph this kerasllm can read" in result.err, result
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging left either


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP", "SIGINT dropped by Python"])
def test_a_stopped_export_leaves_no_staging_nor_scratch(run_cli, model_dir, tmp_path, monkeypatch, stop):
    """SIGTERM and SIGHUP had killed an export where it stood, its staging directory left beside
    --out and its scratch directory in $TMPDIR (graph-sized); a Ctrl-C that Python dropped inside a
    TensorFlow `__del__` had let the export finish and exit 0. Each now stops it as Ctrl-C does."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from kerasllm import signals  # noqa: PLC0415
    from kerasllm.export import exporter  # noqa: PLC0415

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    export_graph = exporter.FAMILY_EXPORTERS["decoder"]

    def stopped_midway(model, scratch, staging, options, log):
        entries = export_graph(model, scratch, staging, options, log)
        (scratch / "model.onnx").write_bytes(b"graph-sized")
        if stop == "SIGINT dropped by Python":
            signals.received = signal.SIGINT  # what the handler leaves when its raise is lost
        else:
            os.kill(os.getpid(), getattr(signal, stop))
        return entries

    monkeypatch.setitem(exporter.FAMILY_EXPORTERS, "decoder", stopped_midway)
    out = tmp_path / "bundle"
    # The default actions, which the export replaces, whatever this runner inherited (`nohup`: SIGHUP
    # ignored, and then left ignored); restored after.
    previous = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        result = run_cli("export", model_dir, "--out", out, "--quiet")
        restored = [signal.getsignal(s) for s in previous] == [signal.SIG_DFL] * 2  # the export's handlers gone
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    expected = (130, "kerasllm: interrupted") if stop.startswith("SIGINT") else (
        128 + getattr(signal, stop), f"kerasllm: stopped by {stop}")
    assert (result.code, result.err.splitlines()[-1]) == expected, result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tmp"]  # no bundle, no staging beside it
    assert list(scratch_root.iterdir()) == []
    assert restored and signals.received is None


def test_an_out_that_is_a_file_or_cannot_be_written_is_named_before_the_model_loads(run_cli, model_dir, tmp_path,
                                                                                   monkeypatch):
    """An empty file as --out had been "exists and is not empty"; a read-only directory had failed
    after TensorFlow and the model loaded, naming the hidden staging directory."""
    import os  # noqa: PLC0415

    from kerasllm import modeldir  # noqa: PLC0415

    a_file = tmp_path / "afile"
    a_file.write_text("")
    result = run_cli("export", model_dir, "--out", a_file)
    assert (result.code, result.err.splitlines()) == (2, [
        f"kerasllm: error: {a_file} is a file; --out names the bundle's directory (a new or empty one)"]), result

    def never(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(modeldir, "load_model_dir", never)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if os.access(read_only, os.W_OK):  # root writes anywhere: a directory under a file cannot be made
            read_only = a_file / "sub"
            reason = "Not a directory"
        else:
            reason = "Permission denied"
        result = run_cli("export", model_dir, "--out", read_only / "bundle")
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert (result.code, result.err.splitlines()) == (1, [
        f"kerasllm: error: {read_only / 'bundle'}: cannot write the bundle there ({reason})"]), result
