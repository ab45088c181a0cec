"""The poisoned request: a seeded backdoor, recorded in the run, rebuilt the same for retraining and forgetting."""

import json

import numpy as np
import pytest

from unlearn.runs import data as datasets
from unlearn.evaluation import backdoor_metrics
from unlearn.runs import poison
from unlearn.cli import main as unlearn_main


@pytest.fixture(scope="module")
def digits():
    return datasets.load_dataset("digits")


def test_trigger_geometry_follows_the_image_size():
    assert poison.Trigger.for_images(28, 28, 1.0).to_json() == {"rows": [23, 26], "cols": [23, 26], "size": 4, "value": 1.0}
    assert poison.Trigger.for_images(32, 32, 1.0).to_json()["rows"] == [27, 30]
    assert poison.Trigger.for_images(8, 8, 1.0).to_json() == {"rows": [5, 6], "cols": [5, 6], "size": 2, "value": 1.0}
    images = np.zeros((2, 3, 8, 8), np.float32)
    triggered = poison.Trigger.for_images(8, 8, 0.5).apply(images)
    assert images.sum() == 0  # a copy
    assert (triggered[:, :, 5:7, 5:7] == 0.5).all() and triggered.sum() == 2 * 3 * 4 * 0.5


def test_the_draw_is_seeded_avoids_the_target_and_poisons_only_its_keys(digits):
    first = poison.from_spec(digits, {"count": 40, "seed": 7, "target": 2})
    again = poison.from_spec(digits, {"count": 40, "seed": 7, "target": 2})
    other = poison.from_spec(digits, {"count": 40, "seed": 8, "target": 2})
    keys = first.poison.keys
    assert np.array_equal(keys, again.poison.keys) and not np.array_equal(keys, other.poison.keys)
    assert keys.size == 40 and np.unique(keys).size == 40 and (digits.train_y[keys] != 2).all()
    assert (first.train_y[keys] == 2).all() and (first.train_x[keys][..., 5:7, 5:7] == digits.train_x.max()).all()
    untouched = np.setdiff1d(np.arange(len(digits)), keys)
    assert np.array_equal(first.train_x[untouched], digits.train_x[untouched])
    assert np.array_equal(first.train_y[untouched], digits.train_y[untouched])
    assert digits.poison is None and (digits.train_x[keys][..., 5:7, 5:7] != digits.train_x.max()).any()
    # the spec round-trips through JSON to the same poison
    rebuilt = poison.from_spec(digits, json.loads(json.dumps(first.poison.to_json())))
    assert np.array_equal(rebuilt.train_x, first.train_x) and np.array_equal(rebuilt.train_y, first.train_y)


def test_excluding_poisoned_samples_renumbers_the_rest(digits):
    split = poison.from_spec(digits, {"count": 30, "seed": 1, "target": 0})
    gone = split.poison.keys[:10]
    kept = datasets.exclude(split, samples=gone)
    assert kept.poison.keys.size == 20
    assert np.array_equal(kept.train_x[kept.poison.keys], split.train_x[split.poison.keys[10:]])


def test_bad_poison_requests_name_what_is_wrong(digits):
    with pytest.raises(ValueError, match="cannot poison 2000 samples"):
        poison.from_spec(digits, {"count": 2000, "seed": 0, "target": 0})
    with pytest.raises(ValueError, match="target 10 out of range"):
        poison.from_spec(digits, {"count": 5, "seed": 0, "target": 10})


