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
unlisted (every file the runtime reads: graphs, their external data, tokenizers) or whose
hashes differ, and any name that is not a plain relative path inside the bundle. Readers open
the bytes they checked (`Bundle.read`), not the file again.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from kerasllm.errors import BundleError, UsageError

FORMAT = "kerasllm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format", "format_version", "family", "task", "config", "graphs", "files", "tokenizer")




def _modified(bundle: Path, name: str) -> BundleError:
    return BundleError(f"{bundle}: {name!r} does not match its sha256 in the manifest (modified or corrupt)")


def bundle_file(bundle: Path, name: str) -> Path:
    """`bundle / name` for a file name the manifest gives: how every reader joins them. BundleError
    (one line naming manifest.json and the name) unless the name is a plain relative path: absolute
    names and `..` parts had run graphs and tokenizers from anywhere on the machine. A file of the
    bundle may be a link, wherever it leads (a Hugging Face cache keeps snapshots as links to its
    blobs): its content is what the manifest's hash checks."""
    path = PurePosixPath(name)  # written by write_manifest as POSIX paths
    if path.is_absolute() or ".." in path.parts or "\0" in name or not name:
        raise BundleError(f"{bundle / MANIFEST}: file name {name!r} is not a relative path inside the bundle "
                          "(absolute, or with a '..' part)")
    return bundle / name


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
    """Move a finished staging directory to `out` in one rename (no half-written bundle), with the
    mode a plain `mkdir` of `out` would have had."""
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            raise UsageError(f"{out} exists and is not empty; choose a new --out")
    # mkdtemp made it 0700 (private while half-written); renamed as is, a bundle exported by one
    # account could not be read by the service account or container user that serves it.
    os.chmod(staging, _mkdir_mode(staging))
    os.replace(staging, out)


def _mkdir_mode(directory: Path) -> int:
    """The mode `mkdir` gives a new directory in `directory`: 0777 less the umask, plus a setgid
    parent's bit. Asked of the file system: `os.umask` can only be read by setting it, for the
    whole process (its other threads' files included)."""
    probe = directory / ".mkdir-mode"
    probe.mkdir()
    try:
        return probe.stat().st_mode & 0o7777
    finally:
        probe.rmdir()


