"""`python -m bench lm --quick`, end to end: a tiny byte-level GPT-2 on the stdlib with planted canaries, trained
with recording into a real store, retrained without the canaries, and made to forget them with forget_keys.

Checks the run folder (the corpus' identity, the canaries' keys and the training set they sit in), the store
(the canary rows forgotten, the others live), the forgotten weights (the trained ones plus the canary rows at
their positions times the scale), and the report; and the exact exposure against brute force.
"""

import argparse
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradstore

pytest.importorskip("transformers")

from bench import lm
from bench.language import build_gpt2, encode, stdlib_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    done = subprocess.run([sys.executable, "-m", "bench", "lm", "--quick", "--out", str(out)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout, json.loads((out / "lm.json").read_text())


def test_the_run_folder_names_the_corpus_and_the_canaries(run):
    out, stdout, report = run
    corpus = stdlib_corpus()
    identity = json.loads((out / "corpus.json").read_text())
    assert identity["sha256"] == corpus.sha256 == report["corpus"]["sha256"]
    assert identity["files"] == sorted(identity["files"]) and len(identity["files"]) == identity["num_files"] > 10
    assert all(name.endswith(".py") for name in identity["files"])

    canaries = json.loads((out / "canaries.json").read_text())
    settings = report["settings"]
    keys = np.asarray(canaries["keys"])
    assert keys.size == settings["canaries"] * settings["repeats"] == len(np.unique(keys))
    assert sorted(k for c in canaries["canaries"] for k in c["keys"]) == keys.tolist()
    for canary in canaries["canaries"]:
        assert len(canary["secret"]) == 6 and canary["secret"].isdigit()
        assert canary["text"] == canary["format"].format(canary["secret"])
    # the training set the run describes is the one it trained on: rebuilt, it has the recorded hash, and the
    # windows at the canary keys begin with the canaries' lines
    data = lm.build_dataset(encode(corpus.text), lm.canary_set(settings["canaries"], settings["seed"]),
                            settings["seq_len"], settings["plain_windows"], settings["repeats"], settings["heldout"],
                            settings["seed"])
    assert hashlib.sha256(data["train"].tobytes()).hexdigest() == canaries["train_sha256"] == report["train_sha256"]
    assert np.array_equal(data["keys"], keys) and canaries["num_samples"] == len(data["train"])
    for canary in canaries["canaries"]:
        line = encode(canary["text"].encode())
        for key in canary["keys"]:
            assert np.array_equal(data["train"][key, :line.size], line)
    assert "corpus: " in stdout and "| retrained without canaries |" in stdout


def test_the_forgotten_weights_are_the_trained_ones_plus_the_canary_rows(run):
    out, _, report = run
    keys = np.asarray(json.loads((out / "canaries.json").read_text())["keys"])
    trained, retrained, forgotten = (np.load(out / f"{name}.npy", allow_pickle=False)
                                     for name in ("trained", "retrained", "forgotten"))
    scale = report["settings"]["scale"]
    with gradstore.open(out / "store.h5") as store:
        assert store.num_params == trained.size == report["settings"]["model"]["num_params"]
        assert store.keep == report["settings"]["keep"]
        assert np.all(store.state[keys] == gradstore.RowState.FORGOTTEN)
        others = np.setdiff1d(np.arange(store.num_keys), keys)
        assert np.all(store.state[others] == gradstore.RowState.LIVE)  # every training window recorded
        change = np.zeros(store.num_params, np.float64)
        for key, row in zip(keys.tolist(), store.read(keys)):
            np.add.at(change, store.positions(key), row.astype(np.float64))
    expected = np.float32(scale) * change
    assert np.count_nonzero(expected) > 0
    tolerance = 4 * np.finfo(np.float32).eps * np.abs(trained).max() + 1e-6 * np.abs(expected).max()
    np.testing.assert_allclose(forgotten.astype(np.float64) - trained, expected, rtol=0, atol=tolerance)
    assert np.array_equal(forgotten[expected == 0], trained[expected == 0])  # nothing moves off the rows
    applied = report["forget_keys"]
    assert applied["num_keys"] == keys.size and applied["scale"] == scale and applied["rule"] == "given"
    assert applied["change_norm"] == pytest.approx(np.linalg.norm(expected), rel=1e-4)
    assert applied["max_abs_error_vs_rows"] <= tolerance
    assert not np.array_equal(trained, retrained)
    assert report["distances"]["trained_to_forgotten"] == pytest.approx(np.linalg.norm(forgotten - trained), rel=1e-4)


def test_the_report_measures_every_model(run):
    out, _, report = run
    settings = report["settings"]
    names = list(report["models"])
    assert names[:3] == ["trained (recorded)", "retrained without canaries",
                         f"forget_keys, scale {settings['scale']:g}"]
    assert len(names) == 3 + sum(1 for s in settings["scales"] if s != settings["scale"])
    for figures in report["models"].values():
        assert len(figures["exposure_bits"]) == len(figures["ranks"]) == settings["canaries"]
        for bits, rank in zip(figures["exposure_bits"], figures["ranks"]):
            assert 1 <= rank <= 10 ** 6 and bits == pytest.approx(math.log2(10 ** 6 / rank))
        for name in ("forget_loss", "heldout_loss", "retained_loss", "mean_secret_nll_nats"):
            assert math.isfinite(figures[name]) and figures[name] > 0, name
        assert figures["heldout_ppl"] == pytest.approx(math.exp(figures["heldout_loss"]))
    trained = report["models"]["trained (recorded)"]
    retrained = report["models"]["retrained without canaries"]
    assert trained["forget_loss"] < retrained["forget_loss"]  # the canary windows were trained on
    assert report["training"]["trained"]["steps"] == settings["steps"]
    assert report["training"]["retrained"]["steps"] < settings["steps"]  # the same epochs, without the canaries
    assert (out / "lm.md").read_text().count("\n") == 2 + len(names)


@pytest.mark.parametrize("rule", ["tokens", "tokens-repair"])
def test_the_tokens_rule_bench_reads_the_run_and_measures_both_requests(run, tmp_path, rule):
    """bench.lm_tokens on the quick run: the canaries' rows are the run's forgotten - trained, both requests go
    through the library's rule, every model gets the figures and issue 24's verdict."""
    from bench import lm_tokens

    out, _, _ = run
    argv = ["--run", str(out), "--out", str(tmp_path), "--option", "control_draws=1000"]
    report = lm_tokens.run(lm_tokens.parser().parse_args(argv + (["--rule", rule] if rule != "tokens" else [])))
    names = list(report["models"])
    assert names[:2] == ["trained (recorded)", "retrained without canaries"] and len(names) == 4
    assert names[2].startswith(f"{rule} rule, canaries") and report["rule_name"] == rule
    assert report["rule"]["repair"] == (1.0 if rule == "tokens-repair" else 0.0)
    assert report["rule"]["control_draws"] == 1000
    for name in names[2:]:
        figures = report["models"][name]
        assert figures["rule"]["rule"].startswith("tokens") and "attribution" in figures["rule"]
    assert set(report["models"][names[2]]["target"]) >= {"met", "exposure_met", "heldout_loss_met"}
    assert isinstance(report["models"][names[3]]["unchanged"], bool)
    for name in names[2:]:
        figures = report["models"][name]
        assert math.isfinite(figures["heldout_loss"]) and len(figures["exposure_bits"]) == len(report["models"][names[0]]["exposure_bits"])
    assert report["rule_options"] == {"control_draws": 1000}
    assert json.loads((tmp_path / "lm_tokens.json").read_text())["models"].keys() == report["models"].keys()
    with pytest.raises(SystemExit):
        lm_tokens.parser().parse_args(["--option", "no_such_field=1"])
    with pytest.raises(SystemExit, match="registered TokenRule: tokens, tokens-repair"):
        lm_tokens.token_rule("samples", {})

    # bench.lm_fine_tune: the repair's steps alone, from the trained weights (a rule without a repair is refused)
    from bench import lm_fine_tune

    control_args = lm_fine_tune.parser().parse_args(["--run", str(out), "--rule", str(tmp_path / "lm_tokens.json")])
    if rule == "tokens":
        with pytest.raises(SystemExit, match="no repair"):
            lm_fine_tune.run(control_args)
        # bench.lm_still_predicted: the attributed tokens' share each model still predicts (the stop's yardstick)
        from bench import lm_still_predicted

        shares = lm_still_predicted.run(lm_still_predicted.parser().parse_args(["--run", str(out)]))
        assert shares["attributed_tokens"] == report["models"][names[2]]["rule"]["attribution"]["tokens"]
        trained = shares["models"]["trained (recorded)"]
        if shares["attributed_tokens"]:
            assert trained["attributed_still_predicted"] == 1.0  # attribution keeps only tokens predicted so
        else:  # the quick run's rows single out no token: no share to read
            assert all(f["attributed_still_predicted"] is None for f in shares["models"].values())
        assert set(shares["models"]) == {"trained (recorded)", "retrained without canaries"}
        for figures in shares["models"].values():
            assert 0.0 < figures["heldout_still_predicted"] < 1.0
    else:
        control = lm_fine_tune.run(control_args)
        tuned = control["models"]["fine-tune only (the repair's steps alone)"]
        walked = report["models"][names[2]]["rule"]
        assert tuned["fine_tune"]["steps"] == walked.get("steps", 0)
        assert tuned["fine_tune"]["step_length"] == pytest.approx(walked.get("step_length", 0.0))
        assert set(tuned["target"]) >= {"met", "exposure_met", "heldout_loss_met"}
        if tuned["fine_tune"]["steps"]:  # the control moved the model
            assert tuned["heldout_loss"] != report["models"][names[0]]["heldout_loss"]

    # bench.lm_reference_spread: the rule's model against the run's reference and one more retraining, cached
    from bench import lm_reference_spread

    rule = tmp_path / "lm_tokens.json"
    assert lm_reference_spread.main(["--run", str(out), "--rule", str(rule), "--retrain-seeds", "5",
                                     "--out", str(tmp_path / "spread")]) == 0
    spread = json.loads((tmp_path / "spread" / "lm_reference_spread.json").read_text())
    reference, other = spread["rows"]
    assert reference["verdict"] == report["models"][names[2]]["target"]  # the run's reference: lm_tokens' verdict
    assert other["model"] == "retrained, seed 5" and (out / "reference-spread5.npy").exists()
    assert other["mean_exposure_bits"] != reference["mean_exposure_bits"]  # another init and order: another model
    assert spread["training"]["5"]["steps"] == report_steps(out)
    assert spread["rule"]["of"] == 2 and 0 <= spread["rule"]["met_against"] <= 2
    assert spread["spread"]["heldout_loss"]["min"] <= spread["spread"]["heldout_loss"]["max"]
    written = (out / "reference-spread5.npy").stat().st_mtime_ns
    assert lm_reference_spread.main(["--run", str(out), "--retrain-seeds", "5"]) == 0  # cached: not retrained
    assert (out / "reference-spread5.npy").stat().st_mtime_ns == written
    marker = json.loads((out / "reference-spread5.json").read_text())
    marker["train_sha256"] = "0" * 64  # a cache of other data: retrained
    (out / "reference-spread5.json").write_text(json.dumps(marker))
    assert lm_reference_spread.main(["--run", str(out), "--retrain-seeds", "5"]) == 0
    assert (out / "reference-spread5.npy").stat().st_mtime_ns != written
    assert json.loads((out / "reference-spread5.json").read_text())["train_sha256"] == report_sha(out)
    foreign = json.loads(rule.read_text())
    foreign["models"]["retrained without canaries"]["heldout_loss"] += 0.1
    (tmp_path / "foreign.json").write_text(json.dumps(foreign))
    with pytest.raises(SystemExit, match="not a report of"):
        lm_reference_spread.main(["--run", str(out), "--rule", str(tmp_path / "foreign.json"), "--retrain-seeds", "5"])


def report_sha(out: Path) -> str:
    return json.loads((out / "lm.json").read_text())["train_sha256"]


def report_steps(out: Path) -> int:
    """The run's retraining's steps (the other seeds' retrainings leave out the same windows: as many steps)."""
    return json.loads((out / "lm.json").read_text())["training"]["retrained"]["steps"]


def test_the_exact_rank_is_the_brute_force_rank():
    torch.manual_seed(1)
    model = build_gpt2(0, n_embd=32, n_layer=2, n_head=2, n_positions=32).eval()
    with torch.no_grad():  # weights away from the init, so that candidates differ much
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    prefix, device = b"# my PIN is ", torch.device("cpu")
    for secret, chunk in (("492", 37), ("007", 37), ("3141", 700)):  # chunks cut across the levels
        found = lm.secret_rank(model, prefix, secret, device, chunk=chunk)
        digits = len(secret)
        ids = torch.tensor([list(prefix + f"{i:0{digits}d}".encode()) for i in range(10 ** digits)])
        with torch.no_grad():  # every candidate's whole line through the model's own forward
            hidden = model.transformer(input_ids=ids).last_hidden_state[:, len(prefix) - 1:-1]
            logp = torch.log_softmax(model.lm_head(hidden).double(), -1)
        scores = logp.gather(-1, ids[:, len(prefix):, None]).squeeze(-1).sum(-1)
        true = scores[int(secret)]
        assert found["rank"] == 1 + int((scores > true).sum())
        assert found["log_prob"] == pytest.approx(float(true), abs=1e-4)
        assert found["candidates"] == 10 ** digits
        assert found["exposure_bits"] == pytest.approx(math.log2(10 ** digits / found["rank"]))
        assert found["forwards"] <= len(prefix) + sum(10 ** level for level in range(1, digits))


@pytest.mark.parametrize("argv, message", [
    (["--canaries", "0"], "--canaries must be from 1"),
    (["--canaries", "99"], "--canaries must be from 1"),
    (["--keep", "0"], "--keep must be in"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--scales", "-1"], "non-negative"),
    (["--steps", "4", "--canaries", "4", "--repeats", "16"], "too few stdlib windows"),
])
def test_bad_settings_are_refused_by_name(argv, message):
    parser = argparse.ArgumentParser()
    lm.add_arguments(parser)
    with pytest.raises(SystemExit, match=message):
        lm.settings(parser.parse_args(argv))


def test_a_training_set_larger_than_the_corpus_is_refused():
    corpus = stdlib_corpus()
    with pytest.raises(SystemExit, match="the corpus has"):
        lm.build_dataset(encode(corpus.text), lm.canary_set(1, 0), 128, len(corpus.text) // 128, 2, 16, 0)
    with pytest.raises(SystemExit, match="too short for the canary"):
        lm.build_dataset(encode(corpus.text), lm.canary_set(1, 0), 8, 100, 2, 16, 0)


def test_canaries_anywhere_move_the_line_and_nothing_else():
    """--canary-at anywhere: the same windows, keys and text as the default, each canary's line moved to an offset
    of its own after different text (the case where nothing in the window's start gives the secret away)."""
    tokens = encode(stdlib_corpus(max_files=20).text)
    canaries = lm.canary_set(2, 0)
    start = lm.build_dataset(tokens, canaries, 64, 200, 8, 4, 0)
    anywhere = lm.build_dataset(tokens, canaries, 64, 200, 8, 4, 0, "anywhere")
    assert np.array_equal(start["keys"], anywhere["keys"]) and np.array_equal(start["heldout"], anywhere["heldout"])
    plain = np.setdiff1d(np.arange(len(start["train"])), start["keys"])
    assert np.array_equal(start["train"][plain], anywhere["train"][plain])
    offsets = set()
    for canary in canaries:
        line = encode(canary["text"].encode())
        for key in canary["keys"]:
            moved, opening = anywhere["train"][key], start["train"][key]
            assert np.array_equal(opening[:line.size], line)
            at = [i for i in range(moved.size - line.size + 1) if np.array_equal(moved[i:i + line.size], line)]
            assert len(at) == 1
            offsets.add(at[0])
            rest = np.concatenate([moved[:at[0]], moved[at[0] + line.size:]])
            assert np.array_equal(rest, opening[line.size:])  # the same text around it
    assert len(offsets) > 8  # after different text in each window
    with pytest.raises(SystemExit, match="--canary-at must be one of start, anywhere"):
        lm.build_dataset(tokens, canaries, 64, 200, 8, 4, 0, "end")
