"""`python -m bench throughput`: what recording costs against plain training, engine by engine.

Models: ``simple`` (SimpleModel) and ``resnet18`` on MNIST images; ``lm``, a small byte-level GPT-2
(``bench.language.build_gpt2``, 1.85 M parameters, transformers' Conv1D, tied wte/lm_head) trained as a
causal LM on windows of the Python stdlib's own ``.py`` files, and ``bert``, a small BERT classifier
(``build_bert``) on padded windows of the same files (attention_mask of varying lengths). The text
models are called as users call them: dict batches, ``model(**batch).loss``.

Four engines run the same model, data, batches and loop: ``plain`` training, recording
with the ``masked`` engine (hooks in the backward, kept values only), recording with the
``vmap`` engine (torch.func full per-sample gradients), and Opacus' ``GradSampleModule``
(full per-sample gradients through hooks: what users would pick instead; with its defaults, and on the text
models with explicit [B, T] ``position_ids``, without which its position-embedding rows are not per sample;
the row names the parameters whose ``grad_sample`` lacks a row per sample, and the module types Opacus
computes through its functorch fallback). Each
(model, engine, p) runs in its own child process, so its peak RSS is its own; the
children are interleaved (A, B, A, B, ... over ``--repeats``) and every figure is a
median. ``overhead`` is against ``plain`` of the same model in the same run. Recording
rows: update flavour, int8 store. Recording rows also report where their time goes and,
from their finished store, how fast it forgets. An engine that cannot run a model (Opacus on a
module it does not support, vmap through control flow it cannot trace) gives a row whose note is
the error its child caught; the benchmark goes on.
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
MODELS = ("simple", "resnet18", "lm", "bert")
IMAGE_MODELS = ("simple", "resnet18")
TEXT_MODELS = ("lm", "bert")
OPACUS_MISSING = "opacus is not installed: pip install 'amnesiac-gradstore[peers]' (an optional extra)"


def configurations(args):
    """The (model, engine, keep) cells of this run, in interleaving order."""
    cells = []
    for model in args.models:
        for engine in args.engines:
            if args.quick and model in ("resnet18", *TEXT_MODELS) and engine == "vmap":
                continue  # several seconds a step on 2 cores: only the full run has it
            keeps = args.keeps if engine in ("masked", "vmap") else [None]
            if args.quick and model in ("resnet18", *TEXT_MODELS):
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


class TextDataset(torch.utils.data.Dataset):
    """Dict samples (``input_ids``, ``labels``, ``attention_mask`` for BERT): the default collate stacks them
    into the dict batches a Hugging Face model takes as ``model(**batch)``."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __len__(self):
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index):
        return {name: value[index] for name, value in self.tensors.items()}


