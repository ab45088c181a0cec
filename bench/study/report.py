"""The study's outputs: results.json / results.csv (every cell of every seed), results.md
(the seed's tables, mean and spread over seeds) and two plots."""

import csv
import datetime
import json
import os
import platform
import statistics
from pathlib import Path

import gradstore.codecs
from unlearn.runs.config import FP16, FP32, GRAD, INT8, LAYER, ORIGINAL, PER_SAMPLE, UPDATE

REFERENCE_ROWS = ("after train", "retrain", "finetune only")
CLASS_FIELDS = ("forgotten", "rest", "forgotten_after_retrain", "rest_after_retrain")
SAMPLE_FIELDS = ("ua", "ra", "ta", "mia_efficacy")
POISON_FIELDS = ("asr", "poisoned_label_acc", "target_class_acc")
POISON_AFTER = tuple(f"{field}_after_retrain" for field in POISON_FIELDS + ("ta",))
NUMERIC = CLASS_FIELDS + SAMPLE_FIELDS + POISON_FIELDS + POISON_AFTER + (
    "mia_efficacy_std", "scale", "bytes_on_disk", "bytes_per_value", "ratio_vs_original", "gap_to_retrain", "seconds",
    "finetune_seconds", "forget_loss")
GAP_FIELDS = {"class": ("forgotten", "rest"), "samples": SAMPLE_FIELDS, "poisoned": ("asr", "target_class_acc", "ta")}
CODEC_ORDER = list(gradstore.codecs.CODECS)  # registry order: fp32, fp16, int8, int4, int4-stochastic, int2, sign
CODEC_COLOURS = {FP32: "tab:blue", FP16: "tab:orange", INT8: "tab:green", "int4": "tab:red", "int4-stochastic": "tab:pink",
                 "int2": "tab:purple", "sign": "tab:brown"}
# Issue 25's target: a store at least 100x smaller than the original's, p >= 0.0025, forgets the class
# (forgotten <= 0.01, rest within 1 point of retraining) and leaves a random request's TA within 0.5 points.
SMALL_STORE_RATIO = 100
SMALL_STORE_MIN_KEEP = 0.0025
SUB_BYTE = [codec for codec in CODEC_ORDER if codec not in (FP32, FP16, INT8)]
MODEL_TITLES = {"simple": "SimpleModel", "resnet18": "ResNet-18 (GroupNorm)"}
TASK_TITLES = {"class": "class request (forgotten, rest)", "samples": "random-sample request (UA, RA, TA, MIA)",
               "poisoned": "poisoned request (ASR, target class, TA)"}


def display_name(cell):
    method = cell["method"]
    if method == "after train":
        return "After train (no removal)"
    if method == "retrain":
        return "Retrain from scratch"
    if method == "finetune only":
        return "Fine-tune only (control)"
    if method == ORIGINAL:
        return "Original"
    if method == LAYER:
        return f"Layer, p = {cell['keep']:g}"
    return f"Ours {cell['flavour']}, p = {cell['keep']:g}, {cell['codec']}"


def row_order(cell):
    method = cell["method"]
    if method in REFERENCE_ROWS:
        return (0, REFERENCE_ROWS.index(method))
    if method in (ORIGINAL, LAYER):
        return (1, 0 if method == ORIGINAL else 1)
    return (2, [UPDATE, GRAD].index(cell["flavour"]), CODEC_ORDER.index(cell["codec"]), -cell["keep"])


