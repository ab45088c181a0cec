"""``unlearn.forget_keys``: forgetting a store's keys from one's own model, in place, and marking them, in one call.

Checked on a real store (600 digits, per-sample fp32 gradient rows, 2 epochs): the change equals the rows
at their positions times the step (computed here from ``store.read`` and ``store.positions``, not by
scatter_add), a second call with the same keys is refused and changes neither the weights nor the file,
every refusal changes nothing, and a rule registered from outside reads the retained DataLoader.
"""

import copy
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

import gradstore
import unlearn
from gradstore import masks
from unlearn.errors import RequestError, UnlearnError
from unlearn.forgetting import ForgetKeysResult, Step, forget_keys, unregister_rule
from unlearn.params import flat_params
from unlearn.runs import data as datasets
from unlearn.runs.models import build_model

KEYS = np.array([3, 17, 40, 222, 599])


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """600 digits, the seed's small CNN trained 2 epochs while a per-sample store (p = 0.05, fp32 grad rows) records."""
    split = datasets.load_dataset("digits")
    data = split.subset(np.arange(len(split)) < 600)
    model = build_model("simple", data.in_channels, data.num_classes, seed=0)
    path = tmp_path_factory.mktemp("recorded") / "store.h5"
    recorder = unlearn.create_recorder(path, "per-sample", model, num_samples=len(data), keep=0.05, codec="fp32",
                                       flavour="grad", seed=0)
    unlearn.train(model, data.train_x, data.train_y, epochs=2, batch_size=32, seed=0, recorders=[recorder],
                  device=torch.device("cpu"), progress=False)
    return model, data, path


@pytest.fixture
def fresh(recorded, tmp_path):
    """A copy of the trained model and of its store, for a test to change."""
    model, data, path = recorded
    copied = tmp_path / "store.h5"
    shutil.copyfile(path, copied)
    return copy.deepcopy(model), data, copied


def expected_change(path, keys, scale):
    """scale * the rows of ``keys`` at their positions, summed in float64, from read() and positions()."""
    with gradstore.open(path) as store:
        rows = store.read(keys)
        change = np.zeros(store.num_params, np.float64)
        for key, row in zip(keys.tolist(), rows):
            positions = store.positions(key)
            assert positions.size == row.size == store.k
            np.add.at(change, positions, row.astype(np.float64))
        if len(keys):  # positions as the masks module draws them, independently of the store
            assert np.array_equal(store.positions(int(keys[0])),
                                  masks.reference_positions(store.seed, int(keys[0]), store.num_params, store.k))
    return scale * change


def assert_change(before, after, expected):
    """``after - before`` is ``expected`` to float32 rounding of the weights."""
    largest = max(np.abs(before).max(), np.abs(after).max())
    tolerance = 4 * np.finfo(np.float32).eps * largest + 1e-6 * np.abs(expected).max()
    np.testing.assert_allclose(after.astype(np.float64) - before, expected, rtol=0, atol=tolerance)


def states(path, keys):
    with gradstore.open(path) as store:
        return store.state[keys].copy()


def test_the_rows_are_added_at_their_positions_marked_and_a_second_call_is_refused(fresh):
    model, _, path = fresh
    before = flat_params(model)
    with gradstore.open(path, "r+") as store:
        result = forget_keys(model, store, KEYS[::-1].tolist(), scale=0.5)  # keys in any order
        assert np.all(store.state[KEYS] == gradstore.RowState.FORGOTTEN)
    after = flat_params(model)
    expected = expected_change(path, KEYS, 0.5)
    assert np.count_nonzero(expected) > 0
    assert_change(before, after, expected)
    untouched = expected == 0
    assert np.array_equal(after[untouched], before[untouched])  # nothing moves outside the rows' positions
    assert isinstance(result, ForgetKeysResult) and result is not None
    assert np.array_equal(result.keys, KEYS) and result.scale == 0.5 and result.rule == "given"
    assert result.change_norm == pytest.approx(np.linalg.norm(expected), rel=1e-5)
    assert result.removal_norm == pytest.approx(2 * result.change_norm, rel=1e-6)
    report, record = json.loads(json.dumps(result.report)), json.loads(json.dumps(result.record))
    assert report["num_keys"] == 5 and report["scale"] == 0.5 and report["scale_search"]["rule"] == "given"
    assert record == {"store": str(path), "forgotten_keys": KEYS.tolist(), "scale": 0.5, "rule": "given"}

    # the same keys again (or any of them): refused by the store's row states, nothing changed
    file_before = digest(path)
    for again in (KEYS, [KEYS[2], 5]):
        with pytest.raises(RequestError, match=r"not live.*'forgotten': \[40\]|not live.*'forgotten': \[3, 17, 40"):
            forget_keys(model, path, again)
        assert digest(path) == file_before
        assert np.array_equal(flat_params(model), after)
    assert states(path, [5])[0] == gradstore.RowState.LIVE