def text_data(model, samples, seq_len):
    """(tensors of the dataset, a description of the text).

    ``lm``: non-overlapping windows of the stdlib's bytes, labels = input_ids (the model shifts them), an
    attention_mask of ones (as a tokenizer gives it; without one transformers checks the ids for padding
    tokens, which torch.func's vmap cannot trace). ``bert``: a CLS token and seq_len - 1 bytes, labelled by
    whether the file is private, right-padded to a length drawn uniformly in [seq_len / 4, seq_len]
    (attention_mask 0 on the padding)."""
    from bench import language

    corpus = language.stdlib_corpus()
    where = f"stdlib .py, {len(corpus.files)} files, sha256 {corpus.sha256[:12]}"
    if model == "lm":
        ids = torch.from_numpy(language.windows(language.encode(corpus.text), seq_len, samples))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, where
    ids, labels = language.classification_windows(corpus, seq_len, samples, seed=0)
    lengths = np.random.default_rng(1).integers(max(2, seq_len // 4), seq_len + 1, samples)
    mask = np.arange(seq_len)[None, :] < lengths[:, None]
    ids = np.where(mask, ids, language.PAD)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "labels": torch.from_numpy(labels)}, where


def build_text_model(model, seq_len):
    from bench import language

    if model == "lm":
        return language.build_gpt2(seed=0, n_positions=max(128, seq_len))
    return language.build_bert(seed=0, max_positions=max(128, seq_len))


def lm_sample_loss(out, labels):
    """The vmap engine's per-sample loss of the LM: the mean next-token cross-entropy over its window (the
    engine scales it by 1/B: the batch's mean over its B * (T - 1) tokens, as the model's own loss)."""
    logits = out.logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def bert_sample_loss(out, labels):
    return torch.nn.functional.cross_entropy(out.logits, labels)


def run_child(spec):
    """One cell: time ``steps`` training steps after ``warmup``; returns the row's measurements."""
    from unlearn import attach, create_recorder

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    text = spec["model"] in TEXT_MODELS
    loss_fn = None
    if text:
        tensors, source = text_data(spec["model"], spec["samples"], spec["seq_len"])
        model = build_text_model(spec["model"], spec["seq_len"]).to(device).train()
        dataset, count = TextDataset(tensors), len(tensors["labels"])
        loss_fn = lm_sample_loss if spec["model"] == "lm" else bert_sample_loss
    else:
        from unlearn.runs.models import build_model

        x, y, channels, classes, source = load_batches(spec["samples"], spec["batch_size"])
        model = build_model(spec["model"], channels, classes, seed=0).to(device)
        dataset, count = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), len(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=spec["batch_size"], shuffle=True,
                                         generator=torch.Generator().manual_seed(0), drop_last=True)
    engine, result = spec["engine"], {"inputs": source}
    recorder, session, scratch = None, None, None
    if engine == "opacus":
        from opacus import GradSampleModule

        if not text:
            out_of_place(model)
        model = GradSampleModule(model)  # the defaults (strict): what a user of Opacus writes
        result["opacus_functorch_modules"] = sorted(opacus_functorch_modules(model))
        if text:
            result["note"] = OPACUS_POSITION_IDS
    elif engine in ("masked", "vmap"):
        scratch = tempfile.TemporaryDirectory(prefix="bench-throughput-")
        if spec["keep"] == "study":  # as bench/study/record.py records: fp32 stores, both flavours, every p
            from bench.study import FLAVOURS, KEEPS

            recorders = [create_recorder(Path(scratch.name) / f"{flavour}-{keep}.h5", PER_SAMPLE, model, len(x),
                                         keep=keep, codec="fp32", flavour=flavour, seed=0)
                         for flavour in FLAVOURS for keep in KEEPS]
        else:
            recorders = [create_recorder(Path(scratch.name) / "store.h5", PER_SAMPLE, model, count,
                                         keep=spec["keep"], codec="int8", flavour="update", seed=0)]
        recorder = recorders[-1]
        optimizer, loader = attach(model, optimizer, loader, recorders, engine=engine, loss_fn=loss_fn)
        session = optimizer.session
    total = spec["warmup"] + spec["steps"]
    times, cpu_times, done, at_warmup = [], [], 0, None
    while done < total:
        for batch in loader:
            if done == total:
                break
            started, cpu_started = time.perf_counter(), time.process_time()
            if text:  # a dict batch, called as users call a Hugging Face model
                batch = {name: value.to(device) for name, value in batch.items()}
                if engine == "opacus":
                    batch = with_position_ids(batch)
                inputs, targets = vmap_inputs(batch) if engine == "vmap" else (None, None)
            else:
                inputs, targets = batch[0].to(device), batch[1].to(device)
            optimizer.zero_grad()
            if engine == "vmap":
                session.backward(inputs, targets)  # the vmap engine's one gradient computation
            elif text:
                model(**batch).loss.backward()  # the model's own loss
            else:
                torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
            if engine == "opacus":
                if done == 0:  # every parameter's grad_sample has a row per sample
                    wrong = result["opacus_not_per_sample"] = not_per_sample(model, spec["batch_size"])
                    if wrong:
                        result["note"] = "; ".join(filter(None, [result.get("note"), "grad_sample not per sample: "
                                                                 + ", ".join(wrong)]))
                for p in model.parameters():
                    p.grad_sample = None
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
            done += 1
            if done == spec["warmup"] and session is not None:  # first calls load numba kernels: not counted
                session.flush()
                at_warmup = counters(session)
    if session is not None:  # the background store writes of the timed steps count
        started, cpu_started = time.perf_counter(), time.process_time()
        session.flush()
        times[-1] += time.perf_counter() - started
        cpu_times[-1] += time.process_time() - cpu_started
    timed = times[spec["warmup"]:]
    result["seconds_per_step"] = statistics.median(timed)
    # CPU seconds of the whole process (every thread: torch's, numba's, the background positions and
    # ingest): the work a step costs, less sensitive than wall time to other processes sharing the cores
    result["cpu_seconds_per_step"] = statistics.median(cpu_times[spec["warmup"]:])
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


def vmap_inputs(batch):
    from unlearn.recording.session import vmap_inputs as split

    return split(batch)


