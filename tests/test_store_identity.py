"""A store carries the identity of the run that recorded it, and `forget` refuses another run's store (issue 21, defect 2).

Copying run b's store.h5 (same architecture, another seed) into run a's folder used to be
accepted: `unlearn forget` exited 0 and subtracted the wrong rows.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import gradstore
from unlearn import identity

TRAIN = ["--dataset", "digits", "--model", "simple", "--method", "per-sample", "--keep", "0.05", "--codec", "fp32",
         "--epochs", "1", "--batch-size", "64", "--quiet", "--device", "cpu"]


def unlearn(*args):
    return subprocess.run([sys.executable, "-m", "unlearn", *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs a and a2 (identical settings) and b (another seed), each on digits for one epoch."""
    folder = tmp_path_factory.mktemp("identity")
    for name, seed in (("a", 1), ("a2", 1), ("b", 2)):
        result = unlearn("train", *TRAIN, "--seed", seed, "--out", folder / name)
        assert result.returncode == 0, result.stderr
    return folder


def store_config(path):
    with gradstore.open(path) as store:
        return dict(store.config)


def test_two_identical_runs_write_the_same_identity_and_the_same_store(runs):
    a, a2 = store_config(runs / "a" / "store.h5"), store_config(runs / "a2" / "store.h5")
    assert set(a["identity"]) == set(identity.IDENTITY_FIELDS)
    assert all(a["identity"][field] is not None for field in identity.IDENTITY_FIELDS)
    assert {k: v for k, v in a.items() if k != "created_at"} == {k: v for k, v in a2.items() if k != "created_at"}
    with gradstore.open(runs / "a" / "store.h5") as one, gradstore.open(runs / "a2" / "store.h5") as two:
        keys = np.arange(one.num_keys)
        assert np.array_equal(one.read(keys), two.read(keys))
    assert store_config(runs / "b" / "store.h5")["identity"]["run_id"] != a["identity"]["run_id"]


def test_forget_refuses_another_runs_store_naming_what_differs(runs, tmp_path):
    victim = tmp_path / "a"
    shutil.copytree(runs / "a", victim)
    shutil.copy(runs / "b" / "store.h5", victim / "store.h5")  # same architecture, another seed
    result = unlearn("forget", victim, "--class", 3, "--out", tmp_path / "out")
    assert result.returncode != 0
    assert "recorded by another run" in result.stderr and "run_id" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written


def test_forget_accepts_its_own_store_and_reports_it_verified(runs, tmp_path):
    result = unlearn("forget", runs / "a", "--class", 3, "--out", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "forget.json").read_text())["store_identity"] == "verified"


def without_identity(source, destination):
    """The same rows in a store that carries no identity (as stores recorded before 2026-12-07)."""
    with gradstore.open(source) as store:
        config = store.config
        rows = store.read(np.arange(store.num_keys))
        recording = gradstore.create(destination, store.num_params, store.num_keys, store.keep, codec=config["codec"],
                                     seed=store.seed, fingerprint=config["fingerprint"], labels=store.labels,
                                     overwrite=True)
    recording.accumulate(np.arange(rows.shape[0]), rows)
    recording.finalize().close()


def test_a_store_without_identity_is_refused_unless_accepted_unverified(runs, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs / "a", old)
    without_identity(runs / "a" / "store.h5", old / "store.h5")
    refused = unlearn("forget", old, "--class", 3, "--out", tmp_path / "refused")
    assert refused.returncode != 0 and "carries no run identity" in refused.stderr, refused.stderr
    assert "--allow-unverified-store" in refused.stderr and not (tmp_path / "refused").exists()
    accepted = unlearn("forget", old, "--class", 3, "--allow-unverified-store", "--out", tmp_path / "accepted")
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads((tmp_path / "accepted" / "forget.json").read_text())["store_identity"] == "unverified"


