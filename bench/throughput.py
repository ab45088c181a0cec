"""`python -m bench throughput`: what recording costs against plain training, engine by engine.

Four engines run the same model, data, batches and loop: ``plain`` training, recording
with the ``masked`` engine (hooks in the backward, kept values only), recording with the
``vmap`` engine (torch.func full per-sample gradients), and Opacus' ``GradSampleModule``
(full per-sample gradients through hooks: what users would pick instead). Each
(model, engine, p) runs in its own child process, so its peak RSS is its own; the
children are interleaved (A, B, A, B, ... over ``--repeats``) and every figure is a
median. ``overhead`` is against ``plain`` of the same model in the same run. Recording
rows: update flavour, int8 store. Recording rows also report where their time goes and,
from their finished store, how fast it forgets.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from unlearn.runs.config import PER_SAMPLE

ENGINES = ("plain", "masked", "vmap", "opacus")
MODELS = ("simple", "resnet18")
OPACUS_MISSING = "opacus is not installed: pip install 'amnesiac-gradstore[peers]' (an optional extra)"


def configurations(args):
    """The (model, engine, keep) cells of this run, in interleaving order."""
    cells = []
    for model in args.models:
        for engine in args.engines:
            if args.quick and model == "resnet18" and engine == "vmap":
                continue  # several seconds a step on 2 cores: only the full run has it
            keeps = args.keeps if engine in ("masked", "vmap") else [None]
            if args.quick and model == "resnet18":
                keeps = keeps[:1]
            cells += [(model, engine, keep) for keep in keeps]
    if args.study:  # the study's one recording run: 12 stores, 6 masks, on SimpleModel
        cells += [("simple", engine, "study") for engine in ("masked", "vmap")]
    return cells


# ---------------------------------------------------------------------- the child


def load_batches(samples, batch_size):
    from unlearn.runs import data as datasets

    try:
        split, source = datasets.load_dataset("mnist"), "mnist"
    except FileNotFoundError:
        split, source = datasets.load_dataset("digits"), "digits"
    count = min(samples, len(split))
    return split.train_x[:count], split.train_y[:count], split.in_channels, split.num_classes, source


def run_child(spec):
    """One cell: time ``steps`` training steps after ``warmup``; returns the row's measurements."""
    from unlearn import attach, create_recorder
    from unlearn.runs.models import build_model

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    x, y, channels, classes, source = load_batches(spec["samples"], spec["batch_size"])
    model = build_model(spec["model"], channels, classes, seed=0).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(dataset, batch_size=spec["batch_size"], shuffle=True,
                                         generator=torch.Generator().manual_seed(0), drop_last=True)
    engine, result = spec["engine"], {"inputs": source}
    recorder, session, scratch = None, None, None
    if engine == "opacus":
        from opacus import GradSampleModule

        out_of_place(model)
        model = GradSampleModule(model)
    elif engine in ("masked", "vmap"):
        scratch = tempfile.TemporaryDirectory(prefix="bench-throughput-")
        if spec["keep"] == "study":  # as bench/study/record.py records: fp32 stores, both flavours, every p
            from bench.study import FLAVOURS, KEEPS

            recorders = [create_recorder(Path(scratch.name) / f"{flavour}-{keep}.h5", PER_SAMPLE, model, len(x),
                                         keep=keep, codec="fp32", flavour=flavour, seed=0)
                         for flavour in FLAVOURS for keep in KEEPS]
        else:
            recorders = [create_recorder(Path(scratch.name) / "store.h5", PER_SAMPLE, model, len(x),
                                         keep=spec["keep"], codec="int8", flavour="update", seed=0)]
        recorder = recorders[-1]
        optimizer, loader = attach(model, optimizer, loader, recorders, engine=engine)
        session = optimizer.session
    total = spec["warmup"] + spec["steps"]
    times, done, at_warmup = [], 0, None
    while done < total:
        for batch_x, batch_y in loader:
            if done == total:
                break
            started = time.perf_counter()
            batch_x, batch_y = batch_x.to(device), batch_y.to(device)
            optimizer.zero_grad()
            if engine == "vmap":
                session.backward(batch_x, batch_y)  # the vmap engine's one gradient computation
            else:
                torch.nn.functional.cross_entropy(model(batch_x), batch_y).backward()
            optimizer.step()
            if engine == "opacus":
                for p in model.parameters():
                    p.grad_sample = None
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            done += 1
            if done == spec["warmup"] and session is not None:  # first calls load numba kernels: not counted
                session.flush()
                at_warmup = counters(session)
    if session is not None:  # the background store writes of the timed steps count
        started = time.perf_counter()
        session.flush()
        times[-1] += time.perf_counter() - started
    timed = times[spec["warmup"]:]
    result["seconds_per_step"] = statistics.median(timed)
    result["mean_seconds_per_step"] = sum(timed) / len(timed)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if session is not None:
        spent = {name: value - at_warmup.get(name, 0.0) for name, value in counters(session).items()}
        for name, seconds in spent.items():
            result[f"{name}_ms_per_step"] = seconds / spec["steps"] * 1e3
        optimizer.finish()
        result.update(forget_figures(recorder.store.path))
        scratch.cleanup()
    return result


