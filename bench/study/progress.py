"""DIR/cells.json: the study's finished cells, so that an interrupted study resumes where it stopped."""

import json
from pathlib import Path
from typing import Any, Dict

from . import record


class CellLog:
    """DIR/cells.json: every finished cell, rewritten atomically after each one."""

    def __init__(self, path: Path, config: Dict[str, Any]):
        self.path = path
        saved = json.loads(path.read_text()) if path.exists() else None
        if saved and saved["config"] != json.loads(json.dumps(record.comparable(config))):
            raise SystemExit(f"{path} holds a study with another configuration; use a new --out or delete it")
        self.cells = saved["cells"] if saved else {}
        poisoned = json.loads(json.dumps(record.comparable(config, "poisoned")))
        if any(cell["task"] == "poisoned" and cell.get("config") != poisoned for cell in self.cells.values()):
            raise SystemExit(f"{path} holds poisoned-request cells of another poison (--poison, --poison-seed, "
                             "--poison-target, --poison-keeps); use a new --out or delete it")
        self.config = config
        if not saved:  # the options are on disk before anything else is
            self._save()

    def __contains__(self, key: object) -> bool:
        return key in self.cells

    def add(self, key: str, cell: Dict[str, Any]) -> None:
        """Record a finished cell, on disk at once."""
        self.cells[key] = cell
        self._save()

    def _save(self) -> None:
        record.write_json(self.path, {"config": record.comparable(self.config), "cells": self.cells})
