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

    from unlearn.runs.models import build_model

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


def test_unlearn_forget_of_a_train_json_with_an_unknown_method(tiny_runs, tmp_path, capsys):
    """train.json is read into a RunConfig: a method no version wrote is refused, naming the file and the value."""
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["a"], run)
    (run / "train.json").write_text(json.dumps({**json.loads((run / "train.json").read_text()), "method": "magic"}))
    result = run_unlearn(capsys, "forget", run, "--class", "1", "--out", tmp_path / "out")
    assert_one_line_error(result, "unlearn forget: error: ", "train.json", "'magic'")
    assert not (tmp_path / "out").exists()


def test_the_cli_refusals_are_typed_errors():
    """Callers may catch the kind of error (all ValueErrors, so the one-line report is unchanged)."""
    from unlearn.errors import RequestError, RunConfigError, RunFolderError
    from unlearn.forgetting import parse_scale
    from unlearn.runs import folders

    with pytest.raises(RequestError, match="--scale"):
        parse_scale("nan", 2.0**16)
    with pytest.raises(RequestError, match="class, feature, samples"):  # the registered rules, named
        parse_scale("cls", 2.0**16)
    assert parse_scale("auto", 1.0) == "auto" and parse_scale("0.5", 1.0) == 0.5 and parse_scale("class") == "class"
    with pytest.raises(RunFolderError):
        folders.load_json(__file__)  # not JSON
    assert all(issubclass(kind, ValueError) for kind in (RequestError, RunConfigError, RunFolderError))


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


# Issue 21: options refused before any work, and nothing written by a refused or failed command.

def run_unlearn(capsys, *args):
    """`python -m unlearn ARGS` in this process (no torch import per call): exit status and output."""
    from types import SimpleNamespace

    from unlearn.cli import main as unlearn_main

    capsys.readouterr()
    code = unlearn_main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def tree(folder):
    """{relative path: sha256} of every file under folder."""
    return {str(path.relative_to(folder)): sha256(path) for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("option", [["--scale", "nan"], ["--scale", "inf"], ["--scale", "1e40"], ["--scale", "-1"],
                                    ["--scale", "70000"], ["--retrain-epochs", "-1"]])
def test_unlearn_forget_refuses_a_bad_step_by_name_before_any_work(tiny_runs, tmp_path, capsys, option):
    result = run_unlearn(capsys, "forget", tiny_runs["a"], "--class", "1", *option, "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 2
    assert_one_line_error(result, "unlearn forget: error: ", option[0], option[1])
    assert not (tmp_path / "out").exists()


def test_unlearn_forget_scale_zero_is_no_step(tiny_runs, tmp_path, capsys):
    """0 is a valid step: the model is left as it was (as --scale auto leaves it for typical samples)."""
    import torch

    result = run_unlearn(capsys, "forget", tiny_runs["a"], "--class", "1", "--scale", "0", "--out", tmp_path / "out",
                         "--quiet", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["scale"] == 0
    before = torch.load(tiny_runs["a"] / "model.pt", weights_only=True)
    after = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_unlearn_forget_refuses_a_step_that_overflows_the_weights(tiny_runs, tmp_path, capsys, monkeypatch):
    """What the bound on --scale lets through is still refused, by name, if the weights overflow."""
    from unlearn import cli as unlearn_cli

    monkeypatch.setattr(unlearn_cli, "MAX_SCALE", 1e38, raising=False)
    result = run_unlearn(capsys, "forget", tiny_runs["a"], "--class", "1", "--scale", "1e37", "--out", tmp_path / "out",
                         "--quiet")
    assert_one_line_error(result, "unlearn forget: error: ", "--scale 1e37", "overflow", "nothing was written")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, words", [
    (["--keep", "nan"], ["--keep", "nan"]),
    (["--keep", "0"], ["--keep", "(0, 1]"]),
    (["--keep", "1e-9"], ["--keep", "keeps no value"]),
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--lr", "0"], ["--lr"]),
    (["--seed", "-1"], ["--seed"]),
    (["--method", "original", "--epochs", "0"], ["--epochs 0", "original"]),
    (["--exclude-class", "10"], ["--exclude-class 10", "0 to 9"]),
    (["--poison", "3", "--poison-seed", "-3"], ["--poison-seed"]),
])
def test_unlearn_train_refuses_an_option_before_writing_anything(tiny_runs, tmp_path, capsys, option, words):
    args = ["train", "--dataset", "digits", "--model", "simple", "--method", "per-sample", "--epochs", "1", "--quiet"]
    old = tmp_path / "old"  # an existing run, about to be replaced: the refused command leaves it as it was
    shutil.copytree(tiny_runs["b"], old)
    before = tree(old)
    result = run_unlearn(capsys, *args, *option, "--out", old, "--overwrite")
    assert_one_line_error(result, "unlearn train: error: ", *words)
    assert tree(old) == before
    result = run_unlearn(capsys, *args, *option, "--out", tmp_path / "new")
    assert_one_line_error(result, "unlearn train: error: ", *words)
    assert not (tmp_path / "new").exists()


def test_unlearn_train_corrected_after_a_refusal_is_not_an_interrupted_run(tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "exclude.npy", np.arange(60, 1437))
    args = ["train", "--dataset", "digits", "--model", "simple", "--method", "per-sample", "--epochs", "1",
            "--exclude-samples", tmp_path / "exclude.npy", "--quiet", "--out", tmp_path / "run"]
    assert run_unlearn(capsys, *args, "--keep", "nan").returncode == 2
    result = run_unlearn(capsys, *args, "--keep", "0.02")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "train.json").exists()


