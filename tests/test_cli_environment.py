"""The CLI in the environments it meets: no home directory, an unusable or odd cache directory,
stderr closed, another KERAS_BACKEND, a keras.json floatx, a memory limit, options before SOURCE."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from kerasllm.cli import _runs_keras, configure_tensorflow, machine_key, prune_xla_cache, xla_cache_limit  # noqa

CACHE_VARIABLES = ("TF_XLA_FLAGS", "KERASLLM_XLA_CACHE", "XDG_CACHE_HOME")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus_file, cli_code):
    out = tmp_path_factory.mktemp("env") / "lm"
    assert cli_code("train", "causal-lm", "--data", corpus_file, "--out", out, "--preset", "tiny", "--steps", "2",
                    "--seq-len", "32", "--batch-size", "8", "--no-jit-compile", "--quiet") == 0
    return out


@pytest.fixture
def cache_environment(monkeypatch):
    """No cache setting of this process's (an earlier in-process `kerasllm` run set TF_XLA_FLAGS);
    monkeypatch puts every variable back afterwards."""
    for name in (*CACHE_VARIABLES, "XLA_FLAGS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _environment(**changes) -> dict[str, str]:
    """This process's environment for a `kerasllm` subprocess: no cache setting of its own, then `changes`."""
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    env.update(changes)
    return env


def _kerasllm(*args, env, stderr_closed=False, code="from kerasllm.cli import main; main()"):
    command = [sys.executable, "-c", code, *map(str, args)]
    if stderr_closed:  # `2>&-`: the child starts with descriptor 2 closed (sys.stderr None)
        command = ["bash", "-c", 'exec "$@" 2>&-', "bash", *command]
    return subprocess.run(command, capture_output=not stderr_closed, text=True, timeout=300, env=env)