def with_ratios(cells):
    """Every cell (a list), with ratio_vs_original (against the original's store of the same seed and
    task) and gap_to_retrain (mean |metric - the same seed's retrained model's|, no retrain)."""
    cells = [dict(cell) for cell in cells.values()]
    original = {(c["seed"], c["task"]): c["bytes_on_disk"] for c in cells if c["method"] == ORIGINAL}
    retrain = {(c["seed"], c["task"]): c for c in cells if c["method"] == "retrain"}
    for cell in cells:
        # the original's store of the same run, else its size computed (steps x M x 4 bytes: --baselines computed)
        base = original.get((cell["seed"], cell["task"])) or cell.get("original_bytes")
        if base and cell.get("bytes_on_disk"):
            cell["ratio_vs_original"] = base / cell["bytes_on_disk"]
        reference = retrain.get((cell["seed"], cell["task"]))
        if reference is not None and cell["method"] != "retrain":
            cell["gap_to_retrain"] = statistics.fmean(abs(cell[f] - reference[f]) for f in GAP_FIELDS[cell["task"]])
    return cells


def aggregate(cells):
    """{(task, row, scale mode): {"cell": a representative cell, field: (mean, std, n)}} over seeds."""
    groups = {}
    for cell in cells:
        groups.setdefault((cell["task"], cell["row"], cell.get("scale_mode", "")), []).append(cell)
    summary = {}
    for key, members in groups.items():
        entry = {"cell": members[0], "seeds": sorted(c["seed"] for c in members)}
        for field in NUMERIC:
            values = [c[field] for c in members if c.get(field) is not None]
            if values:
                entry[field] = (statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0, len(values))
        summary[key] = entry
    return summary


def _pair(entry, first, second, spread=True):
    if entry is None or first not in entry or second not in entry:
        return ""
    (a, sa, n), (b, sb, _) = entry[first], entry[second]
    text = f"{a:.3f}/{b:.3f}"
    return text + (f" ±{sa:.3f}/{sb:.3f}" if spread and n > 1 else "")


def _value(entry, field, fmt):
    if entry is None or field not in entry:
        return ""
    return format(entry[field][0], fmt)


def _ordered_rows(summary, task):
    rows = {}
    for (row_task, row, _), entry in summary.items():
        if row_task == task:
            rows.setdefault(row, entry["cell"])
    return sorted(rows.items(), key=lambda item: row_order(item[1]))