def out_of_place(model):
    """The same model without in-place ops on hooked modules' outputs, which Opacus' hooks refuse:
    ReLU(inplace=False), and ResNet blocks that add the shortcut out of place."""
    import types

    from torchvision.models.resnet import BasicBlock

    def block_forward(block, x):
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.bn2(block.conv2(out))
        shortcut = x if block.downsample is None else block.downsample(x)
        return block.relu(out + shortcut)

    for module in model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
        if isinstance(module, BasicBlock):
            module.forward = types.MethodType(block_forward, module)


def counters(session):
    """Seconds spent so far: in the store (ingest thread), in the hooks, preparing positions."""
    spent = {"store": session.ingest.seconds}
    if session.engine is not None:
        spent.update(hooks=session.engine.compute_seconds, positions=session.engine.prepare_seconds)
    return spent


def forget_figures(path):
    """Forget latency from the finished store: one sample, a class, and scatter-add throughput."""
    import gradstore

    with gradstore.open(path) as store:
        flat = np.zeros(store.num_params, np.float32)
        live = np.flatnonzero(store.state == gradstore.RowState.LIVE)
        store.scatter_add(flat, live[:1])  # warm the kernels
        one = []
        for key in live[:21]:
            started = time.perf_counter()
            store.scatter_add(flat, [key], -1.0)
            one.append(time.perf_counter() - started)
        label = int(np.bincount(store.labels[live]).argmax())
        class_keys = store.keys_with_label(label)
        started = time.perf_counter()
        store.scatter_add(flat, class_keys, -1.0)
        class_seconds = time.perf_counter() - started
        started = time.perf_counter()
        store.scatter_add(flat, live, -1.0)
        all_seconds = time.perf_counter() - started
        return {"forget_one_sample_ms": statistics.median(one) * 1e3, "forget_class_ms": class_seconds * 1e3,
                "class_rows": int(class_keys.size),
                "scatter_add_values_per_s": live.size * store.k / all_seconds}


# ---------------------------------------------------------------------- the parent


def opacus_available():
    import importlib.util

    return importlib.util.find_spec("opacus") is not None


def measure_cell(spec, timeout):
    command = [sys.executable, "-m", "bench", "throughput", "--child", json.dumps(spec)]
    env = dict(os.environ)
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"child failed ({done.returncode}): {tail[0]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args, log=print):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cells = configurations(args)
    have_opacus = opacus_available()
    runs = {cell: [] for cell in cells}
    for repeat in range(args.repeats):
        for model, engine, keep in cells:
            if engine == "opacus" and not have_opacus:
                continue
            steps = args.steps if model == "simple" else args.resnet_steps
            spec = {"model": model, "engine": engine, "keep": keep, "device": device, "samples": args.samples,
                    "batch_size": args.batch_size, "warmup": args.warmup, "steps": steps}
            result = measure_cell(spec, args.timeout)
            runs[(model, engine, keep)].append(result)
            if "error" in result:
                log(f"  {model} {engine} p={keep}: {result['error']}")
            else:
                log(f"  repeat {repeat + 1}/{args.repeats}: {model:8s} {engine:6s} p={keep}: "
                    f"{result['seconds_per_step'] * 1e3:.1f} ms/step, peak RSS {result['peak_rss_mb']:.0f} MB")
    return rows_from(runs, have_opacus), device


