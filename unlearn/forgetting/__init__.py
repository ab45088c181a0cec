"""Forgetting: a request's keys, the removal built from their rows, the step rule that sizes it, and marking it applied."""

from .workflow import ForgetResult, Removal, apply_removal, forget, mark_applied, plan_removal

__all__ = ["ForgetResult", "Removal", "apply_removal", "forget", "mark_applied", "plan_removal"]
