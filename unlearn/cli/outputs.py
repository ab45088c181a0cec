"""`forget`'s outputs: OUT_DIR/model.pt and forget.json, and the store's rows marked (--mark, --purge),
written so that a failure leaves OUT_DIR as it was, or holds the model without rows already marked."""

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, NoReturn

import numpy as np

import gradstore

from ..forgetting import mark_applied
from ..runs import folders as runs


def write_forget_outputs(args: argparse.Namespace, out: Path, outcome: Any, result: Dict[str, Any]) -> None:
    """OUT/model.pt and OUT/forget.json, and with --mark/--purge the store's rows marked.

    Both files are written into a folder inside OUT first; the rows are marked once they are
    on disk there, and the files renamed into OUT only then. A failure that leaves the store's
    rows as they were (a full disk, the store refusing) removes what was written: OUT is left
    as it was. Once rows are marked, the model without them is always installed.
    """
    created = [parent for parent in (out, *out.parents) if not parent.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".forget-", suffix=".tmp", dir=out))
    marking = args.mark or args.purge
    try:
        runs.save_model(staging, outcome.model)
        runs.write_json(staging / "forget.json", {**outcome.record, **result})
        live = _live_keys(outcome.record) if marking else np.zeros(0, np.int64)
    except OSError as error:  # nothing is marked: OUT is left as it was
        _remove(staging, created)
        reason = os.strerror(error.errno) if error.errno else runs.first_line(error)
        state = "nothing was written" if created else "its files are unchanged"
        raise OSError(f"{reason}: writing {out}/model.pt and forget.json failed; {state}") from None
    except BaseException:
        _remove(staging, created)
        raise
    if marking:  # only once the forgotten model and its record are on disk
        try:
            count = mark_applied(outcome.record, erase=args.purge)
        except (gradstore.StoreError, OSError) as error:
            _mark_failed(args, out, outcome.record, result, live, staging, created, error)
        except BaseException:  # interrupted while marking: the rows may be marked, so the model lands
            _install(staging, out)
            raise
        result["purged_rows" if args.purge else "marked_rows"] = count
        try:
            runs.write_json(staging / "forget.json", {**outcome.record, **result})
        except OSError as error:  # the rows are marked: the model without them must land all the same
            _install(staging, out)
            raise OSError(f"{os.strerror(error.errno) if error.errno else error}: writing forget.json failed; the rows are "
                          f"{'purged' if args.purge else 'marked'} and {out} holds the forgotten model, but its "
                          "forget.json does not count them") from None
    _install(staging, out)


def _install(staging: Path, out: Path) -> None:
    """Rename the staged files into OUT (forget.json last: it makes OUT a forget output)."""
    for name in ("model.pt", "forget.json"):
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)


def _live_keys(record: Dict[str, Any]) -> np.ndarray:
    """The record's keys still live in its store (those --mark/--purge will mark)."""
    keys = np.asarray(record["forgotten_keys"], np.int64)
    with gradstore.open(Path(record["root_run"]) / "store.h5") as store:
        return keys[store.state[keys] == gradstore.RowState.LIVE]


def _mark_failed(args: argparse.Namespace, out: Path, record: Dict[str, Any], result: Dict[str, Any],
                 live: np.ndarray, staging: Path, created: List[Path], error: Exception) -> NoReturn:
    """mark_applied failed: one line saying why and what it left. If the rows are as they were, the
    staged files are removed (nothing is written to OUT); if they are marked (a purge that failed
    after marking), or that cannot be told, the model without them is installed in OUT all the same,
    for marked rows are refused to every later request that does not start from it."""
    option = "--purge" if args.purge else "--mark"
    store_path = Path(record["root_run"]) / "store.h5"
    if isinstance(error, gradstore.ReadOnlyError):
        reason = f"{store_path} is read-only; make it writable or drop --mark/--purge"
    elif isinstance(error, OSError) and error.errno and not isinstance(error, gradstore.StoreError):
        reason = f"{os.strerror(error.errno)}: writing {store_path} failed"
    else:  # gradstore's own errors say why, and what became of the file, on their first line
        reason = runs.first_line(error)
    try:
        with gradstore.open(store_path) as store:
            unchanged = bool((store.state[live] == gradstore.RowState.LIVE).all())
            marked = bool((store.state[live] != gradstore.RowState.LIVE).all())
    except (gradstore.StoreError, OSError):
        unchanged = marked = False
    if unchanged:
        _remove(staging, created)
        raise SystemExit(f"{option}: {reason}; nothing was written to {out}")
    if marked:
        result["marked_rows"] = int(live.size)
        try:
            runs.write_json(staging / "forget.json", {**record, **result})
        except OSError:
            pass  # the first forget.json stays: it names the same keys
    _install(staging, out)
    if not marked:
        raise SystemExit(f"{option}: {reason}; {store_path} could not be read back to tell which rows are marked "
                         f"forgotten, so {out} holds the forgotten model")
    raise SystemExit(f"{option}: {reason}; the rows are marked forgotten" +
                     (" but not purged (the next --purge erases them)" if args.purge else "") +
                     f", and {out} holds the forgotten model")


def _remove(staging: Path, created: List[Path]) -> None:
    """Undo write_forget_outputs: its folder, and the folders it created for OUT (if still empty)."""
    shutil.rmtree(staging, ignore_errors=True)
    for folder in created:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break