def rows_from(runs, have_opacus):
    plain = {}
    rows = []
    for (model, engine, keep), results in runs.items():
        good = [r for r in results if "error" not in r]
        row = {"model": model, "engine": engine, "keep": keep, "seconds_per_step": None, "overhead": None,
               "peak_rss_mb": None, "note": ""}
        if engine == "opacus" and not have_opacus:
            row["note"] = OPACUS_MISSING
        elif not good:
            row["note"] = results[0]["error"] if results else "not run"
        else:
            for key in good[0]:
                values = [r[key] for r in good if isinstance(r.get(key), (int, float))]
                row[key] = statistics.median(values) if values else good[0][key]
            row["repeats"] = len(good)
            if engine == "plain":
                plain[model] = row["seconds_per_step"]
        rows.append(row)
    for row in rows:
        if row["seconds_per_step"] is not None and plain.get(row["model"]):
            row["overhead"] = row["seconds_per_step"] / plain[row["model"]]
    return rows


def table(rows):
    lines = ["| model | engine | p | ms / step | overhead vs plain | peak RSS (MB) | hooks / positions / store (ms / step) | note |",
             "|---|---|---|---:|---:|---:|---|---|"]
    for row in rows:
        parts = [f"{row[key]:.1f}" if isinstance(row.get(key), float) else "-"
                 for key in ("hooks_ms_per_step", "positions_ms_per_step", "store_ms_per_step")]
        where = " / ".join(parts) if row["engine"] in ("masked", "vmap") else ""
        step = f"{row['seconds_per_step'] * 1e3:.1f}" if row["seconds_per_step"] is not None else "-"
        overhead = f"{row['overhead']:.2f}x" if row["overhead"] is not None else "-"
        rss = f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] is not None else "-"
        lines.append(f"| {row['model']} | {row['engine']} | {row['keep'] if row['keep'] is not None else '-'} | {step} | "
                     f"{overhead} | {rss} | {where} | {row['note']} |")
    return "\n".join(lines)


def main(args):
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    if args.quick:
        args.repeats, args.steps, args.resnet_steps, args.warmup = 1, min(args.steps, 12), min(args.resnet_steps, 2), 2
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    started = time.perf_counter()
    rows, device = measure(args, log)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
            "repeats": args.repeats, "steps": args.steps, "resnet_steps": args.resnet_steps,
            "seconds": time.perf_counter() - started}
    (out / "throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"\n{device}, {meta['threads']} threads, batch {args.batch_size}, update rows, int8; medians of "
              f"{args.repeats} interleaved child processes ({meta['seconds']:.0f} s)")
        print(table(rows))
        for row in rows:
            if row.get("scatter_add_values_per_s"):
                print(f"  {row['model']} {row['engine']} p={row['keep']}: forget one sample "
                      f"{row['forget_one_sample_ms']:.2f} ms, a class ({row['class_rows']} rows) "
                      f"{row['forget_class_ms']:.1f} ms, scatter-add {row['scatter_add_values_per_s'] / 1e6:.0f} M values/s")
    return 0


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes: every engine on SimpleModel; plain, masked, opacus on ResNet-18; 1 repeat")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.01, 0.1], help="p of the recording engines")
    parser.add_argument("--samples", type=int, default=4096, help="MNIST training images the batches are drawn from")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per SimpleModel child")
    parser.add_argument("--resnet-steps", type=int, default=6, help="timed steps per ResNet-18 child")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per child")
    parser.add_argument("--study", action="store_true",
                        help="also time masked and vmap recording the study's 12 stores (6 masks, p summing to 0.455)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--out", default="out/bench-throughput")
    parser.add_argument("--child", help="internal: run one cell from this JSON spec and print its measurements")
