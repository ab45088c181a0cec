"""Step rules: the registry, and the two built in ("class" and "samples", what "auto" picks by request kind)."""

from .class_rule import ClassRule, choose_scale
from .registry import (AUTO, KINDS, Rule, RuleInput, ScaleChoice, Step, register_rule, registered_rules, rule_for,
                       rule_kinds, rule_names, run_rule, unregister_rule)
from .sample_rule import Evidence, SampleRule, choose_sample_step

__all__ = ["AUTO", "KINDS", "ClassRule", "Evidence", "Rule", "RuleInput", "SampleRule", "ScaleChoice", "Step",
           "choose_sample_step", "choose_scale", "register_rule", "registered_rules", "rule_for", "rule_kinds",
           "rule_names", "run_rule", "unregister_rule"]
