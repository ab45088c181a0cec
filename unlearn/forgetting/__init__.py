"""Forgetting: a request's keys, the removal built from their rows, the step rule that sizes it, and marking it applied."""

from .workflow import (ForgetResult, Removal, apply_removal, choose_sample_step, choose_scale, forget, mark_applied,
                       plan_removal, root_run)

__all__ = ["ForgetResult", "Removal", "apply_removal", "choose_sample_step", "choose_scale", "forget", "mark_applied",
           "plan_removal", "root_run"]
