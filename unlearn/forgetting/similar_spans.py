"""What a language model's named windows share, read token by token: the search for the windows nobody named when
what they taught is a span of text (a secret, a leaked line) and not the whole window.

Why not ``similar.find_similar``: it averages the head's input over a window's positions, and a canary line is
16-38 of a window's 128 bytes, so the average is mostly ordinary text: on the canaries of ``bench lm`` it found
plain windows at 4-14x the base rate, far from the 90% precision asked (docs/RESULTS.md). Here every position
keeps its own vector (the head's input there, centred on the control windows' mean, at unit length), and:

- a position of a named window is *shared* when its vector has a match (cosine above ``match``) in at least
  ``share`` of the other named windows;
- it is *rare* when its vector has a match in few control windows (``control_windows`` random candidates, or
  every candidate where there are fewer; 32 at the least): the
  named windows' matches must be too many for the control's rate, a binomial test at ``evidence_p`` divided by
  every position tested (Bonferroni). Common idioms (``self.``, ``return``) are shared too, and everywhere;
- a *span*: only shared rare positions in runs of at least ``min_positions`` consecutive positions of their
  window count (a line of text, not tokens of a vocabulary scattered over the window);
- evidence: the named windows hold, at the median, at least ``min_positions`` such positions; otherwise nothing
  is searched for;
- found: a candidate window that holds the span of at least ``share`` of the searched named windows that have one
  (its score: that share). It holds a named window's span when it covers ``share`` of that window's span vectors,
  each by a piece of ``min_positions`` or more consecutive vectors of its run matched by as many consecutive
  positions of the candidate, in order: the span's text, not its tokens one by one (a window of other digits
  matches a secret's digits one by one: scored by the share of span vectors matched anywhere, such windows were
  found beside a secret placed after different text, in an exploration on a tiny GPT-2: docs/DESIGN.md). A
  template shared by the named windows (`password = '`) is part of their span: a window holding it alone is
  found when it makes up ``share`` or more of the span (below: what the test rejects).

What the test rejects is exchangeability: that the named windows are like random candidates. A request whose
windows share something else rare (a template, a language, one author's boilerplate) passes it too, and the
windows holding that are found: ``found`` lists them, and ``forget_keys(find_similar=True)`` forgets them with the
named ones. Ask for the search only where the named windows were chosen for what they share.

The named windows' matches are computed among at most ``max_named`` of them (a seeded subset), so that the cost
stays n x T x n x T products of the head's width; scoring reads every candidate window through the model once.
No labels: a language model's windows have none. How few named windows can pass depends on the control and the
window: with 256 control windows and 128 positions, 4 named windows whose span is in all 4 can; 3 never can (a
match in both others is not rare enough at the Bonferroni level); with fewer control windows it takes more.
Measured on ``bench lm``'s canaries (docs/RESULTS.md): every canary's
48 unnamed windows found from 16 named, nothing else; random requests of plain windows find nothing.
Where it may fail:
- a secret that appears after different text in each window: the head's input at the secret's tokens then also
  carries the different prefixes and positions. Every canary of ``bench lm`` opens its window; on a tiny GPT-2
  (an exploration, docs/DESIGN.md "The search span by span") such secrets were found with fewer of their windows,
  or not at all, but no other window was;
- a request where the span is in fewer than half of the named windows: it is not shared, and nothing is found;
- copies of one named window's text elsewhere: only what the named windows share is searched for;
- the control is drawn from the candidates, so it holds some unnamed copies of the span: a span copied into a
  large share of the corpus is not rare, and is not found.
"""

import math
import numbers
from typing import Any

import numpy as np
import torch

from ..errors import RequestError
from .similar import Similar, checked_search_keys, find_head, head_features

MIN_CONTROL = 32  # control windows at the least: a rate estimated from fewer cannot call a span rare
BLOCK = 1024  # vectors compared at a time: bounds the [windows x T x vectors] similarity blocks


