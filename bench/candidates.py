"""`python -m bench candidates`: the removal rules tried for a backdoor before the feature rule was kept (issue 24,
"keep what works; publish what does not"), on the runs `bench diagnose --keep-stores` left (int8 update rows,
p = 0.01, all 100 poisoned samples named).

Each candidate gets what a rule gets (the named keys, the store, the model, retained data), never the trigger or
the target label; each point reports ASR (overall and the worst source class), target-class accuracy and TA:
- **ssd-store**: SSD's dampening (Foster et al. 2024) with its importances read from the store instead of a data
  pass: per position, the mean square of the request's rows against all rows' (each estimated at p from the rows
  that hold the position); where the request's exceeds ``alpha`` times all rows', the weight is multiplied by
  min(lambda * all / request, 1). Also **rows on the selected positions**: w + (c / p) * rows there only.
- **ssd-data**: SSD as published: importances are squared batch gradients at the trained weights, of the request's
  samples against 5,000 retained samples.
- **layers**: the rows with one step per layer group (first convolution, second, classifier).
- **rows + repair**: the rows at c, then a fine-tune of ``steps`` Adam steps on retained data (reported apart);
  and the fine-tune alone, the control.
- **head projection**: the feature rule's projection with k directions (the rule uses 1).

And the searches tried for the samples nobody named (``--parts search``; 25 of the 100 named, ``--draws`` draws),
ranked among the training samples of the named label: each stored row's inner product with the named rows'
sum at its positions (plain, and whitened by all rows' second moments), the cosine of each sample's current
gradient with the named samples' (all weights; the first layer alone), and ``find_similar`` (the head's input):
AUC, how many of the top 75 are poisoned, and find_similar's precision and recall.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import gradstore
from unlearn.forgetting.similar import find_head, find_similar, head_features
from unlearn.params import flat_params, load_flat_params
from unlearn.recording.per_sample import per_sample_grads
from unlearn.runs.models import build_model

from . import diagnose
from .study import record as study_record


def square_sums(store, seed: int, keys: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(sum of rows, sum of squared rows) of ``keys`` at each position, float64 [M]."""
    total, squares = np.zeros(store.num_params), np.zeros(store.num_params)
    for start in range(0, keys.size, block):
        chunk = keys[start:start + block]
        rows = store.read(chunk).astype(np.float64)
        for row, where in zip(rows, gradstore.masks.positions_many(seed, chunk, store.num_params, store.k)):
            np.add.at(total, where, row)
            np.add.at(squares, where, row * row)
    return total, squares


def batch_importance(model, x: np.ndarray, y: np.ndarray, batch: int = 32) -> np.ndarray:
    """SSD's importance: the mean over batches of the squared batch gradient, float64 [M]."""
    total, count = None, 0
    for start in range(0, len(x), batch):
        model.zero_grad()
        F.cross_entropy(model(torch.as_tensor(x[start:start + batch])), torch.as_tensor(y[start:start + batch])).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy()
        total = grad ** 2 if total is None else total + grad ** 2
        count += 1
    return total / count


def fine_tuned(model, weights, data, retained, steps, seed, lr=1e-3, batch=64):
    load_flat_params(model, weights.astype(np.float32))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng([seed, 27])
    for _ in range(steps):
        chosen = rng.choice(retained, batch, replace=False)
        optimizer.zero_grad()
        F.cross_entropy(model(torch.as_tensor(data.train_x[chosen])), torch.as_tensor(data.train_y[chosen])).backward()
        optimizer.step()
    model.eval()
    return flat_params(model)


def head_projected(model, trained, data, named, retained, k, seed):
    load_flat_params(model, trained)
    head = find_head(model, data.train_x[named[:1]])
    reference = np.random.default_rng([seed, 25]).choice(retained, min(10000, retained.size), replace=False)
    mean = head_features(model, head, data.train_x[reference]).mean(0)
    _, _, vt = np.linalg.svd(head_features(model, head, data.train_x[named]) - mean, full_matrices=False)
    v = torch.as_tensor(vt[:k], dtype=torch.float32)
    with torch.no_grad():
        taken = (head.module.weight @ v.T) @ v
        head.module.bias.add_(taken @ torch.as_tensor(mean, dtype=torch.float32))
        head.module.weight.sub_(taken)
    return flat_params(model)


def auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Mann-Whitney AUC of ``scores`` for the ``truth`` rows against the rest."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    hits, misses = int(truth.sum()), int((~truth).sum())
    return float((ranks[truth].sum() - hits * (hits + 1) / 2) / (hits * misses))


