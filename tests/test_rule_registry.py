"""Step rules by name: every registered rule keeps the rule contract on a real run, and a rule defined
outside the library is reached through ``unlearn.forget(..., scale=name)`` like the built-in ones."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

import gradstore
import unlearn
from unlearn.cli import main as unlearn_main
from unlearn.errors import RequestError, UnlearnError
from unlearn.forgetting import (ClassRule, RuleInput, SampleRule, Step, apply_removal, parse_scale, plan_removal,
                                registered_rules, unregister_rule)
from unlearn.forgetting.rules import TokenRule, rule_kinds
from unlearn.params import flat_params, load_flat_params
from unlearn.runs import data as datasets
from unlearn.runs import folders as runs
from unlearn.runs.models import build_model

# (rule name, request kind) for every registered rule and every kind it serves: collected once, so a
# rule registered by the library (not by a test) is held to the contract without a new test.
CASES = [(name, kind) for name, rule in registered_rules().items() for kind in rule_kinds(rule)]
REQUESTS = {"class": {"cls": 3}, "samples": {"samples": np.arange(0, 400, 20)}}
LANGUAGE_MODEL_RULES = {name for name, rule in registered_rules().items()  # causal language models only
                        if isinstance(rule, TokenRule)}


def file_digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """600 digits, the seed's small CNN trained 2 epochs while a per-sample store (p = 0.05, int8) records it."""
    split = datasets.load_dataset("digits")
    data = split.subset(np.arange(len(split)) < 600)
    model = build_model("simple", data.in_channels, data.num_classes, seed=0)
    path = tmp_path_factory.mktemp("recorded") / "store.h5"
    recorder = unlearn.create_recorder(path, "per-sample", model, len(data), keep=0.05, seed=0)
    unlearn.train(model, data.train_x, data.train_y, epochs=2, batch_size=32, seed=0, recorders=[recorder],
                  device=torch.device("cpu"), progress=False)
    return model, flat_params(model), data, path


def test_the_built_in_rules_are_registered_and_auto_picks_them_by_kind():
    rules = registered_rules()
    assert isinstance(rules["class"], ClassRule) and isinstance(rules["samples"], SampleRule)
    assert ("class", "class") in CASES and ("samples", "samples") in CASES
    assert ("class", "samples") not in CASES and ("samples", "class") not in CASES
    assert unlearn.register_rule is unlearn.forgetting.register_rule


@pytest.mark.parametrize("name, kind", CASES)
def test_every_registered_rule_keeps_the_contract(recorded, name, kind):
    """A finite change of the model's size, a JSON report, the store untouched, the model = base + change."""
    model, base, data, path = recorded
    digest = file_digest(path)
    with gradstore.open(path) as store:
        removal = plan_removal(store, "per-sample", data, seed=0, **REQUESTS[kind])
        assert removal.request.kind == kind and np.any(removal.vector)
        if name in LANGUAGE_MODEL_RULES:  # this CNN is refused by name, nothing changed (tests/test_token_rule.py
            with pytest.raises(RequestError, match="token windows"):  # holds the rule's contract on a GPT-2)
                registered_rules()[name](RuleInput(model, base, removal, data, store=store, seed=0))
            assert np.array_equal(flat_params(model), base)
            return
        step = registered_rules()[name](RuleInput(model, base, removal, data, store=store, seed=0))
        assert isinstance(step, Step)
        assert step.change.shape == base.shape and step.change.dtype == np.float32
        assert np.all(np.isfinite(step.change))
        json.dumps(step.report, allow_nan=False)
        load_flat_params(model, base + np.float32(1.0))  # whatever the model holds, applying starts from base
        choice = apply_removal(model, base, removal, data, name, seed=0, store=store)
    assert file_digest(path) == digest
    after = flat_params(model)
    assert np.array_equal(choice.change, step.change)  # the rule is deterministic: the same change applied
    if step.weights is None:
        assert np.array_equal(after, base + step.change)
    else:  # a walked path: loaded as the rule computed it, which is base + change to float32 rounding
        assert np.array_equal(after, step.weights)
        largest = max(np.abs(after).max(), np.abs(base).max())
        np.testing.assert_allclose(after, base + step.change, rtol=0, atol=4 * np.finfo(np.float32).eps * largest)
    json.dumps(choice.search(), allow_nan=False)
    assert set(choice.search()) >= {"rule", "reached", "evaluations", "seconds"}
    load_flat_params(model, base)