def run_child_reporting(spec):
    """``run_child``, with an error it raises (an engine that cannot run the model) as the row's measurement:
    {"error": "<engine> cannot run <model>: <exception>"}, so the benchmark goes on and the row says why."""
    try:
        return run_child(spec)
    except Exception as error:  # noqa: BLE001: any failure of the engine on this model is the row's finding
        import traceback

        traceback.print_exc(file=sys.stderr)
        message = " ".join(str(error).split()) or type(error).__name__
        if len(message) > 200:
            message = message[:197] + "..."
        who = "Opacus" if spec["engine"] == "opacus" else f"the {spec['engine']} engine"
        return {"error": f"{who} cannot run {spec['model']}: {type(error).__name__}: {message}{raised_at(error)}"}


def raised_at(error):
    """" (raised in <package path>:<line> <function>)": the innermost frame outside torch, where the model's
    or the library's code met the failure (torch's own frames say only how it failed)."""
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    frame = frames[-1]
    parts = Path(frame.filename).parts
    anchor = next((i for i in range(len(parts) - 1, -1, -1) if parts[i] == "site-packages"), None)
    where = "/".join(parts[anchor + 1:]) if anchor is not None else "/".join(parts[-2:])
    return f" (raised in {where}:{frame.lineno} {frame.name})"


OPACUS_POSITION_IDS = "position_ids passed as [B, T] (the model's default [1, T] gives one batch-summed row)"


def with_position_ids(batch):
    """The batch with explicit ``position_ids`` [B, T] (the values the model's own default takes). Called as users call
    them, GPT-2 and BERT take their positions from a [1, T] tensor shared by the batch; Opacus' ``nn.Embedding`` grad
    sampler then sees a batch of 1 and gives the position table a single ``grad_sample`` row (the batch's summed
    gradient, times B), with no error; its ``DPOptimizer`` fails later, in ``clip_and_accumulate``, on the
    mismatched batch sizes. With [B, T] ids its rows are every sample's own."""
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    return {**batch, "position_ids": positions}


def opacus_functorch_modules(model):
    """The types of the modules Opacus computes through its per-layer functorch fallback (no grad sampler of its own
    for them: transformers' Conv1D, for one)."""
    return {type(module).__name__ for module in model.iterate_submodules(model._module)
            if type(module) not in model.GRAD_SAMPLERS}


def not_per_sample(model, batch_size):
    """Names of the trainable parameters whose Opacus ``grad_sample`` is missing or does not have ``batch_size``
    rows, after a backward."""
    wrong = []
    for name, param in model.named_parameters():
        sample = getattr(param, "grad_sample", None)
        if param.requires_grad and (not isinstance(sample, torch.Tensor) or sample.shape[0] != batch_size):
            wrong.append(name.removeprefix("_module."))
    return wrong


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
        labelled = store.labels[live]
        labelled = labelled[labelled >= 0]
        class_keys, class_seconds = np.zeros(0, np.int64), None
        if labelled.size:  # an LM's rows have no class label: no class request
            label = int(np.bincount(labelled).argmax())
            class_keys = store.keys_with_label(label)
            started = time.perf_counter()
            store.scatter_add(flat, class_keys, -1.0)
            class_seconds = time.perf_counter() - started
        started = time.perf_counter()
        store.scatter_add(flat, live, -1.0)
        all_seconds = time.perf_counter() - started
        return {"forget_one_sample_ms": statistics.median(one) * 1e3,
                "forget_class_ms": None if class_seconds is None else class_seconds * 1e3,
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
            steps = {"simple": args.steps, "resnet18": args.resnet_steps}.get(model, args.text_steps)
            text = model in TEXT_MODELS
            spec = {"model": model, "engine": engine, "keep": keep, "device": device,
                    "samples": args.text_samples if text else args.samples,
                    "batch_size": args.text_batch_size if text else args.batch_size, "warmup": args.warmup,
                    "steps": steps, "seq_len": args.seq_len}
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
               "cpu_seconds_per_step": None, "cpu_overhead": None, "peak_rss_mb": None, "rss_ratio": None, "note": ""}
        if engine == "opacus" and not have_opacus:
            row["note"] = OPACUS_MISSING
        elif not good:
            row["note"] = results[0]["error"] if results else "not run"
        else:
            for key in good[0]:
                values = [r[key] for r in good if isinstance(r.get(key), (int, float))]
                row[key] = statistics.median(values) if values else good[0][key]
            row["repeats"] = len(good)
            row["each_seconds_per_step"] = [r["seconds_per_step"] for r in good]  # every repeat's: the spread
            if engine == "plain":
                plain[model] = row
        rows.append(row)
    for row in rows:
        reference = plain.get(row["model"])
        if row["seconds_per_step"] is None or reference is None:
            continue
        for key, ratio in (("seconds_per_step", "overhead"), ("cpu_seconds_per_step", "cpu_overhead"),
                           ("peak_rss_mb", "rss_ratio")):
            if isinstance(row.get(key), (int, float)) and reference.get(key):
                row[ratio] = row[key] / reference[key]
    return rows