def find_similar_spans(model: torch.nn.Module, windows: Any, named: np.ndarray, candidates: np.ndarray, *,
                       seed: int = 0, match: float = 0.9, share: float = 0.5, evidence_p: float = 0.001,
                       min_positions: int = 4, control_windows: int = 256, max_named: int = 32,
                       batch_size: int = 64) -> Similar:
    """The windows among ``candidates`` that hold the span the ``named`` windows share and the control rarely
    has (see the module doc). ``windows``: integer token windows [N, T], indexed by key."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer):
        raise RequestError(f"find_similar_spans reads token windows (integers, [N, T]); got {windows.dtype} "
                           f"{list(windows.shape)}")
    named, candidates = checked_search_keys("find_similar_spans", named, candidates, len(windows))
    integers = {"min_positions": (min_positions, 2), "max_named": (max_named, 3), "batch_size": (batch_size, 1),
                "control_windows": (control_windows, 1)}
    for name, (value, least) in integers.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise RequestError(f"find_similar_spans: {name} must be an integer of at least {least}, got {value!r}"
                               + (" (a span is a run of positions, in order)" if name == "min_positions" else ""))
    for name, number, low, high in (("share", share, 0, 1), ("match", match, -1, 1), ("evidence_p", evidence_p, 0, 1)):
        if not isinstance(number, numbers.Real) or not (low < number <= high) or (name != "share" and number == high):
            raise RequestError(f"find_similar_spans: {name} must be in ({low}, {high}{']' if name == 'share' else ')'}, "
                               f"got {number!r}")
    head = find_head(model, windows[named[:1]] if named.size else windows[:1])

    def nothing(why: str, **extra: Any) -> Similar:
        return Similar(np.zeros(0, np.int64), np.zeros(0), None, None, 0, int(candidates.size), head.name, why=why,
                       extra={"spans": extra} if extra else {})

    if named.size < 3:
        return nothing(f"{named.size} named window(s): at least 3 are needed to tell what they share")
    if control_windows < MIN_CONTROL:
        return nothing(f"control_windows {control_windows}: the control needs at least {MIN_CONTROL}")
    control_windows = min(control_windows, int(candidates.size))
    if control_windows < MIN_CONTROL:
        return nothing(f"{candidates.size} candidate windows: the control needs at least {MIN_CONTROL}")
    rng = np.random.default_rng([seed, 33])
    control = np.sort(rng.choice(candidates, control_windows, replace=False))
    subset = np.sort(rng.choice(named, min(max_named, named.size), replace=False))
    control_features = head_features(model, head, windows[control], batch_size, positions=True)
    centre = control_features.reshape(-1, control_features.shape[-1]).mean(0)
    control_units = _units(control_features, centre)
    del control_features
    units = _units(head_features(model, head, windows[subset], batch_size, positions=True), centre)
    n, positions = units.shape[:2]
    counts = _named_matches(units, match)  # [n, T]: other named windows holding a match
    shared = counts >= math.ceil(share * (n - 1))
    rate = (_matched(control_units, units[shared], match).sum(0) + 1) / (control_windows + 1)  # the control's rate
    threshold_p = evidence_p / (n * positions)
    rare = np.zeros_like(shared)
    rare[shared] = [_binomial_tail(int(k), n - 1, float(q)) < threshold_p for k, q in zip(counts[shared], rate)]
    in_span = _in_runs(rare, min_positions)
    per_window = in_span.sum(1)
    report = {"named_searched": int(n), "shared_positions": int(shared.sum()), "shared_rare_positions": int(rare.sum()),
              "span_positions": int(in_span.sum()), "median_span_positions_per_named": float(np.median(per_window)),
              "position_p": threshold_p, "control_windows": int(control_windows), "match": match, "share": share,
              "min_positions": min_positions}
    if np.median(per_window) < min_positions:
        return nothing(f"the named windows share no rare span the model reads alike (median "
                       f"{np.median(per_window):g} positions a window in runs of {min_positions} or more shared rare "
                       "ones): nothing is added without evidence", **report)
    spans = units[in_span]  # the span vectors, window by window, each window's in position order
    owner = np.nonzero(in_span)[0]  # the named window each is from
    starts = np.ones(len(spans), bool)  # where a run begins: a diagonal never crosses from one run into the next
    starts[1:] = (owner[1:] != owner[:-1]) | (np.nonzero(in_span)[1][1:] != np.nonzero(in_span)[1][:-1] + 1)
    scores = np.zeros(candidates.size)
    for start in range(0, candidates.size, batch_size * 4):
        chunk = candidates[start:start + batch_size * 4]
        chunk_units = _units(head_features(model, head, windows[chunk], batch_size, positions=True), centre)
        scores[start:start + chunk.size] = _span_scores(chunk_units, spans, starts, owner, match, min_positions, share)
    found = scores >= share
    order = np.argsort(-scores[found], kind="stable")
    return Similar(candidates[found][order], scores[found][order], None, share, 1, int(candidates.size), head.name,
                   extra={"spans": report})


def _units(features: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """float32 [n, T, d]: each position's vector less ``centre``, at unit length."""
    units = features.astype(np.float32, copy=False) - centre.astype(np.float32)
    units /= np.maximum(np.linalg.norm(units, axis=-1, keepdims=True), 1e-12)
    return units


