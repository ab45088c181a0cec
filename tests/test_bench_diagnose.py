"""`bench diagnose` end to end on the bundled digits (one short epoch): the int8 store recorded through attach and
the dense rows accumulated beside it from torch.func per-sample gradients agree at the store's positions, and every
variant's points carry the figures the diagnosis reads (ASR by source class among them)."""

import argparse
import json

from bench import diagnose


def test_diagnose_runs_and_its_two_records_of_the_run_agree(tmp_path):
    parser = argparse.ArgumentParser()
    diagnose.add_arguments(parser)
    args = parser.parse_args(["--dataset", "digits", "--seeds", "0", "--epochs", "1", "--poison", "20",
                              "--keeps", "1", "0.1", "--flavours", "update", "--grid", "0.5", "1",
                              "--out", str(tmp_path)])
    assert diagnose.main(args) == 0
    entry = json.loads((tmp_path / "diagnose.json").read_text())["seeds"]["0"]
    assert len(entry["poisoned_keys"]) == 20
    # int8 rows (the engine, in the user's backward) against dense torch.func rows times the preconditioner
    assert entry["int8_rows_vs_dense_relative_error"] < 0.01
    assert set(entry["variants"]) == {"update dense", "update masked p=0.1 fp32", "update int8 store p=0.01"}
    for points in entry["variants"].values():
        assert [p["c"] for p in points] == [0.5, 1.0]
        for point in points:
            assert 0 <= point["asr"] <= 1 and 0 <= point["ta"] <= 1
            assert set(point["asr_by_source"]) == {str(c) for c in range(1, 10)}
    assert 0 <= entry["search_signal"]["auc_cosine"] <= 1
    assert not (tmp_path / "seed0" / diagnose.STORE).exists()  # removed unless --keep-stores
    assert "| 0 | update dense | 1 |" in (tmp_path / "diagnose.md").read_text()