def test_the_path_form_opens_marks_and_closes(fresh):
    model, _, path = fresh
    before = flat_params(model)
    result = unlearn.forget_keys(model, str(path), np.array([8, 9]))  # scale 1: the rows exactly
    assert_change(before, flat_params(model), expected_change(path, np.array([8, 9]), 1.0))
    assert np.all(states(path, [8, 9]) == gradstore.RowState.FORGOTTEN)
    assert result.store == str(path) and result.scale == 1.0
    with gradstore.open(path, "r+") as store:  # closed by the call: it opens again for writing
        assert store.writable
    # a number given as text is that number
    moved = flat_params(model)
    unlearn.forget_keys(model, path, [10], scale="0.25")
    assert_change(moved, flat_params(model), expected_change(path, np.array([10]), 0.25))


@pytest.fixture
def retained_rule():
    """A rule registered from outside that reads the retained DataLoader and the open store."""
    seen = {}

    def quarter_if_retained(given):
        batches = list(given.retained_loader)
        seen.update(store=given.store.path, keys=given.keys.tolist(), data=given.data, kind=given.kind)
        count = sum(len(batch[1]) for batch in batches)
        return Step(np.float32(0.25) * given.rows, {"retained_batches": len(batches), "retained_samples": count},
                    scale=0.25, evaluations=1)

    unlearn.register_rule("test-keys-retained")(quarter_if_retained)
    yield seen
    unregister_rule("test-keys-retained")


def test_a_registered_rule_reads_the_retained_loader(fresh, retained_rule):
    model, data, path = fresh
    keep = np.setdiff1d(np.arange(len(data)), KEYS)
    dataset = torch.utils.data.TensorDataset(torch.as_tensor(data.train_x[keep]), torch.as_tensor(data.train_y[keep]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=100)
    before = flat_params(model)
    model.train()
    result = forget_keys(model, path, KEYS, scale="test-keys-retained", retained=loader)
    assert retained_rule == {"store": str(path), "keys": KEYS.tolist(), "data": None, "kind": "samples"}
    assert_change(before, flat_params(model), expected_change(path, KEYS, 0.25))
    assert model.training  # the rule ran on the model; its mode is as the caller left it
    assert result.rule == "test-keys-retained" and result.scale == 0.25
    assert result.rule_report == {"retained_batches": 6, "retained_samples": 595}
    report = json.loads(json.dumps(result.report))
    assert report["scale_search"]["retained_samples"] == 595 and report["scale_search"]["evaluations"] == 1
    assert np.all(states(path, KEYS) == gradstore.RowState.FORGOTTEN)


def test_a_failing_rule_leaves_the_model_and_store_as_they_were(fresh):
    model, _, path = fresh

    def breaks(given):
        with torch.no_grad():
            next(given.model.parameters()).add_(1.0)  # a rule that moved the weights, then failed
        raise RuntimeError("rule broke")

    unlearn.register_rule("test-keys-breaks")(breaks)
    try:
        before, file_before = flat_params(model), digest(path)
        with pytest.raises(RuntimeError, match="rule broke"):
            forget_keys(model, path, KEYS, scale="test-keys-breaks")
        assert np.array_equal(flat_params(model), before) and digest(path) == file_before
    finally:
        unregister_rule("test-keys-breaks")


@pytest.mark.parametrize("scale, message", [
    ("samples", r"'samples' needs the run's training data \(a DataSplit.*retained=.*cannot give"),
    ("auto", r"'samples' \(what scale='auto' runs for keys\) needs the run's training data"),
    ("class", "'class' serves class requests, not samples requests"),
    ("nope", r"no step rule named 'nope'"),
    (-1.0, "scale must be a number from 0"),
    (float("nan"), "scale must be a number from 0"),
    ("1e9", "scale must be a number from 0"),
    (True, "scale must be a number"),
])
def test_rules_that_cannot_serve_keys_are_refused_with_nothing_changed(fresh, scale, message):
    model, data, path = fresh
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.as_tensor(data.train_x)), batch_size=64)
    before, file_before = flat_params(model), digest(path)
    with pytest.raises(RequestError, match=message):
        forget_keys(model, path, KEYS, scale=scale, retained=loader)
    assert np.array_equal(flat_params(model), before) and digest(path) == file_before


