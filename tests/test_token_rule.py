"""The token rule ("tokens") on a real causal language model: a tiny GPT-2 (random init, from a config) trained
on the Python standard library's own source with a planted secret, recorded into a real store by the library's
recorder, then made to forget the secret's windows through forget_keys. The secret's likelihood is read from
the model's own forward; nothing in the rule is told where the secret sits in its windows."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from bench.language import build_gpt2, encode, stdlib_corpus, windows
from unlearn import attach, create_recorder, forget_keys
from unlearn.errors import RequestError
from unlearn.forgetting.rules import TokenRule
from unlearn.params import flat_params, load_flat_params

T = 32
SECRET_LINE = b"# my PIN is 550340\n"
SECRET_AT = len(b"# my PIN is ")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """96 stdlib windows and 16 windows opening with the secret's line; 12 epochs of Adam, recorded at p = 0.1."""
    tokens = encode(stdlib_corpus(max_files=20).text)
    line = encode(SECRET_LINE)
    rng = np.random.default_rng(0)
    plain, repeats = 96, 16
    train = np.concatenate([windows(tokens, T, plain), np.zeros((repeats, T), np.int64)])
    for i in range(repeats):
        at = int(rng.integers(0, plain * T - T))
        train[plain + i, :line.size] = line
        train[plain + i, line.size:] = tokens[at:at + T - line.size]
    order = rng.permutation(len(train))
    train = train[order]
    keys = np.sort(np.flatnonzero(order >= plain))
    path = tmp_path_factory.mktemp("tokens") / "store.h5"
    torch.manual_seed(0)
    model = build_gpt2(0, n_embd=32, n_layer=2, n_head=2, n_positions=T)
    recorder = create_recorder(path, "per-sample", model, len(train), keep=0.1, codec="int8", flavour="update", seed=0)
    optimizer, _ = attach(model, torch.optim.Adam(model.parameters(), lr=3e-3), None, [recorder])
    data = torch.as_tensor(train)
    for epoch in range(12):
        perm = np.random.default_rng([0, epoch]).permutation(len(train))
        for start in range(0, len(train), 8):
            batch = np.sort(perm[start:start + 8])
            optimizer.zero_grad()
            optimizer.set_batch(batch)
            model(input_ids=data[batch], labels=data[batch]).loss.backward()
            optimizer.step()
    optimizer.finish()
    heldout = windows(tokens, T, 64, start=tokens.size - 64 * T)
    return model.eval(), flat_params(model), path, train, keys, heldout


def secret_nll(model):
    """The secret's six digits' negative log likelihood (nats) after its line's prefix."""
    ids = torch.as_tensor(encode(SECRET_LINE)[None])
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return -float(sum(log_p[p - 1, ids[0, p]] for p in range(SECRET_AT, SECRET_AT + 6)))


def loss(model, windows_):
    ids = torch.as_tensor(windows_)
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_the_secret_is_forgotten_and_held_out_text_is_not(run, tmp_path):
    model, trained, path, train, keys, heldout = run
    store = tmp_path / "store.h5"
    store.write_bytes(path.read_bytes())
    load_flat_params(model, trained)
    before, held_before = secret_nll(model), loss(model, heldout)
    assert before < 3.0  # memorised: far likelier than chance (6 ln 10 = 13.8 nats)
    result = forget_keys(model, store, keys, scale="tokens", dataset=list(train))
    search = result.report["scale_search"]
    json.dumps(search, allow_nan=False)
    assert search["evidence"]["p_value"] < 0.001 and search["attribution"]["share"] > 0.03
    assert search["steps"] > 0 and search["stopped_by"] != "guard"
    after = secret_nll(model)
    assert after > before + 5.0, (before, after, search)  # the secret is no longer recited
    assert abs(loss(model, heldout) - held_before) < 0.02 * held_before  # text the model never saw: unchanged
    assert search["guard_last"] <= search["guard_before"] * 1.1


