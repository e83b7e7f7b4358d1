"""The bundle directory: ONNX graph(s) + tokenizer + manifest.json. Never imports TensorFlow.

    bundle/
      manifest.json      what the bundle is and how to check it (below)
      model.onnx         decoder family; encoder-decoder bundles hold encoder.onnx + decoder.onnx
      tokenizer.json     the very file the model was trained with
      genai_config.json  decoder family: ONNX Runtime GenAI's configuration

The manifest (format version `FORMAT_VERSION`):

    {"format": "kerasllm-bundle", "format_version": 1, "family": "decoder", "task": "causal-lm",
     "config": {...family config...}, "special_ids": {"pad": 0, ...}, "tokenizer": "tokenizer.json",
     "dtype": "fp32", "opset": 17,
     "graphs": {"model": {"file": "model.onnx", "inputs": {name: {"dtype", "shape"}}, "outputs": {...},
                          "dynamic_axes": {name: {axis: name}}, "external_data": null}},
     "optimization": {...fusions applied...}, "validation": {...figures...},
     "tools": {"kerasllm": ..., "onnx": ..., "onnxruntime": ..., "tf2onnx": ..., ...},
     "train": {"seq_len": 64},
     "files": {"model.onnx": "<sha256>", "tokenizer.json": "<sha256>", ...}}

`train` (optional, absent from older bundles and from model dirs that did not record it):
the `--seq-len` the model was trained with; `kerasllm generate` warns when prompts plus
new tokens can go past it.

`graphs` maps a role to one file and its I/O, so the encoder and seq2seq families add
their graphs ("encoder", "decoder") without changing the format. `files` lists every
file but the manifest itself; `load_bundle` refuses a bundle whose files are missing,
extra graph files are unlisted, or whose hashes differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kerasllm.errors import BundleError, UsageError

FORMAT = "kerasllm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format", "format_version", "family", "task", "config", "graphs", "files", "tokenizer")


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    """Versions of the tools that wrote the bundle (only those installed)."""
    from importlib import metadata  # noqa: PLC0415

    versions = {}
    for name in ("kerasllm", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime-gpu", "onnxruntime",
                 "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in `directory` (but the manifest) into `manifest["files"]` and write it."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                "files": {p.relative_to(directory).as_posix(): sha256(p) for p in files}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return manifest


def commit_bundle(staging: Path, out: Path) -> None:
    """Move a finished staging directory to `out` in one rename (no half-written bundle)."""
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            raise UsageError(f"{out} exists and is not empty; choose a new --out")
    os.replace(staging, out)


def staging_dir(out: Path) -> Path:
    """A temporary directory beside `out` (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


@dataclass
class Bundle:
    """A verified bundle: its directory and manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    def graph_path(self, name: str = "model") -> Path:
        graphs = self.manifest["graphs"]
        if name not in graphs:
            raise BundleError(f"{self.path}: no {name!r} graph (has {', '.join(graphs)})")
        return self.path / graphs[name]["file"]

    def tokenizer(self):
        from kerasllm.tokenizers import TextTokenizer  # noqa: PLC0415

        return TextTokenizer.load(self.path / self.manifest["tokenizer"])


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and verify a bundle; raise `BundleError` naming what is wrong.

    Checks: manifest present and valid JSON with the required keys, a known format
    version, every graph and the tokenizer listed in `files`, every listed file present
    with its sha256 (skipped with `verify=False`).
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle directory")
    if not manifest_path.is_file():
        raise BundleError(f"{path}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest_path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{manifest_path}: incomplete manifest, missing {', '.join(missing)}")
    if manifest["format"] != FORMAT or manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: unsupported bundle format {manifest['format']!r} version "
                          f"{manifest['format_version']!r} (this kerasllm reads {FORMAT} {FORMAT_VERSION})")
    _check_manifest_fields(manifest, manifest_path)
    files = manifest["files"]
    needed = [g["file"] for g in manifest["graphs"].values()] + [manifest["tokenizer"]]
    unlisted = [f for f in needed if f not in files]
    if unlisted:
        raise BundleError(f"{manifest_path}: {unlisted[0]} is not listed in the manifest's files")
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{path}: incomplete bundle, {name} is missing")
        if verify and sha256(file) != digest:
            raise BundleError(f"{path}: {name} does not match its sha256 in the manifest (modified or corrupt)")
    return Bundle(path, manifest)


# Config fields every predictor reads from the manifest (written by every kerasllm version).
_CONFIG_FIELDS = ("vocab_size", "max_length", "num_layers", "num_heads", "hidden_dim", "pad_id", "bos_id", "eos_id")


def _check_manifest_fields(manifest: dict[str, Any], manifest_path: Path) -> None:
    """The manifest's graphs, files, tokenizer and config have the shapes the runtime reads
    (a hand-edited manifest gets one line naming the field, not a KeyError later)."""
    from kerasllm.config import config_from_dict  # noqa: PLC0415 - a dataclass module, no TensorFlow

    graphs, files = manifest["graphs"], manifest["files"]
    if not isinstance(graphs, dict) or not graphs or not all(
            isinstance(g, dict) and isinstance(g.get("file"), str) for g in graphs.values()):
        raise BundleError(f"{manifest_path}: graphs must map each graph's name to {{\"file\": ...}}")
    if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
        raise BundleError(f"{manifest_path}: files must map each file to its sha256")
    if not isinstance(manifest["tokenizer"], str):
        raise BundleError(f"{manifest_path}: tokenizer must be a file name")
    config = manifest["config"]
    if not isinstance(config, dict):
        raise BundleError(f"{manifest_path}: config must be a JSON object")
    missing = [name for name in _CONFIG_FIELDS if name not in config]
    if missing:
        raise BundleError(f"{manifest_path}: config is missing {', '.join(missing)}")
    try:
        config_from_dict(config)
    except UsageError as err:
        raise BundleError(f"{manifest_path}: {err}") from None
    if not all(isinstance(config[name], int) for name in ("pad_id", "bos_id", "eos_id")):
        raise BundleError(f"{manifest_path}: config: pad_id, bos_id and eos_id must be integers")


def genai_config(config: dict[str, Any], graph: dict[str, Any], special_ids: dict[str, int],
                 shared_buffer: bool = False) -> dict[str, Any]:
    """ONNX Runtime GenAI's `genai_config.json` for a decoder graph with GenAI's I/O names.

    `past_present_share_buffer` is true for a graph whose GroupQueryAttention updates one
    max-length buffer in place (export/optimize.py, `share_kv_buffer`), false for a cache
    that grows by concatenation; positions come from the attention mask.
    """
    return {
        "model": {
            "bos_token_id": special_ids.get("bos"),
            "context_length": config["max_length"],
            "decoder": {
                "session_options": {"log_id": "kerasllm", "provider_options": []},
                "filename": graph["file"],
                "head_size": config["hidden_dim"] // config["num_heads"],
                "hidden_size": config["hidden_dim"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": config["num_heads"],
                "num_hidden_layers": config["num_layers"],
                "num_key_value_heads": config["num_heads"],
            },
            "eos_token_id": special_ids.get("eos"),
            "pad_token_id": special_ids.get("pad"),
            "type": "gpt2",
            "vocab_size": config["vocab_size"],
        },
        "search": {
            "do_sample": False, "early_stopping": True, "max_length": config["max_length"], "min_length": 0,
            "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": shared_buffer,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
