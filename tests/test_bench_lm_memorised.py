"""bench/lm_memorised.py on a tiny GPT-2 (bench.lm's QUICK settings, random weights, no downloads): the run
folder is read back and checked, the search and the head projection run, every figure is a real number, and the
projection does what it says (the head no longer reads the directions; tied embeddings change with it)."""

import argparse
import hashlib
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from bench import lm, lm_memorised
from bench.language import build_gpt2, encode, stdlib_corpus
from unlearn.params import flat_params


@pytest.fixture(scope="module")
def corpus_text():
    return stdlib_corpus().text


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus_text):
    """A run folder of bench.lm's layout at QUICK settings, with untrained weights (two seeds) and no store."""
    folder = tmp_path_factory.mktemp("lm-memorised") / "run"
    folder.mkdir()
    args = argparse.Namespace(**lm.parser_defaults())
    args.quick = True
    settings = lm.settings(args)
    canaries = lm.canary_set(settings["canaries"], settings["seed"])
    data = lm.build_dataset(encode(corpus_text), canaries, settings["seq_len"], settings["plain_windows"],
                            settings["repeats"], settings["heldout"], settings["seed"])
    config = {"n_embd": settings["n_embd"], "n_layer": settings["n_layer"], "n_head": settings["n_head"],
              "n_positions": settings["seq_len"]}
    (folder / "lm.json").write_text(json.dumps({"settings": settings}))
    (folder / "canaries.json").write_text(json.dumps(
        {"canaries": canaries, "keys": data["keys"].tolist(), "num_samples": len(data["train"]),
         "train_sha256": hashlib.sha256(data["train"].tobytes()).hexdigest()}))
    for name, seed in (("trained", 0), ("retrained", 1)):
        np.save(folder / f"{name}.npy", flat_params(build_gpt2(seed, **config)), allow_pickle=False)
    return folder, settings, data


def test_the_run_folder_is_read_back_and_checked(tiny_run, corpus_text, tmp_path):
    folder, settings, data = tiny_run
    loaded = lm_memorised.load_run(folder, corpus_text)
    assert np.array_equal(loaded["data"]["train"], data["train"])
    assert loaded["trained"].dtype == np.float32 and loaded["trained"].size == loaded["retrained"].size
    assert np.intersect1d(loaded["retained_keys"], data["keys"]).size == 0
    bad = json.loads((folder / "canaries.json").read_text())
    bad["train_sha256"] = "0" * 64
    for name in ("lm.json", "trained.npy", "retrained.npy"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "canaries.json").write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match="sha256"):
        lm_memorised.load_run(tmp_path, corpus_text)