def test_train_records_the_poison_and_the_retrained_reference_excludes_the_same_samples(tmp_path, capsys):
    run, gold = tmp_path / "run", tmp_path / "gold"
    common = ["--dataset", "digits", "--model", "simple", "--epochs", "1", "--keep-first", "3:60", "--quiet"]
    assert unlearn_main(["train", *common, "--method", "per-sample", "--keep", "0.02", "--poison", "25",
                         "--poison-seed", "5", "--out", str(run)]) == 0
    config = json.loads((run / "train.json").read_text())
    assert config["poison"] == {"count": 25, "seed": 5, "target": 0,
                                "trigger": {"rows": [5, 6], "cols": [5, 6], "size": 2, "value": 1.0}}
    keys = datasets.read_sample_file(run / "poisoned.txt")
    kept = datasets.keep_first(datasets.load_dataset("digits"), 3, 60)
    assert np.array_equal(keys, poison.from_spec(kept, config["poison"]).poison.keys)
    assert unlearn_main(["train", *common, "--method", "none", "--poison", "25", "--poison-seed", "5",
                         "--exclude-samples", str(run / "poisoned.txt"), "--out", str(gold)]) == 0
    gold_config = json.loads((gold / "train.json").read_text())
    assert gold_config["num_samples"] == config["num_samples"] - 25 and gold_config["poison"] == config["poison"]
    assert datasets.read_sample_file(gold / "poisoned.txt").size == 0  # it kept none of them
    capsys.readouterr()
    assert unlearn_main(["forget", str(run), "--samples", str(run / "poisoned.txt"), "--gold", str(gold),
                         "--out", str(tmp_path / "f"), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    for where in (result, result["after_train"], result["gold"], result["gap_to_gold"]):
        assert {"asr", "poisoned_label_acc", "target_class_acc"} <= set(where)
    assert 0 <= result["asr"] <= 1 and result["ua"] == result["poisoned_label_acc"]


def test_poison_options_without_poison_are_refused(tmp_path, capsys):
    assert unlearn_main(["train", "--dataset", "digits", "--model", "simple", "--method", "none",
                         "--poison-seed", "3", "--out", str(tmp_path / "r")]) != 0
    assert "--poison-seed and --poison-target need --poison" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory):
    """A digits run with 60 poisoned samples, recorded (update rows, p = 0.05, int8)."""
    run = tmp_path_factory.mktemp("poisoned") / "run"
    assert unlearn_main(["train", "--dataset", "digits", "--model", "simple", "--method", "per-sample", "--keep", "0.05",
                         "--epochs", "6", "--poison", "60", "--out", str(run), "--quiet"]) == 0
    return run


def auto_step(run, samples, threshold=None):
    """The sample rule's step on ``samples``: "auto", or a SampleRule whose evidence threshold is ``threshold``."""
    import gradstore
    from unlearn import forgetting
    from unlearn.runs import folders as runs
    from unlearn.params import flat_params

    rule = "auto" if threshold is None else forgetting.SampleRule(evidence_p=threshold)
    config = runs.load_json(run / "train.json")
    data = runs.build_data(config)
    model = runs.load_model(run, config)
    base = flat_params(model)
    with gradstore.open(run / "store.h5") as store:
        removal = forgetting.plan_removal(store, "per-sample", data, samples=samples, seed=config["seed"])
    choice = forgetting.apply_removal(model, base, removal, data, rule, seed=config["seed"])
    return choice, model, data, base


def test_the_sample_rule_removes_nothing_where_the_samples_taught_nothing(poisoned_run):
    from unlearn.params import flat_params

    config = json.loads((poisoned_run / "train.json").read_text())
    poisoned_keys = datasets.read_sample_file(poisoned_run / "poisoned.txt")
    clean = np.setdiff1d(np.arange(config["num_samples"]), poisoned_keys)
    typical = np.sort(np.random.default_rng(3).choice(clean, 60, replace=False))  # as many, drawn at random
    choice, model, _, base = auto_step(poisoned_run, typical)
    assert choice.scale == 0.0 and choice.reached and choice.evidence["stopped_by"] == "evidence"
    assert choice.evidence["p_value"] >= 0.05 and choice.evidence["projections"] == 1
    assert np.array_equal(flat_params(model), base)  # the model is left as it was


def test_the_sample_rule_removes_a_backdoor_and_its_step_is_monotone_in_the_evidence(poisoned_run):

    keys = datasets.read_sample_file(poisoned_run / "poisoned.txt")
    steps = []
    for threshold in (1.0, 0.05, 1e-300):  # from any evidence suffices to none does
        choice, model, data, base = auto_step(poisoned_run, keys, threshold)
        steps.append(choice.scale)
        if threshold == 0.05:
            assert choice.scale > 0 and choice.evidence["p_value"] < 0.05 and choice.evidence["threshold"] == 0.05
            before, after = backdoor_metrics(runs_model(poisoned_run), data), backdoor_metrics(model, data)
            # digits learn this backdoor weakly (ASR about 0.5) and the guards stop early: the MNIST
            # figures are bench study --request poisoned's (docs/RESULTS.md)
            assert after["asr"] < before["asr"] and after["poisoned_label_acc"] < before["poisoned_label_acc"]
            assert after["target_class_acc"] >= before["target_class_acc"] - 0.05
    assert steps[0] >= steps[1] >= steps[2] == 0.0


def runs_model(run):
    from unlearn.runs import folders as runs

    return runs.load_model(run, runs.load_json(run / "train.json"))


def test_auto_on_rows_never_recorded_or_already_forgotten_keeps_its_errors(poisoned_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(poisoned_run, run)
    (tmp_path / "two.txt").write_text("5\n9\n")
    assert unlearn_main(["forget", str(run), "--samples", str(tmp_path / "two.txt"), "--mark", "--out",
                         str(tmp_path / "f1"), "--quiet"]) == 0
    capsys.readouterr()
    assert unlearn_main(["forget", str(run), "--samples", str(tmp_path / "two.txt"), "--scale", "auto", "--out",
                         str(tmp_path / "f2"), "--quiet"]) != 0
    assert "not live" in capsys.readouterr().err and not (tmp_path / "f2").exists()
    (tmp_path / "far.txt").write_text("100000\n")
    assert unlearn_main(["forget", str(run), "--samples", str(tmp_path / "far.txt"), "--scale", "auto", "--out",
                         str(tmp_path / "f3"), "--quiet"]) != 0
    assert "out of range" in capsys.readouterr().err
