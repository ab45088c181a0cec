"""`python -m bench.lm_reference_spread --run out/lm --rule docs/lm/tokens.json`: how far apart language models
retrained without the same canaries land (issue 24's canary target compares a removal with one retrained model).

Reads a finished `bench lm` run (its settings, canaries and data, rebuilt and hash-checked), then trains the
run's GPT-2 from scratch without the canary windows once per --retrain-seeds value: that seed draws the initial
weights and the batch order; the data, the schedule and every other setting are the run's. Each model gets bench
lm's figures (exact exposure of every canary, held-out and retained loss), on the run's own device. With --rule
(a `bench.lm_tokens` report of the same run), the rule's model is judged against every retrained model by issue
24's target (mean exposure within 2 bits, held-out loss within 1%). Each retraining is cached in the run's folder
as reference-spread<seed>.npy beside a JSON marker holding its options, the run's data hashes and the training
code's hash.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import lm
from .language import build_gpt2, gpt2_config
from .lm_memorised import load_run, verdict

FIELDS = ("mean_exposure_bits", "heldout_loss", "retained_loss", "forget_loss")


def retrained(run: Path, loaded: dict[str, Any], training_seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The run's GPT-2 trained without the canary windows, ``training_seed`` drawing init and batch order
    (cached as run/reference-spread<seed>.npy, its marker holding the run's settings, the seed, the run's data and
    corpus hashes and ``training_source()``)."""
    from unlearn.params import flat_params

    settings, data = loaded["settings"], loaded["data"]
    weights_path, marker = run / f"reference-spread{training_seed}.npy", run / f"reference-spread{training_seed}.json"
    expected = json.loads(json.dumps({"settings": settings, "training_seed": training_seed,
                                      "train_sha256": loaded["report"]["train_sha256"],
                                      "corpus_sha256": loaded["report"]["corpus"]["sha256"],
                                      "training_source": training_source()}))
    if marker.exists() and weights_path.exists():
        saved = json.loads(marker.read_text())
        if {key: saved.get(key) for key in expected} == expected:
            return np.load(weights_path, allow_pickle=False), saved["training"]
    model = build_gpt2(training_seed, n_embd=settings["n_embd"], n_layer=settings["n_layer"],
                       n_head=settings["n_head"], n_positions=settings["seq_len"])
    plan = lm.batches(len(data["train"]), settings["batch_size"], settings["epochs"], training_seed, data["keys"])
    print(f"retraining without the {data['keys'].size} canary windows, training seed {training_seed}, "
          f"{len(plan)} steps")
    training = lm.train(model, data["train"], plan, settings["lr"], settings["warmup"], device_of(settings))
    training = {k: v for k, v in training.items() if k != "losses"}
    weights = flat_params(model)
    np.save(weights_path, weights, allow_pickle=False)
    marker.write_text(json.dumps({**expected, "training": training}, indent=1))
    return weights, training


def training_source() -> str:
    """sha256 of the training's and the model's source as imported, with torch's and transformers' versions (a
    cached model from other code is not reused)."""
    import hashlib
    import inspect

    import transformers

    functions = (lm.train, lm.batches, lm.warmup_cosine, build_gpt2, gpt2_config)
    return hashlib.sha256(("".join(inspect.getsource(f) for f in functions) + torch.__version__
                           + transformers.__version__).encode()).hexdigest()


