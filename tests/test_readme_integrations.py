"""README's "Recording in your own loop, Hugging Face's Trainer or Lightning" blocks run as written.

Each block is the python fence right after a ``<!-- runs-as-test: NAME -->`` line in README.md. It
is executed in an empty folder; then the store it wrote must be finished with a live row per
training sample except the keys it forgot, those marked forgotten; the model's weights must have
moved by exactly those rows at their positions (read back with ``store.read``/``store.positions``,
not with scatter_add); and a second ``forget_keys`` of the same keys must be refused, changing
nothing.
"""

import re
from pathlib import Path

import numpy as np
import pytest

import gradstore
import unlearn
from unlearn.errors import RequestError
from unlearn.params import flat_params

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = re.compile(r"^<!-- runs-as-test: ([\w-]+) -->\n```python\n(.*?)^```$", re.S | re.M)
# name: (the store the block writes, its training samples, the keys it forgets)
EXPECTED = {"own-loop": ("grads.h5", 64, [12, 40]),
            "huggingface": ("bert.h5", 16, [3, 7]),
            "lightning": ("lightning.h5", 64, [3, 7])}


def blocks() -> dict:
    found = MARKER.findall(README.read_text(encoding="utf-8"))
    names = [name for name, _ in found]
    assert len(names) == len(set(names)), f"README: a runs-as-test name used twice: {names}"
    return dict(found)


def test_every_marked_block_is_tested():
    assert set(blocks()) == set(EXPECTED)


def run(name, tmp_path, monkeypatch):
    """Execute the block in tmp_path; return its namespace and the weights just before its forget_keys call."""
    code = blocks()[name]
    monkeypatch.chdir(tmp_path)
    before = []
    real = unlearn.forget_keys

    def spy(model, store, keys, *args, **kwargs):
        before.append(flat_params(model).astype(np.float64))
        return real(model, store, keys, *args, **kwargs)

    monkeypatch.setattr(unlearn, "forget_keys", spy)
    namespace: dict = {"__name__": f"readme_{name.replace('-', '_')}"}
    exec(compile(code, f"{README}:{name}", "exec"), namespace)  # noqa: S102
    monkeypatch.setattr(unlearn, "forget_keys", real)
    assert len(before) == 1, "the block calls unlearn.forget_keys once"
    return namespace, before[0]


def check(name, namespace, before, tmp_path):
    path, samples, forgotten = EXPECTED[name]
    model, result = namespace["model"], namespace["result"]
    assert result.keys.tolist() == forgotten and result.scale == 1.0
    after = flat_params(model).astype(np.float64)
    with gradstore.open(tmp_path / path) as store:
        info = store.info()
        assert info["finished"] and store.num_keys == samples
        assert info["rows_forgotten"] == len(forgotten) and info["rows_live"] == samples - len(forgotten)
        assert np.flatnonzero(store.state == gradstore.RowState.FORGOTTEN).tolist() == forgotten
        assert store.num_params == after.size
        change = np.zeros(store.num_params)
        for key, row in zip(forgotten, store.read(forgotten)):
            np.add.at(change, store.positions(key), row.astype(np.float64))
    assert np.abs(change).max() > 0
    tolerance = 4 * np.finfo(np.float32).eps * np.abs(after).max() + 1e-6 * np.abs(change).max()
    np.testing.assert_allclose(after - before, change, rtol=0, atol=tolerance)

    digest = (tmp_path / path).read_bytes()
    with pytest.raises(RequestError, match="not live"):
        unlearn.forget_keys(model, tmp_path / path, keys=forgotten[:1])
    assert np.array_equal(flat_params(model).astype(np.float64), after)
    assert (tmp_path / path).read_bytes() == digest


def test_own_loop(tmp_path, monkeypatch):
    namespace, before = run("own-loop", tmp_path, monkeypatch)
    check("own-loop", namespace, before, tmp_path)


def test_hugging_face_trainer(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    namespace, before = run("huggingface", tmp_path, monkeypatch)
    check("huggingface", namespace, before, tmp_path)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("checkpoint-*"))


def test_lightning(tmp_path, monkeypatch):
    pytest.importorskip("lightning.pytorch")
    namespace, before = run("lightning", tmp_path, monkeypatch)
    check("lightning", namespace, before, tmp_path)
