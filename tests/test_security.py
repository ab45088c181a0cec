"""No pickle in our formats: everything a run writes loads with weights_only / allow_pickle=False / json."""

import ast
import json
from pathlib import Path

import h5py
import numpy as np
import torch

from unlearn.cli import main as unlearn_main

ROOT = Path(__file__).resolve().parents[1]


def test_everything_a_run_writes_loads_without_pickle(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "forgot"
    assert unlearn_main(["train", "--dataset", "digits", "--model", "simple", "--method", "per-sample", "--epochs", "1",
                         "--keep", "0.02", "--checkpoint-every", "10", "--out", str(run), "--quiet"]) == 0
    assert unlearn_main(["forget", str(run), "--class", "2", "--out", str(out), "--quiet"]) == 0
    files = [p for p in list(run.rglob("*")) + list(out.rglob("*")) if p.is_file()]
    assert {p.suffix for p in files} <= {".pt", ".npy", ".json", ".h5"}, files
    for path in files:
        assert not path.read_bytes().startswith(b"\x80"), f"{path} is a bare pickle"
        if path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".npy":
            np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        else:
            with h5py.File(path) as f:  # no object (pickled) dtypes, no variable-length attributes
                f.visititems(lambda name, obj: _no_objects(name, obj))
                for value in f.attrs.values():
                    assert not isinstance(value, str), "JSON attributes are fixed-length bytes"


def _no_objects(name, obj):
    if isinstance(obj, h5py.Dataset):
        assert obj.dtype.kind != "O", name


def test_the_source_loads_nothing_with_pickle():
    """torch.load always with weights_only=True, np.load never allows pickle; pickle itself only reads CIFAR-100's files."""
    for path in list((ROOT / "gradstore").glob("*.py")) + list((ROOT / "unlearn").glob("*.py")) + list((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = getattr(node.func.value, "id", None)
                keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                where = f"{path.name}:{node.lineno}"
                if (owner, node.func.attr) == ("torch", "load"):
                    assert keywords.get("weights_only") is True, where
                if (owner, node.func.attr) == ("np", "load"):
                    assert keywords.get("allow_pickle") is False, where
                if owner == "pickle":
                    assert path.name == "data.py", f"{where}: pickle outside the CIFAR-100 reader"