@dataclasses.dataclass(frozen=True)
class HalfClassStep:
    """Half the class rule's step: a rule built on another, with its own parameter."""

    fraction: float = 0.5
    kinds = ("class",)

    def __call__(self, given):
        full = ClassRule()(given)
        return Step(np.float32(self.fraction) * full.change, {"full_scale": full.scale, "fraction": self.fraction},
                    scale=full.scale * self.fraction, reached=full.reached, evaluations=full.evaluations,
                    rule=f"half the class rule's step (x{self.fraction})")


def dampen(given):
    """The rows scaled by a fixed 0.5, whatever the request."""
    return Step(np.float32(0.5) * given.rows, {"factor": 0.5, "keys": int(given.keys.size)}, scale=0.5)


def first_tensor_only(given):
    """A change that is no multiple of the rows: the rows of the first parameter tensor alone."""
    size = next(given.model.parameters()).numel()
    change = np.zeros_like(given.rows)
    change[:size] = given.rows[:size]
    return Step(change, {"parameters": size})


@pytest.fixture
def external_rules():
    """Three rules registered from outside the library, unregistered after the test."""
    names = {"test-half-class": HalfClassStep, "test-dampen": dampen, "test-first-tensor": first_tensor_only}
    for name, rule in names.items():
        unlearn.register_rule(name)(rule)
    yield list(names)
    for name in names:
        unregister_rule(name)
    assert not set(names) & set(registered_rules())


