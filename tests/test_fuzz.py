"""Fuzzing the reader with hypothesis: mutated and truncated stores give right values or the library's errors.

Each example reads in a forked child (bench.corrupt.isolated), so that a crash inside
libhdf5 fails the test instead of killing the test run.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import corrupt


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "store.h5"
    corrupt.build_store(path, num_keys=120, num_params=8_000)
    return path, path.read_bytes(), corrupt.snapshot(path)


def read_mutated(pristine, tmp_path, data):
    path = tmp_path / "mutated.h5"
    path.write_bytes(bytes(data))
    return corrupt.isolated(corrupt.check, path, pristine[2])


settings_ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings_
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4))
def test_flipped_bytes_never_read_wrong(pristine, tmp_path, flips):
    data = bytearray(pristine[1])
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    outcome, detail = read_mutated(pristine, tmp_path, data)
    assert outcome in ("unaffected", "detected"), (outcome, detail, flips)


@settings_
@given(keep=st.floats(0, 1, exclude_max=True), garbage=st.binary(max_size=64))
def test_truncated_or_overwritten_tails_never_read_wrong(pristine, tmp_path, keep, garbage):
    data = pristine[1][: int(keep * len(pristine[1]))] + garbage
    outcome, detail = read_mutated(pristine, tmp_path, data)
    assert outcome in ("unaffected", "detected"), (outcome, detail, keep)


def test_the_fuzz_target_reads_the_pristine_file_as_right(pristine, tmp_path):
    assert read_mutated(pristine, tmp_path, pristine[1]) == ("unaffected", "")
    assert np.array_equal(pristine[2]["state"][5:8], [2, 2, 2])  # forgotten rows are part of what is checked
