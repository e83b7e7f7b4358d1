"""Packaging: the wheel ships every package (pyproject's explicit package list must name them all)
and its data files, and what kerasllm requires stays free of what would slow every process."""

import importlib.metadata
import re
import tomllib
from pathlib import Path

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
            relative = data.relative_to(directory).as_posix()
            assert any(fnmatch.fnmatch(relative, pattern) for pattern in shipped.get(name, [])), relative


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
