"""The study's one training run per seed, and the models it is compared against.

One training run records every configuration at once: for each (flavour, p) one fp32
store whose float32 sums sit in a memory-mapped scratch file (all of them together
exceed RAM on the full MNIST study: N*M*sum(p)*2 flavours*4 bytes = 19 GB), the
original method's store and the layer-wise one. Per-sample gradients are computed once
per step and each mask once per (p, batch), shared by both flavours. fp16 and int8
stores are then transcoded from the fp32 ones: finalize quantizes the float32 sums once
either way, so they hold exactly what recording in those codecs would have written.

Every phase leaves a JSON marker beside its outputs (weights as .npy, never pickle), so
an interrupted study resumes at the first phase without one.
"""

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import gradstore
import gradstore.codecs
from unlearn.runs import data as datasets
from unlearn.runs import poison
from unlearn.runs.models import build_model
from unlearn.params import flat_params
from unlearn.recording.recorders import create_recorder
from unlearn.runs.config import FP16, FP32, INT8, LAYER, ORIGINAL, PER_SAMPLE
from unlearn.runs.loop import train

from .grid import recorded_baselines, store_name

RECORDED = "recorded.json"
# The per-sample engine of the study's one recording run (12 stores, 6 masks whose p sum to 0.455):
# measured side by side in docs/RESULTS.md.
STUDY_ENGINE = "vmap"
# Defaults added after the published studies: left out of the options a study is compared by while they hold,
# so those studies' cells.json and markers still resume.
LATER_DEFAULTS = {"model": "simple", "baselines": "recorded"}


def study_model(config, data, seed):
    """The study's model (``config["model"]``: SimpleModel or ResNet-18 with GroupNorm), its weights from ``seed``."""
    return build_model(config.get("model", "simple"), data.in_channels, data.num_classes, seed=seed)


def study_engine(config):
    """The per-sample engine of the class and sample requests' run: --engine, else vmap for SimpleModel's many masks
    and masked for ResNet-18 (vmap's dense per-sample gradients cost 71x plain there: docs/RESULTS.md)."""
    return config.get("engine") or (STUDY_ENGINE if config.get("model", "simple") == "simple" else "masked")


def original_bytes(config, num_samples, num_params):
    """The original method's store as issue 25 computes it: one float32 parameter delta a step, steps x M x 4
    bytes, raw. Its recorded stores are zstd-compressed: on SimpleModel they hold 0.66 of this (docs/RESULTS.md),
    so a ratio against the computed size is higher than one against a recorded store would be."""
    return config["epochs"] * math.ceil(num_samples / config["batch_size"]) * num_params * 4


def load_data(config):
    data = datasets.load_dataset(config["dataset"], config.get("data_dir"))
    if config.get("keep_first"):
        data = datasets.keep_first(data, config["forget_class"], config["keep_first"])
    return data


def forget_samples(config, seed, num_samples):
    """The random-sample request: ``sample_fraction`` of the training set (a count when 1 or more), drawn from
    the seed."""
    share = config["sample_fraction"]
    count = int(share) if share >= 1 else max(1, round(share * num_samples))
    if count > num_samples:
        raise ValueError(f"--sample-fraction {share:g} asks for {count} samples of {num_samples}")
    return np.sort(np.random.default_rng([seed, 1]).choice(num_samples, count, replace=False))


POISON_OPTIONS = ("poison", "poison_seed", "poison_target", "poison_keeps")


def comparable(config, task=None):
    """The options that decide a recording's and a cell's values (not progress display, not which seeds or
    requests run, not the engine: both give the same per-sample gradients to float32 rounding). The poison's
    options decide only the poisoned request's (``task="poisoned"``)."""
    ignored = ("progress", "seeds", "engine", "requests", "only_stores") + (() if task == "poisoned" else POISON_OPTIONS)
    return {key: value for key, value in config.items()
            if key not in ignored and not (key in LATER_DEFAULTS and value == LATER_DEFAULTS[key])}


def poison_spec(config, seed, num_samples):
    """The poisoned request's poison: ``config["poison"]`` samples (a fraction of the training set when below 1),
    drawn with the seed's own seed unless --poison-seed gives one."""
    count = config["poison"]
    count = max(1, round(count * num_samples)) if count < 1 else int(count)
    return {"count": count, "seed": seed if config.get("poison_seed") is None else config["poison_seed"],
            "target": config.get("poison_target", 0)}


def poisoned_data(config, seed):
    """The poisoned request's training split: the study's data with the poison applied (unlearn.runs.poison)."""
    data = load_data(config)
    return poison.from_spec(data, poison_spec(config, seed, len(data)))