@pytest.mark.parametrize("field", identity.IDENTITY_FIELDS)
def test_each_field_of_the_identity_is_checked(runs, field):
    with gradstore.open(runs / "a" / "store.h5") as store:
        expected = dict(store.config["identity"])
        assert identity.check_identity(store, expected) == "verified"
        expected[field] = "something else"
        with pytest.raises(identity.StoreIdentityError, match=field):
            identity.check_identity(store, expected)


def test_the_data_fingerprint_sees_one_changed_sample():
    x = np.zeros((4, 1, 8, 8), np.float32)
    y, indices = np.arange(4), np.arange(4)
    before = identity.data_fingerprint(x, y, indices)
    x[2, 0, 3, 3] = 1.0
    assert identity.data_fingerprint(x, y, indices) != before
    assert identity.data_fingerprint(x, y[::-1].copy(), indices) != identity.data_fingerprint(x, y, indices)


# A train.json as `unlearn train` writes it (digits, per-sample int8, --keep-first 3:100), and the run ids the
# identity module gave before runs carried a RunConfig: the stores' bytes depend on them.
TRAIN_JSON = {
    "dataset": "digits", "data_dir": None, "model": "simple", "groups": 1, "method": "per-sample", "flavour": "update",
    "keep": 0.05, "codec": "int8", "epochs": 1, "batch_size": 64, "seed": 0, "optimizer": "adam", "lr": None,
    "keep_first": [3, 100], "exclude_class": None, "exclude_samples": None, "engine": "masked", "checkpoint_every": 0,
    "in_channels": 1, "num_classes": 10, "seconds": 1.97, "record_seconds": 0.51, "steps": 22, "num_samples": 1391,
    "num_params": 95110, "resumed_from_step": 0, "test_acc": 0.76, "device": "cpu", "ranks": 1,
    "store": {"bytes_on_disk": 4790741, "bytes_per_value": 0.72, "k": 4756, "num_keys": 1391,
              "codec": {"block_size": 1024, "id": "int8", "rounding": "nearest"}},
}
POISON = {"count": 5, "seed": 1, "target": 0, "trigger": {"rows": [5, 6], "cols": [5, 6], "size": 2, "value": 1.0}}
OLDER = ("groups", "engine", "poison", "checkpoint_every")  # settings a train.json of an older version lacks


@pytest.mark.parametrize("payload, expected", [
    (TRAIN_JSON, "4c0cf3ce7908c60fff55d68eee649eb5eb638c86187bd80960f31b0f89af1bfb"),
    ({key: value for key, value in TRAIN_JSON.items() if key not in OLDER},
     "6eb74450eead017e2101bcf881c79257b8fab9ae2e11fbc1889c319391f16ce9"),
    ({**TRAIN_JSON, "poison": POISON, "exclude_samples": [3, 1, 2]},
     "02a107f6d4c648f22fa012ef5b5e4acaf6542e7496e424929eff11972358e94c"),
])
def test_run_id_is_the_same_from_train_json_and_from_its_run_config(payload, expected):
    from unlearn.runs.config import RunConfig

    config = RunConfig.from_json(payload)
    assert identity.run_id(payload) == identity.run_id(config) == expected


def test_run_config_round_trips_train_json_exactly():
    from unlearn.runs.config import RunConfig

    settings = list(TRAIN_JSON).index("in_channels")  # a poison comes after the options, as train writes it
    poisoned = dict(list(TRAIN_JSON.items())[:settings] + [("poison", POISON)] + list(TRAIN_JSON.items())[settings:])
    for payload in (TRAIN_JSON, {**poisoned, "a_later_key": [1]},
                    {key: value for key, value in TRAIN_JSON.items() if key not in OLDER}):
        written = RunConfig.from_json(payload).to_json()
        assert written == payload and list(written) == list(payload)
    config = RunConfig.from_json({key: value for key, value in TRAIN_JSON.items() if key not in OLDER})
    assert config.groups == 1 and config.engine is None and config.poison is None  # as runs read them before
    assert config.results["store"]["k"] == 4756 and config.key_kind == "sample" and config.records