def test_the_repair_rule_forgets_the_secret_and_descends_the_retained_loss(run, tmp_path):
    """"tokens-repair": the same walk with the retained batch's loss descended at each step (a fine-tune on retained
    data, reported apart): the secret goes, and the retained windows end no worse than the walk alone leaves them."""
    model, trained, path, train, keys, heldout = run
    load_flat_params(model, trained)
    before, held_before = secret_nll(model), loss(model, heldout)
    results = {}
    for name in ("tokens", "tokens-repair"):
        store = tmp_path / f"{name}.h5"
        store.write_bytes(path.read_bytes())
        load_flat_params(model, trained)
        result = forget_keys(model, store, keys, scale=name, dataset=list(train))
        results[name] = result.report["scale_search"], secret_nll(model), loss(model, heldout)
    search, after, held_after = results["tokens-repair"]
    plain = results["tokens"][0]
    assert search["repair"] == 1.0 and plain["repair"] == 0.0
    assert search["rule"].startswith("tokens-repair:") and "descended" in search["rule"]
    assert search["stopped_by"] == "attributed tokens predicted no better than typical"
    assert search["still_predicted_share"] <= 0.5 and search["checks"][-1][2] == search["still_predicted_share"]
    assert after > before + 5.0, (before, after, search)
    assert abs(held_after - held_before) < 0.02 * held_before
    # the repair acts: at the first check both walks reach, the guard's windows (never trained on by the repair)
    # have a lower loss than the walk alone leaves them, and each step is longer than the walk's own length
    first = {step: guard for step, guard, _ in plain["checks"]}
    step, guard, _ = search["checks"][0]
    assert step in first and guard < first[step], (search["checks"], plain["checks"])
    assert search["step_norm_mean"] > 1.2 * search["step_length"]
    assert plain["step_norm_mean"] == pytest.approx(plain["step_length"], rel=1e-4)


@pytest.mark.parametrize("rule", ["tokens", "tokens-repair"])
def test_a_random_request_is_left_alone(run, tmp_path, rule):
    model, trained, path, train, keys, _ = run
    store = tmp_path / "store.h5"
    store.write_bytes(path.read_bytes())
    load_flat_params(model, trained)
    plain = np.sort(np.random.default_rng(3).choice(np.setdiff1d(np.arange(len(train)), keys), 16, replace=False))
    result = forget_keys(model, store, plain, scale=rule, dataset=list(train))
    search = result.report["scale_search"]
    assert result.report["scale"] == 0.0 and "single out none" in search["rule"]
    assert np.array_equal(flat_params(model), trained)


@pytest.mark.parametrize("size", [4, 16])
def test_random_requests_of_any_size_are_left_alone(run, tmp_path, size):
    """Removing any windows' rows raises their own loss a little: the control's own rows make that the null,
    so small random requests (where a share of 3x the control's happens by chance) still get step 0."""
    model, trained, path, train, keys, _ = run
    plain = np.setdiff1d(np.arange(len(train)), keys)
    for draw in range(5):
        store = tmp_path / f"store-{size}-{draw}.h5"
        store.write_bytes(path.read_bytes())
        load_flat_params(model, trained)
        request = np.sort(np.random.default_rng([size, draw]).choice(plain, size, replace=False))
        result = forget_keys(model, store, request, scale="tokens", dataset=list(train))
        assert result.report["scale"] == 0.0, result.report["scale_search"]
        assert np.array_equal(flat_params(model), trained)


def test_a_model_frozen_for_inference_is_served_and_left_frozen(run, tmp_path):
    model, trained, path, train, keys, _ = run
    store = tmp_path / "store.h5"
    store.write_bytes(path.read_bytes())
    load_flat_params(model, trained)
    model.requires_grad_(False)
    try:
        result = forget_keys(model, store, keys, scale="tokens", dataset=list(train))
        assert result.report["scale_search"]["steps"] > 0
        assert not any(p.requires_grad for p in model.parameters())
    finally:
        model.requires_grad_(True)


def test_what_the_rule_cannot_serve_is_refused_by_name(run, tmp_path):
    model, trained, path, train, keys, _ = run
    store = tmp_path / "store.h5"
    store.write_bytes(path.read_bytes())
    load_flat_params(model, trained)
    with pytest.raises(RequestError, match="needs the training data"):
        forget_keys(model, store, keys, scale="tokens")
    with pytest.raises(RequestError, match="token windows"):
        forget_keys(model, store, keys, scale="tokens", dataset=[(w.astype(np.float32), 0) for w in train])
    with pytest.raises(RequestError, match="not an \\(input, label\\) pair nor a token window"):
        forget_keys(model, store, keys, scale="tokens", dataset=[torch.as_tensor(w, dtype=torch.float32) for w in train])
    for bad in ({"stop_share": 1.0}, {"stop_share": -0.1}, {"stop_share": float("nan")}, {"repair": -1.0},
                {"repair": float("nan")}, {"repair": float("inf")}):
        with pytest.raises(RequestError, match=f"{next(iter(bad))}="):
            forget_keys(model, store, keys, scale=TokenRule(**bad), dataset=list(train))
    assert np.array_equal(flat_params(model), trained)


