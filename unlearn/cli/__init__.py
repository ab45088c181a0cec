"""`python -m unlearn train ...` and `python -m unlearn forget ...` (see --help of each).

This module parses, checks and dispatches; the options are in ``cli.options``, the commands
in ``cli.train`` and ``cli.forget`` (its outputs in ``cli.outputs``).
"""

import argparse
from typing import List, Optional

from gradstore.cli import run_reporting_errors

from .forget import check_forget_inputs, check_forget_outputs, cmd_forget
from ..forgetting import ClassRule, parse_scale
from .options import check_common_inputs
from .options import build_parser as _build_parser
from .train import cmd_train

# --scale: 0 is no step (the model is left as it was; --mark/--purge still serve the request, as
# --scale auto does for samples that taught nothing of their own); 1 removes the recorded rows
# exactly. A negative step adds them again, and a step beyond the largest --scale auto tries
# (2**16, its class search's ceiling) is no removal but the weights' overflow. Read when the
# command runs, so that a test may raise it.
MAX_SCALE = ClassRule.max_step


def build_parser() -> argparse.ArgumentParser:
    """`python -m unlearn`'s parser (train and forget)."""
    return _build_parser(MAX_SCALE)


def main(argv: Optional[List[str]] = None) -> int:
    """Every failure is one line on stderr and a non-zero status (argparse's usage errors: 2), never a traceback."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        check_common_inputs(args)
        if args.command == "train":
            return cmd_train(args)
        scale = parse_scale(args.scale, MAX_SCALE)
        check_forget_inputs(args)
        check_forget_outputs(args)
        return cmd_forget(args, scale)

    return run_reporting_errors("unlearn", args.command, run)


__all__ = ["MAX_SCALE", "build_parser", "main"]
