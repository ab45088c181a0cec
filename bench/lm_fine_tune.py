"""`python -m bench.lm_fine_tune --run out/lm --rule docs/lm/tokens-repair.json`: the fine-tune-only control of the
"tokens-repair" rule on a finished `bench lm` run (issue 24 asks for it beside every repair).

tokens-repair walks away from the canaries' attributed tokens and, at each step, descends a batch of retained
windows' loss. This control takes only the second half: as many steps as the rule's report took, each a step of
the same length (the report's step_length times its repair) down the loss of ``retained_batch`` retained windows
drawn at random, from the trained weights, with no forget term. Whatever exposure it removes is the fine-tune's;
the rule's figures beyond it are the walk's. The model gets bench lm's figures and issue 24's verdict against the
run's reference.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import lm
from .lm_memorised import load_run, model_of, verdict


def fine_tune(model: torch.nn.Module, train: np.ndarray, retained: np.ndarray, steps: int, length: float, batch: int,
              seed: int) -> np.ndarray:
    """``steps`` normalised gradient steps of ``length`` down the mean next-token loss of ``batch`` random windows of
    ``retained`` (eval mode, as the rule walks); returns the flat weights."""
    from unlearn.forgetting.rules.token_rule import token_losses
    from unlearn.params import flat_params

    rng = np.random.default_rng([seed, 29])
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for _ in range(steps):
        ids = torch.as_tensor(train[rng.choice(retained, min(batch, retained.size), replace=False)])
        grads = torch.autograd.grad(token_losses(model, ids, grad=True).mean(), params)
        norm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
        if norm == 0:
            break
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(g * (length / norm))
    return flat_params(model)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir = Path(args.run)
    rule_report = json.loads(Path(args.rule).read_text())
    canary = [f for name, f in rule_report["models"].items() if " rule, canaries" in name]
    if len(canary) != 1 or "rule" not in canary[0]:
        raise SystemExit(f"{args.rule}: expected one canary model of a bench.lm_tokens report")
    walked, options = canary[0]["rule"], rule_report["rule"]
    if not options.get("repair"):
        raise SystemExit(f"{args.rule}: its rule has no repair (repair={options.get('repair')}): nothing to control")
    loaded = load_run(run_dir)
    settings, data = loaded["settings"], loaded["data"]
    recorded = loaded["report"]["models"]
    if abs(rule_report["models"]["retrained without canaries"]["heldout_loss"]
           - recorded["retrained without canaries"]["heldout_loss"]) > 1e-9:
        raise SystemExit(f"{args.rule} is not a report of {run_dir}")
    steps, length = int(walked.get("steps", 0)), float(walked.get("step_length", 0.0)) * float(options["repair"])
    model = model_of(settings, loaded["trained"])
    tuned = time.perf_counter()
    weights = fine_tune(model, data["train"], loaded["retained_keys"], steps, length, int(options["retained_batch"]),
                        settings["seed"])
    tuned = time.perf_counter() - tuned
    figures = lm.measure(model_of(settings, weights), loaded["canaries"], data, torch.device("cpu"),
                         loaded["retained_sample"])
    figures["target"] = verdict(figures, recorded["retrained without canaries"])
    figures["fine_tune"] = {"steps": steps, "step_length": length, "batch": int(options["retained_batch"]),
                            "seconds": tuned}
    rule_figures = canary[0]
    report = {"command": "python -m bench.lm_fine_tune " + " ".join(sys.argv[1:]), "run": str(run_dir),
              "rule_report": str(args.rule),
              "models": {"trained (recorded)": recorded["trained (recorded)"],
                         "retrained without canaries": recorded["retrained without canaries"],
                         "fine-tune only (the repair's steps alone)": figures,
                         "the rule (walk and repair)": {k: v for k, v in rule_figures.items() if k != "rule"}},
              "seconds": time.perf_counter() - started}
    table = markdown(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lm_fine_tune.json").write_text(json.dumps(report, indent=1, default=float))
        (out / "lm_fine_tune.md").write_text(table)
    print(table)
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = ["| model | exposure, bits (each canary) | mean exposure | secret NLL, nats | canary-window loss | "
             "held-out loss | retained loss |", "|---" * 7 + "|"]
    for name, f in report["models"].items():
        lines.append(f"| {name} | {' / '.join(f'{e:.1f}' for e in f['exposure_bits'])} | {f['mean_exposure_bits']:.2f} "
                     f"| {f['mean_secret_nll_nats']:.2f} | {f['forget_loss']:.3f} | {f['heldout_loss']:.4f} | "
                     f"{f['retained_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.lm_fine_tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="out/lm", help="a finished `bench lm` run folder")
    p.add_argument("--rule", required=True, help="its bench.lm_tokens report of a rule with a repair")
    p.add_argument("--out", help="folder for lm_fine_tune.{json,md} (default: print only)")
    return p


def main(argv: list[str] | None = None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