def staging_dir(out: Path) -> Path:
    """A temporary directory beside `out` (same file system, so the final rename is atomic);
    `commit_bundle` gives it its final mode."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


@dataclass
class Bundle:
    """A verified bundle: its directory and manifest. `external_data`: each graph's external-data
    files (bundle-relative names, listed and hashed), empty for a graph whose weights are in its file."""

    path: Path
    manifest: dict[str, Any]
    external_data: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    def file(self, name: str) -> Path:
        """The path of file `name` of the manifest (`bundle_file`)."""
        return bundle_file(self.path, name)

    def graph_path(self, name: str = "model") -> Path:
        graphs = self.manifest["graphs"]
        if name not in graphs:
            raise BundleError(f"{self.path}: no {name!r} graph (has {', '.join(graphs)})")
        return self.file(graphs[name]["file"])

    def graph_files(self, role: str) -> list[str]:
        """The files graph `role` is read from: its own and its external data's."""
        return [self.manifest["graphs"][role]["file"], *self.external_data.get(role, ())]

    def read(self, name: str) -> bytes:
        """File `name`, read once and checked against the manifest's sha256 (BundleError where it
        differs): what the readers open, so that they run what was checked whatever the directory
        holds by then (a redeploy replacing the bundle mid-job had given a job loaded from one
        model another model's graphs)."""
        try:
            data = self.file(name).read_bytes()
        except OSError as err:
            raise BundleError(f"{self.path}: {name!r} cannot be read ({err.strerror or err})") from None
        if hashlib.sha256(data).hexdigest() != self.manifest["files"].get(name):
            raise _modified(self.path, name)
        return data

    def open_session(self, role: str, device: str | None = None, threads: int | None = None,
                     graph: bytes | None = None):
        """An ONNX Runtime session (runtime.create_session) of graph `role`, checked against this
        manifest (`check_graph`): how every bundle predictor opens its graphs. `graph`: the graph's
        bytes from `graph_bytes` (read once for several sessions), else its file, opened by path.

        What opens is what was verified: the graph's files (its own and its external data) are hashed
        again, streamed, just before ONNX Runtime opens them by path, which leaves only ONNX Runtime's
        own read open to a change, rather than the time since the load. (Opened from its bytes instead,
        a graph was held twice at once: a 326 MB graph's session peaked 0.4 GB higher and opened 0.6 s
        slower. A graph with external data has to open by path anyway, for ONNX Runtime to find its data
        beside it: from bytes it looks in the working directory.)"""
        from kerasllm.export.runtime import create_session  # noqa: PLC0415 - ONNX Runtime loads here

        if self.external_data.get(role):
            if graph is not None:
                raise ValueError(f"graph {role!r} keeps its weights in external data: open it by path")
            try:
                os.fsdecode(self.graph_path(role)).encode("utf-8")
            except UnicodeEncodeError:
                # ONNX Runtime takes a path as UTF-8 text (runtime.create_session opens a graph in such a
                # directory from its bytes), and from bytes it would look for the data in the working directory.
                raise BundleError(f"{self.path}: graph {role!r} keeps its weights in external data, which ONNX Runtime "
                                  "reads only from a directory whose path is UTF-8: move the bundle") from None
        if graph is None:
            for name in self.graph_files(role):
                self.verify(name)
        session = create_session(self.graph_path(role), device, threads, graph=graph)
        check_graph(self, role, session.session.get_inputs(), session.session.get_outputs())
        return session

    def verify(self, name: str) -> None:
        """BundleError unless file `name` still matches the manifest's sha256 (streamed, not held)."""
        try:
            digest = sha256(self.file(name))
        except OSError as err:
            raise BundleError(f"{self.path}: {name!r} cannot be read ({err.strerror or err})") from None
        if digest != self.manifest["files"].get(name):
            raise _modified(self.path, name)

    def graph_bytes(self, role: str) -> bytes:
        """Graph `role`'s file, read once and checked (`read`), for `open_session(graph=...)`. Only
        for a graph whose weights are in its file (see `open_session`)."""
        self.graph_path(role)  # (BundleError for an unknown role)
        return self.read(self.manifest["graphs"][role]["file"])

    def load_tokenizer(self, name: str):
        """The tokenizer in file `name`, from its checked bytes (`read`)."""
        from kerasllm.tokenizers import TextTokenizer  # noqa: PLC0415

        return TextTokenizer.load(self.file(name), data=self.read(name))

    def tokenizer(self):
        """The (source) tokenizer, checked against the config's vocabulary (one with ids the graph
        lacks, its hash updated, had loaded and failed the job at the first record using them)."""
        from kerasllm.tokenizers import check_vocabulary  # noqa: PLC0415

        name = self.manifest["tokenizer"]
        tokenizer = self.load_tokenizer(name)
        check_vocabulary(tokenizer, int(self.config["vocab_size"]), self.file(name))
        return tokenizer

    def seq2seq_tokenizers(self):
        """`(source, target)` tokenizers of a seq2seq bundle (tokenizers.load_seq2seq_tokenizers), from
        their checked bytes."""
        from kerasllm.tokenizers import load_seq2seq_tokenizers  # noqa: PLC0415

        return load_seq2seq_tokenizers(self.path, self.config, self.manifest["tokenizer"],
                                       self.manifest.get("target_tokenizer"), load=self.load_tokenizer)


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and verify a bundle; raise `BundleError` naming what is wrong.

    Checks: manifest present and valid JSON with the required keys, a known format
    version, every file name a relative path inside the bundle (`bundle_file`), every
    file the runtime reads listed in `files` (graphs, the external data they reference,
    tokenizers), every listed file present with its sha256 (skipped with `verify=False`),
    and a `max_length` the graphs can hold (`_check_max_length`).
    """
    from kerasllm.tokenizers import TARGET_TOKENIZER_FILE  # noqa: PLC0415

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
    files, graphs = manifest["files"], manifest["graphs"]
    needed = [g["file"] for g in graphs.values()] + [manifest["tokenizer"]]
    if "target_tokenizer" in manifest or manifest["config"].get("target_vocab_size"):
        needed.append(manifest.get("target_tokenizer") or TARGET_TOKENIZER_FILE)  # as load_seq2seq_tokenizers
    for name in [*needed, *files]:  # before any of them is opened
        bundle_file(path, name)
    _check_listed(needed, files, manifest_path)
    scanned = {}
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{path}: incomplete bundle, {name!r} is missing")
        if verify and sha256(file) != digest:
            raise _modified(path, name)
    bundle = Bundle(path, manifest)
    for role, graph in graphs.items():
        name = graph["file"]
        if name not in scanned:
            scanned[name] = _graph_tensors(bundle.file(name), manifest_path)
        external = sorted({_external_name(name, location, path) for _, _, location in scanned[name]
                           if location is not None})
        _check_listed(external, files, manifest_path, f", the external data of {name!r},")
        bundle.external_data[role] = tuple(external)
    _check_max_length(manifest, manifest_path, scanned)
    return bundle


def _check_listed(names: Sequence[str], files: dict[str, str], manifest_path: Path, what: str = "") -> None:
    """BundleError naming the first of `names` that `files` does not list (and so does not hash)."""
    unlisted = [name for name in names if name not in files]
    if unlisted:
        raise BundleError(f"{manifest_path}: {unlisted[0]!r}{what} is not listed in the manifest's files")


def _external_name(graph: str, location: str, bundle: Path) -> str:
    """The bundle-relative name of external data at `location` (relative to its graph's directory,
    as ONNX Runtime reads it), refused as any manifest name that leads out of the bundle."""
    parent = PurePosixPath(graph).parent
    name = location if str(parent) == "." or PurePosixPath(location).is_absolute() else f"{parent}/{location}"
    bundle_file(bundle, name)
    return name


def _check_max_length(manifest: dict[str, Any], manifest_path: Path, graphs: dict[str, list]) -> None:
    """Refuse a `max_length` past the rows of the graphs' learned position tables where they have one
    (`*position_embeddings` initializers, [rows, hidden]); the config's own rule bounds it otherwise
    (kerasllm.config.MAX_LENGTH_CEILING). The runtime sizes buffers by it before it decodes a token."""
    max_length = manifest["config"]["max_length"]
    tables = [(dims[0], graph) for graph, tensors in graphs.items() for name, dims, _ in tensors
              if name.endswith("position_embeddings") and len(dims) == 2]
    if tables:
        rows, graph = min(tables)
        if max_length > rows:
            raise BundleError(f"{manifest_path}: config: max_length {max_length} is more than the {rows} positions "
                              f"of the graph's position table ({graph})")


# What `_graph_tensors` reads of ONNX's protobuf messages (onnx.proto's field numbers): each kind's
# fields holding messages, by number, and TensorProto's own.
_MESSAGE_FIELDS = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 10: "tensor", 6: "graph", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_DIMS, _TENSOR_NAME, _TENSOR_EXTERNAL_DATA = 1, 8, 13


def _graph_tensors(file: Path, manifest_path: Path) -> list[tuple[str, list[int], str | None]]:
    """`(name, dims, external-data location or None)` of every tensor of the ONNX graph in `file`:
    initializers, node attributes', subgraphs' and functions'.

    Read from the protobuf's wire format, by hand: the serving side has no `onnx` package, and
    this skips the weights by their lengths (the file is mapped, not read), where parsing the graph
    copies them all. A file that is not protobuf is refused here (ONNX Runtime could not load it
    either): a tensor this reader could not see would be external data read unverified.
    """
    size = file.stat().st_size
    if not size:
        return []
    tensors = []

    def walk(kind: str, data, start: int, end: int) -> None:
        if kind == "tensor":
            tensors.append(_tensor(data, start, end))
            return
        children = _MESSAGE_FIELDS[kind]
        for number, wire, value in _fields(data, start, end):
            if wire == 2 and number in children:
                walk(children[number], data, *value)

    try:
        with open(file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            walk("model", data, 0, size)
    except (ValueError, IndexError, RecursionError) as err:
        raise BundleError(f"{file}: not an ONNX graph this kerasllm can read ({err or type(err).__name__})") from None
    except OSError as err:
        raise BundleError(f"{file}: cannot be read ({err.strerror or err})") from None
    return tensors


def _tensor(data, start: int, end: int) -> tuple[str, list[int], str | None]:
    name, dims, location = "", [], None
    for number, wire, value in _fields(data, start, end):
        if number == _TENSOR_DIMS and wire == 0:
            dims.append(value - (1 << 64) if value >> 63 else value)
        elif number == _TENSOR_DIMS and wire == 2:  # packed
            pos, stop = value
            while pos < stop:
                dim, pos = _varint(data, pos)
                dims.append(dim - (1 << 64) if dim >> 63 else dim)
        elif number == _TENSOR_NAME and wire == 2:
            name = data[value[0]:value[1]].decode("utf-8", "replace")
        elif number == _TENSOR_EXTERNAL_DATA and wire == 2:
            entry = {key: data[span[0]:span[1]] for key, kind, span in _fields(data, *value) if kind == 2}
            if entry.get(1) == b"location":
                location = entry.get(2, b"").decode("utf-8", "surrogateescape")
    return name, dims, location


def _fields(data, start: int, end: int):
    """`(number, wire type, value)` of each field of the protobuf message in `data[start:end]`: the
    value of a varint, `(start, end)` of a length-delimited field, None for fixed-size ones."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value = None
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = (pos, pos + length), pos + length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:  # groups (proto2, no ONNX field) and invalid types
            raise ValueError(f"protobuf wire type {wire} at byte {pos}")
        if pos > end:
            raise ValueError(f"truncated protobuf field at byte {pos}")
        yield number, wire, value