def test_the_projection_removes_the_directions_and_reports_the_embeddings():
    model = build_gpt2(0, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    rng = np.random.default_rng(0)
    v = lm_memorised.orthonormal(rng.normal(size=(2, 16)))
    assert np.allclose(v @ v.T, np.eye(2), atol=1e-10)
    wte = model.transformer.wte.weight.detach().clone()
    report = lm_memorised.project_head(model, v, rng.normal(size=16))
    w = model.lm_head.weight.detach().double().numpy()
    assert np.abs(w @ v.T).max() < 1e-5  # the head no longer reads V
    assert report["tied_to_wte"] and report["embeddings_changed"] and not report["bias"]
    assert not torch.equal(model.transformer.wte.weight, wte)  # tied: the embeddings moved with the head
    assert 0 < report["head_relative_change"] < 1 and len(report["most_changed_tokens"]) == 8

    untied = build_gpt2(0, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    lm_memorised.untie_head(untied)
    before = untied.transformer.wte.weight.detach().clone()
    report = lm_memorised.project_head(untied, v, np.zeros(16))
    assert not report["tied_to_wte"] and torch.equal(untied.transformer.wte.weight, before)
    assert np.abs(untied.lm_head.weight.detach().double().numpy() @ v.T).max() < 1e-5


def cheap_rank(model, prefix, secret, device):
    """A stand-in for bench.lm.secret_rank (tested against brute force in test_bench_lm.py), whose exact walk of
    10^6 candidates on an untrained model costs minutes: the secret's rank among it and 99 random candidates."""
    rng = np.random.default_rng(int(secret))
    others = ["".join(map(str, rng.integers(0, 10, len(secret)))) for _ in range(99)]
    lp = lm.secret_log_prob(model, prefix, secret, device)
    rank = 1 + sum(lm.secret_log_prob(model, prefix, o, device) > lp for o in others if o != secret)
    return {"rank": rank, "exposure_bits": math.log2(100) - math.log2(rank), "log_prob": lp, "candidates": 100,
            "forwards": 100, "expanded_leaves": 100}


def test_the_search_and_the_projections_run_end_to_end(tiny_run, corpus_text, tmp_path, monkeypatch):
    folder, settings, data = tiny_run
    monkeypatch.setattr(lm, "secret_rank", cheap_rank)
    args = lm_memorised.parser().parse_args(["--run", str(folder), "--out", str(tmp_path / "out"), "--named", "3",
                                             "--k", "1", "--no-library"])
    report = lm_memorised.run(args, corpus_text)
    assert json.loads((tmp_path / "out" / "lm_memorised.json").read_text())["models"].keys() == report["models"].keys()
    assert (tmp_path / "out" / "lm_memorised.md").read_text().count("\n|") >= 4

    per_canary = report["search"]["per_canary"]
    assert len(per_canary) == settings["canaries"]
    for r, canary in zip(per_canary, json.loads((folder / "canaries.json").read_text())["canaries"]):
        assert len(r["named"]) == 3 and set(r["named"]) <= set(canary["keys"])
        assert r["truth_unnamed"] == settings["repeats"] - 3
        assert r["num_found"] == len(r["found"]) == r["found_other_canaries"] + r["found_plain"] + sum(
            f["key"] in canary["keys"] for f in r["found"])
        assert not set(f["key"] for f in r["found"]) & set(r["named"])
        assert 0 < r["coherence"]["p_value"] <= 1
        first = r["diagnostic_first_round"]
        assert 0 <= first["auc"] <= 1 and 0 <= first["found"] <= len(data["train"]) - 3
        for value in (r["precision"], r["recall"]):
            assert value is None or 0 <= value <= 1
    random_request = report["search"]["random_request"]
    assert not set(random_request["named"]) & set(data["keys"].tolist())
    spans = report["span_search"]  # the same named windows, searched span by span (3 named: too few to pass)
    assert [r["named"] for r in spans["per_canary"]] == [r["named"] for r in per_canary]
    for r in spans["per_canary"] + [spans["random_request"]]:
        assert r["num_found"] == 0 and "why_nothing" in r
    assert "Search span by span" in (tmp_path / "out" / "lm_memorised.md").read_text()

    names = list(report["models"])
    assert names[:2] == ["trained (recorded)", "retrained without canaries"]
    assert "head projection, k = 1" in names and any("untied" in n for n in names)
    assert any("per canary" in n for n in names) and any("digit" in n for n in names)
    for name, f in report["models"].items():
        assert len(f["exposure_bits"]) == settings["canaries"]
        for value in [*f["exposure_bits"], f["heldout_loss"], f["retained_loss"], f["forget_loss"]]:
            assert math.isfinite(value)
        assert all(1 <= rank <= 10 ** 6 for rank in f["ranks"])
        if name not in names[:2]:
            assert f["projection"]["head_relative_change"] > 0
            assert isinstance(f["target"]["met"], bool)
            assert math.isclose(f["target"]["exposure_minus_retrained_bits"],
                                f["mean_exposure_bits"] - report["models"][names[1]]["mean_exposure_bits"])
    assert report["models"]["head projection, k = 1"]["projection"]["directions"] == 1
    assert report["models"][[n for n in names if "per canary" in n][0]]["projection"]["directions"] == \
        settings["canaries"]


def test_the_target_verdict():
    retrained = {"mean_exposure_bits": 1.5, "heldout_loss": 2.0}
    assert lm_memorised.verdict({"mean_exposure_bits": 3.4, "heldout_loss": 2.019}, retrained)["met"]
    assert not lm_memorised.verdict({"mean_exposure_bits": 3.6, "heldout_loss": 2.0}, retrained)["met"]
    assert not lm_memorised.verdict({"mean_exposure_bits": 1.0, "heldout_loss": 2.03}, retrained)["met"]
