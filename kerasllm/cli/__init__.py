"""The `kerasllm` command line: train, export and batch inference.

Sub-commands are imported only when run (click's lazy-group pattern), so a serving
command such as `kerasllm generate BUNDLE` never imports TensorFlow and starts fast.
Errors the user can act on print one line, `kerasllm: error: ...`, and exit 2 (usage)
or 1 (runtime); progress and logs go to stderr, results to stdout or the output file.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import click

from kerasllm import __version__, keras_backend_problem
from kerasllm.errors import KerasLLMError, ReaderGone, Terminated, UsageError, in_chain

# command name -> "module:attribute"
COMMANDS = {
    "train": "kerasllm.cli.train:train",
    "sample-data": "kerasllm.cli.data:sample_data",
    "evaluate": "kerasllm.cli.evaluate:evaluate",
    "export": "kerasllm.cli.export:export",
    "generate": "kerasllm.cli.infer:generate",
    "translate": "kerasllm.cli.infer:translate",
    "classify": "kerasllm.cli.infer:classify",
    "embed": "kerasllm.cli.infer:embed",
    "tag": "kerasllm.cli.infer:tag",
}

# The commands whose SOURCE is a bundle or a model directory (Keras, so TensorFlow)
SOURCE_COMMANDS = ("evaluate", "generate", "translate", "classify", "embed", "tag")

HELP = """Train transformer language models in Keras and serve them with ONNX Runtime.

\b
Example:
  kerasllm sample-data corpus --out corpus.txt
  kerasllm train causal-lm --data corpus.txt --out runs/lm --steps 500