def device_of(settings: dict[str, Any]) -> torch.device:
    """The run's own device: its reference was trained and measured there, and the spread is read beside it."""
    device = torch.device(settings["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"the run was made on {device}; no CUDA device here")
    return device


def figures_of(loaded: dict[str, Any], weights: np.ndarray) -> dict[str, Any]:
    from .lm_memorised import model_of

    device = device_of(loaded["settings"])
    return lm.measure(model_of(loaded["settings"], weights).to(device), loaded["canaries"], loaded["data"], device,
                      loaded["retained_sample"])


def rule_model(rule: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The canary request's model of a bench.lm_tokens report."""
    names = [name for name in rule["models"] if " rule, canaries" in name]
    if len(names) != 1:
        raise SystemExit(f"the rule report holds {len(names)} canary models ({list(rule['models'])}); expected one")
    return names[0], rule["models"][names[0]]


def spread(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {field: {"min": min(r[field] for r in rows), "max": max(r[field] for r in rows),
                    "mean": statistics.fmean(r[field] for r in rows), "std": statistics.pstdev(r[field] for r in rows)}
            for field in FIELDS}


def markdown(report: dict[str, Any]) -> str:
    rule = report.get("rule")
    head = "| model | exposure, bits (each canary) | mean | held-out loss | retained loss | canary-window loss |"
    lines = [head + (" the rule against it: exposure, held-out loss, target |" if rule else ""),
             "|---" * (6 + bool(rule)) + "|"]
    for r in report["rows"]:
        line = (f"| {r['model']} | {' / '.join(f'{b:.1f}' for b in r['exposure_bits'])} | "
                f"{r['mean_exposure_bits']:.2f} | {r['heldout_loss']:.4f} | {r['retained_loss']:.3f} | "
                f"{r['forget_loss']:.3f} |")
        if rule and "verdict" in r:
            v = r["verdict"]
            line += (f" {v['exposure_minus_retrained_bits']:+.2f} bits, "
                     f"{100 * v['heldout_loss_relative_to_retrained']:+.1f}%, {'met' if v['met'] else 'missed'} |")
        elif rule:
            line += " |"
        lines.append(line)
    s = report["spread"]
    lines.append(f"| retrained models: min-max (std) | | {s['mean_exposure_bits']['min']:.2f}-"
                 f"{s['mean_exposure_bits']['max']:.2f} ({s['mean_exposure_bits']['std']:.2f}) | "
                 f"{s['heldout_loss']['min']:.4f}-{s['heldout_loss']['max']:.4f} ({s['heldout_loss']['std']:.4f}) | "
                 f"{s['retained_loss']['min']:.3f}-{s['retained_loss']['max']:.3f} | "
                 f"{s['forget_loss']['min']:.3f}-{s['forget_loss']['max']:.3f} |" + (" |" if rule else ""))
    return "\n".join(lines) + "\n"


def row(name: str, figures: dict[str, Any], rule: dict[str, Any] | None) -> dict[str, Any]:
    out = {"model": name, "exposure_bits": figures["exposure_bits"],
           **{field: figures[field] for field in FIELDS}}
    if rule is not None:
        out["verdict"] = verdict(rule, figures)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lm_reference_spread", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="out/lm", help="a finished bench lm run")
    parser.add_argument("--rule", help="the run's bench.lm_tokens report (tokens.json), judged against every model")
    parser.add_argument("--retrain-seeds", type=int, nargs="+", default=[100, 101, 102])
    parser.add_argument("--out", help="folder for lm_reference_spread.{json,md} (default: print only)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    loaded = load_run(run)
    reference = loaded["report"]["models"]["retrained without canaries"]
    rule_name, rule = rule_model(json.loads(Path(args.rule).read_text())) if args.rule else (None, None)
    if rule is not None:
        recorded = json.loads(Path(args.rule).read_text())["models"]["retrained without canaries"]
        if abs(recorded["heldout_loss"] - reference["heldout_loss"]) > 1e-9:
            raise SystemExit(f"{args.rule} is not a report of {run}: its retrained model's held-out loss "
                             f"{recorded['heldout_loss']:.6f} is not the run's {reference['heldout_loss']:.6f}")
    seed = loaded["settings"]["seed"]
    rows = [row(f"retrained, seed {seed} (the run's reference: same init, same order)", reference, rule)]
    trainings = {}
    for training_seed in args.retrain_seeds:
        weights, trainings[training_seed] = retrained(run, loaded, training_seed)
        rows.append(row(f"retrained, seed {training_seed}", figures_of(loaded, weights), rule))
        r = rows[-1]
        print(f"seed {training_seed}: exposure {r['mean_exposure_bits']:.2f} bits, held-out loss "
              f"{r['heldout_loss']:.4f}, final training loss {trainings[training_seed]['final_loss']:.3f}")
    report: dict[str, Any] = {
        "command": "python -m bench.lm_reference_spread " + " ".join(sys.argv[1:] if argv is None else argv),
        "run": str(run), "device": str(device_of(loaded["settings"])), "retrain_seeds": args.retrain_seeds,
        "rows": rows, "spread": spread(rows),
        "training": trainings}
    if rule is not None:
        report["rule"] = {"model": rule_name, **{field: rule[field] for field in FIELDS},
                          "exposure_bits": rule["exposure_bits"],
                          "met_against": sum(r["verdict"]["met"] for r in rows), "of": len(rows)}
    table = markdown(report)
    if rule is not None:
        table += (f"\nThe rule's model ({rule_name}): exposure {rule['mean_exposure_bits']:.2f} bits, held-out loss "
                  f"{rule['heldout_loss']:.4f}; issue 24's target met against {report['rule']['met_against']} of "
                  f"{len(rows)} retrained models.\n")
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lm_reference_spread.md").write_text(table)
        (out / "lm_reference_spread.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
