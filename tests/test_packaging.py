"""Packaging: the wheel ships every package (pyproject's explicit package list must name them all)
and its data files, and what kerasllm requires stays free of what would slow every process."""

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapped = {name: ROOT / path for name, path in config["package-dir"].items()}
    found = set()
    for name, directory in mapped.items():
        for init in directory.rglob("__init__.py"):
            relative = init.parent.relative_to(directory).parts
            found.add(".".join((name, *relative)))
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_every_data_file_of_a_package_is_shipped():
    """Files a package reads at run time (export/graphs/*.onnx) are in pyproject's package-data."""
    import fnmatch

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = config.get("package-data", {})
    for name, path in config["package-dir"].items():
        directory = ROOT / path
        for data in directory.rglob("*.onnx"):
            # A file's pattern may sit under any package above it (`pkg: ["sub/*.onnx"]`, `pkg.sub: ["*.onnx"]`).
            parts = data.relative_to(directory).parts
            patterns = [(".".join((name, *parts[:depth])), "/".join(parts[depth:])) for depth in range(len(parts))]
            assert any(fnmatch.fnmatch(relative, pattern)
                       for package, relative in patterns for pattern in shipped.get(package, [])), data
            package = ".".join((name, *parts[:-1]))  # its own directory: a listed package, else setuptools warns
            assert package in config["packages"], f"add {package} to [tool.setuptools] packages"


def _requirement_names(distribution: str, seen: set[str]) -> set[str]:
    """Names of `distribution`'s installed requirements, recursively, extras left out."""
    for requirement in importlib.metadata.requires(distribution) or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            _requirement_names(name, seen)
        except importlib.metadata.PackageNotFoundError:
            pass  # an environment marker kept it out of this platform's install
    return seen


def test_kerasllm_does_not_install_scikit_learn():
    # With scikit-learn installed, `import keras` imports it and SciPy (its scikit-learn wrappers):
    # ~0.45 s added to every training and export process. Nothing kerasllm requires may pull it in.
    assert "scikit-learn" not in _requirement_names("kerasllm", set())


def _requirements(specs: list[str]) -> dict[str, str]:
    """{normalized name: requirement} of pyproject requirement strings."""
    return {re.split(r"[ ;<>=!~\[(]", spec, maxsplit=1)[0].lower().replace("_", "-"): spec for spec in specs}


# The serving side: the batch commands and `kerasllm evaluate` on bundles (no TensorFlow, no onnx).
SERVING_MODULES = ("kerasllm.cli", "kerasllm.cli.infer", "kerasllm.cli.evaluate", "kerasllm.evaluation",
                   "kerasllm.metrics", "kerasllm.tokenizers", *(f"kerasllm.export.{name}" for name in (
                       "batch", "bundle", "decoding_predictor", "encoder_predictor", "generate", "predict", "records",
                       "row_gather", "runtime", "seq2seq_runtime", "translate_predictor", "word_pieces")))


def test_the_serve_extra_holds_every_package_the_serving_side_imports():
    """README: `pip install --no-deps kerasllm` plus the `serve` extra's list is a serving-only
    environment. `kerasllm evaluate` on a seq2seq bundle imports sacrebleu (bleu, chrf) when it
    scores: left out of `serve`, it ended in a ModuleNotFoundError traceback there."""
    import json
    import subprocess
    import sys

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    serve = _requirements(project["optional-dependencies"]["serve"])
    assert serve.items() <= _requirements(project["dependencies"]).items()  # the same pins as a full install
    code = ("import json, sys; before = set(sys.modules)\n"
            f"for name in {SERVING_MODULES!r}: __import__(name)\n"
            "from kerasllm import metrics\n"
            "metrics.bleu(['forty two'], ['forty two']); metrics.chrf(['forty two'], ['forty two'])\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = set(json.loads(result.stdout.splitlines()[-1])) - set(sys.stdlib_module_names) - {"kerasllm"}
    installed = set()  # what `pip install` of the serve list brings: its requirements' own, recursively
    for name in serve:
        installed |= {name} | _requirement_names(name, set())
    owners = importlib.metadata.packages_distributions()
    missing = {module: owners.get(module) for module in imported
               if module in owners and not {d.lower().replace("_", "-") for d in owners[module]} & installed}
    assert not missing, f"add to pyproject's serve extra: {missing}"


@pytest.mark.parametrize("imports", ["import kerasllm, keras", "import keras, kerasllm",
                                     "import kerasllm; import tensorflow as tf; keras = tf.keras",
                                     # keras imported from inside a half-built kerasllm module (the
                                     # registration had failed, with a warning, on the circular import)
                                     "import kerasllm.layers, keras", "from kerasllm.optimizers import AdamW; import keras"])
def test_a_saved_model_loads_in_a_fresh_process_after_import_kerasllm(tmp_path, imports):
    """Keras finds kerasllm's classes once kerasllm is imported, whichever of the two came first
    (the models load lazily; loading had failed with "Could not locate class 'CausalLM'" unless
    a kerasllm model had been touched first); a process that imports no keras imports no TensorFlow."""
    import subprocess

    path = tmp_path / "lm.keras"
    save = ("import kerasllm; from kerasllm import CausalLM, DecoderConfig; "
            f"CausalLM(DecoderConfig.preset('tiny', vocab_size=64)).save({str(path)!r})")
    subprocess.run([sys.executable, "-c", save], check=True, capture_output=True, timeout=300)
    load = f"{imports}; print(type(keras.models.load_model({str(path)!r})).__name__)"
    result = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "CausalLM", result.stderr[-2000:]
    assert "could not be registered" not in result.stderr
    serving = ("import sys, kerasllm, kerasllm.export.runtime, kerasllm.tokenizers; "
               "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", serving], check=True, timeout=120)


def test_python_dash_m_kerasllm_runs():
    """`python -m kerasllm` (how the multi-worker tests and some launchers start it): runpy asks the
    module's loader for its code, which the registration hook's wrapper must pass on."""
    import subprocess

    result = subprocess.run([sys.executable, "-m", "kerasllm", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "kerasllm" in result.stdout, result.stderr[-2000:]