"""


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use."""

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands or {}

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx, name):
        if name in self.lazy_commands:
            module, attr = self.lazy_commands[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


# XLA's CPU pipeline rewrites every reduction over more than 32 elements (layer norms over the
# hidden size, softmax over the keys, the loss over the vocabulary, each gradient's squared norm
# for clipping) into a reduce-window of 32 and a second reduce, each its own kernel that XLA
# cannot fuse: a precision measure for sums of millions of floats. A training step's are over
# hundreds of values, the largest over one weight matrix (the clipping norm's sums of squares:
# 65k values here, 2.4M for 'base'), where a plain reduce's float32 rounding is far below what
# clipping or a layer norm can notice.
# Without the rewrite the benchmark model's programs have a third fewer kernels (part_gradients
# 246 -> 160 fusions, apply_mean 254 -> 182) and compile sooner: medians of seeded processes
# alternated on 2 cores, part_gradients 1.23 -> 1.07 s (9/12 faster), apply_mean 0.95 -> 0.80 s
# (6/6), part_loss 0.63 -> 0.54 s (6/6), losses and weights after a step bit-identical. Whole
# 300-step `kerasllm train causal-lm` runs of bench_train_causal_lm.py's shape, 6 alternated
# pairs: 15.85 -> 15.16 s (median; 6/6 shorter), the same validation loss to the last digit.
# Set only for the CLI's own process (tests/test_cli_train.py): importing kerasllm leaves a
# user's XLA alone; `XLA_FLAGS=--xla_disable_hlo_passes=tree_reduction_rewriter` does the same there.
XLA_CPU_TRAINING_FLAGS = "--xla_disable_hlo_passes=tree_reduction_rewriter"


class _NoRetracingWarnings(logging.Filter):
    """Drops TensorFlow's "N out of the last N calls to <function ...> triggered tf.function
    retracing" warning.

    A batch job's batches come in uneven shapes (a window's last batch, the token budget,
    prompts of every length), and a model dir traces its generate/predict function once per
    shape by design; TensorFlow reads that as a mistake and warned again and again, under
    --quiet too, and twice (its own handler and ours: "WARNING:tensorflow:..." and
    "kerasllm: ..."). As a filter on the "tensorflow" logger it stops the record before any
    handler sees it; TensorFlow's other warnings pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def configure_tensorflow(xla_cache: bool = True) -> str | None:
    """Quiet TensorFlow's start-up chatter and its retracing warnings (`_NoRetracingWarnings`),
    skip XLA's tree-reduction rewrite (`XLA_CPU_TRAINING_FLAGS`, unless `XLA_FLAGS` already names
    passes to disable) and, with `xla_cache`, keep XLA's compiled programs between runs
    (`use_xla_cache`). Returns the notice of `use_xla_cache`, if any.
    """
    # Level 3 also hides "failed call to cuInit" on machines without a GPU; TensorFlow's
    # real failures still surface as Python exceptions.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")
    tf_logger = logging.getLogger("tensorflow")  # TensorFlow logs here; getting it imports nothing
    if not any(isinstance(f, _NoRetracingWarnings) for f in tf_logger.filters):
        tf_logger.addFilter(_NoRetracingWarnings())
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if "xla_disable_hlo_passes" not in xla_flags:
        os.environ["XLA_FLAGS"] = f"{xla_flags} {XLA_CPU_TRAINING_FLAGS}".strip()
    return use_xla_cache() if xla_cache else None


_XLA_CACHE_ADVICE = "(set KERASLLM_XLA_CACHE to a writable directory, or to off)"


def use_xla_cache() -> str | None:
    """Point TensorFlow's persistent XLA compilation cache at kerasllm's cache directory
    (`TF_XLA_FLAGS`, before TensorFlow loads). Returns None, or a one-line notice saying why
    this process compiles without the cache.

    XLA compiles the train step anew in every process (~5-8 s for a small model on two
    cores); the cache makes a rerun of the same shape skip most of that. It lives in
    `$KERASLLM_XLA_CACHE` (`off` disables it), else `$XDG_CACHE_HOME/kerasllm/xla`, else
    `~/.cache/kerasllm/xla`. Only an optimisation: TensorFlow fails the first compiled call
    when it cannot write there (a read-only home, an XDG_CACHE_HOME under /proc), so a
    directory that cannot be created or written is skipped, as is a missing home directory
    (arbitrary-uid containers). Called only for commands that run Keras: serving commands,
    --help and --version never look for a home directory.

    The programs go in a subdirectory per TensorFlow version and CPU (`machine_key`), and the
    cache is kept under `KERASLLM_XLA_CACHE_SIZE` (`prune_xla_cache`).
    """
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if "tf_xla_persistent_cache_directory" in flags:  # the user's own cache: theirs to keep
        return None
    if flags.strip() and not flags.lstrip().startswith("-"):
        return None  # TF_XLA_FLAGS names a file of flags; anything appended would break its name
    setting = os.environ.get("KERASLLM_XLA_CACHE")
    if setting is not None and setting.lower() in ("", "off", "0", "false"):
        return None
    if setting is not None:
        cache = Path(setting)
    else:
        base = os.environ.get("XDG_CACHE_HOME", "")
        if not os.path.isabs(base):  # unset, empty or relative: the XDG spec says to ignore it
            try:
                home = Path.home()
            except RuntimeError:  # HOME unset and no passwd entry for this uid
                home = Path()
            if not home.is_absolute():  # also HOME="" (a cache in the current directory otherwise)
                return f"XLA compilation cache off: no home directory to keep it in {_XLA_CACHE_ADVICE}"
            base = home / ".cache"
        cache = Path(base) / "kerasllm" / "xla"
    limit = xla_cache_limit()
    root, cache = cache, cache / machine_key()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache):  # writable: the directory is not enough (a read-only mount)
            pass
    except OSError as err:
        return f"XLA compilation cache off: cannot write {root}: {err.strerror or err} {_XLA_CACHE_ADVICE}"
    prune_xla_cache(root, limit)
    # XLA's failed cache write is a ResourceExhaustedError that ends the command (a full cache disk
    # had stopped training and export as "out of memory"): a disk too full for it is skipped.
    free = shutil.disk_usage(cache).free
    if free < _XLA_CACHE_MIN_FREE:
        return (f"XLA compilation cache off: {root} has {free / 2**20:.0f} MiB free "
                f"(< {_XLA_CACHE_MIN_FREE // 2**20} MiB) {_XLA_CACHE_ADVICE}")
    # TensorFlow splits TF_XLA_FLAGS at whitespace, but reads a double-quoted value whole, with
    # backslash escapes (XLA's ParseArgvFromString): unquoted, a path with a space was cut there
    # and the cache written into the directory before the space.
    quoted = str(cache).replace("\\", "\\\\").replace('"', '\\"')
    os.environ["TF_XLA_FLAGS"] = f'{flags} --tf_xla_persistent_cache_directory="{quoted}"'.strip()
    return None


_XLA_CACHE_DEFAULT_SIZE = "2G"
_XLA_CACHE_MIN_FREE = 256 * 2**20  # a base-size model's programs are tens of MB
_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def xla_cache_limit() -> int:
    """The XLA cache's size limit in bytes: `KERASLLM_XLA_CACHE_SIZE` (bytes, or a number with K,
    M, G or T: binary units, as `du -h` prints), default 2G."""
    setting = os.environ.get("KERASLLM_XLA_CACHE_SIZE", "").strip() or _XLA_CACHE_DEFAULT_SIZE
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", setting, re.IGNORECASE)
    if match is None:
        raise click.UsageError(f"KERASLLM_XLA_CACHE_SIZE={setting!r} is not a size (e.g. 500M or 2G)")
    return int(float(match[1]) * _SIZE_UNITS[match[2].upper()])


def machine_key() -> str:
    """The XLA cache's subdirectory for this TensorFlow and this CPU, e.g. `tf2.21.0-cpu3f9a1c2d0b7e`.

    XLA's cache entries are machine code for the CPU that compiled them, and TensorFlow loads an
    entry compiled for another CPU with only a log line ("could lead to execution errors such as
    SIGILL"): a home directory shared by machines of different CPUs (a cluster's NFS home) would
    hand one machine another's AVX-512 code. Entries of another TensorFlow version are unread
    (XLA's own key) and only take room; apart, they are the first to be pruned.
    """
    import hashlib  # noqa: PLC0415
    import importlib.metadata  # noqa: PLC0415
    import platform  # noqa: PLC0415

    version = "unknown"
    for distribution in ("tensorflow", "tensorflow-cpu", "tf-nightly"):
        try:
            version = importlib.metadata.version(distribution)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    cpu = f"{platform.machine()} {platform.processor()}"
    try:  # Linux: the model and its instruction set extensions, as the kernel reports them
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            first_cpu = info.read().split("\n\n")[0]
        fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first_cpu.splitlines())}
        cpu += f" {fields.get('model name', '')} {fields.get('flags', '')}"
    except OSError:
        pass
    return f"tf{version}-cpu{hashlib.sha256(cpu.encode()).hexdigest()[:12]}"


# What XLA writes into its persistent cache (TensorFlow's naming): the only files pruning touches.
_XLA_CACHE_FILES = "xla_compile_cache__*"


def prune_xla_cache(root: Path, limit: int) -> None:
    """Keep XLA's programs under `root` within `limit` bytes: past it, the least recently used go (by
    the later of access and modification time: Linux's default relatime updates the access time of
    a file read once a day), down to 80% of the limit, and the `machine_key` directories that leaves
    empty. Only XLA's own files (`_XLA_CACHE_FILES`, in `root` as earlier versions kept them, or in
    a `machine_key` directory): a KERASLLM_XLA_CACHE naming a directory that holds other files too
    (a home's .cache, a project folder) leaves those alone.

    TensorFlow never deletes from its cache, and every new model shape or option adds programs
    (~1 MB each for the tiny preset, tens of MB for larger models): a machine running many
    trainings collected GBs. A program deleted while another run loads it is compiled again there.
    """
    files = []
    for path in [*root.glob(_XLA_CACHE_FILES), *root.glob(f"tf*-cpu*/{_XLA_CACHE_FILES}")]:
        try:
            stat = path.stat()
        except OSError:  # deleted meanwhile by another run's pruning
            continue
        files.append((max(stat.st_atime, stat.st_mtime), stat.st_size, path))
    total = sum(size for _, size, _ in files)
    if total <= limit:
        return
    emptied = set()
    for _, size, path in sorted(files):
        if total <= 0.8 * limit:
            break
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        if path.parent != root:
            emptied.add(path.parent)
    for directory in emptied:
        try:
            directory.rmdir()  # only if empty
        except OSError:
            pass


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kerasllm")
@click.option("-v", "--verbose", is_flag=True, help="Log debug details (and tracebacks) to stderr.")
@click.pass_context
def cli(ctx, verbose):
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="kerasllm: %(message)s",
                        stream=sys.stderr)
    if not verbose:
        # ONNX Runtime's transformer optimizer logs every fusion; the export prints a summary.
        logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    # TensorFlow, imported before this (main), gave its logger a stderr handler of its own, so its
    # records came out twice ("INFO:tensorflow: Using MirroredStrategy ..." and "kerasllm: Using
    # ..."), --quiet or not. They go through the handler above alone, and its INFO lines (strategy
    # and collective details; kerasllm says which strategy runs) only with -v.
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.handlers.clear()
    tf_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _discard_closed_stderr() -> None:
    """With stderr closed (`2>&-`, some daemons and job runners), put /dev/null in its place:
    descriptor 2 and `sys.stderr`.

    Python leaves `sys.stderr` None then, and every write to it (a flush, a progress bar, a
    log line) had failed the command with nothing written. And a free descriptor 2 is the
    next file opened: TensorFlow's and absl's C++ lines, written to descriptor 2, would land in
    a checkpoint or an output file.
    """
    try:
        os.fstat(2)
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        if devnull != 2:
            os.dup2(devnull, 2)
            os.close(devnull)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - the process's stderr from now on


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with file descriptor 2 silenced.

    TF 2.21 prints absl start-up lines (the oneDNN notice, "Could not find cuda drivers")
    before its logging is configured, ignoring TF_CPP_MIN_LOG_LEVEL. A failed import still
    raises its Python exception once stderr is back.
    """
    _discard_closed_stderr()
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401,PLC0415
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _home_for_keras_libraries() -> None:
    """Give this process a HOME where it has none (HOME unset and no passwd entry for the uid:
    arbitrary-uid containers): keras_hub imports kagglehub, which calls `Path.home()` at import
    and failed the export and a model dir's generation ("Could not determine home directory").
    The temporary directory is Keras's own fallback for an unusable home (its keras.json).
    Nothing of kerasllm's is kept there: `use_xla_cache`, which runs first, has left the cache off.
    """
    try:
        Path.home()
    except RuntimeError:
        os.environ["HOME"] = tempfile.gettempdir()


def _pin_float32() -> None:
    """Keras's default float type float32 in this process, whatever keras.json says.

    kerasllm's models and bundles are float32 (mixed precision is a policy on top): a keras.json
    `floatx` of float64 had built float64 models, trained them in float64 and exported float64
    graphs that ONNX Runtime's fused kernels cannot run ("fused attention failed validation").
    """
    import keras  # noqa: PLC0415

    keras.config.set_floatx("float32")


def _command(argv: list[str]) -> tuple[str | None, list[str]]:
    """The sub-command of a command line and the arguments after it (the group's own options,
    -v, --version and -h, take no value, so the command is the first word that is not one)."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            return arg, argv[i + 1:]
    return None, []


def _is_model_dir(arg: str) -> bool:
    try:
        return (Path(arg) / "model.keras").is_file()
    except (OSError, ValueError):  # a name too long for a path, a NUL: an option's value, not SOURCE
        return False


def _runs_keras(argv: list[str]) -> bool:
    """Whether this command line will load TensorFlow: training, export, or a model directory source.

    SOURCE may stand anywhere after the command (`generate -i prompts.txt runs/lm`): only the
    word right after it had been looked at, and TensorFlow's start-up lines then leaked."""
    command, rest = _command(argv)
    if command in ("train", "export"):
        return True
    return command in SOURCE_COMMANDS and any(_is_model_dir(arg) for arg in rest if not arg.startswith("-"))


# What lowers a command's memory, named in the out-of-memory line.
_MEMORY_OPTIONS = {
    "train": "--batch-size or --seq-len",
    "evaluate": "--batch-size",
    **dict.fromkeys(("generate", "translate", "classify", "embed", "tag"),
                    "--batch-size, --max-batch-tokens or --window"),
}


def _out_of_memory(err: BaseException | str, argv: list[str], hint: bool = True) -> str:
    """The one line for a command that ran out of memory (a MemoryError, TensorFlow's
    out-of-memory error's first line, or an import that could not map its library: a hint to lower
    the batch would not help there)."""
    detail = str(err).strip()
    line = f"out of memory ({detail})" if detail else "out of memory"
    command, rest = _command(argv)
    options = _MEMORY_OPTIONS.get(command or "")
    # Beam search holds batch x --num-beams rows of the model's cache: with beams in use they are named
    # first (`--num-beams 100000` on one record had been told to lower three options that cannot help it).
    beams = [value for flag, value in zip(rest, rest[1:]) if flag == "--num-beams"]
    beams += [arg.partition("=")[2] for arg in rest if arg.startswith("--num-beams=")]
    if options and command in ("generate", "translate") and any(value.strip() not in ("", "1") for value in beams):
        options = f"--num-beams, {options}"
    return f"{line}: lower {options}" if hint and options else line


def _raised_in_an_import(err: BaseException) -> bool:
    """Whether `err` came out of a module's import (a module's body is on its traceback below `main`;
    Python trims its import machinery's frames): a smaller batch would not have helped there."""
    import traceback  # noqa: PLC0415

    # ("exec_module": kerasllm's own import hook running an extension module's loader, which has no
    # Python body: a MemoryError importing onnxruntime under `ulimit -v` had been told to lower --batch-size.)
    return any(frame.f_code.co_name in ("<module>", "exec_module") for frame, _ in traceback.walk_tb(err.__traceback__))


def _import_out_of_memory(err: ImportError) -> bool:
    """Whether an import failed for want of memory (a memory limit, `ulimit -v`): the dynamic
    loader cannot map a C extension ("failed to map segment from shared object", "cannot
    allocate memory"), or the import ran into a MemoryError."""
    text = str(err).lower()
    return ("failed to map segment" in text or "cannot allocate memory" in text
            or in_chain(err, MemoryError) is not None)


def _tensorflow_disk_full(err: Exception) -> str | None:
    """The one line for TensorFlow's ResourceExhaustedError from a full disk (XLA writing a program
    to its cache when the disk filled during the run), else None: it had read "out of memory ...
    lower --batch-size"."""
    kind = type(err)
    if kind.__name__ != "ResourceExhaustedError" or not kind.__module__.startswith("tensorflow"):
        return None
    match = re.search(r"(\S+?);? No space left on device", str(err))
    if match is None:
        return None
    where = Path(match.group(1).rstrip(";:,"))
    if where.name.startswith("xla_compile_cache__"):
        return (f"{where.parent}: no space left on device for XLA's compilation cache: free space there "
                f"{_XLA_CACHE_ADVICE}")
    return f"{where}: no space left on device"


def _tensorflow_out_of_memory(err: Exception) -> str | None:
    """What TensorFlow's out-of-memory error (`ResourceExhaustedError`) says ran out, in one line,
    else None: its allocator's "OOM when allocating tensor with shape[...]" or XLA's "Out of memory
    while trying to allocate ...", without the graph's "Detected at node" frames, node names and
    hints around it. Matched by name: TensorFlow is not imported here (serving commands run
    without it). ONNX Runtime's failures are already one line where the batch runs
    (export/batch.py's RuntimeFailure)."""
    kind = type(err)
    if kind.__name__ != "ResourceExhaustedError" or not kind.__module__.startswith("tensorflow"):
        return None
    for line in str(err).splitlines():
        if re.search(r"\bOOM\b|out of memory", line, re.IGNORECASE):
            line = re.sub(r"\{\{.*?\}\}", "", line)  # {{function_node ...}}
            return re.sub(r"\s*\[Op:[^\]]*\].*$", "", line).strip()  # [Op:__inference_...] name:
    return "resource exhausted"


def _missing_package(err: ModuleNotFoundError) -> str | None:
    """The top-level package a command needed and did not find (e.g. TensorFlow for a model dir
    in a serving-only environment), or None where the missing module is kerasllm's own."""
    package = (err.name or "").split(".")[0]
    return package if package and package != "kerasllm" else None


def _interrupted_import(err: ImportError) -> bool:
    """Whether `err` is a Ctrl-C that landed during an import.

    Commands import their heavy modules lazily (a batch job imports onnxruntime when it runs,
    before its SignalGuard turns SIGINT into a clean stop), and a SIGINT arriving in the middle of
    a C extension's module initialisation comes out of the import as another exception:
    onnxruntime's raises `ImportError: initialization failed` *from* the KeyboardInterrupt. That is
    an interruption, not a broken installation: one line and exit 130, like any other Ctrl-C.
    """
    return in_chain(err, KeyboardInterrupt) is not None


# Control characters a message carries from the user's own names (a file name holding a newline, `$'a\nb'`),
# written as escapes: an error is one line, which scripts and log parsers rely on.
# (C0 but the tab, DEL, C1 with NEL and CSI, and the Unicode line and paragraph separators.)
_CONTROL_ESCAPES = ({code: f"\\x{code:02x}" for code in (*range(32), *range(0x7f, 0xa0)) if code != 9}
                    | {10: "\\n", 13: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def _discard_standard_output() -> None:
    """Point descriptor 1 at /dev/null: Python's flush of a standard output whose reader is gone would
    otherwise fail again at exit ("Exception ignored ... BrokenPipeError"), as its docs advise."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


def _say_error(message) -> None:
    click.echo(f"kerasllm: error: {str(message).translate(_CONTROL_ESCAPES)}", err=True)


def main(argv=None) -> None:
    _discard_closed_stderr()
    arguments = sys.argv[1:] if argv is None else list(argv)
    runs_keras = _runs_keras(arguments) and "--help" not in arguments and "-h" not in arguments
    try:
        if runs_keras and (problem := keras_backend_problem()) is not None:
            raise UsageError(problem)
        notice = configure_tensorflow(xla_cache=runs_keras)
        if notice is not None and "--quiet" not in arguments and "-q" not in arguments:
            click.echo(f"kerasllm: {notice}", err=True)
        if runs_keras:
            _home_for_keras_libraries()
            import_tensorflow_quietly()  # a serving-only environment: ModuleNotFoundError, one line below
            _pin_float32()
            # TensorFlow's modules are hundreds of thousands of long-lived objects: moved out of
            # the collector's reach, each garbage collection while Keras traces the train step
            # no longer walks them all again.
            gc.freeze()
        cli.main(args=argv, prog_name="kerasllm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("kerasllm: interrupted", err=True)
        sys.exit(130)
    except click.UsageError as err:
        # One line, like every other error (click's own show() prints Usage/Try/Error lines).
        hint = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
        _say_error(f"{err.format_message()}{hint}")
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KerasLLMError as err:
        logging.getLogger(__name__).debug("%s", err, exc_info=True)  # -v: the traceback
        _say_error(err)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("kerasllm: interrupted", err=True)
        sys.exit(130)
    except Terminated as err:
        from kerasllm.signals import name  # noqa: PLC0415

        signum = err.args[0] if err.args and isinstance(err.args[0], int) else 15
        try:
            click.echo(f"kerasllm: stopped by {name(signum)}", err=True)
        except OSError:  # SIGHUP from a terminal that closed: its stderr is gone too
            pass
        sys.exit(128 + signum)
    except ReaderGone:
        # The output's reader went away (`... | head`, a FIFO's reader): quietly, with what a Unix tool that
        # SIGPIPE ends exits with (128 + 13, `yes | head`); exit 1 had read as "some records failed".
        _discard_standard_output()
        sys.exit(141)
    except OSError as err:
        logging.getLogger(__name__).debug("%s", err, exc_info=True)  # -v: the traceback
        _say_error(err)
        sys.exit(1)
    except MemoryError as err:
        logging.getLogger(__name__).debug("%s", err, exc_info=True)  # -v: the traceback
        _say_error(_out_of_memory(err, arguments, hint=not _raised_in_an_import(err)))
        sys.exit(1)
    except ImportError as err:
        if _interrupted_import(err):
            click.echo("kerasllm: interrupted", err=True)
            sys.exit(130)
        if _import_out_of_memory(err):
            logging.getLogger(__name__).debug("%s", err, exc_info=True)  # -v: the traceback
            _say_error(_out_of_memory(err, arguments, hint=False))
            sys.exit(1)
        package = _missing_package(err) if isinstance(err, ModuleNotFoundError) else None
        if package is None:  # a module of kerasllm's own, or an import that broke: a bug, keep its traceback
            raise
        logging.getLogger(__name__).debug("%s", err, exc_info=True)  # -v: the traceback
        _say_error(f"this command needs the Python package '{package}' (pip install {package})")
        sys.exit(1)
    except Exception as err:
        disk_full = _tensorflow_disk_full(err)
        if disk_full is not None:
            logging.getLogger(__name__).debug("%s", err, exc_info=True)  # -v: the traceback
            _say_error(disk_full)
            sys.exit(1)
        detail = _tensorflow_out_of_memory(err)
        if detail is None:
            raise
        # TensorFlow's own out-of-memory error: the same one line as a MemoryError (its message goes
        # on for a dozen lines of graph nodes and hints).
        logging.getLogger(__name__).debug("%s", err, exc_info=True)  # -v: the traceback
        _say_error(_out_of_memory(detail, arguments))
        sys.exit(1)
    finally:
        # Everything is written by now. Interpreter shutdown with TensorFlow loaded spends
        # ~0.5 s in garbage collection of its objects; frozen, they are left to the OS.
        gc.freeze()
