"""`pip install amnesiac-gradstore` is the store alone: gradstore and its CLI never load torch,
and torch, the datasets' and the plots' packages are extras, not core dependencies."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_CORE = {"torch", "torchvision", "tqdm", "scikit-learn", "sklearn", "matplotlib", "opacus"}


def run_python(code, cwd):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          cwd=str(cwd))


def test_the_store_its_cli_and_gradstore_info_load_no_torch(tmp_path):
    result = run_python(
        f"""
        import runpy, sys

        import numpy as np

        import gradstore
        import gradstore.cli

        path = {str(tmp_path / "store.h5")!r}
        store = gradstore.create(path, num_params=2000, num_keys=40, keep=0.1, codec="int8", seed=3)
        store.accumulate(np.arange(40), np.full((40, store.k), 1e-3, np.float32))
        k = store.k
        finished = store.finalize()  # the finished store (None from older versions, which finish in place)
        (store if finished is None else finished).close()
        with gradstore.open(path) as reopened:
            assert reopened.read([0, 39]).shape == (2, k)
        assert "torch" not in sys.modules, "import gradstore / create / read loaded torch"

        sys.argv = ["gradstore", "info", path, "--json"]
        try:
            runpy.run_module("gradstore", run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code
        assert code == 0, code
        assert "torch" not in sys.modules, "gradstore info loaded torch"
        print("no torch")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert '"rows_live": 40' in result.stdout and result.stdout.rstrip().endswith("no torch")


def test_unlearn_without_torch_says_which_extra_to_install(tmp_path):
    result = run_python(
        """
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        import unlearn
        """,
        tmp_path,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError") and "torch" in last, result.stderr
    assert "pip install 'amnesiac-gradstore[unlearn]'" in last


def requirement_name(requirement):
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def load_pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)


def test_core_dependencies_name_no_torch_and_the_extras_do():
    project = load_pyproject()["project"]
    core = {requirement_name(requirement) for requirement in project["dependencies"]}
    assert {"numpy", "h5py", "hdf5plugin", "zstandard", "numba"} <= core
    assert not core & NOT_CORE, core & NOT_CORE
    extras = {name: {requirement_name(r) for r in requirements}
              for name, requirements in project["optional-dependencies"].items()}
    assert {"torch", "torchvision", "tqdm", "scikit-learn"} <= extras["unlearn"]
    assert {"torch", "matplotlib"} <= extras["bench"]
    assert {"pytest", "hypothesis"} <= extras["test"]


def test_the_quick_start_installs_every_extra_it_needs_and_nothing_offline_only():
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"pip install [^\n]*-e '\.\[([a-z,]+)\]'", makefile)
    assert match, "the Makefile installs the checkout with its extras"
    assert set(match.group(1).split(",")) == {"unlearn", "bench", "test"}


def source_packages():
    """Every package of the source tree (a folder with an __init__.py), as a path inside the wheel."""
    return sorted(str(init.parent.relative_to(ROOT)) for top in ("gradstore", "unlearn", "bench")
                  for init in (ROOT / top).rglob("__init__.py") if "__pycache__" not in init.parts)


def test_the_wheel_holds_every_package_and_both_py_typed(tmp_path):
    """Built offline (no build isolation, no dependencies) from a copy of the sources, so the checkout is untouched."""
    import shutil
    import zipfile

    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for top in ("gradstore", "unlearn", "bench"):
        shutil.copytree(ROOT / top, source / top, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "--quiet", str(source), "-w", str(tmp_path / "dist")],
                            capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = source_packages()
    assert {"gradstore", "unlearn", "unlearn/runs", "unlearn/cli", "bench", "bench/study"} <= set(packages)
    missing = [package for package in packages if f"{package}/__init__.py" not in names]
    assert not missing, f"packages left out of the wheel: {missing}"
    modules = {str(path.relative_to(ROOT)) for top in ("gradstore", "unlearn", "bench")
               for path in (ROOT / top).rglob("*.py") if "__pycache__" not in path.parts}
    assert not modules - names, f"modules left out of the wheel: {sorted(modules - names)}"
    assert {"gradstore/py.typed", "unlearn/py.typed"} <= names
