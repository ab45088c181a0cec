"""unlearn: recording during training, forgetting, and the CLI, on small real data."""

import json
import pickle

import numpy as np
import pytest
import torch

import gradstore
from unlearn.runs import data as datasets
from unlearn.cli import main as unlearn_main
from unlearn.runs.models import build_model
from unlearn.params import flat_params
from unlearn.recording.per_sample import per_sample_grads
from unlearn.recording.recorders import PerSampleRecorder, StepRecorder
from unlearn.recording.session import attach
from unlearn.runs.loop import make_loader, train


def digits_subset(count=256):
    split = datasets.load_dataset("digits")
    return split.train_x[:count], split.train_y[:count]


def test_per_sample_grads_sum_to_the_batch_gradient():
    x, y = digits_subset(32)
    model = build_model("simple", 1, 10, seed=0)
    per_sample = per_sample_grads(model, torch.from_numpy(x), torch.from_numpy(y), loss_scale=1 / 32, chunk_size=10)
    torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    batch = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert per_sample.shape == (32, batch.numel())
    torch.testing.assert_close(per_sample.sum(0), batch, rtol=1e-4, atol=1e-6)


def test_exactness_sgd_update_flavour_p1_fp32(tmp_path):
    """p=1, fp32, SGD without momentum, update flavour: forgetting S gives exactly
    w_0 - sum of the other samples' updates (the identity that makes the method correct)."""
    x, y = digits_subset(200)
    model = build_model("simple", 1, 10, seed=1)
    w0 = flat_params(model)
    store = gradstore.create(tmp_path / "s.h5", w0.size, len(y), 1.0, codec="fp32", seed=5)
    train(model, x, y, epochs=2, batch_size=32, seed=3, optimizer="sgd", lr=0.05,
          recorders=[PerSampleRecorder(store, "update")], device=torch.device("cpu"), progress=False)
    w_final = flat_params(model)
    store = gradstore.open(tmp_path / "s.h5")
    rows = store.read(np.arange(len(y))).astype(np.float64)  # k == M: positions are the identity
    # every sample's updates together are the whole trajectory
    np.testing.assert_allclose(w_final + rows.sum(0), w0, rtol=0, atol=2e-5)
    forget_keys = np.array([3, 50, 51, 199])
    restored = w_final.copy()
    store.scatter_add(restored, forget_keys, 1.0)
    others = np.setdiff1d(np.arange(len(y)), forget_keys)
    np.testing.assert_allclose(restored, w0 - rows[others].sum(0), rtol=0, atol=2e-5)
    # and the removal moved the weights: the test would fail if rows were zero
    assert np.abs(restored - w_final).max() > 1e-4


