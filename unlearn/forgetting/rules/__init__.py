"""Step rules: the registry, the two that "auto" picks by request kind ("class" and "samples"), "feature"
(what a group of samples taught together, such as a backdoor), "tokens" (what a language model's windows
taught, such as a secret) and "tokens-repair" (the same, with the retained loss descended at each step)."""

from .class_rule import ClassRule, choose_scale
from .feature_rule import FeatureRule
from .registry import (AUTO, KINDS, Rule, RuleInput, ScaleChoice, Step, register_rule, registered_rules, rule_for,
                       rule_kinds, rule_names, run_rule, unregister_rule)
from .sample_rule import Evidence, SampleRule, choose_sample_step
from .token_rule import TokenRule

__all__ = ["AUTO", "KINDS", "ClassRule", "Evidence", "FeatureRule", "Rule", "RuleInput", "SampleRule", "ScaleChoice", "Step", "TokenRule",
           "choose_sample_step", "choose_scale", "register_rule", "registered_rules", "rule_for", "rule_kinds",
           "rule_names", "run_rule", "unregister_rule"]
