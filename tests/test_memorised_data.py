"""What a group of samples taught together (issue 24), on a real poisoned digits run recorded by `unlearn train`:
``find_similar`` finds the unnamed poisoned samples and nothing for a random request; the "feature" rule takes the
backdoor out through ``forget`` (CLI, --find-similar) and ``forget_keys``, and changes nothing for a random request;
bad requests are refused with the files left as they were."""

import hashlib
import json

import numpy as np
import pytest
import torch

import gradstore
from unlearn import find_similar, forget_keys
from unlearn.cli import main as unlearn_main
from unlearn.errors import RequestError
from unlearn.evaluation import accuracy
from unlearn.forgetting import plan_removal, apply_removal
from unlearn.params import flat_params
from unlearn.runs import data as datasets
from unlearn.runs import folders as runs


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """10 epochs on digits (about 15 s): 60 samples poisoned with a 2x2 patch and relabelled 0, recorded at p = 0.05."""
    out = tmp_path_factory.mktemp("memorised") / "run"
    assert unlearn_main(["train", "--dataset", "digits", "--model", "simple", "--epochs", "10", "--method",
                         "per-sample", "--keep", "0.05", "--poison", "60", "--poison-seed", "5", "--out", str(out),
                         "--quiet"]) == 0
    config = runs.load_run_config(out)
    data = runs.build_data(config)
    return out, config, data, datasets.read_sample_file(out / "poisoned.txt")


def model_of(run_dir, config):
    return runs.load_model(run_dir, config, "cpu")


def triggered_accuracy(model, data):
    """Share of triggered test images of other classes predicted as the target (the ASR)."""
    others = data.test_y != data.poison.target
    x = data.poison.trigger.apply(data.test_x[others])
    return float((model(torch.as_tensor(x)).argmax(1).numpy() == data.poison.target).mean())


def test_find_similar_finds_the_unnamed_poisoned_samples_and_nothing_for_random_requests(run):
    run_dir, config, data, poisoned = run
    model = model_of(run_dir, config)
    everyone = np.arange(len(data))
    for draw in range(3):
        named = np.random.default_rng(draw).choice(poisoned, 15, replace=False)
        similar = find_similar(model, data.train_x, data.train_y, named, np.setdiff1d(everyone, named))
        report = similar.report(np.setdiff1d(poisoned, named))
        assert similar.coherence.p_value < 0.001
        assert not np.isin(similar.found, named).any()
        assert report["recall"] >= 0.8 and report["precision"] >= 0.9, report
        assert [entry["key"] for entry in report["found"]] == similar.found.tolist()
        assert all(s >= similar.threshold for s in similar.scores)
    clean = np.setdiff1d(everyone, poisoned)
    for draw in range(3):
        named = np.random.default_rng(10 + draw).choice(clean, 15, replace=False)
        similar = find_similar(model, data.train_x, data.train_y, named, np.setdiff1d(everyone, named))
        assert similar.found.size == 0 and similar.coherence.p_value >= 0.001 and "why_nothing" in similar.report()


def test_feature_rule_takes_the_backdoor_out_and_leaves_a_random_request_unchanged(run):
    run_dir, config, data, poisoned = run
    model = model_of(run_dir, config)
    base = flat_params(model)
    asr_before, ta_before = triggered_accuracy(model, data), accuracy(model, data.test_x, data.test_y)
    assert asr_before > 0.5  # the backdoor was learnt
    with gradstore.open(run_dir / "store.h5") as store:
        choice = apply_removal(model, base, plan_removal(store, config.method, data, samples=poisoned, seed=0),
                               data, "feature", store=store)
        assert choice.name == "feature" and choice.report["coherence"]["p_value"] < 0.001
        # on digits the whole projection costs class 0 more than the 1-point guard: the rule keeps the share that holds
        assert 0 < choice.report["share"] <= 1 and choice.reached == (choice.report["share"] == 1)
        assert all(a >= b - 0.01 for a, b in zip(choice.report["guards_after"], choice.report["guards_before"]))
        assert triggered_accuracy(model, data) < 0.5 * asr_before
        assert accuracy(model, data.test_x, data.test_y) >= ta_before - 0.02
        changed = np.flatnonzero(choice.change)  # only the head (net.6 of the simple CNN) moved
        names = [name for name, _ in model.named_parameters()]
        sizes = np.cumsum([0] + [p.numel() for p in model.parameters()])
        head = [names.index("net.6.weight"), names.index("net.6.bias")]
        assert changed.min() >= sizes[head[0]] and changed.max() < sizes[head[1] + 1]
        clean = np.setdiff1d(np.arange(len(data)), poisoned)
        random = np.random.default_rng(3).choice(clean, 15, replace=False)
        again = model_of(run_dir, config)
        choice = apply_removal(again, base, plan_removal(store, config.method, data, samples=random, seed=0),
                               data, "feature", store=store)
        assert not np.any(choice.change) and not choice.reached and "no direction" in choice.rule


