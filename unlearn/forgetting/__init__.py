"""Forgetting, one module per job: ``requests`` (what a request is), ``removal`` (plan, apply, mark applied),
``rules`` (the step rules, by name: "class", "samples", "feature", and any registered with ``register_rule``),
``similar`` (what the request's samples share, read from the model's head: ``find_similar``), ``similar_spans``
(what a language model's windows share, token by token: ``find_similar_spans``), ``projection``
(the sample rule's path), ``run_folder`` (``forget()`` on a run folder) and ``keys``
(``forget_keys()``: a store's keys forgotten from one's own model and marked, in one call)."""

from .removal import Scale, apply_removal, mark_applied, parse_scale, plan_removal, removal_vector
from .requests import Removal, Request, label_matched, resolve_request
from .rules import (AUTO, ClassRule, FeatureRule, Rule, RuleInput, SampleRule, ScaleChoice, Step, choose_sample_step,
                    choose_scale, register_rule, registered_rules, unregister_rule)
from .run_folder import ForgetResult, check_fingerprint, fine_tune, forget, root_run
from .keys import ForgetKeysResult, TrainingData, forget_keys
from .similar import Similar, find_similar
from .similar_spans import find_similar_spans

__all__ = ["AUTO", "ClassRule", "FeatureRule", "ForgetKeysResult", "ForgetResult", "Removal", "Request", "Rule",
           "RuleInput", "SampleRule", "Similar", "TrainingData", "find_similar", "find_similar_spans", "Scale", "ScaleChoice", "Step", "apply_removal", "check_fingerprint", "choose_sample_step",
           "choose_scale", "fine_tune", "forget", "forget_keys", "label_matched", "mark_applied", "parse_scale",
           "plan_removal", "register_rule", "registered_rules", "removal_vector", "resolve_request", "root_run",
           "unregister_rule"]