def read_marker(path, config, task=None):
    """A phase's marker, if it was written under these options (else the phase runs again)."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("config") == json.loads(json.dumps(comparable(config, task))) else None


def write_json(path, value):
    """Write atomically: a marker is either absent or complete."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def disk_needed(config, num_samples, num_params):
    """Bytes of disk the recording phase needs at its peak (scratch sums + fp32 stores + the rest)."""
    steps = config["epochs"] * math.ceil(num_samples / config["batch_size"])
    values = num_samples * num_params * sum(config["keeps"]) * len(config["flavours"])
    derived = sum(codec_bytes(c) for c in config["codecs"] if c != FP32)
    # float32 sums (in scratch files, then in the fp32 stores: each store's scratch goes as it
    # finalizes, so the two overlap by one store at most), then the transcoded codecs beside them
    overlap = values * 4 * max(config["keeps"]) / sum(config["keeps"])
    baselines = steps * num_params * 4 * (1 + config["layer_keep"]) if recorded_baselines(config) else 0
    return int(values * (4 + derived) + overlap + baselines)


def codec_bytes(codec):
    """Raw bytes a value at most (codes plus scales, before zstd) in one of the study's codecs."""
    width = {FP32: 4.0, FP16: 2.0, INT8: 1.0}
    if codec in width:
        return width[codec] + 0.05
    bits = gradstore.codecs.get_codec(codec).bits  # the packed codecs: int4, int2, sign
    return bits / 8 + 0.1


def record(seed, config, seed_dir, log=print):
    """Train once with every recorder attached; finalize, transcode. Returns the marker's content."""
    marker = seed_dir / RECORDED
    saved = read_marker(marker, config)
    if saved is not None:
        return saved
    if seed_dir.exists():  # interrupted before its marker, or recorded under other options: start again
        shutil.rmtree(seed_dir)
    seed_dir.mkdir(parents=True)
    data = load_data(config)
    model = study_model(config, data, seed)
    num_params = sum(p.numel() for p in model.parameters())
    free = shutil.disk_usage(seed_dir).free
    needed = disk_needed(config, len(data), num_params)
    if needed > free:
        raise RuntimeError(f"the recording needs about {needed / 1e9:.1f} GB under {seed_dir}; {free / 1e9:.1f} GB are free")
    scratch = seed_dir / "scratch"
    scratch.mkdir()
    steps = config["epochs"] * math.ceil(len(data) / config["batch_size"])
    stores, recorders = {}, []
    for flavour in config["flavours"]:
        for keep in config["keeps"]:
            name = store_name(PER_SAMPLE, flavour, keep, FP32)
            k = gradstore.keep_to_k(keep, num_params)
            recorders.append(create_recorder(seed_dir / f"{name}.h5", PER_SAMPLE, model, len(data), steps, keep=keep,
                                             codec=FP32, flavour=flavour, seed=seed,
                                             memory_budget=len(data) * k * 4, buffer_dir=scratch))
            stores[name] = {"method": PER_SAMPLE, "flavour": flavour, "keep": keep, "codec": FP32}
    recorders += step_recorders(seed, config, seed_dir, model, data, steps, stores)
    run = train_recording(seed, config, model, data, recorders, study_engine(config), log)
    shutil.rmtree(scratch)
    started = time.perf_counter()
    for name, entry in list(stores.items()):
        if entry["method"] != PER_SAMPLE:
            continue
        for codec in config["codecs"]:
            if codec != FP32:
                derived = store_name(PER_SAMPLE, entry["flavour"], entry["keep"], codec)
                gradstore.transcode(seed_dir / f"{name}.h5", seed_dir / f"{derived}.h5", codec)
                stores[derived] = {**entry, "codec": codec}
        if FP32 not in config["codecs"]:
            os.remove(seed_dir / f"{name}.h5")
            del stores[name]
    np.save(seed_dir / "trained.npy", flat_params(model))
    result = {
        "config": comparable(config), "seed": seed, "num_samples": len(data), "num_params": num_params, "steps": run["steps"],
        "original_bytes": original_bytes(config, len(data), num_params),
        "train_seconds": run["seconds"], "record_seconds": run["record_seconds"],
        "transcode_seconds": time.perf_counter() - started,
        "stores": {name: {**entry, "path": f"{name}.h5"} for name, entry in stores.items()},
    }
    write_json(marker, result)
    log(f"seed {seed}: trained and recorded in {run['seconds']:.0f} s, transcoded in {result['transcode_seconds']:.0f} s")
    return result


