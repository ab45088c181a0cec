"""`python -m bench.lm_still_predicted --run out/lm`: how many of the canary windows' attributed tokens a model
still predicts better than typical, for the run's trained model, the model retrained without the canaries and
every retraining `bench.lm_reference_spread` cached beside it: what the token rules' ``stop_share`` is read from.

The attributed tokens are the "tokens" rule's step 1 on the run's canary request (``TokenRule.attributed_tokens``,
which changes nothing). A token is predicted better than typical when its next-token loss is below the entropy of
the model's prediction at its position. The held-out windows' share (every token) is printed beside it: text the
model never saw.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .lm_memorised import load_run, model_of
from .lm_tokens import rule_input


def predicted_share(model: torch.nn.Module, windows: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """Share of the next tokens of ``windows`` (those ``mask`` marks; every one without it) that ``model`` predicts
    better than typical; None where ``mask`` marks none."""
    from unlearn.forgetting.rules.token_rule import predicted_better_than_typical

    ids = torch.as_tensor(windows.astype(np.int64))
    predicted = predicted_better_than_typical(model.eval(), ids).cpu().numpy()
    chosen = predicted[mask] if mask is not None else predicted.ravel()
    return float(chosen.mean()) if chosen.size else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import gradstore
    from unlearn.forgetting.rules import TokenRule

    run_dir = Path(args.run)
    loaded = load_run(run_dir)
    settings, data = loaded["settings"], loaded["data"]
    keys, trained = data["keys"], loaded["trained"].astype(np.float32)
    rows = (np.load(run_dir / "forgotten.npy", allow_pickle=False) - trained).astype(np.float32)
    with gradstore.open(run_dir / "store.h5") as store:
        attributed = TokenRule().attributed_tokens(rule_input(loaded, keys, rows, settings["seed"], store))
    if attributed is None:
        raise SystemExit(f"{run_dir}: no retained window with a live row: nothing attributed")
    models = {"trained (recorded)": trained, "retrained without canaries": loaded["retrained"]}
    for path in sorted(run_dir.glob("reference-spread*.npy")):
        seed = path.stem.removeprefix("reference-spread")
        models[f"retrained, training seed {seed}"] = np.load(path, allow_pickle=False)
    canary_windows = data["train"][keys]
    rows_out = {name: {"attributed_still_predicted": predicted_share(model_of(settings, weights), canary_windows,
                                                                     attributed),
                       "heldout_still_predicted": predicted_share(model_of(settings, weights), data["heldout"])}
                for name, weights in models.items()}
    report = {"command": "python -m bench.lm_still_predicted " + " ".join(sys.argv[1:]), "run": str(run_dir),
              "attributed_tokens": int(attributed.sum()), "models": rows_out}
    lines = [f"{int(attributed.sum())} attributed tokens in the {keys.size} canary windows", "",
             "| model | attributed tokens still predicted better than typical | held-out tokens so predicted |",
             "|---|---|---|"]
    lines += [f"| {name} | {_f(r['attributed_still_predicted'])} | {_f(r['heldout_still_predicted'])} |"
              for name, r in rows_out.items()]
    table = "\n".join(lines) + "\n"
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lm_still_predicted.json").write_text(json.dumps(report, indent=1))
        (out / "lm_still_predicted.md").write_text(table)
    print(table)
    return report


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.lm_still_predicted", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="out/lm", help="a finished `bench lm` run folder")
    p.add_argument("--out", help="folder for lm_still_predicted.{json,md} (default: print only)")
    return p


def main(argv: list[str] | None = None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