def test_forget_cli_find_similar_lists_found_keys_with_precision_and_recall(run, tmp_path, capsys):
    run_dir, config, data, poisoned = run
    named = np.sort(np.random.default_rng(0).choice(poisoned, 15, replace=False))
    request = tmp_path / "named.txt"
    request.write_text("\n".join(map(str, named)) + "\n")
    before = sha256(run_dir / "store.h5")
    capsys.readouterr()
    assert unlearn_main(["forget", str(run_dir), "--samples", str(request), "--find-similar", "--scale", "feature",
                         "--out", str(tmp_path / "f"), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    found = [entry["key"] for entry in result["found"]]
    assert found and all(set(entry) == {"key", "score"} for entry in result["found"])
    assert not set(found) & set(named.tolist())
    unnamed = set(poisoned.tolist()) - set(named.tolist())
    assert result["precision"] == pytest.approx(len(set(found) & unnamed) / len(found))
    assert result["recall"] == pytest.approx(len(set(found) & unnamed) / len(unnamed))
    assert result["request"]["num_samples"] == named.size + len(found)
    assert result["scale_search"]["rule"].startswith("feature")
    assert result["scale_search"]["share"] > 0  # on digits the retained guards bind: a share of the direction
    assert result["asr"] < result["after_train"]["asr"] - 0.05
    assert result["ta"] >= result["after_train"]["ta"] - 0.02
    assert json.loads((tmp_path / "f" / "forget.json").read_text())["found"] == result["found"]
    assert sha256(run_dir / "store.h5") == before  # forget never writes the store without --mark
    capsys.readouterr()
    assert unlearn_main(["forget", str(run_dir), "--class", "3", "--find-similar", "--out", str(tmp_path / "g")]) != 0
    assert "--find-similar serves --samples" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_forget_keys_find_similar_marks_the_found_rows_and_refuses_without_a_dataset(run, tmp_path):
    run_dir, config, data, poisoned = run
    copy = tmp_path / "store.h5"
    copy.write_bytes((run_dir / "store.h5").read_bytes())
    dataset = torch.utils.data.TensorDataset(torch.as_tensor(data.train_x), torch.as_tensor(data.train_y))
    named = np.random.default_rng(1).choice(poisoned, 15, replace=False)
    model = model_of(run_dir, config)
    weights, before = flat_params(model), sha256(copy)
    with pytest.raises(RequestError, match="find_similar needs dataset="):
        forget_keys(model, copy, named, 1.0, find_similar=True)
    with pytest.raises(RequestError, match="needs the training data"):
        forget_keys(model, copy, named, "feature")
    assert sha256(copy) == before and np.array_equal(flat_params(model), weights)
    result = forget_keys(model, copy, named, "feature", dataset=dataset, find_similar=True)
    found = [entry["key"] for entry in result.found]
    assert len(found) >= 30 and np.isin(found, poisoned).mean() >= 0.9
    assert np.array_equal(result.keys, np.union1d(named, found)) and result.report["found"] == result.found
    assert result.rule == "feature" and not np.array_equal(flat_params(model), weights)
    with gradstore.open(copy) as store:
        assert (store.state[result.keys] == gradstore.RowState.FORGOTTEN).all()
    with pytest.raises(RequestError, match=r"dataset\[0\] is tuple|not an \(input, label\) pair"):
        forget_keys(model, copy, [0], 1.0, dataset=torch.utils.data.TensorDataset(torch.zeros(len(data), 1)))
    with pytest.raises(RequestError, match="dataset has 10 items"):
        forget_keys(model, copy, [0], 1.0, dataset=torch.utils.data.TensorDataset(torch.zeros(10, 1)), )


class TiedHead(torch.nn.Module):
    """A classifier whose head's weight is an embedding's (as GPT-2's lm_head is wte)."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(3, 8)
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)
        self.head.weight = self.embedding.weight

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


class Sequence(torch.nn.Module):
    """Logits per position, [batch, positions, classes], as a language model gives."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(x.reshape(x.shape[0], 2, 4).repeat(1, 1, 2))


@pytest.mark.parametrize("model, match", [(TiedHead(), "tied to 'embedding.weight'"),
                                          (Sequence(), r"returns \(1, 2, 3\): a language model")])
def test_feature_rule_refuses_a_tied_head_and_outputs_it_cannot_guard(model, match):
    from unlearn.forgetting import FeatureRule, Removal, Request, RuleInput, TrainingData

    rng = np.random.default_rng(0)
    data = TrainingData(rng.normal(size=(60, 8)).astype(np.float32), rng.integers(0, 3, 60))
    samples = np.arange(6)
    removal = Removal(Request(samples=samples, keys=samples, excluded=samples), np.zeros(1), 0.0)
    base = flat_params(model)
    with pytest.raises(RequestError, match=match):
        FeatureRule()(RuleInput(model, base, removal, data))
    assert np.array_equal(flat_params(model), base)


def test_coherence_needs_an_effect_to_act_on_as_well_as_significance():
    from unlearn.forgetting.similar import Coherence

    seen = Coherence(cosine=0.033, null_max=0.0369, p_value=2 / 2001, draws=2000)  # a random MNIST request, seed 1
    assert "below 0.1" in seen.shortfall(0.001, 0.1)
    assert "not below 0.001" in Coherence(0.45, 0.5, 0.01, 2000).shortfall(0.001, 0.1)
    assert Coherence(0.45, 0.11, 1 / 2001, 2000).shortfall(0.001, 0.1) == ""


def test_feature_rule_leaves_parameters_outside_the_store_index_untouched():
    """A subset store may record the head's weight and not its bias: the rule then never moves the bias."""
    from unlearn.forgetting import FeatureRule, Removal, Request, RuleInput, TrainingData

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    x[:12] += 4.0 * np.eye(8, dtype=np.float32)[0]  # twelve samples the model reads alike
    data = TrainingData(x, rng.integers(0, 3, 300))
    data.train_y[:12] = 1
    samples = np.arange(12)
    names = [n for n, _ in model.named_parameters() if n != "2.bias"]
    removal = Removal(Request(samples=samples, keys=samples, excluded=samples), np.zeros(1), 0.0)
    bias = model[2].bias.detach().clone()
    step = FeatureRule(guard_tolerance=1.0)(RuleInput(model, flat_params(model, names), removal, data, names=names))
    assert step.report["coherence"]["p_value"] < 0.001 and step.report["share"] == 1.0
    assert step.report["bias_absorbs_mean"] is False and np.any(step.change)
    assert torch.equal(model[2].bias, bias)


def test_find_similar_refuses_what_it_cannot_test_and_keeps_the_model_as_it_was(run):
    run_dir, config, data, poisoned = run
    model = model_of(run_dir, config)
    everyone = np.arange(len(data))
    with pytest.raises(RequestError, match="named outside"):
        find_similar(model, data.train_x, data.train_y, [5, len(data)], everyone)
    with pytest.raises(RequestError, match="control_draws=200 cannot give a p-value below evidence_p=0.001"):
        find_similar(model, data.train_x, data.train_y, poisoned[:15], everyone, control_draws=200)
    model.train()
    model.net[0].eval()  # a submodule's own mode is put back as it was, not the model's
    as_float64 = data.train_x.astype(np.float64)  # float64 data meets a float32 model
    similar = find_similar(model, as_float64, data.train_y, poisoned[:15], np.setdiff1d(everyone, poisoned[:15]))
    assert similar.found.size > 0
    assert model.training and not model.net[0].training and model.net[1].training


def test_forget_cli_find_similar_in_a_chain_counts_recall_among_what_it_could_find(run, tmp_path, capsys):
    run_dir, config, data, poisoned = run
    first, named = tmp_path / "first.txt", tmp_path / "named.txt"
    first.write_text("\n".join(map(str, poisoned[:30])) + "\n")
    named.write_text("\n".join(map(str, poisoned[30:45])) + "\n")
    assert unlearn_main(["forget", str(run_dir), "--samples", str(first), "--out", str(tmp_path / "a"),
                         "--quiet"]) == 0
    capsys.readouterr()
    assert unlearn_main(["forget", str(tmp_path / "a"), "--samples", str(named), "--find-similar", "--scale",
                         "feature", "--out", str(tmp_path / "b"), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    findable = set(poisoned[45:].tolist())  # neither named nor forgotten earlier in the chain
    found = {entry["key"] for entry in result["found"]}
    assert not found & set(poisoned[:45].tolist())
    assert result["find_similar"]["truth_unnamed"] == len(findable)
    assert result["recall"] == pytest.approx(len(found & findable) / len(findable))


def test_random_clean_samples_of_the_poisoned_label_find_nothing(run):
    """The label holds a distinct group (the poisoned samples): clean samples drawn from it reached p = 0.0005 at a
    mean cosine of .10-.14 against controls from the whole label (a review's repro); the 0.2 floor stops them."""
    run_dir, config, data, poisoned = run
    model = model_of(run_dir, config)
    zeros = np.setdiff1d(np.flatnonzero(data.train_y == 0), poisoned)
    for seed in range(6):
        named = np.random.default_rng(seed).choice(zeros, 30, replace=False)
        similar = find_similar(model, data.train_x, data.train_y, named, np.arange(len(data)), seed=seed)
        assert similar.found.size == 0, (seed, similar.coherence)
