"""The study's cells: one forget request applied from one store, measured against retraining.

Class requests (the seed's tables): forgotten/rest test accuracy after train, with no
retrain (the removal alone) and after retrain (the removal, then a short fine-tune on
retained data). Sample requests: UA/RA/TA and MIA efficacy with no retrain. Poisoned
requests (on their own poisoned training run): the backdoor's ASR, the poisoned samples'
accuracy on their poisoned label and the target class's test accuracy beside UA/RA/TA/MIA,
with no retrain and after the fine-tune, at both scales.
"""


import numpy as np
import torch

import gradstore
from unlearn.evaluation import accuracy, evaluate
from unlearn.forgetting import apply_removal, plan_removal
from unlearn.runs.models import build_model
from unlearn.params import load_flat_params
from unlearn.runs.config import PER_SAMPLE
from unlearn.runs.loop import train

RETAINED_EVAL = 10_000  # retained samples behind RA and the MIA's members


def class_cells(model, data, cls):
    """(forgotten, rest): test accuracy on the class and on every other class."""
    in_class = data.test_y == cls
    return (accuracy(model, data.test_x[in_class], data.test_y[in_class]),
            accuracy(model, data.test_x[~in_class], data.test_y[~in_class]))


def fresh_model(data, weights, config=None):
    """The study's model (``config["model"]``, SimpleModel without one) holding ``weights``."""
    model = build_model((config or {}).get("model", "simple"), data.in_channels, data.num_classes)
    load_flat_params(model, weights)
    return model


def finetune_subset(config, seed, data, excluded):
    """The retained samples every fine-tune of a seed uses (the same for every method)."""
    retained = np.setdiff1d(np.arange(len(data)), excluded)
    count = min(retained.size, config["finetune_samples"] or retained.size)
    return np.sort(np.random.default_rng([seed, 2]).choice(retained, count, replace=False))


def fine_tune(model, data, subset, config, seed):
    """The seed's "retrain": epochs over retained samples with a fresh Adam. Returns seconds."""
    run = train(model, data.train_x[subset], data.train_y[subset], config["finetune_epochs"], config["batch_size"],
                seed + 1, device=torch.device("cpu"), progress=False, description="fine-tune")
    return run["seconds"]


def sample_metrics(model, data, samples, seed):
    metrics = evaluate(model, data, samples, retained_limit=RETAINED_EVAL, seed=seed)
    return {key: metrics[key] for key in ("ua", "ra", "ta", "mia_efficacy", "mia_efficacy_std", "forget_loss")}


def reference_cells(task, kind, weights, data, config, seed, samples, subset, seconds):
    """A row without a store: 'after train', 'retrain' (from scratch), or 'finetune only'."""
    model = fresh_model(data, weights, config)
    cell = {"seconds": seconds}
    if kind == "finetune only" and task != "poisoned":
        cell["finetune_seconds"] = fine_tune(model, data, subset, config, seed)
    if task == "poisoned":
        cell.update(poisoned_cell(model, data, config, seed, subset, finetune=kind == "finetune only"))
    elif task == "class":
        cell["forgotten"], cell["rest"] = class_cells(model, data, config["forget_class"])
    else:
        cell.update(sample_metrics(model, data, samples, seed))
    return cell


POISON_FIELDS = ("asr", "poisoned_label_acc", "target_class_acc", "ua", "ra", "ta", "mia_efficacy", "mia_efficacy_std")
AFTER_FINETUNE = ("asr", "poisoned_label_acc", "target_class_acc", "ta")  # the poisoned request's "after retrain" columns


def poisoned_metrics(model, data, seed):
    """The backdoor's figures (unlearn.evaluation.backdoor_metrics) beside UA/RA/TA/MIA, on ``data``, the poisoned split."""
    metrics = evaluate(model, data, data.poison.keys, retained_limit=RETAINED_EVAL, seed=seed)
    return {key: metrics[key] for key in POISON_FIELDS}


def poisoned_cell(model, data, config, seed, subset, finetune=True):
    """A poisoned request's cell for ``model``: its figures, then (when ``finetune``) the same after the study's
    fine-tune on retained clean samples, as ``<field>_after_retrain`` (``model`` is fine-tuned in place)."""
    cell = poisoned_metrics(model, data, seed)
    if finetune and config["finetune_epochs"]:
        cell["finetune_seconds"] = fine_tune(model, data, subset, config, seed)
        after = poisoned_metrics(model, data, seed)
        cell.update({f"{key}_after_retrain": after[key] for key in AFTER_FINETUNE})
    return cell


def store_cells(task, store_path, entry, trained, data, config, seed, samples, subset):
    """Cells of one store for one request: scale 1 (with the fine-tuned column for class
    requests) and, for per-sample stores, scale 'auto'. Returns {scale mode: cell}."""
    with gradstore.open(store_path) as store:
        if task == "class":
            removal = plan_removal(store, entry["method"], data, cls=config["forget_class"])
        elif task == "poisoned":
            removal = plan_removal(store, entry["method"], data, samples=data.poison.keys, seed=seed)
        else:
            removal = plan_removal(store, entry["method"], data, samples=samples, seed=seed)
        info = store.info()
    common = {"bytes_on_disk": info["bytes_on_disk"], "bytes_per_value": info["bytes_per_value"],
              "keys_removed": int(removal.request.keys.size)}
    model = fresh_model(data, trained, config)
    modes = {"1": 1.0}
    if entry["method"] == PER_SAMPLE:
        modes["auto"] = "auto"
    cells = {}
    for mode, scale in modes.items():
        cell = dict(common)
        choice = apply_removal(model, trained, removal, data, scale, seed=seed)
        cell.update(scale=choice.scale, seconds=removal.seconds + choice.seconds)
        if mode == "auto":
            cell["scale_reached"] = choice.reached
        if task == "poisoned":  # both scales with and without the fine-tune: either may be where the backdoor goes
            cell.update(poisoned_cell(model, data, config, seed, subset))
        elif task == "class":
            cell["forgotten"], cell["rest"] = class_cells(model, data, config["forget_class"])
            if mode == "1" and config["finetune_epochs"]:
                cell["finetune_seconds"] = fine_tune(model, data, subset, config, seed)
                cell["forgotten_after_retrain"], cell["rest_after_retrain"] = class_cells(model, data, config["forget_class"])
        else:
            cell.update(sample_metrics(model, data, samples, seed))
        cells[mode] = cell
    return cells