@pytest.mark.parametrize("keys, message", [
    ([], "no keys given"),
    ([3, 600], r"keys out of range \[0, 600\).*\[600\]"),
    ([-1, 4], r"keys out of range \[0, 600\).*\[-1\]"),
    ([5, 6, 5], r"keys repeated: \[5\]"),
    ([1.5], "keys must be integers"),
    ([[1, 2]], "1-D"),
])
def test_bad_keys_are_refused_by_name_with_nothing_changed(fresh, keys, message):
    model, _, path = fresh
    before, file_before = flat_params(model), digest(path)
    with pytest.raises(RequestError, match=message):
        forget_keys(model, path, keys)
    assert np.array_equal(flat_params(model), before) and digest(path) == file_before


def test_a_store_of_another_model_is_refused(fresh):
    _, data, path = fresh
    other = build_model("simple", data.in_channels, data.num_classes + 1, seed=0)
    before, file_before = flat_params(other), digest(path)
    with pytest.raises(gradstore.FormatError, match="recorded for another model"):
        forget_keys(other, path, KEYS)
    assert np.array_equal(flat_params(other), before) and digest(path) == file_before


def test_a_read_only_store_is_refused_before_the_weights_change(fresh):
    model, _, path = fresh
    before, file_before = flat_params(model), digest(path)
    with gradstore.open(path, "r") as store:
        with pytest.raises(gradstore.ReadOnlyError, match="read-only.*mode='r\\+'"):
            forget_keys(model, store, KEYS)
        assert np.all(store.state[KEYS] == gradstore.RowState.LIVE)
    assert np.array_equal(flat_params(model), before) and digest(path) == file_before


def test_weights_are_put_back_when_marking_fails(fresh, monkeypatch):
    model, _, path = fresh
    before = flat_params(model)
    with gradstore.open(path, "r+") as store:
        def refuse(keys):
            assert not np.array_equal(flat_params(model), before)  # marking comes after the weights changed
            raise gradstore.WriteFailedError(f"{store.path}: disk full")

        monkeypatch.setattr(store, "mark_forgotten", refuse)
        with pytest.raises(gradstore.WriteFailedError, match="disk full"):
            forget_keys(model, store, KEYS)
        assert np.all(store.state[KEYS] == gradstore.RowState.LIVE)
    assert np.array_equal(flat_params(model), before)


def test_a_store_still_recording_is_refused(recorded, tmp_path):
    model, data, _ = recorded
    model = copy.deepcopy(model)
    before = flat_params(model)
    path = tmp_path / "recording.h5"
    recorder = unlearn.create_recorder(path, "per-sample", model, num_samples=len(data), keep=0.05, codec="fp32",
                                       flavour="grad", seed=0)
    recording = recorder.store
    with pytest.raises(gradstore.BadInputError, match="recording has not finished"):
        forget_keys(model, recording, KEYS)
    recording.commit()
    recording.close()
    file_before = digest(path)
    with pytest.raises(gradstore.BadInputError, match="recording has not finished"):
        forget_keys(model, path, KEYS)
    assert np.array_equal(flat_params(model), before) and digest(path) == file_before


def test_errors_are_the_library_s_typed_errors():
    assert issubclass(RequestError, UnlearnError) and issubclass(RequestError, ValueError)
    assert unlearn.forget_keys is forget_keys and unlearn.ForgetKeysResult is ForgetKeysResult