def test_attach_keeps_the_users_loop_and_records_every_sample(tmp_path):
    x, y = digits_subset(96)
    model = build_model("simple", 1, 10, seed=0)
    num_params = sum(p.numel() for p in model.parameters())
    store = gradstore.create(tmp_path / "a.h5", num_params, len(y), 0.05, codec="fp16", seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = make_loader(x, y, batch_size=32, seed=0)
    optimizer, loader = attach(model, optimizer, loader, [PerSampleRecorder(store, "grad")])
    for _ in range(2):  # the user's own loop, unchanged
        for inputs, targets in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    optimizer.finish()
    store = gradstore.open(tmp_path / "a.h5")
    assert store.info()["rows_live"] == len(y)
    np.testing.assert_array_equal(store.labels, y)
    assert np.abs(store.read(np.arange(len(y)))).sum(axis=1).min() > 0


def test_step_recorders_hold_each_steps_delta_and_batch(tmp_path):
    x, y = digits_subset(64)
    model = build_model("simple", 1, 10, seed=0)
    w0 = flat_params(model)
    steps = 2 * 2
    original = gradstore.create(tmp_path / "o.h5", w0.size, steps, 1.0, codec="fp32", key_kind="step")
    layer = gradstore.create(tmp_path / "l.h5", w0.size, steps, 0.1, codec="fp32", key_kind="step", seed=7)
    train(model, x, y, epochs=2, batch_size=32, seed=0, recorders=[StepRecorder(original), StepRecorder(layer)],
          device=torch.device("cpu"), progress=False)
    original, layer = gradstore.open(tmp_path / "o.h5"), gradstore.open(tmp_path / "l.h5")
    deltas = original.read(np.arange(steps))
    np.testing.assert_allclose(flat_params(model) + deltas.sum(0), w0, atol=1e-5)
    members = np.sort(np.concatenate([original.members[s] for s in range(2)]))
    np.testing.assert_array_equal(members, np.arange(64))  # epoch 1's two batches cover every sample once
    np.testing.assert_allclose(layer.read([2])[0], deltas[2][layer.positions(2)], rtol=1e-6)
    assert set(original.keys_covering([5]).tolist()) == {s for s in range(steps) if 5 in original.members[s]}


@pytest.mark.parametrize("method", ["per-sample", "original", "layer"])
def test_each_method_end_to_end_through_the_cli(tmp_path, method, capsys):
    run = tmp_path / "run"
    assert unlearn_main(["train", "--dataset", "digits", "--model", "simple", "--method", method, "--epochs", "1",
                         "--keep", "0.05", "--keep-first", "3:20", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    trained = json.loads((run / "train.json").read_text())
    assert {"seconds", "num_samples", "num_params", "test_acc"} <= set(trained)
    assert trained["num_params"] == 95110 and (trained["num_samples"] == 1437 - 146 + 20)
    samples = tmp_path / "forget.txt"
    samples.write_text("0\n5\n17\n")
    out = tmp_path / "forgot"
    assert unlearn_main(["forget", str(run), "--samples", str(samples), "--scale", "1", "--out", str(out),
                         "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("forgotten_acc", "rest_acc", "ua", "ra", "ta", "mia_efficacy", "scale", "seconds"):
        assert key in result
    assert result["request"]["num_samples"] == 3 and result["request"]["num_keys"] >= 1
    assert result["removal_norm"] > 0
    before = torch.load(run / "model.pt", weights_only=True)
    after = torch.load(out / "model.pt", weights_only=True)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    # --mark records the request in the store: the original run's model can no longer claim those rows
    again_marked = tmp_path / "marked"
    assert unlearn_main(["forget", str(run), "--samples", str(samples), "--mark", "--out", str(again_marked),
                         "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["marked_rows"] >= 1
    with gradstore.open(run / "store.h5") as store:
        assert store.info()["rows_forgotten"] >= 1 and store.info()["rows_purged"] == 0
    # forgetting the same samples again from the forget output is a no-op, never a second subtraction
    again = tmp_path / "again"
    assert unlearn_main(["forget", str(out), "--samples", str(samples), "--out", str(again), "--json", "--quiet"]) == 0
    repeat = json.loads(capsys.readouterr().out)
    assert repeat["request"]["num_keys"] == 0 and repeat["request"]["skipped_already_forgotten"] == 3
    twice = torch.load(again / "model.pt", weights_only=True)
    assert all(torch.equal(after[name], twice[name]) for name in after)


def test_class_forget_with_auto_scale_gold_and_purge(tmp_path, capsys):
    run, gold = tmp_path / "run", tmp_path / "gold"
    common = ["--dataset", "digits", "--model", "simple", "--epochs", "3", "--keep-first", "3:60", "--quiet"]
    assert unlearn_main(["train", *common, "--method", "per-sample", "--keep", "0.05", "--out", str(run)]) == 0
    assert unlearn_main(["train", *common, "--method", "none", "--exclude-class", "3", "--out", str(gold)]) == 0
    capsys.readouterr()
    out = tmp_path / "forgot"
    assert unlearn_main(["forget", str(run), "--class", "3", "--scale", "auto", "--gold", str(gold), "--purge",
                         "--out", str(out), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scale"] > 0 and result["scale_search"]["evaluations"] > 1
    assert result["forgotten_acc"] < result["after_train"]["forgotten_acc"]
    assert result["gold"]["forgotten_acc"] == 0.0 and "gap_to_gold" in result
    with gradstore.open(run / "store.h5") as store:
        assert store.info()["rows_purged"] == 60
    assert result["purged_rows"] == 60
    # the original run's model still holds the class but its rows are gone: refused, not silently skipped
    assert unlearn_main(["forget", str(run), "--class", "3", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "not live" in capsys.readouterr().err
    # from the forget output the same request is a no-op
    assert unlearn_main(["forget", str(out), "--class", "3", "--out", str(tmp_path / "y"), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["request"]["num_keys"] == 0


def test_cifar100_loader_reads_the_standard_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, count in (("train", 6), ("test", 4)):
        payload = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                   "fine_labels": list(range(count)), "coarse_labels": [0] * count}
        (folder / name).write_bytes(pickle.dumps(payload))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    split = datasets.load_dataset("cifar100", tmp_path)
    assert split.train_x.shape == (6, 3, 32, 32) and split.test_x.shape == (4, 3, 32, 32)
    assert split.num_classes == 100 and split.train_y.tolist() == list(range(6))
    raw = pickle.loads((folder / "train").read_bytes())["data"][1]
    np.testing.assert_allclose(split.train_x[1].reshape(-1), raw / 255.0, rtol=1e-6)  # CHW, as stored


def test_cifar100_missing_files_say_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        datasets.load_dataset("cifar100", tmp_path)


def test_keep_first_and_sample_files(tmp_path):
    split = datasets.load_dataset("digits")
    kept = datasets.keep_first(split, 3, 10)
    assert (kept.train_y == 3).sum() == 10 and len(kept) == len(split) - (split.train_y == 3).sum() + 10
    first_threes = np.nonzero(split.train_y == 3)[0][:10]
    np.testing.assert_array_equal(kept.source_indices[kept.train_y == 3], first_threes)
    (tmp_path / "s.txt").write_text("4\n2\n")
    np.testing.assert_array_equal(datasets.read_sample_file(tmp_path / "s.txt"), [4, 2])
    np.save(tmp_path / "s.npy", np.array([1, 2, 3]))
    np.testing.assert_array_equal(datasets.read_sample_file(tmp_path / "s.npy"), [1, 2, 3])
    (tmp_path / "bad.txt").write_text("1\nx\n")
    with pytest.raises(ValueError, match="one integer"):
        datasets.read_sample_file(tmp_path / "bad.txt")


def test_forget_refuses_a_store_of_another_model(tmp_path, capsys):
    run = tmp_path / "run"
    assert unlearn_main(["train", "--dataset", "digits", "--model", "simple", "--method", "per-sample", "--epochs", "1",
                         "--keep", "0.02", "--out", str(run), "--quiet"]) == 0
    config = json.loads((run / "train.json").read_text())
    config["num_classes"] = 11  # the model rebuilt for forget now has a different last layer
    (run / "train.json").write_text(json.dumps(config))
    capsys.readouterr()
    # the saved weights do not even load into that model: an error naming the file and the mismatch
    assert unlearn_main(["forget", str(run), "--class", "1", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "model.pt does not fit" in error and "net.6.weight (10, 400) where the model has (11, 400)" in error
    assert not (tmp_path / "o").exists()


def test_mnist_smoke_real_data(tmp_path, capsys):
    """One real-MNIST run: 1,920 samples, two epochs, per-sample recording, forget 10 samples."""
    try:
        split = datasets.load_dataset("mnist")
    except FileNotFoundError as error:
        pytest.skip(f"real MNIST not available: {error}")
    x, y = split.train_x[:1920], split.train_y[:1920]
    model = build_model("simple", 1, 10, seed=0)
    store = gradstore.create(tmp_path / "m.h5", 95110, 1920, 0.02, codec="int8", seed=0)
    result = train(model, x, y, epochs=2, batch_size=64, seed=0, recorders=[PerSampleRecorder(store, "update")],
                   device=torch.device("cpu"), progress=False)
    assert result["steps"] == 60
    test_acc = float((model(torch.from_numpy(split.test_x[:2000])).argmax(1).numpy() == split.test_y[:2000]).mean())
    assert test_acc > 0.6, test_acc  # 60 Adam steps on real digits learn (chance: 0.1)
    store = gradstore.open(tmp_path / "m.h5")
    weights = flat_params(model)
    store.scatter_add(weights, np.arange(10), 1.0)
    assert 0 < np.abs(weights - flat_params(model)).max() < 1.0


def test_models_match_the_seeds_parameter_counts():
    count = lambda model: sum(p.numel() for p in model.parameters())
    assert count(build_model("simple", 1, 10)) == 95_110
    assert count(build_model("simple", 3, 100)) == 133_000
    resnet = build_model("resnet18", 3, 100, groups=1)
    assert count(resnet) == 11_227_812
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.modules())
    assert resnet(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_training_is_seeded_and_deterministic():
    x, y = digits_subset(128)
    weights = []
    for _ in range(2):
        model = build_model("simple", 1, 10, seed=4)
        train(model, x, y, epochs=1, batch_size=32, seed=9, device=torch.device("cpu"), progress=False)
        weights.append(flat_params(model))
    np.testing.assert_array_equal(weights[0], weights[1])
    other = build_model("simple", 1, 10, seed=4)
    train(other, x, y, epochs=1, batch_size=32, seed=10, device=torch.device("cpu"), progress=False)
    assert not np.array_equal(weights[0], flat_params(other))  # the seed matters (batch order)


def test_sample_request_auto_scale_reports_its_evidence(tmp_path, capsys):
    run = tmp_path / "run"
    assert unlearn_main(["train", "--dataset", "digits", "--model", "simple", "--method", "per-sample", "--epochs", "2",
                         "--keep", "0.05", "--out", str(run), "--quiet"]) == 0
    np.save(tmp_path / "s.npy", np.arange(0, 200, 10))
    capsys.readouterr()
    assert unlearn_main(["forget", str(run), "--samples", str(tmp_path / "s.npy"), "--scale", "auto",
                         "--out", str(tmp_path / "o"), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    search = result["scale_search"]
    assert search["rule"].startswith("samples: the projected removal")
    evidence = search["evidence"]
    assert evidence["forget_samples"] == 20 and evidence["control_samples"] >= 50 and evidence["projections"] >= 1
    assert evidence["stopped_by"] in ("evidence", "guard", "segments") and 0 <= evidence["p_value"] <= 1
    if result["scale"] == 0:  # no evidence: the model is the trained one
        assert result["ua"] == result["after_train"]["ua"] and result["ta"] == result["after_train"]["ta"]
    else:
        assert evidence["p_value"] < 0.05


def test_forget_on_a_run_trained_with_exclusions_maps_keys_to_its_own_samples(tmp_path, capsys):
    run = tmp_path / "run"
    (tmp_path / "ex.txt").write_text("0\n1\n2\n")
    assert unlearn_main(["train", "--dataset", "digits", "--model", "simple", "--method", "per-sample", "--epochs", "1",
                         "--keep", "0.02", "--exclude-samples", str(tmp_path / "ex.txt"), "--out", str(run),
                         "--quiet"]) == 0
    capsys.readouterr()
    assert json.loads((run / "train.json").read_text())["num_samples"] == 1437 - 3
    np.save(tmp_path / "f.npy", np.array([len(datasets.load_dataset("digits")) - 4]))  # the run's last key
    assert unlearn_main(["forget", str(run), "--samples", str(tmp_path / "f.npy"), "--out", str(tmp_path / "o"),
                         "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["request"]["num_keys"] == 1


def test_sgd_momentum_update_rows_carry_the_momentum(tmp_path):
    """With momentum mu, a gradient moves the weights by lr*g/(1-mu) over the following steps:
    the rows (p=1, fp32) should add up to about the whole trajectory, not a tenth of it."""
    x, y = digits_subset(256)
    model = build_model("simple", 1, 10, seed=2)
    w0 = flat_params(model)
    store = gradstore.create(tmp_path / "m.h5", w0.size, len(y), 1.0, codec="fp32")
    train(model, x, y, epochs=6, batch_size=16, seed=0, optimizer="sgd-momentum", lr=0.01,
          recorders=[PerSampleRecorder(store, "update")], device=torch.device("cpu"), progress=False)
    travelled = w0 - flat_params(model)
    rows = gradstore.open(tmp_path / "m.h5").read(np.arange(len(y))).sum(0)
    projection = float(rows @ travelled / (travelled @ travelled))
    # ~96 steps: the last ~10 steps' momentum is not yet spent, so slightly above 1 (without the
    # 1/(1-mu) factor it would be about 0.1)
    assert 0.8 < projection < 1.25, projection


def test_forget_refuses_a_store_recorded_for_another_model_and_leaves_it_as_it_was(tmp_path, capsys):
    """Same parameter count, other layout: the fingerprint tells them apart before any row is applied."""
    import hashlib

    import gradstore
    from unlearn.params import named_shapes

    run = tmp_path / "run"
    assert unlearn_main(["train", "--dataset", "digits", "--model", "simple", "--method", "per-sample", "--epochs", "1",
                         "--keep", "0.02", "--out", str(run), "--quiet"]) == 0
    model = build_model("simple", 1, 10)
    other = [(name.replace("net.", "body."), shape) for name, shape in named_shapes(model)]
    with gradstore.open(run / "store.h5") as store:
        rows = store.read(np.arange(store.num_keys))
        foreign = gradstore.create(tmp_path / "foreign.h5", store.num_params, store.num_keys, 0.02, codec="int8",
                                   fingerprint=gradstore.model_fingerprint(other))
        foreign.accumulate(np.arange(store.num_keys), rows, labels=store.labels)
        foreign = foreign.finalize()
        foreign.close()
    (tmp_path / "foreign.h5").replace(run / "store.h5")
    digest = hashlib.sha256((run / "store.h5").read_bytes()).hexdigest()
    assert unlearn_main(["forget", str(run), "--class", "1", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "recorded for another model" in capsys.readouterr().err
    assert hashlib.sha256((run / "store.h5").read_bytes()).hexdigest() == digest
    assert not (tmp_path / "o").exists()


def test_the_forget_pipeline_refuses_an_unfinished_recording(tmp_path):
    from unlearn import plan_removal

    with gradstore.create(tmp_path / "r.h5", num_params=100, num_keys=10, keep=0.1) as recording:
        recording.accumulate([1], np.ones((1, recording.k), np.float32))
        with pytest.raises(gradstore.BadInputError, match="finalize never ran"):
            plan_removal(recording, "per-sample", data=None, samples=[1])
