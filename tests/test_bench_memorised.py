"""`bench memorised` end to end on the bundled digits: a tiny poisoned run kept by `bench diagnose --keep-stores`
(one short epoch, 20 poisoned samples), then every cell of `bench memorised` on it through the real code path
(the "samples" and "feature" rules through plan_removal/apply_removal on the run's int8 store, find_similar, the
fine-tune and the retrain-without-the-named controls). The figures are checked for range and shape, not value."""

import argparse
import json

import pytest

from bench import diagnose, memorised


def parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_memorised_refuses_a_missing_run_naming_the_diagnose_command(tmp_path):
    args = parse(memorised, ["--seeds", "7", "--diagnose-dir", str(tmp_path / "none"), "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match="bench diagnose --seeds 7 --keep-stores"):
        memorised.main(args)
    assert not (tmp_path / "m").exists()


def test_memorised_runs_every_cell_on_a_kept_diagnose_run(tmp_path):
    runs, out = tmp_path / "diagnose", tmp_path / "memorised"
    assert diagnose.main(parse(diagnose, ["--dataset", "digits", "--seeds", "0", "--epochs", "1", "--poison", "20",
                                          "--keeps", "1", "--flavours", "update", "--grid", "1",
                                          "--keep-stores", "--out", str(runs)])) == 0
    args = parse(memorised, ["--seeds", "0", "--diagnose-dir", str(runs), "--out", str(out)])
    assert memorised.main(args) == 0
    results = json.loads((out / "memorised.json").read_text())
    entry = results["seeds"]["0"]
    assert entry["poisoned"] == 20 and len(entry["named"]) == 5 and len(entry["random"]) >= 3
    assert set(entry["named"]) < set(diagnose_keys(runs))
    random_size = len(entry["random"])
    assert set(entry["cells"]) == {
        "after train", "retrain", "all 20: samples", "all 20: feature", "5 named + found: feature",
        "5 named alone: feature", f"random {random_size}: samples", f"random {random_size}: feature",
        "fine-tune 1 epoch(s) on the retained", "retrain without the 5 named"}
    for name, c in entry["cells"].items():
        for key in ("asr", "target_class_acc", "ta"):
            assert 0 <= c[key] <= 1, (name, key)
        assert set(c["asr_by_source"]) == {str(k) for k in range(1, 10)}
        assert c["worst_source"]["asr"] == max(c["asr_by_source"].values())
        assert set(c["gaps"]) == {"asr", "worst_source_asr", "target_class_acc", "ta"}
        assert set(c["targets"]) == {"asr", "target_class_acc", "ta"}
    assert entry["cells"]["retrain"]["gaps"]["ta"] == 0
    for name in ("all 20: samples", "all 20: feature", "5 named alone: feature"):
        c = entry["cells"][name]
        assert c["seconds"] > 0 and isinstance(c["changed"], bool) and c["report"]["rule"]
    assert entry["cells"]["all 20: feature"]["report"]["coherence"]["control_draws"] > 0
    search = entry["search"]
    assert search["truth_unnamed"] == 15 and search["num_found"] == len(search["found_keys"])
    assert not set(search["found_keys"]) & set(entry["named"])
    if search["num_found"]:
        assert 0 <= search["precision"] <= 1 and 0 <= search["recall"] <= 1
    assert isinstance(search["targets"]["search"], bool)
    assert entry["random_search"]["num_found"] == len(entry["random_search"]["found_keys"])
    assert all(isinstance(ok, bool) for ok in entry["targets"].values()) and len(entry["targets"]) == 11
    assert (runs / "seed0" / "reference-named5.npy").exists()  # cached: a rerun does not retrain
    md = (out / "memorised.md").read_text()
    assert "| all 20: feature |" in md and "find_similar, 5 of 20 named" in md

    # bench.reference_spread on the same kept run: the run's reference and two more retrainings, cached
    from bench import reference_spread
    assert reference_spread.main(["--diagnose-dir", str(runs), "--seed", "0", "--retrain-seeds", "5", "6",
                                  "--out", str(tmp_path / "spread")]) == 0
    spread = json.loads((tmp_path / "spread" / "reference_spread.json").read_text())
    assert [r["model"] for r in spread["rows"]] == ["after train (poisoned)", "retrained, seed 0 (the run's reference)",
                                                    "retrained, seed 5", "retrained, seed 6"]
    assert spread["rows"][1]["ta"] == entry["cells"]["retrain"]["ta"]  # the run's own reference, as memorised read it
    assert spread["rows"][2]["ta"] != spread["rows"][3]["ta"] or spread["rows"][2]["asr"] != spread["rows"][3]["asr"]
    for field in ("asr", "target_class_acc", "ta"):
        assert spread["spread"][field]["min"] <= spread["spread"][field]["max"]
    assert (runs / "seed0" / "reference-spread5.npy").exists() and (runs / "seed0" / "reference-spread6.json").exists()


def diagnose_keys(runs):
    return json.loads((runs / "diagnose.json").read_text())["seeds"]["0"]["poisoned_keys"]