def table(rows):
    lines = ["| model | engine | p | ms / step | overhead vs plain | CPU ms / step (vs plain) | peak RSS (MB) (vs plain) "
             "| hooks / positions / store (ms / step) | note |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    for row in rows:
        parts = [f"{row[key]:.1f}" if isinstance(row.get(key), float) else "-"
                 for key in ("hooks_ms_per_step", "positions_ms_per_step", "store_ms_per_step")]
        where = " / ".join(parts) if row["engine"] in ("masked", "vmap") else ""
        step = f"{row['seconds_per_step'] * 1e3:.1f}" if row["seconds_per_step"] is not None else "-"
        overhead = f"{row['overhead']:.2f}x" if row["overhead"] is not None else "-"
        rss = f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] is not None else "-"
        if row.get("rss_ratio") is not None:
            rss += f" ({row['rss_ratio']:.2f}x)"
        cpu = f"{row['cpu_seconds_per_step'] * 1e3:.1f}" if row.get("cpu_seconds_per_step") is not None else "-"
        if row.get("cpu_overhead") is not None:
            cpu += f" ({row['cpu_overhead']:.2f}x)"
        lines.append(f"| {row['model']} | {row['engine']} | {row['keep'] if row['keep'] is not None else '-'} | {step} | "
                     f"{overhead} | {cpu} | {rss} | {where} | {row['note']} |")
    return "\n".join(lines)


def main(args):
    if args.child:
        print(json.dumps(run_child_reporting(json.loads(args.child))))
        return 0
    if args.quick:
        args.repeats, args.steps, args.resnet_steps, args.warmup = 1, min(args.steps, 12), min(args.resnet_steps, 2), 2
        args.text_steps = min(args.text_steps, 2)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    started = time.perf_counter()
    rows, device = measure(args, log)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
            "repeats": args.repeats, "steps": args.steps, "resnet_steps": args.resnet_steps, "models": args.models,
            "text_batch_size": args.text_batch_size, "seq_len": args.seq_len, "text_steps": args.text_steps,
            "text_samples": args.text_samples, "warmup": args.warmup,
            "seconds": time.perf_counter() - started}
    (out / "throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        batches = []
        if any(m in IMAGE_MODELS for m in args.models):
            batches.append(f"batch {args.batch_size} images")
        if any(m in TEXT_MODELS for m in args.models):
            batches.append(f"batch {args.text_batch_size} x {args.seq_len} tokens")
        print(f"\n{device}, {meta['threads']} threads, {', '.join(batches)}, update rows, int8; medians of "
              f"{args.repeats} interleaved child processes ({meta['seconds']:.0f} s)")
        print(table(rows))
        for row in rows:
            if row.get("scatter_add_values_per_s"):
                a_class = (f"a class ({row['class_rows']} rows) {row['forget_class_ms']:.1f} ms, "
                           if row.get("forget_class_ms") is not None else "")
                print(f"  {row['model']} {row['engine']} p={row['keep']}: forget one sample "
                      f"{row['forget_one_sample_ms']:.2f} ms, {a_class}"
                      f"scatter-add {row['scatter_add_values_per_s'] / 1e6:.0f} M values/s")
    return 0


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes: every engine on SimpleModel; plain, masked (first p), opacus on ResNet-18, "
                        "lm and bert (2 timed steps each); 1 repeat")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.01, 0.1], help="p of the recording engines")
    parser.add_argument("--samples", type=int, default=4096, help="MNIST training images the batches are drawn from")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per SimpleModel child")
    parser.add_argument("--resnet-steps", type=int, default=6, help="timed steps per ResNet-18 child")
    parser.add_argument("--text-steps", type=int, default=8, help="timed steps per lm / bert child")
    parser.add_argument("--text-batch-size", type=int, default=16, help="windows per batch of lm and bert")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window of lm and bert")
    parser.add_argument("--text-samples", type=int, default=2048,
                        help="stdlib windows the lm and bert batches are drawn from (the stores' rows)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per child")
    parser.add_argument("--study", action="store_true",
                        help="also time masked and vmap recording the study's 12 stores (6 masks, p summing to 0.455)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--out", default="out/bench-throughput")
    parser.add_argument("--child", help="internal: run one cell from this JSON spec and print its measurements")
