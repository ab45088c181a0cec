"""`gradstore info PATH [--json]` and `gradstore verify PATH`."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Callable, Optional, Sequence, Union

from . import open as open_store
from .errors import StoreError, os_reason


def _print_info(info):
    width = max(len(key) for key in info)
    for key, value in info.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        print(f"{key:<{width}}  {value}")


def _open(path):
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a store file (.h5)")
    return open_store(path)


def cmd_info(args: argparse.Namespace) -> int:
    with _open(args.path) as store:
        info = store.info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
        if not info["finished"]:
            last = ("no commit yet: nothing recorded counts" if info["committed_generation"] is None else
                    f"its last commit ({info['committed_generation']}, note {json.dumps(info['commit_note'])}) is intact")
            print(f"\nrecording did not finish (finalize never ran): {last}; rows accumulated after it are not in the file")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with _open(args.path) as store:
        problems = store.verify()
        if store.finished:
            checked = f"{-(-store.num_keys // store.rows_per_chunk)} chunks per part decoded and checked"
        else:
            checked = f"recording unfinished: the {store.info()['staging_runs']} runs of its last commit decoded and checked"
    if not problems:
        print(f"{args.path}: OK ({checked})")
        return 0
    for problem in problems:
        rows = problem["rows"]
        shown = ", ".join(map(str, rows[:20])) + (" ..." if len(rows) > 20 else "")
        print(f"{args.path}: {problem['problem']}: rows [{shown}]", file=sys.stderr)
    affected = sorted({row for problem in problems for row in problem["rows"]})
    print(f"{args.path}: FAILED: {len(problems)} problem(s), {len(affected)} row(s) affected", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradstore", description="Inspect and check per-sample gradient stores (HDF5 files written by gradstore)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print every store-level field, row counts and bytes on disk")
    info.add_argument("path", help="store file (.h5)")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    info.set_defaults(run=cmd_info)
    verify = commands.add_parser("verify", help="decode every chunk and check it; exit 1 naming damaged rows")
    verify.add_argument("path", help="store file (.h5)")
    verify.set_defaults(run=cmd_verify)
    return parser


def report_failure(prog: str, command: str, message: Union[str, BaseException], code: int = 2) -> int:
    """`PROG COMMAND: error: MESSAGE` on one line of stderr; returns the exit status.

    HDF5's messages run over several lines and give the operating system's reason on a
    later one ("errno = 28, error message = 'No space left on device'"): that reason then
    leads the line, so it is never cut off.
    """
    text = str(message).strip()
    first = text.splitlines()[0] if text else "failed"
    if "\n" in text and re.search(r"errno = \d+", text):
        first = f"{os_reason(message)}: {first}"
    print(f"{prog} {command}: error: {first}", file=sys.stderr)
    return code


def run_reporting_errors(prog: str, command: str, action: Callable[[], int]) -> int:
    """``action()``'s exit status; every failure becomes one line on stderr and a non-zero status,
    never a traceback (the CLIs of gradstore, unlearn and bench all run through here)."""
    try:
        return action()
    except SystemExit as error:  # a command's own refusal: SystemExit("message")
        if isinstance(error.code, str):
            return report_failure(prog, command, error.code)
        raise
    except (StoreError, OSError, ValueError) as error:
        return report_failure(prog, command, error)
    except Exception as error:  # last resort: still one line, with the exception's type
        return report_failure(prog, command, f"{type(error).__name__}: {error}", 1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Every failure is one line on stderr and a non-zero status (argparse's usage errors: 2), never a traceback."""
    args = build_parser().parse_args(argv)
    return run_reporting_errors("gradstore", args.command, lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
