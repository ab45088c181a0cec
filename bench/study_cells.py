"""Moved to ``bench.study.cells``; kept for ``bench/backdoor.py`` until it imports from there."""

from .study.cells import fine_tune, finetune_subset, fresh_model

__all__ = ["fine_tune", "finetune_subset", "fresh_model"]