def _varint(data, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError(f"protobuf varint too long at byte {pos}")


# Each family's tasks, as the recipes name them (recipes/causal_lm.py, models/encoder.py's
# ENCODER_TASKS, recipes/seq2seq.py).
FAMILY_TASKS = {"decoder": ("causal-lm",), "encoder": ("masked-lm", "classifier", "token-classifier"),
                "seq2seq": ("seq2seq",)}
# The manifest's `dtype` -> the ONNX Runtime type of the KV cache it travels in (exporter.py).
GRAPH_DTYPES = {"fp32": "tensor(float)", "fp16": "tensor(float16)"}

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
    for role, graph in graphs.items():
        for kind in ("inputs", "outputs"):  # read by check_graph; optional
            declared = graph.get(kind, {})
            if not isinstance(declared, dict):
                raise BundleError(f"{manifest_path}: graphs[{role!r}].{kind} must be a JSON object")
            for name, decl in declared.items():
                if not _tensor_decl(decl):
                    raise BundleError(f"{manifest_path}: graphs[{role!r}].{kind}[{name!r}] must be "
                                      f"{{\"dtype\": a name, \"shape\": a list of sizes and axis names}}, "
                                      f"got {json.dumps(decl)[:100]}")
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
    family, task = manifest["family"], manifest["task"]
    if not isinstance(family, str) or family not in FAMILY_TASKS:
        raise BundleError(f"{manifest_path}: unknown family {family!r} (choose from {', '.join(FAMILY_TASKS)})")
    if task not in FAMILY_TASKS[family]:
        raise BundleError(f"{manifest_path}: task {task!r} does not go with family {family!r} "
                          f"(its tasks: {', '.join(FAMILY_TASKS[family])})")
    if config.get("family") != family:
        raise BundleError(f"{manifest_path}: config: family {config.get('family')!r} in a {family} bundle")
    dtype = manifest.get("dtype", "fp32")
    if not isinstance(dtype, str) or dtype not in GRAPH_DTYPES:  # (a list is no key: TypeError, not False)
        raise BundleError(f"{manifest_path}: dtype must be one of {', '.join(GRAPH_DTYPES)}, got {dtype!r}")
    # Optional fields, read by the predictors as they are.
    train = manifest.get("train")
    if train is not None and not (isinstance(train, dict) and _positive_int_or_absent(train.get("seq_len"))):
        raise BundleError(f"{manifest_path}: train must be an object whose seq_len is a positive integer, "
                          f"got {json.dumps(train)[:100]}")
    labels = manifest.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(label, str) for label in labels)):
        raise BundleError(f"{manifest_path}: labels must be a list of label names")
    if "target_tokenizer" in manifest and not isinstance(manifest["target_tokenizer"], str):
        raise BundleError(f"{manifest_path}: target_tokenizer must be a file name")