def search_signals(seed, folder, data, model, trained, all_squares, count, draws, log) -> list:
    """Each signal's AUC and top-75 hits for the unnamed poisoned samples among the named label's samples."""
    poisoned = np.asarray(data.poison.keys, np.int64)
    out = []
    for draw in range(draws):
        named = np.random.default_rng([seed, 25, draw]).choice(poisoned, 25, replace=False)
        unnamed = np.setdiff1d(poisoned, named)
        candidates = np.setdiff1d(np.flatnonzero(np.isin(data.train_y, data.train_y[named])), named)
        truth = np.isin(candidates, unnamed)
        signals = {}
        with gradstore.open(folder / diagnose.STORE) as store:
            named_sum, _ = square_sums(store, seed, named)
            rows = store.read(candidates).astype(np.float64)
            where = gradstore.masks.positions_many(seed, candidates, store.num_params, store.k)
        whitening = 1.0 / np.maximum(all_squares / count, 1e-30)
        signals["stored rows . named rows"] = np.array([r @ named_sum[w] for r, w in zip(rows, where)])
        signals["stored rows . named rows, whitened"] = np.array([r @ (named_sum * whitening)[w]
                                                                  for r, w in zip(rows, where)])
        load_flat_params(model, trained)
        named_grads = per_sample_grads(model, torch.as_tensor(data.train_x[named]),
                                       torch.as_tensor(data.train_y[named])).double().numpy()
        unit = (named_grads / np.linalg.norm(named_grads, axis=1, keepdims=True)).mean(0)
        grads = np.concatenate([per_sample_grads(model, torch.as_tensor(data.train_x[candidates[i:i + 512]]),
                                                 torch.as_tensor(data.train_y[candidates[i:i + 512]])).double().numpy()
                                for i in range(0, candidates.size, 512)])
        first = model.net[0].weight.numel() + model.net[0].bias.numel()
        signals["current gradient cosine"] = grads @ unit / np.maximum(np.linalg.norm(grads, axis=1), 1e-30)
        signals["current gradient cosine, first layer"] = (grads[:, :first] @ unit[:first] /
                                                           np.maximum(np.linalg.norm(grads[:, :first], axis=1), 1e-30))
        similar = find_similar(model, data.train_x, data.train_y, named,
                               np.setdiff1d(np.arange(len(data)), named), seed=seed)
        found_report = similar.report(unnamed)
        entry = {"draw": draw, "signals": {}, "find_similar": {key: found_report[key] for key in
                                                                ("num_found", "precision", "recall", "rounds",
                                                                 "threshold")}}
        for name, scores in signals.items():
            top = np.argsort(-scores)[:unnamed.size]
            entry["signals"][name] = {"auc": auc(scores, truth), "top_75_poisoned": int(truth[top].sum())}
        entry["find_similar"]["coherence_p"] = similar.coherence.p_value if similar.coherence else None
        log(f"seed {seed} draw {draw}: " + "; ".join(f"{name} AUC {v['auc']:.3f} top {v['top_75_poisoned']}"
                                                   for name, v in entry["signals"].items())
            + f"; find_similar {found_report['num_found']} found, precision {found_report['precision']}, "
              f"recall {found_report['recall']}")
        out.append(entry)
    return out