def test_unlearn_forget_mark_on_a_read_only_store_writes_nothing(tiny_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["a"], run)
    os.chmod(run / "store.h5", 0o444)
    before = sha256(run / "store.h5")
    try:
        for option in ("--mark", "--purge"):
            result = run_unlearn(capsys, "forget", run, "--class", "1", option, "--out", tmp_path / "out", "--quiet")
            assert_one_line_error(result, "unlearn forget: error: ", "store.h5 is read-only", "make it writable",
                                  "drop --mark/--purge")
            assert "mode=" not in result.stderr
            assert not (tmp_path / "out").exists()
    finally:
        os.chmod(run / "store.h5", 0o644)
    assert sha256(run / "store.h5") == before


def test_unlearn_forget_an_empty_samples_file_is_refused(tiny_runs, tmp_path, capsys):
    (tmp_path / "none.txt").write_text("# nobody\n")
    result = run_unlearn(capsys, "forget", tiny_runs["a"], "--samples", tmp_path / "none.txt", "--out", tmp_path / "out")
    assert_one_line_error(result, "unlearn forget: error: ", "--samples", "none.txt", "nothing to forget")
    assert not (tmp_path / "out").exists()


FULL_DISK_CHILD = """
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
from unlearn.runs import folders as runs
from unlearn.cli import main
from unlearn.runs.models import build_model
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # model.pt (~380 kB) cannot be written
codes = [main(argv) for argv in json.loads(sys.argv[1])]
try:
    runs.save_model(sys.argv[2], build_model("simple", 1, 10))
except OSError as error:
    print("save_model:", error, file=sys.stderr)
print(json.dumps(codes))
"""


def test_unlearn_write_failures_say_why_and_leave_the_files_as_they_were(tiny_runs, tmp_path, capsys):
    """A full disk (here a file-size limit: EFBIG) while writing model.pt is one line with the OS's reason,
    and what was there is unchanged: forget writes nothing to --out, nor marks the store."""
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["a"], run)
    assert run_unlearn(capsys, "forget", run, "--class", "2", "--out", tmp_path / "old", "--quiet").returncode == 0
    old, store = tree(tmp_path / "old"), sha256(run / "store.h5")
    commands = [
        ["forget", str(run), "--class", "1", "--out", str(tmp_path / "new" / "out"), "--quiet"],
        ["forget", str(run), "--class", "1", "--mark", "--out", str(tmp_path / "old"), "--quiet"],
        ["train", "--dataset", "digits", "--model", "simple", "--method", "none", "--epochs", "1", "--keep-first", "1:5",
         "--exclude-class", "2", "--out", str(tmp_path / "train"), "--quiet"],
    ]
    result = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, json.dumps(commands), tmp_path / "old"],
                            capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() and json.loads(result.stdout.splitlines()[-1]) == [2, 2, 2], result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 4, result.stderr
    assert lines[0].startswith("unlearn forget: error: File too large: ") and "nothing was written" in lines[0], lines[0]
    assert not (tmp_path / "new").exists()
    assert lines[1].startswith("unlearn forget: error: File too large: ") and "unchanged" in lines[1], lines[1]
    assert tree(tmp_path / "old") == old and sha256(run / "store.h5") == store
    assert lines[2].startswith("unlearn train: error: File too large: ") and "model.pt" in lines[2], lines[2]
    assert "unfinished" in lines[2] and "--overwrite" in lines[2], lines[2]
    assert sorted(path.name for path in (tmp_path / "train").iterdir()) == ["started.json"]
    assert lines[3].startswith("save_model: File too large: ") and "model.pt" in lines[3] and "unchanged" in lines[3]
    assert tree(tmp_path / "old") == old  # no model.pt.tmp left either
