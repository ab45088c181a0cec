"""The command line: `python -m gradstore info PATH [--json]` and `gradstore verify PATH`."""

import json
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