# -- the XLA compilation cache ------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["XDG_CACHE_HOME under a file", "XDG_CACHE_HOME in /proc", "KERASLLM_XLA_CACHE"])
def test_an_unusable_xla_cache_directory_is_left_out_with_a_notice(cache_environment, tmp_path, where):
    """TensorFlow was handed a cache directory it could not create or write (a read-only home,
    XDG_CACHE_HOME under /proc or a file) and failed the first compiled call in a traceback."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    if where == "XDG_CACHE_HOME under a file":
        cache_environment.setenv("XDG_CACHE_HOME", str(a_file))
        expected = f"cannot write {a_file}/kerasllm/xla: Not a directory"
    elif where == "XDG_CACHE_HOME in /proc":
        cache_environment.setenv("XDG_CACHE_HOME", "/proc/nope")
        expected = "cannot write /proc/nope/kerasllm/xla: "
    else:
        cache_environment.setenv("KERASLLM_XLA_CACHE", str(a_file / "xla"))
        expected = f"cannot write {a_file}/xla: Not a directory"
    notice = configure_tensorflow()
    assert "TF_XLA_FLAGS" not in os.environ
    assert notice.startswith(f"XLA compilation cache off: {expected}"), notice
    assert notice.endswith("(set KERASLLM_XLA_CACHE to a writable directory, or to off)")


def test_an_export_with_an_unusable_cache_runs_without_it(model_dir, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    done = _kerasllm("export", model_dir, "--out", tmp_path / "bundle", env=_environment(XDG_CACHE_HOME=str(a_file)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    notices = [line for line in done.stderr.splitlines() if "XLA compilation cache" in line]
    assert notices == [f"kerasllm: XLA compilation cache off: cannot write {a_file}/kerasllm/xla: Not a directory "
                       "(set KERASLLM_XLA_CACHE to a writable directory, or to off)"], done.stderr


XLA_CACHE_SCRIPT = """
from kerasllm.cli import configure_tensorflow
assert configure_tensorflow() is None
import tensorflow as tf
tf.function(lambda x: x * 2.0 + 1.0, jit_compile=True)(tf.ones(3))
"""


def test_a_cache_path_with_spaces_and_quotes_reaches_tensorflow_whole(tmp_path):
    """TensorFlow splits TF_XLA_FLAGS at whitespace: the cache of XDG_CACHE_HOME="/x/cache dir" was
    written to a new directory /x/cache. A double-quoted value is read whole (XLA's parser)."""
    base = tmp_path / 'cache dir "q"'
    done = _kerasllm(code=XLA_CACHE_SCRIPT, env=_environment(XDG_CACHE_HOME=str(base), CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((base / "kerasllm" / "xla" / machine_key()).glob("xla_compile_cache__*")), list(tmp_path.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [base.name]  # no "cache" cut at the space


def test_the_cache_is_left_to_a_users_own_settings(cache_environment, tmp_path):
    cache_environment.setenv("KERASLLM_XLA_CACHE", "off")
    assert configure_tensorflow() is None and "TF_XLA_FLAGS" not in os.environ
    cache_environment.setenv("KERASLLM_XLA_CACHE", str(tmp_path / "mine"))
    cache_environment.setenv("TF_XLA_FLAGS", "--tf_xla_persistent_cache_directory=/theirs")
    assert configure_tensorflow() is None
    assert os.environ["TF_XLA_FLAGS"] == "--tf_xla_persistent_cache_directory=/theirs"
    cache_environment.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=2")
    assert configure_tensorflow() is None
    assert os.environ["TF_XLA_FLAGS"] == (f'--tf_xla_auto_jit=2 --tf_xla_persistent_cache_directory='
                                          f'"{tmp_path}/mine/{machine_key()}"')


def _cache_file(path, size, age_days):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    when = 1_700_000_000 - age_days * 86_400
    os.utime(path, (when, when))


def test_the_cache_is_pruned_to_its_limit_least_recently_used_first(tmp_path):
    """Nothing pruned XLA's cache: every new shape or option added programs, GBs over many runs.
    Only XLA's own files go: a KERASLLM_XLA_CACHE naming a directory with other files in it (a home's
    .cache) had lost them, least recently used first (the regression review)."""
    root = tmp_path / "xla"
    old_version = root / "tf2.20.0-cpuaaaa"
    current = root / "tf2.21.0-cpubbbb"
    for day in range(10):  # 10 files of 100 bytes, day 9 the oldest; the old version's are the oldest
        _cache_file((old_version if day >= 8 else current) / f"xla_compile_cache__{day}.pb", 100, day)
    theirs = [root / "notes.txt", root / "tf2.21.0-cpubbbb" / "mine.bin", root / "other" / "xla_compile_cache__theirs.pb"]
    for path in theirs:  # older than every program, and in the tree
        _cache_file(path, 1000, 30)
    prune_xla_cache(root, 1000)  # at the limit (the programs' 1000 bytes): nothing goes
    assert len(list(root.rglob("xla_compile_cache__?.pb"))) == 10
    prune_xla_cache(root, 900)  # over it: down to 80% (720 bytes), the least recently used first
    assert sorted(p.name for p in root.rglob("xla_compile_cache__?.pb")) == [
        f"xla_compile_cache__{day}.pb" for day in range(7)]
    assert not old_version.exists() and current.is_dir()  # emptied directories go, the root stays
    read_yesterday = current / "xla_compile_cache__6.pb"  # read since it was written: its access time is recent
    os.utime(read_yesterday, (1_700_000_000, read_yesterday.stat().st_mtime))
    prune_xla_cache(root, 600)  # 700 bytes: down to 480, days 5, 4 and 3 go; day 6's, read since, stays
    assert sorted(p.name for p in root.rglob("xla_compile_cache__?.pb")) == [
        f"xla_compile_cache__{day}.pb" for day in (0, 1, 2, 6)]
    assert all(path.is_file() for path in theirs)


def test_the_cache_is_kept_per_tensorflow_and_cpu_and_within_its_size(cache_environment, tmp_path):
    """XLA loads a program compiled for another CPU with only a log line ("could lead to execution
    errors such as SIGILL"): a home shared by machines of different CPUs gets a directory per CPU."""
    root = tmp_path / "cache"
    for day in range(30):  # 30 MB in an old layout's files, straight in the root
        _cache_file(root / f"xla_compile_cache__{day}__XLA_CPU_JIT.pb", 2**20, day)
    cache_environment.setenv("KERASLLM_XLA_CACHE", str(root))
    cache_environment.setenv("KERASLLM_XLA_CACHE_SIZE", "20M")
    assert configure_tensorflow() is None
    key = machine_key()
    assert re.fullmatch(r"tf\d+\.\d+\S*-cpu[0-9a-f]{12}", key), key
    assert f'--tf_xla_persistent_cache_directory="{root / key}"' in os.environ["TF_XLA_FLAGS"]
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) <= 16 * 2**20
    assert (root / key).is_dir()
    assert len(list(root.glob("xla_compile_cache__*"))) == 16  # the old layout's oldest 14 went


@pytest.mark.parametrize("setting, expected", [("", 2 * 2**30), ("500M", 500 * 2**20), ("1.5G", 3 * 2**29),
                                               ("2gib", 2 * 2**30), ("123456", 123456), (" 10 K ", 10 * 2**10)])
def test_the_cache_size_setting(monkeypatch, setting, expected):
    monkeypatch.setenv("KERASLLM_XLA_CACHE_SIZE", setting)
    assert xla_cache_limit() == expected


def test_a_bad_cache_size_is_one_line(tmp_path, model_dir):
    done = _kerasllm("export", model_dir, "--out", tmp_path / "bundle",
                     env=_environment(KERASLLM_XLA_CACHE=str(tmp_path / "cache"), KERASLLM_XLA_CACHE_SIZE="lots"))
    assert (done.returncode, done.stderr.splitlines()) == (
        2, ["kerasllm: error: KERASLLM_XLA_CACHE_SIZE='lots' is not a size (e.g. 500M or 2G)"]), done.stderr
    assert not (tmp_path / "bundle").exists()


# -- no home directory ----------------------------------------------------------------------------------
def _no_home(monkeypatch):
    """HOME unset and no passwd entry for the uid (arbitrary-uid containers): Path.home() raises."""
    import pwd

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)


def test_without_a_home_directory_only_the_cache_is_left_out(cache_environment, run_cli, tmp_path):
    """Every command had failed on Path.home(), --version and TF-free serving included, and
    with KERASLLM_XLA_CACHE=off too."""
    _no_home(cache_environment)
    result = run_cli("--version")
    assert (result.code, result.out) == (0, "kerasllm, version 0.1.0\n"), result
    result = run_cli("generate", tmp_path, "-i", tmp_path / "missing.txt")  # a serving command: past the start
    assert result.code == 2 and "missing.txt" in result.err, result
    assert configure_tensorflow(xla_cache=False) is None
    assert configure_tensorflow() == ("XLA compilation cache off: no home directory to keep it in "
                                      "(set KERASLLM_XLA_CACHE to a writable directory, or to off)")
    cache_environment.setenv("KERASLLM_XLA_CACHE", "off")
    assert configure_tensorflow() is None


NO_HOME = """
import pwd, sys
def no_entry(uid):
    raise KeyError(uid)
pwd.getpwuid = no_entry
from kerasllm.cli import main
main()
"""


def test_an_export_runs_without_a_home_directory(model_dir, tmp_path):
    """keras_hub's import (kagglehub) calls Path.home(): the export's validation failed there."""
    env = {k: v for k, v in _environment().items() if k != "HOME"}
    done = _kerasllm("export", model_dir, "--out", tmp_path / "bundle", "--quiet", env=env, code=NO_HOME)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr
    assert (tmp_path / "bundle" / "manifest.json").is_file()


# -- stderr closed ------------------------------------------------------------------------------------
def test_train_and_export_run_with_stderr_closed(corpus_file, model_dir, tmp_path):
    """`2>&-`: import_tensorflow_quietly flushed sys.stderr (None) and failed train and export
    with exit 1, nothing written, not even a message."""
    env = _environment(KERASLLM_XLA_CACHE="off")
    done = _kerasllm("train", "causal-lm", "--data", corpus_file, "--out", tmp_path / "run", "--preset", "tiny",
                     "--steps", "2", "--seq-len", "32", "--batch-size", "8", "--no-jit-compile", "--quiet",
                     env=env, stderr_closed=True)
    assert done.returncode == 0
    assert (tmp_path / "run" / "model.keras").is_file()
    done = _kerasllm("export", model_dir, "--out", tmp_path / "bundle", "--quiet", env=env, stderr_closed=True)
    assert done.returncode == 0
    assert (tmp_path / "bundle" / "manifest.json").is_file()


# -- KERAS_BACKEND ----------------------------------------------------------------------------------------
BACKEND_LINE = ("kerasllm: error: kerasllm needs Keras's TensorFlow backend; KERAS_BACKEND is 'jax' "
                "(unset it or set it to tensorflow)")


@pytest.mark.parametrize("command", ["train", "export", "generate"])
def test_another_keras_backend_is_one_usage_line(run_cli, monkeypatch, corpus_file, model_dir, tmp_path, command):
    """KERAS_BACKEND=jax had said "this command needs the Python package 'jax' (pip install jax)":
    advice that cannot help, kerasllm is TensorFlow code."""
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    args = {"train": ["train", "causal-lm", "--data", corpus_file, "--out", tmp_path / "run", "--steps", "1"],
            "export": ["export", model_dir, "--out", tmp_path / "bundle"],
            "generate": ["generate", "-i", corpus_file, model_dir]}[command]
    result = run_cli(*args)
    assert result.code == 2, result
    assert result.err.splitlines() == [BACKEND_LINE]
    assert not (tmp_path / "run").exists() and not (tmp_path / "bundle").exists()


BACKEND_SCRIPT = """
import os, kerasllm, kerasllm.export.runtime
print(os.environ["KERAS_BACKEND"])
try:
    kerasllm.CausalLM
except ImportError as err:
    print(err)
"""


@pytest.mark.parametrize("backend, expected", [
    ("", ["tensorflow"]),  # Keras reads "" as unset and would take keras.json's backend
    ("jax", ["jax", BACKEND_LINE.removeprefix("kerasllm: error: ")]),
])
def test_the_python_api_names_the_backend_it_needs(backend, expected):
    done = subprocess.run([sys.executable, "-c", BACKEND_SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KERAS_BACKEND": backend})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == expected


@pytest.mark.parametrize("module", ["kerasllm.models", "kerasllm.layers", "kerasllm.training", "kerasllm.optimizers",
                                    "kerasllm.modeldir", "kerasllm.recipes.causal_lm"])
def test_a_keras_side_package_imported_directly_names_the_backend_it_needs(module):
    """`import kerasllm.models` under KERAS_BACKEND=jax had failed inside Keras ("No module named 'jax'")."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KERAS_BACKEND": "jax"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "ImportError: " + BACKEND_LINE.removeprefix("kerasllm: error: ")


# -- keras.json's floatx ----------------------------------------------------------------------------------
def test_a_keras_json_floatx_of_float64_changes_neither_training_nor_export(run_cli, corpus_file, tmp_path):
    """The export built float64 graphs that ONNX Runtime's fused kernels could not run, and said fp32."""
    import keras

    keras.config.set_floatx("float64")  # what KERAS_HOME/keras.json {"floatx": "float64"} sets at import
    try:
        assert run_cli("train", "causal-lm", "--data", corpus_file, "--out", tmp_path / "run", "--preset", "tiny",
                       "--steps", "1", "--seq-len", "32", "--batch-size", "8", "--no-jit-compile", "--quiet").code == 0
        keras.config.set_floatx("float64")
        result = run_cli("export", tmp_path / "run", "--out", tmp_path / "bundle", "--quiet")
        assert result.code == 0, result
    finally:
        keras.config.set_floatx("float32")
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    assert {w.dtype for w in model.weights} == {"float32"}
    assert (tmp_path / "bundle" / "manifest.json").is_file()


# -- out of memory ------------------------------------------------------------------------------------
def _failing(error):
    def run(*args, **kwargs):
        raise error

    return run


@pytest.mark.parametrize("command, patched, error, expected", [
    ("generate", "kerasllm.cli.infer.run_job",
     MemoryError("Unable to allocate 469. MiB for an array with shape (20000, 2, 192, 16) and data type float32"),
     "out of memory (Unable to allocate 469. MiB for an array with shape (20000, 2, 192, 16) and data type "
     "float32): lower --batch-size, --max-batch-tokens or --window"),
    ("classify", "kerasllm.cli.infer.run_job", MemoryError(),
     "out of memory: lower --batch-size, --max-batch-tokens or --window"),
    ("evaluate", "kerasllm.evaluation.evaluate", MemoryError(), "out of memory: lower --batch-size"),
    # ulimit -v: the dynamic loader cannot map a C extension; a smaller batch would not help there
    ("generate", "kerasllm.cli.infer.run_job",
     ImportError("/venv/tokenizers/tokenizers.abi3.so: failed to map segment from shared object"),
     "out of memory (/venv/tokenizers/tokenizers.abi3.so: failed to map segment from shared object)"),
])
def test_out_of_memory_is_one_line_exit_1(run_cli, monkeypatch, tmp_path, command, patched, error, expected):
    """A MemoryError (numpy's allocation of a batch's cache) and an ImportError caused by a memory
    limit had ended in tracebacks of 30-70 lines."""
    monkeypatch.setattr(patched, _failing(error))
    inputs = tmp_path / "in.txt"
    inputs.write_text("a prompt\n")
    args = ["--data", inputs] if command == "evaluate" else ["-i", inputs, "-q"]
    result = run_cli(command, tmp_path, *args)
    assert result.code == 1, result
    assert result.err.splitlines() == [f"kerasllm: error: {expected}"]


def test_out_of_memory_while_an_extension_module_loads_gives_no_batch_hint(run_cli, monkeypatch, tmp_path):
    """An extension module has no Python body: its MemoryError (onnxruntime's under `ulimit -v`) came out
    of kerasllm's import hook's exec_module and had been told to lower --batch-size."""
    def exec_module(module):  # as kerasllm's _CountingLoader runs an extension's loader
        raise MemoryError()

    monkeypatch.setattr("kerasllm.cli.infer.run_job", lambda *a, **k: exec_module(None))
    (tmp_path / "in.txt").write_text("a prompt\n")
    result = run_cli("generate", tmp_path, "-i", tmp_path / "in.txt", "-q")
    assert (result.code, result.err.splitlines()) == (1, ["kerasllm: error: out of memory"]), result


def test_tensorflow_out_of_memory_in_training_is_one_line(run_cli, monkeypatch, tmp_path, corpus_file):
    """TensorFlow's own out-of-memory error (ResourceExhaustedError, not a MemoryError) had ended
    `kerasllm train` in a traceback with the graph's frames, node names and hints (~40 lines).
    Here a real one, from an allocation of 16 TiB inside a step's callback; the run keeps its
    checkpoint for --resume."""
    import tensorflow as tf

    from kerasllm import training

    original = training.ProgressLogger.on_train_batch_end

    @tf.function
    def allocate_too_much(n):
        return tf.reduce_sum(tf.zeros([n, 2**20]))

    def run_out_of_memory(self, batch, logs=None):
        original(self, batch, logs)
        if self.step == 5:
            allocate_too_much(tf.constant(2**22))

    monkeypatch.setattr(training.ProgressLogger, "on_train_batch_end", run_out_of_memory)
    out = tmp_path / "run"
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", out, "--preset", "tiny", "--steps", "8",
                     "--eval-interval", "2", "--eval-steps", "1", "--seq-len", "32", "--batch-size", "4",
                     "--no-jit-compile", "--quiet")
    assert result.code == 1, result
    assert len(result.err.splitlines()) == 1, result
    assert re.fullmatch(r"kerasllm: error: out of memory \(OOM when allocating tensor with shape\[4194304,1048576\] "
                        r"and type float on \S+CPU:0 by allocator \w+\): lower --batch-size or --seq-len\n",
                        result.err), result
    monkeypatch.setattr(training.ProgressLogger, "on_train_batch_end", original)
    assert not (out / "model.keras").exists()
    assert training.restored_epoch(out) == 2  # steps 1-4 checkpointed, the 5th step's interval lost
    resumed = run_cli("train", "causal-lm", "--data", corpus_file, "--out", out, "--resume", "--quiet")
    assert resumed.code == 0, resumed
    assert (out / "model.keras").is_file()


# -- which command lines load TensorFlow --------------------------------------------------------------
def test_a_model_directory_is_found_wherever_source_stands(tmp_path):
    """Only the word after the command was looked at: `generate -i prompts.txt runs/lm` imported
    TensorFlow unsilenced (six start-up lines on stderr, under --quiet too)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({}))
    for argv in (["generate", "-i", "prompts.txt", str(run), "--quiet"], ["-v", "generate", str(run)],
                 ["evaluate", "--data", "x.tsv", str(run)], ["generate", str(run)], ["export", str(run)],
                 ["-v", "train", "causal-lm"]):
        assert _runs_keras(argv), argv
    for argv in (["generate", "-i", "prompts.txt", str(bundle)], ["--version"], [], ["-v"],
                 ["sample-data", "corpus", "--out", str(run)], ["generate", "-i", "x" * 5000]):
        assert not _runs_keras(argv), argv


def test_out_of_memory_in_an_import_gives_no_batch_advice(run_cli, monkeypatch, tmp_path):
    """A MemoryError out of a module's import (ulimit -v) had advised a smaller --batch-size, which
    cannot help there."""
    (tmp_path / "hungry_extension.py").write_text("raise MemoryError()\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def run(*args, **kwargs):
        import hungry_extension  # noqa: F401

    monkeypatch.setattr("kerasllm.cli.infer.run_job", run)
    inputs = tmp_path / "in.txt"
    inputs.write_text("a prompt\n")
    result = run_cli("generate", tmp_path, "-i", inputs, "-q")
    assert (result.code, result.err.splitlines()) == (1, ["kerasllm: error: out of memory"]), result


def test_a_cache_disk_too_full_is_left_out_with_a_notice(cache_environment, tmp_path, monkeypatch):
    """XLA's failed write into a full cache disk ended training and export as "out of memory": a
    disk with less than 256 MiB free is not used for the cache."""
    import shutil

    cache_environment.setenv("KERASLLM_XLA_CACHE", str(tmp_path / "xla"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30 - 2**20, 2**20))
    notice = configure_tensorflow()
    assert "TF_XLA_FLAGS" not in os.environ
    assert notice == (f"XLA compilation cache off: {tmp_path / 'xla'} has 1 MiB free (< 256 MiB) "
                      "(set KERASLLM_XLA_CACHE to a writable directory, or to off)")


def test_a_disk_that_fills_during_the_run_is_named_not_called_out_of_memory(run_cli, monkeypatch, tmp_path):
    """TensorFlow's ResourceExhaustedError for XLA's cache write ("No space left on device") had
    read "out of memory ...: lower --batch-size or --seq-len"."""
    import tensorflow as tf

    cache = tmp_path / "xla" / "tf2.21.0-cpu0123"
    message = (f"{{{{function_node __inference_<lambda>_1943}}}} {cache}/xla_compile_cache__123-XLA_CPU_JIT.pbvm-"
               "0.tmp; No space left on device")

    def fill_the_disk(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, message)

    monkeypatch.setattr("kerasllm.cli.infer.run_job", fill_the_disk)
    inputs = tmp_path / "in.txt"
    inputs.write_text("a prompt\n")
    result = run_cli("generate", tmp_path, "-i", inputs, "-q")
    assert (result.code, result.err.splitlines()) == (1, [
        f"kerasllm: error: {cache}: no space left on device for XLA's compilation cache: free space there "
        "(set KERASLLM_XLA_CACHE to a writable directory, or to off)"]), result


# -- ONNX Runtime's telemetry ---------------------------------------------------------------------
@pytest.mark.parametrize("setting, written", [(None, False), ("0", True)])
def test_onnx_runtimes_telemetry_is_off_unless_the_user_keeps_it(tmp_path, setting, written):
    """ONNX Runtime (1.29 on) writes a device id under HOME at its import and uploads events; with a
    read-only HOME it printed a warning on every serving command. Off unless ORT_DISABLE_TELEMETRY is
    set (0: ONNX Runtime's default, which writes the id: what shows this test can see it)."""
    import onnxruntime

    if written and tuple(int(part) for part in onnxruntime.__version__.split(".")[:2]) < (1, 29):
        pytest.skip("ONNX Runtime before 1.29 collects no telemetry on Linux: nothing to see written")
    home = tmp_path / "home"
    home.mkdir()
    # (ONNX Runtime collects nothing where it sees a CI system: CI=true, as .ci/run sets, among them)
    ci = ("ORT_DISABLE_TELEMETRY", "CI", "GITHUB_ACTIONS", "TF_BUILD", "JENKINS_URL", "BUILD_ID", "ORT_RUNNING_UNIT_TESTS")
    env = {k: v for k, v in os.environ.items() if k not in ci}
    env["HOME"] = str(home)
    env.pop("XDG_CACHE_HOME", None)
    if setting is not None:
        env["ORT_DISABLE_TELEMETRY"] = setting
    code = ("import kerasllm.export.runtime, onnxruntime, sys; "
            "assert 'tensorflow' not in sys.modules; print(onnxruntime.get_available_providers()[-1])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert (result.returncode, result.stdout.strip()) == (0, "CPUExecutionProvider"), result.stderr
    assert (home / ".cache" / "Microsoft").exists() == written, sorted(p.name for p in home.rglob("*"))