def _in_runs(mask: np.ndarray, length: int) -> np.ndarray:
    """bool [n, T]: the True entries of ``mask`` that lie in runs of at least ``length`` consecutive ones."""
    out = np.zeros_like(mask)
    for i, row in enumerate(mask):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
        for start, end in zip(edges[::2], edges[1::2]):
            if end - start >= length:
                out[i, start:end] = True
    return out


def _named_matches(units: np.ndarray, match: float) -> np.ndarray:
    """int [n, T]: for each position of each named window, how many other named windows hold a match for it."""
    n, positions, width = units.shape
    flat = units.reshape(-1, width)
    counts = np.zeros((n, positions), np.int64)
    for i in range(n):
        best = (units[i] @ flat.T).reshape(positions, n, positions).max(-1)  # [T, n]
        best[:, i] = -1.0
        counts[i] = (best > match).sum(-1)
    return counts


def _matched(units: np.ndarray, vectors: np.ndarray, match: float) -> np.ndarray:
    """bool [windows, vectors]: whether each window holds a position matching each vector (in blocks of at most
    BLOCK positions x BLOCK vectors)."""
    windows, positions, width = units.shape
    out = np.zeros((windows, len(vectors)), bool)
    step = max(1, BLOCK // positions)
    for first in range(0, windows, step):
        flat = units[first:first + step].reshape(-1, width)
        for start in range(0, len(vectors), BLOCK):
            block = vectors[start:start + BLOCK]
            out[first:first + step, start:start + len(block)] = \
                (flat @ block.T).reshape(-1, positions, len(block)).max(1) > match
    return out


def _span_scores(units: np.ndarray, spans: np.ndarray, starts: np.ndarray, owner: np.ndarray, match: float,
                 length: int, share: float) -> np.ndarray:
    """float [windows]: the share of the named windows (those with a span) whose span each window holds: at least
    ``share`` of that named window's span vectors covered by in-order pieces (``_covered_in_order``)."""
    covered = _covered_in_order(units, spans, starts, match, length)
    owners = np.unique(owner)
    held = np.stack([covered[:, owner == window].mean(1) >= share for window in owners], axis=1)
    return held.mean(1)


def _covered_in_order(units: np.ndarray, spans: np.ndarray, starts: np.ndarray, match: float,
                      length: int) -> np.ndarray:
    """bool [windows, span vectors]: whether each window covers each span vector by a piece of ``length`` or more
    consecutive vectors of its run, matched by as many consecutive positions of the window, in order. That is the
    span's text itself: a window of other digits matches a secret's digits one by one, not a run of them in
    order. ``starts`` marks the first vector of each run."""
    windows, positions, width = units.shape
    covered = np.zeros((windows, len(spans)), bool)
    step = max(1, (1 << 24) // max(1, positions * len(spans)))  # windows at a time: hits stay under ~16 M entries
    for first in range(0, windows, step):
        block = units[first:first + step]
        count = len(block)
        hits = (block.reshape(-1, width) @ spans.T > match).reshape(count, positions, len(spans))
        diagonal = np.zeros((positions, count, len(spans)), np.int32)  # in-order matches ending at (t, j)
        for t in range(positions):
            previous = np.zeros((count, len(spans)), np.int32)
            if t:
                previous[:, 1:] = diagonal[t - 1][:, :-1]
                previous[:, starts] = 0
            diagonal[t] = np.where(hits[:, t], previous + 1, 0)
        # each diagonal's final length, carried back along it: the piece a match lies in, not the part before it
        final = diagonal[positions - 1].copy()
        piece = covered[first:first + count]
        piece |= final >= length
        ends = np.zeros(len(spans), bool)  # the last vector of each run: nothing follows it on a diagonal
        ends[:-1] = starts[1:]
        ends[-1] = True
        for t in range(positions - 2, -1, -1):
            after = np.zeros_like(final)
            after[:, :-1] = final[:, 1:]
            after[:, ends] = 0
            following = np.zeros_like(diagonal[t])  # the match after (t, j) on its diagonal, where there is one
            following[:, :-1] = diagonal[t + 1][:, 1:]
            following[:, ends] = 0
            final = np.where(diagonal[t] > 0, np.where(following == diagonal[t] + 1, after, diagonal[t]), 0)
            piece |= final >= length
    return covered


def _binomial_tail(k: int, n: int, q: float) -> float:
    """P(X >= k) for X ~ Binomial(n, q)."""
    return float(sum(math.comb(n, j) * q ** j * (1 - q) ** (n - j) for j in range(k, n + 1)))