def class_table(summary, spread=True):
    """The seed's Table 1 layout, widened: every codec and flavour, auto scale, bytes, times."""
    after = summary.get(("class", "after train", ""))
    lines = ["| Technique | After train | No retrain (scale 1) | After retrain (scale 1 + fine-tune) | No retrain (scale auto) "
             "| auto scale | MB on disk | bytes/value | x smaller than original | forget s (1 / auto) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row, cell in _ordered_rows(summary, "class"):
        one = summary.get(("class", row, "1")) or summary.get(("class", row, ""))
        auto = summary.get(("class", row, "auto"))
        if cell["method"] in REFERENCE_ROWS:  # retrain: the target of every column; fine-tune only: of "after retrain"
            cells = _pair(one, "forgotten", "rest", spread)
            columns = {"after train": ["", "", ""], "retrain": [cells, cells, cells], "finetune only": ["", cells, ""]}
            seconds = _value(one, "finetune_seconds" if cell["method"] == "finetune only" else "seconds", ".1f")
            lines.append(f"| {display_name(cell)} | {_pair(after, 'forgotten', 'rest', False)} | "
                         + " | ".join(columns[cell["method"]]) + f" | | | | | {seconds} |")
            continue
        seconds = _value(one, "seconds", ".2f") + (f" / {_value(auto, 'seconds', '.2f')}" if auto else "")
        lines.append(
            f"| {display_name(cell)} | {_pair(after, 'forgotten', 'rest', False)} | {_pair(one, 'forgotten', 'rest', spread)} "
            f"| {_pair(one, 'forgotten_after_retrain', 'rest_after_retrain', spread)} | {_pair(auto, 'forgotten', 'rest', spread)} "
            f"| {_value(auto, 'scale', '.3g')} | {_value(one, 'bytes_on_disk', '.0f') and format(one['bytes_on_disk'][0] / 1e6, '.1f')} "
            f"| {_value(one, 'bytes_per_value', '.3f')} | {_value(one, 'ratio_vs_original', '.1f')} | {seconds} |"
        )
    return "\n".join(lines)


def sample_table(summary, spread=True):
    lines = ["| Technique | scale | UA | RA | TA | MIA efficacy | MIA std over draws | mean gap to retrain | forget s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, cell in _ordered_rows(summary, "samples"):
        for mode in ("", "1", "auto"):
            entry = summary.get(("samples", row, mode))
            if entry is None:
                continue
            values = []
            for field in SAMPLE_FIELDS:
                mean, std, n = entry[field]
                values.append(f"{mean:.3f}" + (f" ±{std:.3f}" if spread and n > 1 else ""))
            values.append(_value(entry, "mia_efficacy_std", ".3f"))
            gap = _value(entry, "gap_to_retrain", ".3f")
            scale = {"": "", "1": "1", "auto": f"auto ({entry['scale'][0]:.3g})" if "scale" in entry else "auto"}[mode]
            lines.append(f"| {display_name(cell)} | {scale} | " + " | ".join(values) + f" | {gap} | {_value(entry, 'seconds', '.2f')} |")
    return "\n".join(lines)


def poisoned_table(summary, spread=True):
    """The poisoned request: the backdoor's figures with no retrain and after the fine-tune, every method."""
    lines = ["| Technique | scale | ASR | poisoned-label acc | target-class acc | TA | RA | MIA efficacy "
             "| after fine-tune: ASR | target-class acc | TA | forget s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def figure(entry, field):
        if entry is None or field not in entry:
            return ""
        mean, std, n = entry[field]
        return f"{mean:.3f}" + (f" ±{std:.3f}" if spread and n > 1 else "")

    for row, cell in _ordered_rows(summary, "poisoned"):
        for mode in ("", "1", "auto"):
            entry = summary.get(("poisoned", row, mode))
            if entry is None:
                continue
            scale = {"": "", "1": "1", "auto": f"auto ({entry['scale'][0]:.3g})" if "scale" in entry else "auto"}[mode]
            values = [figure(entry, field) for field in POISON_FIELDS + ("ta", "ra", "mia_efficacy")]
            values += [figure(entry, f"{field}_after_retrain") for field in ("asr", "target_class_acc", "ta")]
            lines.append(f"| {display_name(cell)} | {scale} | " + " | ".join(values) + f" | {_value(entry, 'seconds', '.2f')} |")
    return "\n".join(lines)


def target_lines(cells):
    """The project's MNIST target, per int8 per-sample store and seed: no fine-tune, auto scale."""
    gold = {c["seed"]: c for c in cells if c["task"] == "class" and c["method"] == "retrain"}
    seeds = sorted(gold)
    verdicts = {}
    for cell in cells:
        if cell["task"] == "class" and cell["method"] == PER_SAMPLE and cell["codec"] == INT8 and cell["scale_mode"] == "auto":
            rest_gap = cell["rest"] - gold[cell["seed"]]["rest"]
            ratio = cell.get("ratio_vs_original", 0)
            misses = [what for what, ok in (("forgotten", cell["forgotten"] <= 0.01), ("rest", rest_gap >= -0.01),
                                            ("size", ratio >= 20)) if not ok]
            verdicts.setdefault((cell["flavour"], cell["keep"]), {})[cell["seed"]] = (
                ("met" if not misses else "missed: " + ", ".join(misses))
                + f" ({cell['forgotten']:.3f}, {rest_gap:+.3f}, {ratio:.1f}x)")
    lines = ["| int8 store, scale auto | " + " | ".join(f"seed {seed}" for seed in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for (flavour, keep), by_seed in sorted(verdicts.items(), key=lambda item: (item[0][0] != UPDATE, -item[0][1])):
        lines.append(f"| {flavour} p = {keep:g} | " + " | ".join(by_seed.get(seed, "") for seed in seeds) + " |")
    return lines + ["", "(forgotten-class accuracy, rest minus the retrained model's, times smaller than the original's store)"]


def small_store_lines(cells):
    """Issue 25's target, per per-sample store (any codec) and seed, scale auto, no fine-tune: >= 100x smaller
    than the original's store at p >= 0.0025, the class forgotten (<= 0.01) with rest within 1 point of the
    retrained model, and the random request's test accuracy within 0.5 points of the retrained model's."""
    gold = {(c["seed"], c["task"]): c for c in cells if c["method"] == "retrain"}
    seeds = sorted({c["seed"] for c in cells})
    sample_request = any(c["task"] == "samples" for c in cells)
    rows = {}
    for cell in cells:
        if cell["method"] != PER_SAMPLE or cell.get("scale_mode") != "auto" or cell["task"] not in ("class", "samples"):
            continue
        reference = gold.get((cell["seed"], cell["task"]))
        if reference is None:
            continue
        entry = rows.setdefault((cell["flavour"], cell["keep"], cell["codec"]), {}).setdefault(cell["seed"], {})
        entry["ratio"] = cell.get("ratio_vs_original", 0)
        entry["mb"] = cell["bytes_on_disk"] / 1e6
        if cell["task"] == "class":
            entry["class"] = (cell["forgotten"], cell["rest"] - reference["rest"])
        else:
            entry["ta"] = cell["ta"] - reference["ta"]
    lines = ["| store, scale auto | MB | x smaller | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
             "|---" * (len(seeds) + 3) + "|"]
    for (flavour, keep, codec), by_seed in sorted(rows.items(), key=lambda item: -next(iter(item[1].values()))["ratio"]):
        verdicts = []
        for seed in seeds:
            entry = by_seed.get(seed)
            if entry is None:
                verdicts.append("")
                continue
            misses = [] if entry["ratio"] >= SMALL_STORE_RATIO and keep >= SMALL_STORE_MIN_KEEP else ["size"]
            figures = []
            if "class" not in entry:
                misses.append("class not measured")
            else:
                forgotten, rest_gap = entry["class"]
                misses += [what for what, ok in (("forgotten", forgotten <= 0.01), ("rest", rest_gap >= -0.01)) if not ok]
                figures.append(f"{forgotten:.3f}, {rest_gap:+.3f}")
            if "ta" in entry:
                misses += [] if abs(entry["ta"]) <= 0.005 else ["TA"]
                figures.append(f"TA {entry['ta']:+.3f}")
            elif sample_request:  # the study measured the random request, but not on this store
                figures.append("TA not measured")
            verdict = "met" if not misses else "missed: " + ", ".join(misses)
            if not misses and sample_request and "ta" not in entry:
                verdict = "class met"
            verdicts.append(f"{verdict} ({'; '.join(figures)})")
        first = next(iter(by_seed.values()))
        lines.append(f"| {flavour} p = {keep:g} {codec} | {first['mb']:.1f} | {first['ratio']:.1f} | " + " | ".join(verdicts) + " |")
    return lines + ["", "(forgotten-class accuracy, rest minus the retrained model's (at most 1 point below it); TA: the "
                        "random request's test accuracy minus the retrained model's. Size: >= 100x smaller than the "
                        "original's store, p >= 0.0025.)"]


def cell_line(task, cells):
    """One console line for a store's cells."""
    parts = []
    for mode, cell in cells.items():
        if task == "class":
            parts.append(f"scale {mode}: {cell['forgotten']:.3f}/{cell['rest']:.3f}")
        elif task == "poisoned":
            parts.append(f"scale {mode}: ASR {cell['asr']:.3f} target {cell['target_class_acc']:.3f} TA {cell['ta']:.3f}"
                         + (f" (fine-tuned: ASR {cell['asr_after_retrain']:.3f})" if "asr_after_retrain" in cell else ""))
        else:
            parts.append(f"scale {mode}: UA {cell['ua']:.3f} TA {cell['ta']:.3f} MIA {cell['mia_efficacy']:.3f}")
    return "  ".join(parts)


def console_table(cells, config):
    summary = aggregate(with_ratios(cells))
    tasks = {cell["task"] for cell in cells.values()}
    tables = []
    if "class" in tasks:
        tables.append(f"Forgetting class {config['forget_class']} (forgotten/rest test accuracy):\n" + class_table(summary, spread=False))
    if "poisoned" in tasks:
        tables.append("Forgetting the poisoned samples:\n" + poisoned_table(summary, spread=False))
    return "\n\n".join(tables)


def plot(cells, out):
    """study-quality-vs-bytes.png and study-frontier.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = aggregate(cells)
    present = {c["codec"] for c in cells if c.get("codec")}
    colours = {codec: colour for codec, colour in CODEC_COLOURS.items() if codec in present}
    styles = {UPDATE: "-", GRAD: "--"}
    gold = summary.get(("class", "retrain", ""))
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for col, mode in enumerate(("1", "auto")):
        for flavour in (UPDATE, GRAD):
            for codec in colours:
                points = sorted(
                    (entry["bytes_on_disk"][0], entry["forgotten"][0], entry["rest"][0])
                    for (task, _, m), entry in summary.items()
                    if task == "class" and m == mode and entry["cell"]["method"] == PER_SAMPLE
                    and entry["cell"]["flavour"] == flavour and entry["cell"]["codec"] == codec
                )
                if points:
                    x, forgotten, rest = zip(*points)
                    label = f"ours {flavour} {codec}"
                    axes[0, col].plot(x, forgotten, styles[flavour], marker="o", color=colours[codec], label=label, ms=4)
                    axes[1, col].plot(x, [r - gold["rest"][0] for r in rest] if gold else rest, styles[flavour], marker="o",
                                      color=colours[codec], label=label, ms=4)
        if mode == "1":
            for method, marker in ((ORIGINAL, "s"), (LAYER, "^")):
                for (task, _, m), entry in summary.items():
                    if task == "class" and m == "1" and entry["cell"]["method"] == method:
                        axes[0, col].plot(entry["bytes_on_disk"][0], entry["forgotten"][0], marker, color="k", label=method)
                        axes[1, col].plot(entry["bytes_on_disk"][0], entry["rest"][0] - (gold["rest"][0] if gold else 0),
                                          marker, color="k", label=method)
        axes[0, col].set_title(f"class forgetting, no retrain, scale {mode}")
        axes[0, col].set_ylabel("forgotten-class test accuracy")
        axes[1, col].set_ylabel("rest accuracy minus retrain's")
        axes[1, col].axhline(0, color="grey", lw=0.8)
        axes[1, col].set_xlabel("store bytes on disk (log)")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7)
    axes[0, 0].legend(fontsize=7)
    figure.tight_layout()
    quality = Path(out) / "study-quality-vs-bytes.png"
    figure.savefig(quality, dpi=110)
    plt.close(figure)

    tasks = [task for task in TASK_TITLES if summary.get((task, "retrain", "")) is not None]
    figure, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5.5 * max(1, len(tasks)), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for codec, colour in colours.items():
            points = []
            for (t, _, _), entry in summary.items():
                if t == task and entry["cell"].get("codec") == codec and entry["cell"]["method"] == PER_SAMPLE:
                    points.append((entry["bytes_on_disk"][0], entry["gap_to_retrain"][0]))
            frontier, best = [], float("inf")
            for x, gap in sorted(points):
                if gap < best:
                    frontier.append((x, gap))
                    best = gap
            if points:
                ax.scatter(*zip(*points), color=colour, s=10, alpha=0.4)
                ax.step(*zip(*frontier), where="post", color=colour, label=f"ours {codec} (frontier)")
        for method, marker in ((ORIGINAL, "s"), (LAYER, "^")):
            for (t, _, _), entry in summary.items():
                if t == task and entry["cell"]["method"] == method:
                    ax.plot(entry["bytes_on_disk"][0], entry["gap_to_retrain"][0], marker, color="k", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("store bytes on disk (log)")
        ax.set_ylabel("mean |metric - retrain's| (per seed), no retrain")
        ax.set_title(TASK_TITLES[task] + "\npoints: every flavour, p and scale; line: the frontier", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    frontier_path = Path(out) / "study-frontier.png"
    figure.savefig(frontier_path, dpi=110)
    plt.close(figure)
    paths = [quality, frontier_path]
    if "poisoned" in tasks:
        paths.append(plot_poisoned(summary, out, plt))
    return paths


def plot_poisoned(summary, out, plt):
    """study-poisoned.png: the backdoor against the target class, every method, no retrain and after the fine-tune."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, suffix, title in zip(axes, ("", "_after_retrain"), ("no retrain", "after the fine-tune")):
        for (task, row, mode), entry in summary.items():
            if task != "poisoned" or f"asr{suffix}" not in entry:
                continue
            cell = entry["cell"]
            if cell["method"] == PER_SAMPLE:
                marker, colour = ("o" if cell["flavour"] == UPDATE else "x"), ("tab:green" if mode == "auto" else "tab:blue")
                label = f"ours {cell['flavour']} p={cell['keep']:g} scale {mode}"
            else:
                marker, colour, label = {ORIGINAL: "s", LAYER: "^"}.get(cell["method"], "*"), "k", display_name(cell)
            ax.plot(entry[f"asr{suffix}"][0], entry[f"target_class_acc{suffix}"][0], marker, color=colour, ms=6)
            ax.annotate(label, (entry[f"asr{suffix}"][0], entry[f"target_class_acc{suffix}"][0]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("attack success rate (triggered test images of other classes sent to the target)")
        ax.set_title(f"poisoned request, {title}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("target-class test accuracy")
    figure.tight_layout()
    path = Path(out) / "study-poisoned.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def sample_share(config):
    """The sample request's size as the study's --sample-fraction gave it: '1%', or a count ('100')."""
    share = config["sample_fraction"]
    return f"{int(share)}" if share >= 1 else f"{share:.0%}"


def write(cells_by_id, config, out, command=None):
    """Write results.json, results.csv, results.md and the plots; returns their paths."""
    out = Path(out)
    cells = sorted(with_ratios(cells_by_id), key=lambda c: (c["seed"], c["task"], row_order(c), c.get("scale_mode", "")))
    summary = aggregate(cells)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    date = datetime.date.today().isoformat()
    (out / "results.json").write_text(json.dumps({
        "config": config, "machine": machine, "date": date, "command": command, "cells": cells,
        "summary": [{"task": t, "row": r, "scale_mode": m, "seeds": e["seeds"],
                     **{f: {"mean": v[0], "std": v[1], "n": v[2]} for f, v in e.items() if f in NUMERIC}}
                    for (t, r, m), e in summary.items()],
    }, indent=1))
    fields = ["seed", "task", "row", "method", "flavour", "keep", "codec", "scale_mode", *NUMERIC, "scale_reached", "keys_removed"]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(cells)
    plots = plot(cells, out)
    seeds = sorted({c["seed"] for c in cells})
    text = [
        f"# Study: {config['dataset']}, forgetting " + ", ".join(
            {"class": f"class {config['forget_class']}", "samples": f"{sample_share(config)} of the samples",
             "poisoned": "poisoned samples"}[task] for task in config.get("requests", ["class", "samples"])),
        "",
        f"Command: `{command or 'python -m bench study'}`; machine: {machine}; date: {date}; seeds: {seeds} "
        "(cells are the mean over seeds, ± the spread (population std) when there are several).",
        "",
        f"Protocol: {MODEL_TITLES[config.get('model', 'simple')]}, {config['epochs']} epochs, B = {config['batch_size']}, Adam 1e-3"
        + (f", class {config['forget_class']} kept at its first {config['keep_first']} training samples" if config["keep_first"] else "")
        + ". One training run per seed records every store"
        + ("" if config.get("baselines", "recorded") == "recorded" else
           " (the original method's and the layer-wise stores are not recorded: \"x smaller than original\" is against "
           "the original's size computed as steps x M x 4 bytes, raw: the recorded original stores are zstd-compressed to about 0.66 of that on SimpleModel)")
        + ". \"After retrain\": the removal, then "
        f"{config['finetune_epochs']} epoch(s) of fine-tuning on "
        + (f"{config['finetune_samples']:,} retained samples" if config["finetune_samples"] else "the retained samples")
        + " (the same samples for every row and for the fine-tune-only control). Scale auto: the step chosen "
        "by `unlearn.forgetting.choose_scale` for a class and `choose_sample_step` for samples (docs/DESIGN.md), "
        "never from test labels. The retrained model's cells stand in every "
        "column as the target. Seconds: reading the rows and building the removal (plus the auto search) for "
        "stores; training for \"After train\" (with every store recording) and \"Retrain from scratch\"; the "
        "fine-tune for the control.",
        "",
    ]
    tasks = {cell["task"] for cell in cells}
    if "class" in tasks:
        text += [
            f"## Forgetting class {config['forget_class']} (forgotten/rest test accuracy)",
            "",
            class_table(summary),
            "",
        ]
    if "samples" in tasks:
        text += [
            f"## Forgetting {sample_share(config)} of the training samples at random (no retrain)",
            "",
            "UA/RA/TA: accuracy on the forget set, on retained training samples (10,000 at most), on the test set. "
            "MIA efficacy: share of the forget set a membership classifier calls non-members (SalUn's), the mean of "
            "5 shadow draws of 10,000 retained against 10,000 test samples; MIA std over draws: their spread "
            "(mean over seeds).",
            "",
            sample_table(summary),
            "",
        ]
    if "poisoned" in tasks:
        spec = next(cell["poison"] for cell in cells if cell["task"] == "poisoned")
        text += [
            f"## Forgetting {spec['count']} poisoned samples (a backdoor)",
            "",
            f"Each seed trains once more, on a split where {spec['count']} samples of other classes than "
            f"{spec['target']} carry a {spec['trigger']['size']}x{spec['trigger']['size']} patch of value "
            f"{spec['trigger']['value']:g} at rows {spec['trigger']['rows'][0]}-{spec['trigger']['rows'][1]}, columns "
            f"{spec['trigger']['cols'][0]}-{spec['trigger']['cols'][1]} and the label {spec['target']} "
            "(unlearn.runs.poison); its stores record that run, and the retrained model leaves the poisoned samples out. "
            "ASR: share of the triggered test images of the other classes predicted as the target. Poisoned-label "
            "acc (UA): the poisoned samples' accuracy on the label they were trained with. After fine-tune: the "
            "same model after the study's fine-tune on retained clean samples.",
            "",
            poisoned_table(summary),
            "",
            "![the backdoor against the target class](study-poisoned.png)",
            "",
        ]
    if "class" in tasks:
        text += [
            "## Target (int8 per-sample stores, no fine-tune, scale auto: forgotten <= 0.01, rest within 1 point of "
            "retrain, >= 20x smaller)",
            "",
            *target_lines(cells),
            "",
            "![quality against bytes](study-quality-vs-bytes.png)",
            "",
        ]
    if any(c.get("codec") in SUB_BYTE for c in cells) or any(c.get("keep", 1) < 0.01 for c in cells if c["method"] == PER_SAMPLE):
        text += [
            f"## Target below one byte (every per-sample store, no fine-tune, scale auto: >= {SMALL_STORE_RATIO}x smaller at "
            f"p >= {SMALL_STORE_MIN_KEEP:g}, forgotten <= 0.01, rest within 1 point, a random request's TA within 0.5 "
            "points)",
            "",
            *small_store_lines(cells),
            "",
        ]
    text += ["![frontier per codec](study-frontier.png)", ""]
    (out / "results.md").write_text("\n".join(text))
    return [out / "results.md", out / "results.csv", out / "results.json", *plots]
