"""Flipped bytes in an unfinished recording (as a crash leaves it): nothing read wrong, nothing dropped silently.

Runs `python -m bench corrupt --unfinished`'s machinery (bench/corrupt.py) over 96 flips:
6 targeted at each staging run's `committed` and `generation` attribute messages (type,
name, value, the generation's sign bit; 11 runs, 9 of them committed) and 30 random ones
(10 in the chunk frames, 10 in the runs' attribute messages, 10 elsewhere). Each damaged
copy is opened read-only and verified, then opened r+, finalized and read whole, in a
forked child, and compared with the undamaged copy.
"""

import numpy as np
import pytest

from bench import corrupt


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
    work = tmp_path_factory.mktemp("corrupt-unfinished")
    source, expected, regions = corrupt.prepare_unfinished(work)
    return work, source, expected, regions


def test_the_recording_has_committed_runs_runs_after_the_commit_and_located_attributes(unfinished):
    _, _, expected, regions = unfinished
    assert len(regions["runs"]) == 11 and len(expected["open r+"]["runs"]) == 9  # 2 spilled after the last commit
    assert expected["open r + verify"]["commit_note"] == {"epoch": 2}
    assert int((expected["finalize + read"]["state"] == 1).sum()) == 112
    located = {(a["run"], a["name"]) for a in regions["attributes"]}
    assert all((run, name) in located for run in regions["runs"] for name in ("committed", "generation"))


def test_flipped_bytes_in_an_unfinished_recording_are_refused_or_harmless(unfinished):
    work, source, expected, regions = unfinished
    flips = corrupt.targeted_flips(regions, "key bytes")
    flips += corrupt.plan_flips(source.stat().st_size, regions, 30, np.random.default_rng(0))
    results = corrupt.run_flips(source, work, expected, flips, progress=lambda line: None)
    bad = [r for r in results if r["outcome"] in ("SILENT", "DROPPED", "UNCAUGHT", "CRASH")]
    lines = "\n".join(f"{r['outcome']}: {r['where']} {r['target']} offset {r['offset']} xor {r['xor']:#04x}: "
                      f"{r['detail'][:200]}" for r in bad)
    assert not bad, f"{len(bad)} of {len(results)} flips:\n{lines}"