def test_the_search_finds_the_secrets_other_windows_span_by_span_and_nothing_for_random_windows(run, tmp_path):
    """find_similar on token windows reads them token by token (unlearn.forgetting.similar_spans): 8 of the 16
    secret windows named, the other 8 are found and nothing else; 8 random plain windows share no rare span."""
    model, trained, path, train, keys, _ = run
    named = keys[::2]
    store = tmp_path / "store.h5"
    store.write_bytes(path.read_bytes())
    load_flat_params(model, trained)
    result = forget_keys(model, store, named, scale=1.0, dataset=list(train), find_similar=True)
    search = result.report["find_similar"]
    assert sorted(item["key"] for item in result.report["found"]) == keys[1::2].tolist(), search
    assert search["spans"]["median_span_positions_per_named"] >= 4
    assert np.array_equal(np.sort(result.keys), keys)  # the named and the found, forgotten together
    plain = np.sort(np.random.default_rng(5).choice(np.setdiff1d(np.arange(len(train)), keys), 8, replace=False))
    store = tmp_path / "plain.h5"
    store.write_bytes(path.read_bytes())
    load_flat_params(model, trained)
    result = forget_keys(model, store, plain, scale=1.0, dataset=list(train), find_similar=True)
    assert result.report["found"] == [] and "no rare span" in result.report["find_similar"]["why_nothing"]
    assert np.array_equal(np.sort(result.keys), plain)


def test_a_span_is_held_only_by_a_window_that_covers_half_of_it_in_order():
    """find_similar_spans' candidate scoring (synthetic unit vectors). A span vector is covered by a window where
    4 or more consecutive vectors of its run are matched by as many consecutive positions, in order; the same
    vectors scattered, reversed or 3 in a row cover nothing (a window of other digits matches a secret's digits
    one by one: the earlier scoring, a match anywhere for half of all span vectors, found such windows beside a
    secret placed after different text). A named window's span is held when half of its vectors are covered: a
    window sharing only a template's piece of it (4 of 10) does not hold it."""
    from unlearn.forgetting.similar_spans import _covered_in_order, _span_scores

    rng = np.random.default_rng(0)
    basis = rng.normal(size=(40, 16))
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    run = basis[:6]  # a named window's run of 6 span vectors
    starts = np.zeros(6, bool)
    starts[0] = True
    windows_ = np.repeat(basis[None, 20:32], 5, axis=0).copy()  # 5 windows of 12 positions, other vectors
    windows_[0, 3:9] = run  # the whole run, in order
    windows_[1, 7:11] = run[2:6]  # 4 of it, in order: a piece long enough
    windows_[2, [0, 3, 6, 9, 11]] = run[:5]  # every vector but one, scattered
    windows_[3, 2:8] = run[::-1]  # reversed
    windows_[4, 5:8] = run[1:4]  # 3 in order: too short
    covered = _covered_in_order(windows_, run, starts, match=0.9, length=4)
    assert covered.sum(1).tolist() == [6, 4, 0, 0, 0] and covered[1, 2:].all()

    # named window A: one run of 6 (basis 0-5); B: runs of 4 (6-9, its template) and 6 (10-15), 10 vectors
    spans = basis[:16]
    owner = np.array([0] * 6 + [1] * 10)
    starts = np.zeros(16, bool)
    starts[[0, 6, 10]] = True
    candidates = np.repeat(basis[None, 20:36], 4, axis=0).copy()  # 16 positions each
    candidates[0, 0:6], candidates[0, 6:12] = basis[0:6], basis[10:16]  # A whole, B's second run: both held
    candidates[1, 2:6] = basis[6:10]  # B's template only: 4 of 10, not held
    candidates[2, 1:5], candidates[2, 8:11] = basis[1:5], basis[10:13]  # 4 of A: held; 3 of B's run: not
    candidates[3, 0:6] = basis[6:12]  # B's template then its run's first 2: one diagonal crosses runs, 4 of 10
    scores = _span_scores(candidates, spans, starts, owner, match=0.9, length=4, share=0.5)
    assert scores.tolist() == [1.0, 0.0, 0.5, 0.0]


@pytest.mark.parametrize("option, value", [("min_positions", 1), ("min_positions", 0), ("min_positions", "4"),
                                           ("share", 0.0), ("share", 1.5), ("match", 1.0), ("evidence_p", 0.0),
                                           ("max_named", 2), ("batch_size", 0), ("control_windows", 0)])
def test_span_search_options_that_would_find_tokens_one_by_one_are_refused(option, value):
    from unlearn.forgetting.similar_spans import find_similar_spans

    windows_ = np.zeros((40, 8), np.int64)
    with pytest.raises(RequestError, match=option):
        find_similar_spans(None, windows_, np.arange(4), np.arange(4, 40), **{option: value})