def _tensor_decl(decl: Any) -> bool:
    """Whether `decl` is an I/O declaration as convert.TensorDecl writes it (both keys optional)."""
    if not isinstance(decl, dict) or not isinstance(decl.get("dtype", ""), str):
        return False
    shape = decl.get("shape")
    return shape is None or isinstance(shape, list) and all(d is None or isinstance(d, (int, str)) for d in shape)


def _positive_int_or_absent(value: Any) -> bool:
    return value is None or (type(value) is int and value > 0)


# The manifest's tensor dtypes (convert.TensorDecl) as ONNX Runtime names them.
_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
              "int32": "tensor(int32)"}


def check_graph(bundle: Bundle, role: str, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
    """Refuse graph `role` of `bundle` (BundleError, one line naming its file) where it is not the graph
    the manifest describes, judged from its inputs and outputs as ONNX Runtime reads them (`NodeArg`s:
    `name`, `type` such as "tensor(float)", `shape` of ints and axis names).

    Why: the manifest does not hash itself, so its fields can be edited without a checksum failing;
    a `config` that disagrees with the graph had passed until it broke a job halfway (a vocabulary
    the logits do not have) or never showed (the wrong dtype). What the I/O cannot show (max_length:
    the position table's rows) fails when ONNX Runtime runs the graph.
    Checked: each output the manifest records is there (older bundles' graphs may take fewer inputs),
    of its recorded dtype and fixed sizes, and so is each recorded input the graph has; the logits'
    and embeddings' last sizes against the config; the KV cache's layers, heads and head size against
    the config, its dtype against the manifest's.
    """
    file = bundle.graph_path(role)
    graph = {"input": {arg.name: arg for arg in inputs}, "output": {arg.name: arg for arg in outputs}}
    for kind in ("input", "output"):
        declared = bundle.manifest["graphs"][role].get(kind + "s")
        for name, decl in (declared.items() if isinstance(declared, dict) else ()):
            arg = graph[kind].get(name)
            if arg is None and kind == "input":
                continue  # (seq2seq_runtime reads which contract a decoder graph takes from its inputs)
            if arg is None:
                raise BundleError(f"{file}: the graph has no {kind} {name!r}, which the manifest lists (its "
                                  f"{kind}s: {', '.join(graph[kind]) or 'none'}): not this bundle's graph")
            decl = decl if isinstance(decl, dict) else {}
            dtype, shape = _ORT_TYPES.get(decl.get("dtype")), decl.get("shape")
            if not _matches(arg, dtype, shape):
                raise BundleError(f"{file}: the graph's {kind} {name!r} is {_show(arg.type, arg.shape)}, the manifest "
                                  f"lists {_show(decl.get('dtype'), shape)}: not this bundle's graph")
    config = bundle.config
    seq2seq = bundle.family == "seq2seq"
    if bundle.task in ("classifier", "token-classifier"):
        logits = "num_labels"
    else:
        logits = "target_vocab_size" if seq2seq and config.get("target_vocab_size") else "vocab_size"
    for name, config_field in (("logits", logits), ("embeddings", "hidden_dim")):
        arg, size = graph["output"].get(name), config.get(config_field)
        if arg is None or not isinstance(size, int) or not isinstance(arg.shape, list):
            continue
        if not _matches(arg, None, [None] * (len(arg.shape) - 1) + [size]):
            raise BundleError(f"{file}: the graph's output {name!r} is {_show(arg.type, arg.shape)}, but the config's "
                              f"{config_field} is {size}")
    past = [arg for name, arg in graph["input"].items() if name.startswith("past_key_values.")]
    if past and bundle.family in ("decoder", "seq2seq"):
        layers = (config.get("num_decoder_layers") or config["num_layers"]) if seq2seq else config["num_layers"]
        found = {arg.name.split(".")[1] for arg in past}
        if found != {str(i) for i in range(layers)}:
            raise BundleError(f"{file}: the graph's KV cache has {len(found)} layers, but the config has {layers}")
        heads, dtype = config["num_heads"], bundle.manifest.get("dtype", "fp32")
        for arg in past:
            if not _matches(arg, GRAPH_DTYPES[dtype], None):
                raise BundleError(f"{file}: the graph's KV cache is {arg.type} ({arg.name}), but the manifest's "
                                  f"dtype is {dtype}")
            if not _matches(arg, None, [None, heads, None, config["hidden_dim"] // heads]):
                raise BundleError(f"{file}: the graph's input {arg.name!r} is {_show(arg.type, arg.shape)}, but the "
                                  f"config's num_heads {heads} and hidden_dim {config['hidden_dim']} make "
                                  f"{heads} heads of {config['hidden_dim'] // heads}")


def _matches(arg: Any, dtype: str | None, shape: Any) -> bool:
    """Whether ONNX Runtime's `arg` is of `dtype` (None: any) and `shape` (not a list: any; None or
    a name in it: any size), where the graph fixes them."""
    if dtype is not None and arg.type != dtype:
        return False
    if not isinstance(shape, list) or not isinstance(arg.shape, list):
        return True
    return len(arg.shape) == len(shape) and all(not isinstance(want, int) or not isinstance(have, int) or want == have
                                                for want, have in zip(shape, arg.shape))


def _show(dtype: Any, shape: Any) -> str:
    dims = ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) if isinstance(shape, list) else "?"
    return f"{dtype} [{dims}]"


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