def step_recorders(seed, config, seed_dir, model, data, steps, stores):
    """The baselines' recorders (the original method's store, the layer-wise one), entered in ``stores``; none when
    the study computes the original's size instead (--baselines computed)."""
    recorders = []
    if not recorded_baselines(config):
        return recorders
    for method, keep in ((ORIGINAL, 1.0), (LAYER, config["layer_keep"])):
        name = store_name(method, keep=keep)
        recorders.append(create_recorder(seed_dir / f"{name}.h5", method, model, len(data), steps, keep=keep,
                                         codec=FP32, seed=seed))
        stores[name] = {"method": method, "flavour": None, "keep": keep, "codec": FP32}
    return recorders


def train_recording(seed, config, model, data, recorders, engine, log):
    """The seed's training run with every recorder attached; the stores are closed (finished) after it."""
    log(f"seed {seed}: training {config['epochs']} epochs on {len(data)} samples, recording {len(recorders)} stores")
    run = train(model, data.train_x, data.train_y, config["epochs"], config["batch_size"], seed,
                recorders=recorders, device=torch.device("cpu"), progress=config["progress"],
                description=f"seed {seed} recording", engine=engine)
    for recorder in recorders:
        recorder.store.close()
    return run


def record_poisoned(seed, config, seed_dir, log=print):
    """The poisoned request's own training run, on the poisoned split: int8 per-sample stores of both flavours
    at each of ``config["poison_keeps"]``, recorded directly (no transcode), and the baselines' stores.
    The masked engine records them (their p sum to a few percent). Returns the marker's content."""
    marker = seed_dir / RECORDED
    saved = read_marker(marker, config, "poisoned")
    if saved is not None:
        return saved
    if seed_dir.exists():
        shutil.rmtree(seed_dir)
    seed_dir.mkdir(parents=True)
    data = poisoned_data(config, seed)
    model = study_model(config, data, seed)
    steps = config["epochs"] * math.ceil(len(data) / config["batch_size"])
    stores, recorders = {}, []
    for flavour in config["flavours"]:
        for keep in config["poison_keeps"]:
            name = store_name(PER_SAMPLE, flavour, keep, INT8)
            recorders.append(create_recorder(seed_dir / f"{name}.h5", PER_SAMPLE, model, len(data), steps, keep=keep,
                                             codec=INT8, flavour=flavour, seed=seed))
            stores[name] = {"method": PER_SAMPLE, "flavour": flavour, "keep": keep, "codec": INT8}
    recorders += step_recorders(seed, config, seed_dir, model, data, steps, stores)
    run = train_recording(seed, config, model, data, recorders, config.get("engine") or "masked", log)
    np.save(seed_dir / "trained.npy", flat_params(model))
    result = {
        "config": comparable(config, "poisoned"), "seed": seed, "num_samples": len(data), "steps": run["steps"],
        "original_bytes": original_bytes(config, len(data), sum(p.numel() for p in model.parameters())),
        "poison": data.poison.to_json(), "poisoned_keys": data.poison.keys.tolist(),
        "train_seconds": run["seconds"], "record_seconds": run["record_seconds"],
        "stores": {name: {**entry, "path": f"{name}.h5"} for name, entry in stores.items()},
    }
    write_json(marker, result)
    log(f"seed {seed}: trained on the poisoned split and recorded in {run['seconds']:.0f} s")
    return result


def reference_model(kind, seed, config, seed_dir, data, log=print):
    """A model trained from scratch without a request's forget set (``kind`` 'class', 'samples', or
    'poisoned': ``data`` is then the poisoned split, retrained without its poisoned samples).

    Returns (flat weights, seconds); cached as seed_dir/<kind>.npy + .json.
    """
    weights, marker = seed_dir / f"reference-{kind}.npy", seed_dir / f"reference-{kind}.json"
    task = "poisoned" if kind == "poisoned" else None
    saved = read_marker(marker, config, task)
    if saved is not None:
        return np.load(weights, allow_pickle=False), saved["seconds"]
    if kind == "poisoned":  # ``data`` is the poisoned split
        kept = datasets.exclude(data, samples=data.poison.keys)
    elif kind == "class":
        kept = datasets.exclude(data, cls=config["forget_class"])
    elif kind == "samples":
        kept = datasets.exclude(data, samples=forget_samples(config, seed, len(data)))
    else:
        raise ValueError(kind)
    log(f"seed {seed}: retraining from scratch without the {kind} request")
    model = study_model(config, data, seed)
    run = train(model, kept.train_x, kept.train_y, config["epochs"], config["batch_size"], seed,
                device=torch.device("cpu"), progress=config["progress"], description=f"seed {seed} retrain ({kind})")
    np.save(weights, flat_params(model))
    write_json(marker, {"config": comparable(config, task), "seconds": run["seconds"]})
    return flat_params(model), run["seconds"]