def run_seed(seed: int, folder: Path, args, log) -> dict:
    config = json.loads((folder / "trained.json").read_text())["config"]
    data = study_record.poisoned_data(config, seed)
    with np.load(folder / "trained.npz", allow_pickle=False) as saved:
        trained = saved["trained"]
    retrained = np.load(folder / "reference-poisoned.npy", allow_pickle=False)
    model = build_model("simple", data.in_channels, data.num_classes, seed=seed).eval()
    named = np.asarray(data.poison.keys, np.int64)
    retained = np.setdiff1d(np.arange(len(data)), named)
    points = []

    def point(candidate, setting, weights):
        figures = diagnose.figures(model, np.asarray(weights, np.float32), data)
        worst = max(figures["asr_by_source"].items(), key=lambda item: item[1])
        points.append({"candidate": candidate, "setting": setting, "asr": figures["asr"], "worst_source": worst[0],
                       "worst_asr": worst[1], "target_class_acc": figures["target_class_acc"], "ta": figures["ta"]})
        log(f"seed {seed} {candidate} {setting}: ASR {figures['asr']:.3f} (worst {worst[1]:.3f}), target "
            f"{figures['target_class_acc']:.3f}, TA {figures['ta']:.3f}")

    point("after train", "", trained)
    point("retrained without the 100", "", retrained)
    with gradstore.open(folder / diagnose.STORE) as store:
        keep = store.k / store.num_params
        live = np.flatnonzero(store.state == gradstore.RowState.LIVE)
        _, all_squares = square_sums(store, seed, live)
        rows, request_squares = square_sums(store, seed, named)
        count = live.size
    if "search" in args.parts:
        searches = search_signals(seed, folder, data, model, trained, all_squares, count, args.draws, log)
    if "removal" not in args.parts:
        return {"points": points, "p": keep, "search": searches}
    ratio = (request_squares / named.size) / np.maximum(all_squares / count, 1e-30)
    for alpha in args.alphas:
        selected = ratio > alpha
        damp = np.where(selected, np.minimum(1.0 / np.maximum(ratio, 1e-30), 1.0), 1.0)
        point("ssd-store", f"alpha {alpha:g} ({selected.mean():.1%} of weights), lambda 1", trained * damp)
        for c in (0.05, 1.0):
            point("rows on the ssd-store positions", f"alpha {alpha:g}, c {c:g}",
                  trained + np.where(selected, (c / keep) * rows, 0.0))
    load_flat_params(model, trained)
    reference = np.random.default_rng([seed, 28]).choice(retained, min(5000, retained.size), replace=False)
    forget_importance = batch_importance(model, data.train_x[named], data.train_y[named])
    retained_importance = batch_importance(model, data.train_x[reference], data.train_y[reference])
    model.zero_grad()
    for alpha in args.alphas:
        for lam in (0.1, 1.0):
            selected = forget_importance > alpha * retained_importance
            beta = np.where(selected, np.minimum(lam * retained_importance / np.maximum(forget_importance, 1e-30), 1), 1)
            point("ssd-data", f"alpha {alpha:g} ({selected.mean():.1%} of weights), lambda {lam:g}", trained * beta)
    bounds = np.cumsum([0] + [p.numel() for p in model.parameters()])
    groups = {"conv1": (bounds[0], bounds[2]), "conv2": (bounds[2], bounds[4]), "classifier": (bounds[4], bounds[6])}
    for c1 in (0.5, 1.0, 2.0):
        for c2 in (0.0, 0.02, 0.05):
            for c3 in (0.0, 0.01, 0.02):
                step = np.zeros_like(rows)
                for (start, end), c in zip(groups.values(), (c1, c2, c3)):
                    step[start:end] = (c / keep) * rows[start:end]
                point("layers", f"conv1 {c1:g}, conv2 {c2:g}, classifier {c3:g}", trained + step)
    for steps in args.repair_steps:
        point("fine-tune only (control)", f"{steps} steps", fine_tuned(model, trained, data, retained, steps, seed))
        for c in (0.05, 0.2, 1.0):
            point("rows + repair", f"c {c:g}, {steps} steps",
                  fine_tuned(model, trained + (c / keep) * rows, data, retained, steps, seed))
    for k in (1, 2, 4, 8):
        point("head projection", f"k {k}", head_projected(model, trained, data, named, retained, k, seed))
    return {"points": points, "p": keep, **({"search": searches} if "search" in args.parts else {})}


def markdown(results: dict) -> str:
    lines = ["| seed | candidate | setting | ASR | worst source (ASR) | target class | TA |", "|---" * 7 + "|"]
    for seed, entry in results["seeds"].items():
        for p in entry["points"]:
            lines.append(f"| {seed} | {p['candidate']} | {p['setting']} | {p['asr']:.3f} | {p['worst_source']} "
                         f"({p['worst_asr']:.3f}) | {p['target_class_acc']:.3f} | {p['ta']:.3f} |")
    searches = [(seed, draw) for seed, entry in results["seeds"].items() for draw in entry.get("search", [])]
    if searches:
        names = list(searches[0][1]["signals"])
        lines += ["", "| seed | draw | " + " | ".join(f"{n}: AUC / top 75" for n in names)
                  + " | find_similar: found / precision / recall |", "|---" * (len(names) + 3) + "|"]
        for seed, draw in searches:
            found = draw["find_similar"]
            lines.append(f"| {seed} | {draw['draw']} | " + " | ".join(
                f"{draw['signals'][n]['auc']:.3f} / {draw['signals'][n]['top_75_poisoned']}" for n in names)
                + f" | {found['num_found']} / {found['precision']} / {found['recall']} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser):
    parser.add_argument("--diagnose-dir", default="out/diagnose", help="where `bench diagnose --keep-stores` wrote")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--alphas", type=float, nargs="+", default=[2, 5, 10, 20, 50])
    parser.add_argument("--repair-steps", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--parts", nargs="+", choices=["removal", "search"], default=["removal", "search"])
    parser.add_argument("--draws", type=int, default=6, help="draws of 25 named for the search part")
    parser.add_argument("--out", default="out/candidates")


def main(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"seeds": {}}
    for seed in args.seeds:
        folder = Path(args.diagnose_dir) / f"seed{seed}"
        if not (folder / diagnose.STORE).exists() or not (folder / "trained.npz").exists():
            raise SystemExit(f"{folder} has no kept run: run `python -m bench diagnose --seeds {seed} --keep-stores "
                             f"--out {args.diagnose_dir}` first")
        results["seeds"][str(seed)] = run_seed(seed, folder, args, print)
        (out / "candidates.json").write_text(json.dumps(results, indent=1))
    (out / "candidates.md").write_text(markdown(results))
    print(markdown(results))
    return 0