TRAIN = "train --dataset digits --model simple --method per-sample --epochs 1 --keep 0.05 --keep-first 3:60 --quiet"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run written by `python -m unlearn train`: digits, per-sample rows, one epoch."""
    run = tmp_path_factory.mktemp("rules") / "run"
    assert unlearn_main([*TRAIN.split(), "--out", str(run)]) == 0
    return run


def test_an_external_rule_runs_through_forget_by_name_with_its_report(run_folder, external_rules):
    samples = np.arange(0, 300, 15)
    digest = file_digest(run_folder / "store.h5")
    base = flat_params(runs.load_model(run_folder, runs.load_json(run_folder / "train.json")))
    damped = unlearn.forget(run_folder, samples=samples, scale="test-dampen", device="cpu", progress=False)
    given = unlearn.forget(run_folder, samples=samples, scale=0.5, device="cpu", progress=False)
    assert np.array_equal(flat_params(damped.model), flat_params(given.model))  # 0.5 x the rows, as a number gives
    assert not np.array_equal(flat_params(damped.model), base)
    report = json.loads(json.dumps(damped.report))
    assert report["scale"] == 0.5
    assert report["scale_search"] == {"rule": "test-dampen", "reached": True, "evaluations": 0,
                                      "seconds": report["scale_search"]["seconds"], "factor": 0.5, "keys": 20}
    # a change that is no multiple of the rows: its scale is the fitted one, and says so
    layer = unlearn.forget(run_folder, samples=samples, scale="test-first-tensor", device="cpu", progress=False)
    moved = np.nonzero(flat_params(layer.model) != base)[0]
    first = next(layer.model.parameters()).numel()
    assert moved.size and moved.max() < first
    assert layer.report["scale_search"]["scale_fitted"] is True and 0 < layer.report["scale"] < 1
    assert file_digest(run_folder / "store.h5") == digest  # forget never writes the store


def test_a_rule_built_on_the_class_rule_halves_its_step(run_folder, external_rules):
    auto = unlearn.forget(run_folder, cls=3, scale="auto", device="cpu", progress=False)
    half = unlearn.forget(run_folder, cls=3, scale="test-half-class", device="cpu", progress=False)
    assert auto.report["scale"] > 0
    assert half.report["scale"] == auto.report["scale"] / 2
    assert half.report["scale_search"]["full_scale"] == auto.report["scale"]
    assert half.report["scale_search"]["rule"] == "half the class rule's step (x0.5)"
    with pytest.raises(RequestError, match="'test-half-class' serves class requests, not samples requests"):
        unlearn.forget(run_folder, samples=[1, 2], scale="test-half-class", device="cpu", progress=False)


def test_unknown_names_and_bad_rules_are_refused_by_name(recorded, external_rules):
    model, base, data, path = recorded
    with gradstore.open(path) as store:
        removal = plan_removal(store, "per-sample", data, samples=[3, 4, 5], seed=0)
    with pytest.raises(RequestError, match=r"no step rule named 'nope'.*class, feature, samples, test-dampen"):
        apply_removal(model, base, removal, data, "nope")
    with pytest.raises(RequestError, match="'class' serves class requests, not samples requests"):
        apply_removal(model, base, removal, data, "class")
    as_text = apply_removal(model, base, removal, data, "0.5")  # a number given as text is that number
    assert as_text.scale == 0.5 and np.array_equal(as_text.weights, base + np.float32(0.5) * removal.vector)
    with pytest.raises(RequestError, match="from 0"):
        apply_removal(model, base, removal, data, "nan")
    with pytest.raises(RequestError, match="'ClassRule' serves class requests, not samples requests"):
        apply_removal(model, base, removal, data, ClassRule(margin=1.0))  # a rule object, not a name
    with pytest.raises(UnlearnError, match="already registered"):
        unlearn.register_rule("test-dampen")(dampen)
    for bad in ("auto", "1.5", "", " spaced "):
        with pytest.raises(UnlearnError, match="name must be"):
            unlearn.register_rule(bad)
    wrong = {"test-short": lambda given: Step(np.zeros(3, np.float32)),
             "test-nan": lambda given: Step(np.full_like(given.rows, np.nan)),
             "test-report": lambda given: Step(np.zeros_like(given.rows), {"array": np.zeros(2)}),
             "test-clash": lambda given: Step(np.zeros_like(given.rows), {"seconds": 1}),
             "test-weights": lambda given: Step(np.zeros_like(given.rows), weights=given.base + np.float32(0.01))}
    messages = {"test-short": "shape", "test-nan": "not finite", "test-report": "not JSON", "test-clash": "may not use",
                "test-weights": "not base \\+ change"}
    for name, rule in wrong.items():
        unlearn.register_rule(name)(rule)
        try:
            with pytest.raises(UnlearnError, match=f"'{name}'.*{messages[name]}"):
                apply_removal(model, base, removal, data, name)
        finally:
            unregister_rule(name)
    with pytest.raises(RequestError, match="no step rule named 'never'"):
        unregister_rule("never")


def test_parse_scale_takes_numbers_auto_and_registered_names(external_rules):
    assert parse_scale("auto") == "auto" and parse_scale("class") == "class" and parse_scale("test-dampen") == "test-dampen"
    assert parse_scale("0") == 0.0 and parse_scale("1") == 1.0 and parse_scale("65536") == 65536.0
    assert parse_scale("1e37", max_scale=1e38) == 1e37
    for bad in ("nan", "inf", "-1", "70000", "1e40"):
        with pytest.raises(RequestError, match=f"--scale .*got {bad}"):
            parse_scale(bad)
    with pytest.raises(RequestError, match=r"--scale must be a number, 'auto' or a registered rule \(class, feature, "
                                           r"samples, test-dampen, test-first-tensor, test-half-class, tokens, tokens-repair\), got 'fast'"):
        parse_scale("fast")
