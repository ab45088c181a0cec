"""The command lines: `gradstore info PATH [--json]` and `gradstore verify PATH`; every error of
`gradstore`, `python -m unlearn` and `python -m bench` is one line on stderr, never a traceback."""

import json
import os
import shutil
import subprocess
import sys

import h5py
import pytest

import gradstore
from gradstore import cli

from conftest import sha256

REQUIRED_INFO = {
    "format_version", "num_params", "keep", "k", "codec", "seed", "rows_live", "rows_forgotten",
    "bytes_on_disk", "bytes_per_value", "finished",
}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gradstore", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_info_json(small_store):
    path, _ = small_store
    result = run_cli("info", path, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert REQUIRED_INFO <= set(info)
    with gradstore.open(path) as store:
        expected = store.info()
    assert info == json.loads(json.dumps(expected))
    assert info["rows_live"] == 300 and info["finished"] is True and info["k"] == 500


def test_info_table(small_store, capsys):
    path, _ = small_store
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()}
    assert REQUIRED_INFO <= set(lines)
    assert lines["rows_live"].strip() == "300"
    assert json.loads(lines["codec"]) == gradstore.get_codec("int8").get_config()


def test_verify_good_store(small_store):
    path, _ = small_store
    before = sha256(path)
    result = run_cli("verify", path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert sha256(path) == before


@pytest.mark.parametrize("chunk", [0, 1])
def test_verify_names_rows_of_a_damaged_chunk(small_store, tmp_path, chunk):
    path, _ = small_store
    damaged = tmp_path / "damaged.h5"
    shutil.copy(path, damaged)
    with gradstore.open(path) as store:
        rows = store.rows_per_chunk
    with h5py.File(damaged, "r") as f:
        chunk_info = f["rows/values"].id.get_chunk_info(chunk)
        assert chunk_info.chunk_offset == (chunk * rows, 0)
        offset, size = chunk_info.byte_offset, chunk_info.size
    with open(damaged, "r+b") as handle:
        handle.seek(offset + size // 2)
        byte = handle.read(1)
        handle.seek(offset + size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    result = run_cli("verify", damaged)
    assert result.returncode != 0
    lo, hi = chunk * rows, min(300, (chunk + 1) * rows)
    assert f"rows [{lo}, {lo + 1}, {lo + 2}" in result.stderr, result.stderr
    assert "chunk" in result.stderr and "FAILED" in result.stderr
    assert f"{hi - lo} row(s) affected" in result.stderr
    # the original is still fine
    assert run_cli("verify", path).returncode == 0


def test_verify_python_api_names_the_chunk_rows(small_store, tmp_path):
    path, _ = small_store
    damaged = tmp_path / "damaged.h5"
    shutil.copy(path, damaged)
    with h5py.File(damaged, "r") as f:
        chunk_info = f["rows/scales"].id.get_chunk_info(2)
    with open(damaged, "r+b") as handle:
        handle.seek(chunk_info.byte_offset + chunk_info.size // 2)
        byte = handle.read(1)
        handle.seek(chunk_info.byte_offset + chunk_info.size // 2)
        handle.write(bytes([byte[0] ^ 0x55]))
    with gradstore.open(damaged) as store:
        problems = store.verify()
        assert [problem["rows"] for problem in problems] == [list(range(262, 300))]
        with pytest.raises(gradstore.CorruptChunkError) as error:
            store.read([270])
        assert 270 in error.value.keys
        store.read([0, 261])  # other chunks still read


def test_info_on_non_hdf5_file(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not a store\n")
    result = run_cli("info", path)
    assert result.returncode != 0
    assert "not an HDF5 file" in result.stderr
    assert result.stdout == ""
    assert path.read_text() == "not a store\n"


def test_verify_on_missing_file(tmp_path):
    result = run_cli("verify", tmp_path / "absent.h5")
    assert result.returncode != 0
    assert "no such store" in result.stderr


# Every CLI failure is one line on stderr and a non-zero exit, never a traceback.

def assert_one_line_error(result, prefix, *words):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    for word in words:
        assert word in lines[0], lines[0]


def run_module(module, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two per-sample digits runs of one epoch: 100 and 60 training samples (the rest excluded)."""
    import numpy as np

    from unlearn.cli import main as unlearn_main

    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, count in (("a", 100), ("b", 60)):
        np.save(root / f"exclude-{name}.npy", np.arange(count, 1437))
        made[name] = root / name
        assert unlearn_main(["train", "--dataset", "digits", "--model", "simple", "--method", "per-sample",
                             "--epochs", "1", "--keep", "0.02", "--exclude-samples", str(root / f"exclude-{name}.npy"),
                             "--out", str(made[name]), "--quiet"]) == 0
    return made


def test_unlearn_forget_refuses_the_store_of_another_run(tiny_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["a"], run)
    shutil.copy(tiny_runs["b"] / "store.h5", run / "store.h5")  # recorded for 60 samples, the run has 100
    result = run_module("unlearn", "forget", run, "--class", "1", "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(result, "unlearn forget: error: ", "store.h5", "60 rows", "100 samples", "another run")
    assert not (tmp_path / "out").exists()


def test_unlearn_forget_refuses_weights_of_another_architecture(tiny_runs, tmp_path):
    import torch

    from unlearn.models import build_model

    run = tmp_path / "run"
    shutil.copytree(tiny_runs["a"], run)
    torch.save(build_model("resnet18", 1, 10).state_dict(), run / "model.pt")
    result = run_module("unlearn", "forget", run, "--class", "1", "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(result, "unlearn forget: error: ", "model.pt", "does not fit", "simple", "missing",
                          "unexpected")


def test_unlearn_forget_of_a_missing_run_dir(tmp_path):
    result = run_module("unlearn", "forget", tmp_path / "absent", "--class", "1", "--out", tmp_path / "out")
    assert_one_line_error(result, "unlearn forget: error: ", "absent", "not a directory")


def test_unlearn_forget_of_a_damaged_train_json(tiny_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["a"], run)
    text = (run / "train.json").read_text()
    (run / "train.json").write_text(text[: len(text) // 2])  # cut short, as by a full disk
    result = run_module("unlearn", "forget", run, "--class", "1", "--out", tmp_path / "out")
    assert_one_line_error(result, "unlearn forget: error: ", "train.json", "damaged", "not valid JSON")
    (run / "train.json").write_text(json.dumps({"dataset": "digits"}))  # valid JSON, not a run's
    result = run_module("unlearn", "forget", run, "--class", "1", "--out", tmp_path / "out")
    assert_one_line_error(result, "unlearn forget: error: ", "train.json", "lacks model")


def test_unlearn_train_bad_option_value(tmp_path):
    result = run_module("unlearn", "train", "--dataset", "digits", "--model", "simple", "--method", "none",
                        "--batch-size", "0", "--out", tmp_path / "run")
    assert_one_line_error(result, "unlearn train: error: ", "--batch-size")


def test_unlearn_train_mnist_missing_says_where_it_looked(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "MNIST_DIR"}
    result = subprocess.run([sys.executable, "-m", "unlearn", "train", "--dataset", "mnist", "--model", "simple",
                             "--method", "none", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert_one_line_error(result, "unlearn train: error: ", str(tmp_path.parent / "shared" / "data" / "mnist"),
                          "working directory", "--data-dir", "MNIST_DIR")


def test_bench_bad_input(tmp_path):
    result = run_module("bench", "purge", "--rows", "10", "--forget-fraction", "2", "--out", tmp_path / "purge")
    assert_one_line_error(result, "bench purge: error: ", "--forget-fraction")
    result = run_module("bench", "footprint", "--from-study", tmp_path / "no-study", "--out", tmp_path / "fp")
    assert_one_line_error(result, "bench footprint: error: ", "no-study")


def test_gradstore_cli_on_a_directory(tmp_path):
    result = run_cli("info", tmp_path)
    assert_one_line_error(result, "gradstore info: error: ", str(tmp_path), "directory")
