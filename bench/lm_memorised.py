"""`python -m bench.lm_memorised --run out/lm --out out/lm-memorised`: the canaries of a finished ``bench lm`` run
through issue 24's search (``unlearn.forgetting.similar.find_similar``) and its head projection (the math of the
feature rule, ``unlearn/forgetting/rules/feature_rule.py``), measured with bench.lm's exact exposure.

It reads the run folder (lm.json's settings, canaries.json, trained.npy, retrained.npy, store.h5), rebuilds the
training set from the stdlib (checked against the recorded hash) and

1. the search: for each canary, names ``--named`` of its windows (seeded) and asks ``find_similar`` (labels None:
   one label for all) for the training windows the trained model reads as it reads them, candidates every other
   training window; precision and recall against that canary's unnamed windows. A request of as many random
   plain windows is searched too: it should find nothing. The trained model's head inputs are computed once
   for every window and replayed through its own lm_head (``ReplayedHead``), so the five searches read what
   they would read from the model without rerunning the transformer five times (checked on a slice).
2. the head projection: the head's input features (``similar.head_features``: the input of GPT-2's ``lm_head``,
   the final LayerNorm's output, averaged over the window's tokens) of all canary windows (the forget set) less
   the mean over the retained windows (mu); V their top-k right singular vectors; ``W <- W (I - V'V)`` and a bias,
   were there one, would absorb ``W V'V mu`` (GPT-2's lm_head has none). GPT-2 ties lm_head to wte: the same
   Parameter, so the projection edits every token's input embedding too; the report says by how much, and one
   variant unties the head (a copy of wte) and projects the copy only. Variants: k = 1, 2, 4; one direction per
   canary (its 64 windows' top direction; the span of the four). One diagnostic, not the library's features:
   the features at the positions that predict the secret's digits (mean of those 6 positions per window) in
   place of the mean over the whole window.
   Each model: the four canaries' exposure (bench.lm.measure: exact rank among 10^6), secret NLL, the canary
   windows' loss, held-out loss and perplexity, retained loss; against the retrained model's (taken from the
   run's lm.json, the same function on the same weights; --remeasure measures it again). The trained model
   is measured again and its difference from the run's figures recorded.
3. the library's own path, tried: ``forget_keys(model, <a copy of the store>, keys, scale="feature",
   dataset=...)`` and ``unlearn.evaluation.accuracy`` on the LM; what they raise is recorded.

Writes lm_memorised.json and lm_memorised.md under --out.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import lm
from .language import build_gpt2, encode, stdlib_corpus

TARGET_BITS = 2.0  # issue 24: mean exposure within 2 bits of the retrained model's
TARGET_LOSS = 0.01  # and held-out loss within 1% of it


# ---------------------------------------------------------------------- the run folder


def load_run(run: Path, corpus_text: bytes | None = None) -> dict[str, Any]:
    """The finished bench lm run: settings, canaries (with prefixes), the rebuilt data (hash checked), weights."""
    report = json.loads((run / "lm.json").read_text())
    settings = report["settings"]
    recorded = json.loads((run / "canaries.json").read_text())
    canaries = lm.canary_set(settings["canaries"], settings["seed"])
    text = stdlib_corpus().text if corpus_text is None else corpus_text
    data = lm.build_dataset(encode(text), canaries, settings["seq_len"], settings["plain_windows"],
                            settings["repeats"], settings["heldout"], settings["seed"], settings.get("canary_at", "start"))
    for mine, theirs in zip(canaries, recorded["canaries"]):
        if mine["secret"] != theirs["secret"] or mine["keys"] != theirs["keys"]:
            raise SystemExit(f"{run}: canaries.json does not match the canaries rebuilt from its settings")
    import hashlib
    sha = hashlib.sha256(data["train"].tobytes()).hexdigest()
    if sha != recorded["train_sha256"]:
        raise SystemExit(f"{run}: the rebuilt training set's sha256 {sha[:16]}... is not the run's "
                         f"{recorded['train_sha256'][:16]}... (another stdlib?)")
    keys = data["keys"]
    retained_keys = np.setdiff1d(np.arange(len(data["train"])), keys)
    retained_sample = np.random.default_rng([settings["seed"], 26]).choice(
        retained_keys, min(256, retained_keys.size), replace=False)  # bench.lm's retained sample
    return {"settings": settings, "canaries": canaries, "data": data, "retained_keys": retained_keys,
            "retained_sample": retained_sample, "report": report,
            "trained": np.load(run / "trained.npy", allow_pickle=False),
            "retrained": np.load(run / "retrained.npy", allow_pickle=False)}


def model_of(settings: dict[str, Any], weights: np.ndarray) -> torch.nn.Module:
    """bench.lm's GPT-2 of the run's settings with ``weights`` (flat, named_parameters() order)."""
    from unlearn.params import load_flat_params

    model = build_gpt2(settings["seed"], n_embd=settings["n_embd"], n_layer=settings["n_layer"],
                       n_head=settings["n_head"], n_positions=settings["seq_len"])
    load_flat_params(model, torch.as_tensor(weights))
    return model.eval()


# ---------------------------------------------------------------------- the head's inputs, once


@torch.inference_mode()
def hidden_states(model: torch.nn.Module, windows_: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """The input of GPT-2's lm_head (the final LayerNorm's output) for every window: float32 [n, T, d]."""
    caught: list[torch.Tensor] = []
    gpt: Any = model
    hook = gpt.lm_head.register_forward_hook(lambda m, i, o: caught.append(i[0].detach()))
    model.eval()
    try:
        for start in range(0, len(windows_), batch_size):
            model(input_ids=torch.as_tensor(windows_[start:start + batch_size]))
    finally:
        hook.remove()
    return torch.cat(caught)


class ReplayedHead(torch.nn.Module):
    """The model's own lm_head fed the inputs the whole model gives it, computed once (``hidden_states``):
    ``forward(ids)`` looks each window up by its tokens. ``find_similar`` hooks the same Linear and reads the same
    input as on the model itself, without rerunning the transformer for each search."""

    def __init__(self, model: torch.nn.Module, windows_: np.ndarray, hidden: torch.Tensor) -> None:
        super().__init__()
        gpt: Any = model
        self.lm_head = gpt.lm_head
        self.hidden = hidden
        self.index = {row.tobytes(): i for i, row in enumerate(np.ascontiguousarray(windows_))}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = [self.index[row.tobytes()] for row in np.ascontiguousarray(ids.cpu().numpy())]
        return self.lm_head(self.hidden[rows])


# ---------------------------------------------------------------------- 1. the search


def search(model: torch.nn.Module, train: np.ndarray, canaries: list[dict[str, Any]], named: int,
           seed: int) -> dict[str, Any]:
    """find_similar for each canary (``named`` of its windows named) and for a random request of plain windows."""
    from unlearn.forgetting.similar import find_similar

    every = np.arange(len(train))
    canary_keys = np.concatenate([np.asarray(c["keys"]) for c in canaries])
    out: dict[str, Any] = {"named_per_request": named, "labels": None, "per_canary": []}
    for canary in canaries:
        keys = np.asarray(canary["keys"])
        rng = np.random.default_rng([seed, 31, canary["index"]])
        chosen = np.sort(rng.choice(keys, min(named, keys.size), replace=False))
        truth = np.setdiff1d(keys, chosen)
        started = time.perf_counter()
        found = find_similar(model, train, None, chosen, np.setdiff1d(every, chosen), seed=seed)
        report = found.report(truth)
        others = np.setdiff1d(canary_keys, keys)
        report.update({"canary": canary["index"], "text": canary["text"], "named": chosen.tolist(),
                       "found_other_canaries": int(np.isin(found.found, others).sum()),
                       "found_plain": int((~np.isin(found.found, canary_keys)).sum()),
                       "seconds": time.perf_counter() - started})
        out["per_canary"].append(report)
    plain = np.setdiff1d(every, canary_keys)
    chosen = np.sort(np.random.default_rng([seed, 32]).choice(plain, named, replace=False))
    started = time.perf_counter()
    found = find_similar(model, train, None, chosen, np.setdiff1d(every, chosen), seed=seed)
    report = found.report()
    report.update({"named": chosen.tolist(), "found_canary_windows": int(np.isin(found.found, canary_keys).sum()),
                   "seconds": time.perf_counter() - started})
    out["random_request"] = report
    return out


def span_search(model: torch.nn.Module, train: np.ndarray, canaries: list[dict[str, Any]], named: int,
                seed: int) -> dict[str, Any]:
    """``find_similar_spans`` (what ``forget_keys(find_similar=True)`` runs on token windows) for each canary and
    for a random request of plain windows: the same named windows as ``search``."""
    from unlearn.forgetting.similar_spans import find_similar_spans

    every = np.arange(len(train))
    canary_keys = np.concatenate([np.asarray(c["keys"]) for c in canaries])
    out: dict[str, Any] = {"named_per_request": named, "per_canary": []}
    for canary in canaries:
        keys = np.asarray(canary["keys"])
        chosen = np.sort(np.random.default_rng([seed, 31, canary["index"]]).choice(keys, min(named, keys.size),
                                                                                  replace=False))
        started = time.perf_counter()
        found = find_similar_spans(model, train, chosen, np.setdiff1d(every, chosen), seed=seed)
        report = found.report(np.setdiff1d(keys, chosen))
        report.update({"canary": canary["index"], "text": canary["text"], "named": chosen.tolist(),
                       "found_other_canaries": int(np.isin(found.found, np.setdiff1d(canary_keys, keys)).sum()),
                       "found_plain": int((~np.isin(found.found, canary_keys)).sum()),
                       "seconds": time.perf_counter() - started})
        out["per_canary"].append(report)
    plain = np.setdiff1d(every, canary_keys)
    chosen = np.sort(np.random.default_rng([seed, 32]).choice(plain, named, replace=False))
    found = find_similar_spans(model, train, chosen, np.setdiff1d(every, chosen), seed=seed)
    out["random_request"] = {**found.report(), "named": chosen.tolist(),
                             "found_canary_windows": int(np.isin(found.found, canary_keys).sum())}
    return out


def first_round(features: np.ndarray, named: np.ndarray, truth: np.ndarray,
                quantile: float | None = None) -> dict[str, Any]:
    """Diagnostic of a search: find_similar's first round redone on ``features`` (every window's head input), at
    its percentile (``quantile``: find_similar's default when None) and without its ``balanced`` floor,
    before later rounds add what it found to the direction: its threshold, what it finds, and the AUC with which
    the named direction ranks the unnamed ``truth`` windows above the other candidates (0.5: chance)."""
    candidates = np.setdiff1d(np.arange(len(features)), named)
    units = features - np.median(features[candidates], axis=0)
    units /= np.maximum(np.linalg.norm(units, axis=1, keepdims=True), 1e-12)
    total = units[named].sum(0)
    scores = units[candidates] @ (total / np.linalg.norm(total))
    leave_one_out = [float(u @ (total - u)) / float(np.linalg.norm(total - u)) for u in units[named]]
    if quantile is None:
        import inspect

        from unlearn.forgetting.similar import find_similar

        quantile = inspect.signature(find_similar).parameters["quantile"].default
    threshold = float(np.percentile(leave_one_out, quantile))
    found = candidates[scores >= threshold]
    hits = int(np.isin(found, truth).sum())
    positive = np.isin(candidates, truth)
    ranks = np.argsort(np.argsort(scores)) + 1.0
    auc = (ranks[positive].sum() - positive.sum() * (positive.sum() + 1) / 2) / (positive.sum() * (~positive).sum())
    return {"threshold": threshold, "found": int(found.size), "precision": hits / found.size if found.size else None,
            "recall": hits / truth.size, "auc": float(auc),
            "named_leave_one_out_cosine_median": float(np.median(leave_one_out)),
            "truth_score_median": float(np.median(scores[positive])),
            "others_score_median": float(np.median(scores[~positive]))}


def brief(report: dict[str, Any]) -> dict[str, Any]:
    """A search report without its long lists (for the table and the log)."""
    return {k: v for k, v in report.items() if k not in ("found", "named")}


# ---------------------------------------------------------------------- 2. the projection


def head_inputs(model: torch.nn.Module, windows_: np.ndarray) -> np.ndarray:
    """The library's features: the input of the model's head, averaged over tokens (``similar.head_features``)."""
    from unlearn.forgetting.similar import find_head, head_features

    return head_features(model, find_head(model, windows_[:1]), windows_)


def digit_features(hidden: torch.Tensor, prefix_len: int, digits: int = 6) -> np.ndarray:
    """Diagnostic: the head's input (``hidden`` [n, T, d] of canary windows) at the positions that predict the
    secret's digits (prefix_len - 1 to prefix_len + digits - 2), averaged over those positions: [n, d] float64."""
    return hidden[:, prefix_len - 1:prefix_len - 1 + digits].double().mean(1).numpy()


def top_directions(request: np.ndarray, mean: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` right singular vectors [k, d] of ``request - mean`` and all its singular values."""
    _, singular, vt = np.linalg.svd(request - mean, full_matrices=False)
    return vt[:k], singular


def orthonormal(rows: np.ndarray) -> np.ndarray:
    """An orthonormal basis [r, d] of the span of ``rows`` (r = their count)."""
    q, _ = np.linalg.qr(rows.T)
    return q.T


def untie_head(model: torch.nn.Module) -> None:
    """Give GPT-2's lm_head its own weight: a copy of wte (so a projection of the head leaves the embeddings)."""
    gpt: Any = model
    gpt.config.tie_word_embeddings = False
    gpt.lm_head.weight = torch.nn.Parameter(gpt.transformer.wte.weight.detach().clone())


def project_head(model: torch.nn.Module, directions: np.ndarray, mean: np.ndarray) -> dict[str, Any]:
    """W <- W (I - V'V) on the head (V: ``directions``, orthonormal rows); a bias would absorb W V'V mu.
    Returns what changed: the head, the embeddings (the same matrix when tied), the bias."""
    gpt: Any = model
    head, wte = gpt.lm_head, gpt.transformer.wte
    tied = head.weight is wte.weight
    with torch.no_grad():
        w = head.weight
        v = torch.as_tensor(directions, dtype=w.dtype)
        before = w.detach().clone()
        taken = (w @ v.T) @ v
        if head.bias is not None:
            head.bias.add_(taken @ torch.as_tensor(mean, dtype=w.dtype))
        w.sub_(taken)
        per_token = taken.norm(dim=1) / before.norm(dim=1).clamp_min(1e-12)
        most = torch.argsort(per_token, descending=True)[:8]
        shift = float(torch.linalg.norm(taken @ torch.as_tensor(mean, dtype=w.dtype)))
    return {"tied_to_wte": tied, "embeddings_changed": tied, "bias": head.bias is not None,
            "head_change_fro": float(taken.norm()), "head_fro": float(before.norm()),
            "head_relative_change": float(taken.norm() / before.norm()),
            "per_token_relative_change_max": float(per_token.max()),
            "per_token_relative_change_mean": float(per_token.mean()),
            "most_changed_tokens": [{"token": _token(int(t)), "relative_change": float(per_token[t])} for t in most],
            "unabsorbed_logit_shift_at_mu": shift}


def _token(t: int) -> str:
    return repr(chr(t)) if t < 256 else ["<pad>", "<bos>", "<cls>"][t - 256]


def variants(features: np.ndarray, digit_feats: np.ndarray, canaries: list[dict[str, Any]], keys: np.ndarray,
             reference: np.ndarray, ks: list[int], untied: bool, per_canary: bool,
             digits: bool) -> list[dict[str, Any]]:
    """The projections to measure: name, directions (orthonormal rows), mu, untie first, and the spectrum."""
    mean = features[reference].mean(0)
    out: list[dict[str, Any]] = []
    spectrum: np.ndarray | None = None
    for k in ks:
        v, spectrum = top_directions(features[keys], mean, k)
        out.append({"name": f"head projection, k = {k}", "directions": v, "mean": mean, "untie": False})
        if untied and k == 1:
            out.append({"name": "head projection, k = 1, head untied (wte kept)", "directions": v, "mean": mean,
                        "untie": True})
    if per_canary:
        rows = np.stack([top_directions(features[np.asarray(c["keys"])], mean, 1)[0][0] for c in canaries])
        out.append({"name": f"head projection, one direction per canary ({len(canaries)})",
                    "directions": orthonormal(rows), "mean": mean, "untie": False,
                    "per_canary_cosines": np.abs(rows @ rows.T).round(4).tolist()})
    if digits:
        v, _ = top_directions(digit_feats, mean, 1)
        out.append({"name": "diagnostic: digit-position features, k = 1", "directions": v, "mean": mean,
                    "untie": False})
    for variant in out:
        variant["spectrum_top"] = (spectrum[:6].tolist() if spectrum is not None else [])
    return out


# ---------------------------------------------------------------------- 3. the library's path


def library_attempt(model: torch.nn.Module, store: Path, train: np.ndarray,
                    requests: dict[str, np.ndarray]) -> dict[str, Any]:
    """What the library does with the LM: forget_keys(scale="feature") for each of ``requests`` (name: keys) on a
    fresh copy of the store each, and accuracy(). (The run's store has its canary rows marked forgotten already:
    bench lm applied forget_keys at scale 1, so a request of live plain keys shows what the rule itself does.)"""
    from unlearn import forget_keys
    from unlearn.evaluation.metrics import accuracy

    out: dict[str, Any] = {}
    dataset = [(train[i], 0) for i in range(len(train))]
    for name, keys in requests.items():
        with tempfile.TemporaryDirectory() as folder:
            copy = Path(folder) / "store.h5"
            shutil.copyfile(store, copy)
            try:
                result = forget_keys(model, copy, keys, scale="feature", dataset=dataset)
                out[f"forget_keys_feature, {name}"] = {"ran": True, "rule_report": result.rule_report}
            except Exception as error:  # recorded: the point is what the library does with an LM
                out[f"forget_keys_feature, {name}"] = {"ran": False, "error": f"{type(error).__name__}: {error}"}
    try:
        out["accuracy"] = {"ran": True, "value": accuracy(model, train[:2], np.zeros(2, np.int64))}
    except Exception as error:
        out["accuracy"] = {"ran": False, "error": f"{type(error).__name__}: {error}"}
    return out


# ---------------------------------------------------------------------- the report


def verdict(figures: dict[str, Any], retrained: dict[str, Any]) -> dict[str, Any]:
    """Issue 24's target for one model against the retrained one."""
    bits = figures["mean_exposure_bits"] - retrained["mean_exposure_bits"]
    loss = figures["heldout_loss"] / retrained["heldout_loss"] - 1
    return {"exposure_minus_retrained_bits": bits, "heldout_loss_relative_to_retrained": loss,
            "exposure_met": bool(bits <= TARGET_BITS), "heldout_loss_met": bool(abs(loss) <= TARGET_LOSS),
            "met": bool(bits <= TARGET_BITS and abs(loss) <= TARGET_LOSS)}


def markdown(report: dict[str, Any]) -> str:
    lines = ["### Search (find_similar, trained model, labels None)", "",
             "| request | named | coherence p | cosine (control max) | found | precision | recall | other canaries' "
             "/ plain windows found | rounds | diagnostic: first round found, precision, recall; AUC |",
             "|---" * 10 + "|"]
    for r in report["search"]["per_canary"]:
        c = r["coherence"] or {}
        lines.append(f"| canary {r['canary']}: `{r['text'].strip()}` | {len(r['named'])} | {_f(c.get('p_value'))} | "
                     f"{_f(c.get('mean_pairwise_cosine'))} ({_f(c.get('control_max'))}) | {r['num_found']} | "
                     f"{_f(r.get('precision'))} | {_f(r.get('recall'))} | {r['found_other_canaries']} / "
                     f"{r['found_plain']} | {r['rounds']} | {_first(r.get('diagnostic_first_round'))} |")
    r = report["search"]["random_request"]
    c = r["coherence"] or {}
    lines.append(f"| random plain windows | {len(r['named'])} | {_f(c.get('p_value'))} | "
                 f"{_f(c.get('mean_pairwise_cosine'))} ({_f(c.get('control_max'))}) | {r['num_found']} | - | - | "
                 f"{r['found_canary_windows']} canary | {r['rounds']} | - |")
    if "span_search" in report:
        lines += ["", "### Search span by span (find_similar_spans: forget_keys(find_similar=True) on token windows)",
                  "", "| request | named | shared rare positions; in spans (median a named window) | found | precision | recall | "
                  "other canaries' / plain windows found | s |", "|---" * 8 + "|"]
        for r in report["span_search"]["per_canary"]:
            spans = r.get("spans", {})
            lines.append(f"| canary {r['canary']}: `{r['text'].strip()}` | {len(r['named'])} | "
                         f"{spans.get('shared_rare_positions', '-')} ({_f(spans.get('median_span_positions_per_named'))})"
                         f" | {r['num_found']} | {_f(r.get('precision'))} | {_f(r.get('recall'))} | "
                         f"{r['found_other_canaries']} / {r['found_plain']} | {r['seconds']:.0f} |")
        r = report["span_search"]["random_request"]
        spans = r.get("spans", {})
        lines.append(f"| random plain windows | {len(r['named'])} | {spans.get('shared_rare_positions', '-')} "
                     f"({_f(spans.get('median_span_positions_per_named'))}) | {r['num_found']} | - | - | "
                     f"{r['found_canary_windows']} canary | - |")
    lines += ["", "### Head projection (all 256 canary windows named) against retraining", "",
              "| model | exposure, bits (each canary) | mean exposure | secret NLL, nats | canary-window loss | "
              "held-out loss | held-out ppl | retained loss | head change (rel.) | target met |", "|---" * 10 + "|"]
    for name, f in report["models"].items():
        each = " / ".join(f"{e:.1f}" for e in f["exposure_bits"])
        change = f.get("projection", {}).get("head_relative_change")
        met = f.get("target", {}).get("met")
        lines.append(f"| {name} | {each} | {f['mean_exposure_bits']:.2f} | {f['mean_secret_nll_nats']:.2f} | "
                     f"{f['forget_loss']:.3f} | {f['heldout_loss']:.4f} | {f['heldout_ppl']:.3f} | "
                     f"{f['retained_loss']:.3f} | {_f(change)} | {'-' if met is None else ('yes' if met else 'no')} |")
    return "\n".join(lines) + "\n"


def _first(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"{d['found']}, {_f(d['precision'])}, {_f(d['recall'])}; {d['auc']:.3f}"


def _f(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def run(args: argparse.Namespace, corpus_text: bytes | None = None) -> dict[str, Any]:
    """Everything above on the run folder ``args.run``; returns the report (and writes it under ``args.out``)."""
    started = time.perf_counter()
    run_dir, out = Path(args.run), Path(args.out)
    loaded = load_run(run_dir, corpus_text)
    settings, canaries, data = loaded["settings"], loaded["canaries"], loaded["data"]
    if args.digits and settings.get("canary_at", "start") != "start":
        raise SystemExit(f"{run_dir}: its canaries sit anywhere in their windows; the digit-position diagnostic "
                         "reads them at the window's start: give --no-digits")
    train, keys = data["train"], data["keys"]
    device = torch.device("cpu")
    model = model_of(settings, loaded["trained"])
    print(f"run {run_dir}: {len(train)} windows, {keys.size} canary windows ({len(canaries)} canaries)")

    hidden = hidden_states(model, train)
    replay = ReplayedHead(model, train, hidden)
    check = np.arange(0, len(train), max(1, len(train) // 16))
    replay_error = float(np.abs(head_inputs(model, train[check]) - head_inputs(replay, train[check])).max())
    print(f"  head inputs of {len(train)} windows computed once ({time.perf_counter() - started:.0f} s; the "
          f"replay's largest difference from the model's own on {check.size} windows: {replay_error:.2g})")
    found = search(replay, train, canaries, args.named, settings["seed"])
    for r in found["per_canary"]:
        print(f"  search, canary {r['canary']}: coherence p {_f((r['coherence'] or {}).get('p_value'))}, "
              f"found {r['num_found']} (precision {_f(r.get('precision'))}, recall {_f(r.get('recall'))}), "
              f"{r['seconds']:.0f} s")
    print(f"  search, random request: found {found['random_request']['num_found']}")
    spans = span_search(replay, train, canaries, args.named, settings["seed"])
    for r in spans["per_canary"]:
        print(f"  span search, canary {r['canary']}: found {r['num_found']} (precision {_f(r.get('precision'))}, "
              f"recall {_f(r.get('recall'))}), {r['seconds']:.0f} s")
    print(f"  span search, random request: found {spans['random_request']['num_found']}")

    features = head_inputs(replay, train)
    for r, canary in zip(found["per_canary"], canaries):
        r["diagnostic_first_round"] = first_round(features, np.asarray(r["named"]),
                                                  np.setdiff1d(canary["keys"], r["named"]))
        print(f"  search diagnostic, canary {r['canary']}: first round finds "
              f"{r['diagnostic_first_round']['found']}, AUC {r['diagnostic_first_round']['auc']:.3f}")
    digit_feats = np.concatenate([digit_features(hidden[np.asarray(c["keys"])], len(c["prefix"]))
                                  for c in canaries])
    del replay, hidden
    reference = loaded["retained_keys"]
    ordered = np.concatenate([np.asarray(c["keys"]) for c in canaries])  # digit_feats' order
    plan = variants(features, digit_feats, canaries, ordered, reference, args.k, args.untied, args.per_canary,
                    args.digits)

    models: dict[str, Any] = {}
    recorded = loaded["report"].get("models", {})
    for name, weights in (("trained (recorded)", loaded["trained"]), ("retrained without canaries",
                                                                      loaded["retrained"])):
        if name == "retrained without canaries" and name in recorded and not args.remeasure:
            models[name] = {**recorded[name], "source": "the run's lm.json (bench.lm.measure on retrained.npy)"}
            continue
        models[name] = lm.measure(model_of(settings, weights), canaries, data, device, loaded["retained_sample"])
        if name in recorded:  # the same function on the same weights: the run's figures again
            models[name]["difference_from_run"] = {
                key: float(np.max(np.abs(np.subtract(models[name][key], recorded[name][key]))))
                for key in ("exposure_bits", "secret_nll_nats", "heldout_loss", "forget_loss", "retained_loss")}
        print(f"  {name}: exposure {models[name]['mean_exposure_bits']:.2f} bits, held-out loss "
              f"{models[name]['heldout_loss']:.4f} ({models[name]['seconds']:.0f} s)")
    retrained = models["retrained without canaries"]
    for variant in plan:
        edited = model_of(settings, loaded["trained"])
        if variant["untie"]:
            untie_head(edited)
        projection = project_head(edited, variant["directions"], variant["mean"])
        projection["directions"] = int(variant["directions"].shape[0])
        projection["singular_values_top"] = variant["spectrum_top"]
        if "per_canary_cosines" in variant:
            projection["per_canary_direction_abs_cosines"] = variant["per_canary_cosines"]
        figures = lm.measure(edited, canaries, data, device, loaded["retained_sample"])
        figures["projection"] = projection
        figures["target"] = verdict(figures, retrained)
        models[variant["name"]] = figures
        print(f"  {variant['name']}: exposure {figures['mean_exposure_bits']:.2f} bits, held-out loss "
              f"{figures['heldout_loss']:.4f}, head change {projection['head_relative_change']:.3g} "
              f"({figures['seconds']:.0f} s)")

    requests = {"the 256 canary keys": keys,
                f"the {args.named} random plain keys (live)": np.asarray(found["random_request"]["named"])}
    attempt = library_attempt(model_of(settings, loaded["trained"]), run_dir / "store.h5", train, requests) \
        if args.library else {}
    for name, outcome in attempt.items():
        print(f"  library, {name}: {'ran' if outcome['ran'] else outcome['error'][:160]}")
    headline = models.get("head projection, k = 1")
    report = {
        "command": "python -m bench.lm_memorised " + " ".join(sys.argv[1:]) if args.command is None else args.command,
        "run": str(run_dir), "settings": {"named": args.named, "k": args.k, "untied": args.untied,
                                          "per_canary": args.per_canary, "digits": args.digits,
                                          "reference": "all retained training windows",
                                          "reference_count": int(reference.size), "seed": settings["seed"]},
        "target": {"exposure_bits_within": TARGET_BITS, "heldout_loss_within_relative": TARGET_LOSS,
                   "headline": "head projection, k = 1",
                   "headline_verdict": headline["target"] if headline else None},
        "search": found, "span_search": spans, "models": models, "library": attempt, "library_source": _library_source(),
        "features": {"what": "input of lm_head (ln_f output), mean over the window's tokens",
                     "computed": "once for every training window by the trained model, replayed through its "
                                 "lm_head to find_similar (ReplayedHead)",
                     "replay_max_abs_difference": replay_error,
                     "dimension": int(features.shape[1]),
                     "cosine_token_mean_shift_vs_digit_position_shift": float(
                         _cos(features[ordered].mean(0) - features[reference].mean(0),
                              digit_feats.mean(0) - features[reference].mean(0)))},
        "seconds": time.perf_counter() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_memorised.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "lm_memorised.md").write_text(table)
    print(table)
    return report


def _library_source() -> dict[str, str]:
    """sha256 of the search's and the rule's source as imported (the library may change under a long run)."""
    import hashlib
    import inspect

    from unlearn.forgetting import similar, similar_spans
    from unlearn.forgetting.rules import feature_rule

    return {m.__name__: hashlib.sha256(inspect.getsource(m).encode()).hexdigest() for m in (similar, similar_spans, feature_rule)}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.lm_memorised", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="out/lm", help="a finished `bench lm` run folder")
    p.add_argument("--out", default="out/lm-memorised")
    p.add_argument("--named", type=int, default=16, help="windows named per search request")
    p.add_argument("--k", type=int, nargs="*", default=[1, 2, 4], help="directions projected off")
    p.add_argument("--no-untied", dest="untied", action="store_false", help="skip the untied-head variant")
    p.add_argument("--no-per-canary", dest="per_canary", action="store_false")
    p.add_argument("--no-digits", dest="digits", action="store_false", help="skip the digit-position diagnostic")
    p.add_argument("--remeasure", action="store_true",
                   help="measure the retrained model again rather than take its figures from the run's lm.json")
    p.add_argument("--no-library", dest="library", action="store_false",
                   help="skip trying forget_keys(scale='feature') and accuracy() on the LM")
    p.set_defaults(command=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.named < 3:
        raise SystemExit("--named must be at least 3 (find_similar needs 3 to tell what they share)")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
