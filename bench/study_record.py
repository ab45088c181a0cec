"""Moved to ``bench.study.record``; kept for ``bench/backdoor.py`` until it imports from there."""

from .study.record import poisoned_data, record_poisoned, reference_model

__all__ = ["poisoned_data", "record_poisoned", "reference_model"]
