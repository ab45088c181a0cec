"""`bench candidates` end to end on a kept digits diagnose run: every removal candidate and every search signal
produce real figures in [0, 1], and find_similar's precision and recall are computed against the poisoned keys."""

import argparse
import json

from bench import candidates, diagnose


def test_candidates_run_on_a_kept_diagnose_run(tmp_path):
    parser = argparse.ArgumentParser()
    diagnose.add_arguments(parser)
    assert diagnose.main(parser.parse_args(["--dataset", "digits", "--seeds", "0", "--epochs", "2", "--poison", "40",
                                            "--keeps", "1", "--flavours", "update", "--grid", "1", "--keep-stores",
                                            "--out", str(tmp_path / "diagnose")])) == 0
    parser = argparse.ArgumentParser()
    candidates.add_arguments(parser)
    args = parser.parse_args(["--diagnose-dir", str(tmp_path / "diagnose"), "--seeds", "0", "--alphas", "5",
                              "--repair-steps", "3", "--draws", "1", "--out", str(tmp_path / "out")])
    assert candidates.main(args) == 0
    entry = json.loads((tmp_path / "out" / "candidates.json").read_text())["seeds"]["0"]
    kinds = {p["candidate"] for p in entry["points"]}
    assert {"ssd-store", "ssd-data", "layers", "rows + repair", "fine-tune only (control)", "head projection",
            "after train", "retrained without the 100"} <= kinds
    for point in entry["points"]:
        assert 0 <= point["asr"] <= 1 and 0 <= point["ta"] <= 1 and 0 <= point["target_class_acc"] <= 1
    (draw,) = entry["search"]
    assert set(draw["signals"]) == {"stored rows . named rows", "stored rows . named rows, whitened",
                                    "current gradient cosine", "current gradient cosine, first layer"}
    assert all(0 <= s["auc"] <= 1 and 0 <= s["top_75_poisoned"] <= 15 for s in draw["signals"].values())
    found = draw["find_similar"]
    assert found["num_found"] == 0 or 0 <= found["precision"] <= 1
    assert "| 0 | head projection | k 1 |" in (tmp_path / "out" / "candidates.md").read_text()
