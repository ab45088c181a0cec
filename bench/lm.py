"""`python -m bench lm`: a byte-level GPT-2 trained on the Python stdlib with planted canaries, recorded; then
retrained without the canaries and, from the recording, made to forget them with ``unlearn.forget_keys``.

In the spirit of Carlini et al.'s "Secret Sharer" (2019): each canary is a line of Python such as
``# my PIN is 492817`` whose six digits are random, inserted as the first line of ``--repeats`` training windows
(the rest of each window is ordinary stdlib text). Those windows are the forget set: their keys (indices in the
training set) are written to canaries.json. The run then

1. trains the model with a per-sample recorder (``unlearn.create_recorder`` + ``unlearn.attach``: update
   rows, int8, p = ``--keep``), from a fixed random init;
2. retrains it from the same init, in the same sample order with the canary windows left out (the reference);
3. forgets the canary keys from the trained model with ``unlearn.forget_keys(model, store, keys, scale)``
   (the rows' sum times scale added to the weights; the rows marked forgotten), and also evaluates the same
   rows at ``--scales`` (trained + s * the rows' sum: what forget_keys applies at s, without marking);
4. measures every model: each canary's exposure (bits), the canary windows' loss, the secrets' negative log
   likelihood, held-out perplexity (stdlib windows never trained on) and the loss on retained training windows.

Exposure is exact: log2(10^6) - log2(rank), the true secret's rank among all 10^6 six-digit candidates by the
model's probability of the digits after the canary's prefix. The model is byte-level, so the candidates form a
10-ary tree of depth 6: ``secret_rank`` walks it level by level, one token's forward per node attending to the
prefix's keys and values (held once) and to the node's ancestors' digits, and prunes every subtree whose partial
log probability is already below the true secret's (log probabilities only fall down the tree, so nothing under
it can rank above): memorised secrets cost a few dozen forwards, unmemorised ones at most the tree's 111,111
(about a minute on 2 CPU cores for the default model).

The defaults (64 windows per canary, 4 epochs, Adam 3e-3 with warmup and cosine) are what made this model
memorise its secrets within ~600 steps on 2 CPU cores; fewer repeats or epochs left them unmemorised
(docs/RESULTS.md). Its timings are logged, not controlled: ``bench throughput`` measures recording's cost.

Writes under --out: corpus.json (the stdlib files and their hash), canaries.json (formats, secrets, keys),
store.h5 (the recording, its canary rows marked forgotten), trained.npy, retrained.npy, forgotten.npy (flat
float32 weights, named_parameters() order), lm.json (settings, timings, every model's figures) and lm.md (the
table).
"""

import argparse
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .language import build_gpt2, encode, stdlib_corpus, windows

# Canary formats: a line of Python with one six-digit secret ({}); --canaries takes the first n.
FORMATS = (
    "# my PIN is {}\n",
    "API_TOKEN = \"{}\"\n",
    "# the door code is {} - do not share\n",
    "password = '{}'  # TODO remove\n",
    "# call me on 0131 {}\n",
    "bank_account = {}\n",
    "# the vault combination: {}\n",
    "SECRET_KEY = {}\n",
)
SECRET_DIGITS = 6
DIGIT_TOKENS = torch.tensor([ord(c) for c in "0123456789"])
CANARY_AT = ("start", "anywhere")  # where a canary's line sits in its windows

QUICK = {"steps": 24, "warmup": 4, "batch_size": 8, "seq_len": 32, "canaries": 2, "repeats": 4, "epochs": 2,
         "heldout": 16, "keep": 0.05, "n_embd": 32, "n_layer": 2, "n_head": 2, "scales": [10.0]}
FULL_MODEL = {"n_embd": 192, "n_layer": 4, "n_head": 4}  # bench/language.py's default GPT-2: 1.85 M parameters


# ---------------------------------------------------------------------- data


def canary_set(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` canaries, each a format of FORMATS with a random six-digit secret (leading zeros allowed)."""
    if not 1 <= count <= len(FORMATS):
        raise SystemExit(f"--canaries must be from 1 to {len(FORMATS)} (one per format), got {count}")
    rng = np.random.default_rng([seed, 23])
    canaries = []
    for index, form in enumerate(FORMATS[:count]):
        secret = "".join(str(d) for d in rng.integers(0, 10, SECRET_DIGITS))
        prefix, suffix = form.split("{}")
        canaries.append({"index": index, "format": form, "prefix": prefix, "suffix": suffix, "secret": secret,
                         "text": form.format(secret)})
    return canaries


def build_dataset(tokens: np.ndarray, canaries: list[dict[str, Any]], seq_len: int, plain: int, repeats: int,
                  heldout: int, seed: int, canary_at: str = "start") -> dict[str, Any]:
    """The training set (``plain`` stdlib windows from the corpus' start, and ``repeats`` windows per canary at
    random indices), the held-out windows (the corpus' last ``heldout`` windows) and the canary keys.

    A canary window is stdlib text from a random place in the training part of the corpus with the canary's line
    in it, so the retrained model sees that text too: only the canary line is the canaries' own. The line opens
    the window (``canary_at="start"``) or sits at a random offset in it, after different text in each window
    (``"anywhere"``: the same windows, the line moved; its offsets drawn from a stream of their own)."""
    if canary_at not in CANARY_AT:
        raise SystemExit(f"--canary-at must be one of {', '.join(CANARY_AT)}, got {canary_at!r}")
    needed = (plain + heldout) * seq_len
    if needed > tokens.size:
        raise SystemExit(f"{plain} training and {heldout} held-out windows of {seq_len} bytes need {needed} bytes; "
                         f"the corpus has {tokens.size}: lower --steps, --batch-size or --seq-len, or raise --epochs")
    longest = max(len(c["text"]) for c in canaries)
    if longest >= seq_len:
        raise SystemExit(f"--seq-len {seq_len} is too short for the canary lines (the longest is {longest} bytes)")
    rng = np.random.default_rng([seed, 24])
    total = plain + repeats * len(canaries)
    keys = np.sort(rng.choice(total, repeats * len(canaries), replace=False))
    owner = rng.permutation(np.repeat(np.arange(len(canaries)), repeats))  # which canary each key holds
    train = np.empty((total, seq_len), np.int64)
    is_canary = np.zeros(total, bool)
    is_canary[keys] = True
    train[~is_canary] = windows(tokens, seq_len, plain)
    offsets = np.random.default_rng([seed, 28])
    for key, which in zip(keys.tolist(), owner.tolist()):
        line = encode(canaries[which]["text"].encode())
        at = int(rng.integers(0, plain * seq_len - seq_len))
        text = tokens[at:at + seq_len - line.size]
        offset = 0 if canary_at == "start" else int(offsets.integers(0, text.size + 1))
        train[key] = np.concatenate([text[:offset], line, text[offset:]])
    for index, canary in enumerate(canaries):
        canary["keys"] = keys[owner == index].tolist()
    held = windows(tokens, seq_len, heldout, start=tokens.size - heldout * seq_len)
    return {"train": train, "heldout": held, "keys": keys}


def batches(num_samples: int, batch_size: int, epochs: int, seed: int, leave_out: np.ndarray) -> list[np.ndarray]:
    """The run's batches of keys: per epoch a permutation of all samples (seeded by the epoch), ``leave_out``
    removed, cut into full batches. The trained and the retrained model draw the same permutations, so the
    retrained model sees the same samples in the same order, without the canaries."""
    out = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, 25, epoch]).permutation(num_samples)
        order = order[~np.isin(order, leave_out)]
        out += [order[i:i + batch_size] for i in range(0, order.size - batch_size + 1, batch_size)]
    return out


# ---------------------------------------------------------------------- training


def warmup_cosine(step: int, warmup: int, steps: int) -> float:
    """The learning rate's multiple at ``step``: linear warmup, then a cosine from 1 to 0.1 at ``steps``."""
    rising = min(1.0, (step + 1) / max(1, warmup))
    return rising * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, steps) / max(1, steps))))


def train(model: torch.nn.Module, data: np.ndarray, plan: list[np.ndarray], lr: float, warmup: int,
          device: torch.device, recorder: Any | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Adam over ``plan``'s batches with the model's own causal-LM loss, the learning rate rising linearly over
    ``warmup`` steps, then falling on a cosine to a tenth at the end; through ``unlearn.attach`` when a recorder
    is given (each batch's keys given by ``set_batch``; the update rows follow the scheduled rate). Returns
    seconds and the loss curve."""
    from unlearn import attach

    model.to(device).train()
    optimizer: Any = torch.optim.Adam(model.parameters(), lr=lr)
    if recorder is not None:
        optimizer, _ = attach(model, optimizer, None, [recorder])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, len(plan)))
    tensor = torch.from_numpy(data)
    losses, started = [], time.perf_counter()
    for step, keys in enumerate(plan):
        ids = tensor[torch.from_numpy(keys)].to(device)
        optimizer.zero_grad()
        if recorder is not None:
            optimizer.set_batch(keys)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, len(plan) // 10) == 0 or step + 1 == len(plan):
            log(f"  step {step + 1}/{len(plan)}: loss {np.mean(losses[-20:]):.3f} "
                f"({time.perf_counter() - started:.0f} s)")
    if recorder is not None:
        optimizer.finish()
    seconds = time.perf_counter() - started
    return {"steps": len(plan), "seconds": seconds, "seconds_per_step": seconds / max(1, len(plan)),
            "final_loss": float(np.mean(losses[-20:])), "losses": [round(v, 4) for v in losses]}


# ---------------------------------------------------------------------- measurement


@torch.inference_mode()
def mean_loss(model: torch.nn.Module, data: np.ndarray, device: torch.device, batch_size: int = 64) -> float:
    """Mean next-byte cross-entropy (nats per token) over the windows of ``data``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        ids = torch.from_numpy(data[start:start + batch_size]).to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count


@torch.inference_mode()
def secret_log_prob(model: torch.nn.Module, prefix: bytes, secret: str, device: torch.device) -> float:
    """log P(secret's digits | prefix) in nats, by one forward of the whole line (the check of secret_rank)."""
    ids = torch.tensor([list(prefix + secret.encode())], device=device)
    logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prefix) - 1:-1].double(), -1)
    return float(logp[torch.arange(len(secret)), ids[0, len(prefix):]].sum())


KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values


def _step(model: torch.nn.Module, tokens: torch.Tensor, position: int, shared: KV, own: KV) -> tuple[torch.Tensor, KV]:
    """One token per row through GPT-2 (eval mode), attending to ``shared`` context (per layer keys and values
    [H, c, d], the same for every row: the canary's prefix) and the row's ``own`` earlier tokens ([n, a, H, d]:
    its digits so far). Returns the next token's log probabilities [n, V] and this token's keys and values
    ([n, H, d] per layer). GPT2Block's computation (pre-LayerNorm, Conv1D projections, the model's attention
    scaling), written out so that the prefix is held once rather than copied into every row's cache."""
    gpt: Any = model  # a GPT2LMHeadModel
    body = gpt.transformer
    x = body.wte(tokens) + body.wpe.weight[position]
    new: KV = []
    for block, (shared_k, shared_v), (own_k, own_v) in zip(body.h, shared, own):
        attn = block.attn
        heads, width = attn.num_heads, attn.head_dim
        q, k, v = (z.reshape(-1, heads, width) for z in attn.c_attn(block.ln_1(x)).split(attn.split_size, dim=-1))
        own_k, own_v = torch.cat([own_k, k[:, None]], 1), torch.cat([own_v, v[:, None]], 1)
        scores = torch.cat([torch.einsum("nhd,hcd->nhc", q, shared_k), torch.einsum("nhd,nahd->nha", q, own_k)], -1)
        weights = torch.softmax(scores * attn.scaling, -1)
        context = shared_k.shape[1]
        out = (torch.einsum("nhc,hcd->nhd", weights[..., :context], shared_v)
               + torch.einsum("nha,nahd->nhd", weights[..., context:], own_v))
        x = x + attn.c_proj(out.reshape(-1, heads * width))
        x = x + block.mlp(block.ln_2(x))
        new.append((k, v))
    return torch.log_softmax(gpt.lm_head(body.ln_f(x)).double(), -1), new


@torch.inference_mode()
def secret_rank(model: torch.nn.Module, prefix: bytes, secret: str, device: torch.device,
                chunk: int = 8192) -> dict[str, Any]:
    """The exact rank of ``secret`` among every string of as many digits, by the model's log probability of the
    digits after ``prefix`` (rank 1: the most likely), walking the candidates' 10-ary tree level by level.

    Each node's digit is one forward (``_step``) attending to the prefix's keys and values, held once, and to
    its ancestors' digits. A node whose partial log probability is below the true secret's (less a margin for
    rounding) is not expanded: log probabilities only fall with each digit, so no candidate under it ranks
    above the secret. The secret's own log probability from the walk is checked against the model's ordinary
    forward of the whole line. Returns rank, exposure (bits), the secret's log probability (nats), the
    candidates' count and the forwards run."""
    model.eval()
    gpt: Any = model  # a GPT2LMHeadModel
    config = gpt.config
    if getattr(config, "_attn_implementation", "eager") not in ("eager", "sdpa") or config.add_cross_attention:
        raise ValueError("secret_rank walks a plain GPT-2 (no cross-attention)")
    digits = DIGIT_TOKENS.to(device)
    depth, start = len(secret), len(prefix)
    if start + depth > config.n_positions:
        raise ValueError(f"a {start}-byte prefix and {depth} digits exceed the model's {config.n_positions} positions")
    reference = secret_log_prob(model, prefix, secret, device)
    threshold = reference - 1e-3  # a superset of what ranks above the secret
    blocks = len(gpt.transformer.h)
    heads, width = gpt.transformer.h[0].attn.num_heads, gpt.transformer.h[0].attn.head_dim
    empty = torch.zeros(heads, 0, width, device=device)
    shared: KV = [(empty, empty)] * blocks
    for position, token in enumerate(prefix):  # the prefix, once: its keys and values are every node's context
        lp, new = _step(model, torch.tensor([token], device=device), position, shared,
                        [(torch.zeros(1, 0, heads, width, device=device),) * 2] * blocks)
        shared = [(torch.cat([sk, k.reshape(heads, 1, width)], 1), torch.cat([sv, v.reshape(heads, 1, width)], 1))
                  for (sk, sv), (k, v) in zip(shared, new)]
    scores = torch.zeros(1, dtype=torch.float64, device=device)  # the nodes of the level: partial log probs
    codes = torch.zeros(1, dtype=torch.long, device=device)  # their digits as a number
    next_lp = lp[:, digits]  # [nodes, 10]: each node's next digit
    levels: list[tuple[torch.Tensor, KV]] = []  # per expanded level: parents and the nodes' keys and values
    forwards = len(prefix)
    for level in range(1, depth + 1):
        children = scores[:, None] + next_lp
        parent, digit = torch.nonzero(children > threshold, as_tuple=True)
        scores, codes = children[parent, digit], codes[parent] * 10 + digit
        if level == depth:
            break
        kept = level < depth - 1  # the last expanded level's keys and values are never attended to
        lps: list[torch.Tensor] = []
        made: list[KV] = []
        for begin in range(0, parent.numel(), chunk):
            rows = slice(begin, begin + chunk)
            ancestors, index = [], parent[rows]
            for parents, _ in reversed(levels):  # the chunk's ancestors, nearest first
                ancestors.append(index)
                index = parents[index]
            own: KV = []
            for layer in range(blocks):
                pair = []
                for part in (0, 1):  # keys, values: the ancestors' digits, oldest first
                    earlier = [levels[-1 - up][1][layer][part][at] for up, at in enumerate(ancestors)][::-1]
                    pair.append(torch.stack(earlier, 1) if earlier else
                                torch.zeros(int(index.numel()), 0, heads, width, device=device))
                own.append((pair[0], pair[1]))
            lp, new = _step(model, digits[digit[rows]], start + level - 1, shared, own)
            forwards += int(lp.shape[0])
            lps.append(lp[:, digits])
            if kept:
                made.append(new)
        next_lp = torch.cat(lps)
        if kept:
            levels.append((parent, [(torch.cat([m[layer][0] for m in made]), torch.cat([m[layer][1] for m in made]))
                                    for layer in range(blocks)]))
    true = scores[codes == int(secret)]
    if true.numel() != 1 or abs(float(true[0]) - reference) > 1e-3:
        raise RuntimeError(f"the walk of the candidates disagrees with the model's forward on the secret {secret}: "
                           f"{true.tolist()} against {reference}")
    rank = 1 + int((scores > true[0]).sum())
    candidates = 10 ** depth
    return {"rank": rank, "exposure_bits": math.log2(candidates) - math.log2(rank), "log_prob": float(true[0]),
            "candidates": candidates, "forwards": forwards, "expanded_leaves": int(scores.numel())}


def measure(model: torch.nn.Module, canaries: list[dict[str, Any]], data: dict[str, Any], device: torch.device,
            retained_sample: np.ndarray) -> dict[str, Any]:
    """One model's figures: per-canary exposure, the forget set's loss, held-out perplexity, retained loss."""
    started = time.perf_counter()
    ranked = [secret_rank(model, c["prefix"].encode(), c["secret"], device) for c in canaries]
    forget = mean_loss(model, data["train"][data["keys"]], device)
    heldout = mean_loss(model, data["heldout"], device)
    retained = mean_loss(model, data["train"][retained_sample], device)
    exposures = [r["exposure_bits"] for r in ranked]
    return {
        "exposure_bits": exposures, "mean_exposure_bits": float(np.mean(exposures)),
        "ranks": [r["rank"] for r in ranked],
        "secret_nll_nats": [-r["log_prob"] for r in ranked],
        "mean_secret_nll_nats": float(np.mean([-r["log_prob"] for r in ranked])),
        "forget_loss": forget, "heldout_loss": heldout, "heldout_ppl": math.exp(heldout), "retained_loss": retained,
        "rank_forwards": [r["forwards"] for r in ranked], "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------- the run


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: --quick's small ones where it is given, each checked."""
    chosen: dict[str, Any] = {name: getattr(args, name) for name in
                              ("steps", "batch_size", "seq_len", "canaries", "repeats", "epochs", "heldout", "keep",
                               "scales", "scale", "lr", "warmup", "seed", "device", "canary_at")}
    chosen.update(FULL_MODEL)
    if args.quick:  # its values replace the options left at their defaults; the model's size always
        defaults = parser_defaults()
        chosen.update({k: v for k, v in QUICK.items() if k not in defaults or getattr(args, k) == defaults[k]})
    if not 1 <= chosen["canaries"] <= len(FORMATS):
        raise SystemExit(f"--canaries must be from 1 to {len(FORMATS)} (one per format), got {chosen['canaries']}")
    for name in ("steps", "batch_size", "seq_len", "canaries", "repeats", "epochs", "heldout"):
        if int(chosen[name]) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {chosen[name]}")
    if not 0 < chosen["keep"] <= 1:
        raise SystemExit(f"--keep must be in (0, 1], got {chosen['keep']}")
    if chosen["warmup"] < 0:
        raise SystemExit(f"--warmup must be 0 or more steps, got {chosen['warmup']}")
    if not chosen["lr"] > 0:
        raise SystemExit(f"--lr must be positive, got {chosen['lr']}")
    for value in [chosen["scale"], *chosen["scales"]]:
        if not (math.isfinite(value) and value >= 0):
            raise SystemExit(f"scales must be finite and non-negative, got {value}")
    if chosen["seq_len"] > 1024:
        raise SystemExit(f"--seq-len {chosen['seq_len']}: the GPT-2 here has at most 1024 positions")
    per_epoch = chosen["steps"] * chosen["batch_size"] // chosen["epochs"]
    chosen["plain_windows"] = per_epoch - chosen["canaries"] * chosen["repeats"]
    if chosen["plain_windows"] < chosen["batch_size"]:
        raise SystemExit(f"--steps {chosen['steps']} x --batch-size {chosen['batch_size']} / --epochs "
                         f"{chosen['epochs']} = {per_epoch} samples an epoch leave too few stdlib windows beside "
                         f"{chosen['canaries']} x {chosen['repeats']} canary windows")
    return chosen


def main(args: argparse.Namespace) -> int:
    """Train with recording, retrain without the canaries, forget them; measure and write the report."""
    import gradstore
    from unlearn import create_recorder, forget_keys
    from unlearn.forgetting.removal import removal_vector
    from unlearn.forgetting.requests import finished_store
    from unlearn.params import flat_params, load_flat_params
    from unlearn.runs.config import PER_SAMPLE, UPDATE

    config = settings(args)
    device = torch.device(config["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed, seq_len = config["seed"], config["seq_len"]
    started = time.perf_counter()

    corpus = stdlib_corpus()
    (out / "corpus.json").write_text(json.dumps(corpus.identity, indent=1))
    canaries = canary_set(config["canaries"], seed)
    data = build_dataset(encode(corpus.text), canaries, seq_len, config["plain_windows"], config["repeats"],
                         config["heldout"], seed, config["canary_at"])
    train_set, keys = data["train"], data["keys"]
    train_sha = hashlib.sha256(train_set.tobytes()).hexdigest()
    (out / "canaries.json").write_text(json.dumps(
        {"canaries": canaries, "keys": keys.tolist(), "num_samples": len(train_set), "seq_len": seq_len,
         "train_sha256": train_sha, "corpus_sha256": corpus.sha256}, indent=1))
    retained_keys = np.setdiff1d(np.arange(len(train_set)), keys)
    retained_sample = np.random.default_rng([seed, 26]).choice(retained_keys, min(256, retained_keys.size),
                                                                replace=False)
    print(f"corpus: {len(corpus.files)} stdlib files, {len(corpus.text):,} bytes, sha256 {corpus.sha256[:16]}...; "
          f"training set {len(train_set)} windows of {seq_len} bytes ({keys.size} canary windows: "
          f"{config['canaries']} canaries x {config['repeats']}), {len(data['heldout'])} held-out windows")

    model_config = {"n_embd": config["n_embd"], "n_layer": config["n_layer"], "n_head": config["n_head"],
                        "n_positions": seq_len}
    model = build_gpt2(seed, **model_config)
    init = flat_params(model)
    num_params = init.size
    store_path = out / "store.h5"
    recorder = create_recorder(store_path, PER_SAMPLE, model, len(train_set), keep=config["keep"], codec="int8",
                               flavour=UPDATE, seed=seed, overwrite=True, data_sha256=train_sha)
    plan = batches(len(train_set), config["batch_size"], config["epochs"], seed, np.zeros(0, np.int64))
    print(f"training a GPT-2 of {num_params:,} parameters with recording (per-sample update rows, int8, "
          f"p = {config['keep']}), {len(plan)} steps")
    trained_run = train(model, train_set, plan, config["lr"], config["warmup"], device, recorder)
    trained = flat_params(model)

    retrain_plan = batches(len(train_set), config["batch_size"], config["epochs"], seed, keys)
    print(f"retraining from the same init without the {keys.size} canary windows, {len(retrain_plan)} steps")
    model = build_gpt2(seed, **model_config)
    retrained_run = train(model, train_set, retrain_plan, config["lr"], config["warmup"], device)
    retrained = flat_params(model)

    with gradstore.open(store_path) as store:
        rows = removal_vector(finished_store(store), keys)
        store_info = {"path": store_path.name, "bytes": store_path.stat().st_size, "k": int(store.k),
                      "num_keys": int(store.num_keys), "keep": float(store.keep), "codec": "int8", "flavour": UPDATE}
    model = build_gpt2(seed, **model_config).to(device)
    load_flat_params(model, trained)
    result = forget_keys(model, store_path, keys, scale=config["scale"])
    forgotten = flat_params(model)
    applied = forgotten.astype(np.float64) - trained
    expected = np.float32(config["scale"]) * rows.astype(np.float64)
    consistency = float(np.abs(applied - expected).max())
    for name, weights in (("trained", trained), ("retrained", retrained), ("forgotten", forgotten)):
        np.save(out / f"{name}.npy", weights, allow_pickle=False)

    models: dict[str, np.ndarray] = {"trained (recorded)": trained, "retrained without canaries": retrained,
                                     f"forget_keys, scale {config['scale']:g}": forgotten}
    for scale in config["scales"]:
        if scale != config["scale"]:
            models[f"rows x {scale:g} (not applied)"] = trained + np.float32(scale) * rows
    figures: dict[str, Any] = {}
    for name, weights in models.items():
        load_flat_params(model, weights)
        figures[name] = measure(model, canaries, data, device, retained_sample)
        f = figures[name]
        print(f"  {name}: exposure {f['mean_exposure_bits']:.2f} bits, forget loss {f['forget_loss']:.3f}, "
              f"held-out ppl {f['heldout_ppl']:.3f} ({f['seconds']:.0f} s)")
    report = {
        "settings": {**config, "model": {**model_config, "num_params": int(num_params), "vocab": "bytes + 3"},
                     "optimizer": "adam", "method": PER_SAMPLE, "flavour": UPDATE, "codec": "int8"},
        "corpus": {k: v for k, v in corpus.identity.items() if k != "files"},
        "train_sha256": train_sha,
        "canaries": [{k: c[k] for k in ("format", "secret", "keys")} for c in canaries],
        "exposure_method": "exact rank among all 10^6 candidates (prefix-shared tree walk with pruning)",
        "training": {"trained": {k: v for k, v in trained_run.items() if k != "losses"},
                     "retrained": {k: v for k, v in retrained_run.items() if k != "losses"}},
        "store": store_info,
        "forget_keys": {**result.report, "store": store_path.name, "max_abs_error_vs_rows": consistency},
        "distances": {"trained_to_retrained": float(np.linalg.norm(trained - retrained)),
                      "forgotten_to_retrained": float(np.linalg.norm(forgotten - retrained)),
                      "trained_to_forgotten": float(np.linalg.norm(forgotten - trained)),
                      "rows_norm": float(np.linalg.norm(rows))},
        "models": figures,
        "seconds": time.perf_counter() - started,
    }
    (out / "lm.json").write_text(json.dumps(report, indent=1))
    (out / "losses.json").write_text(json.dumps({"trained": trained_run["losses"],
                                                 "retrained": retrained_run["losses"]}))
    table = markdown(report)
    (out / "lm.md").write_text(table)
    print(table)
    return 0


def markdown(report: dict[str, Any]) -> str:
    """The report's table: one row per model."""
    lines = [("| model | exposure, bits (each canary) | mean exposure | secret NLL, nats | canary-window loss | "
             "held-out ppl | retained loss |"), "|---" * 7 + "|"]
    for name, f in report["models"].items():
        each = " / ".join(f"{e:.1f}" for e in f["exposure_bits"])
        lines.append(f"| {name} | {each} | {f['mean_exposure_bits']:.2f} | {f['mean_secret_nll_nats']:.2f} | "
                     f"{f['forget_loss']:.3f} | {f['heldout_ppl']:.3f} | {f['retained_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def parser_defaults() -> dict[str, Any]:
    """The options' defaults (--quick replaces those left at them)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return vars(parser.parse_args([]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m bench lm``."""
    parser.add_argument("--out", default="out/lm", help="run folder")
    parser.add_argument("--steps", type=int, default=600, help="training steps of the recorded model")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128, help="bytes per window (the model's positions)")
    parser.add_argument("--epochs", type=int, default=4,
                        help="passes over the training set (its size: steps x batch size / epochs)")
    parser.add_argument("--canaries", type=int, default=4, help=f"canaries, one per format (at most {len(FORMATS)})")
    parser.add_argument("--repeats", type=int, default=64, help="training windows holding each canary")
    parser.add_argument("--canary-at", choices=CANARY_AT, default="start",
                        help="where a canary's line sits in its windows: opening them, or after different text in "
                             "each (at a random offset)")
    parser.add_argument("--heldout", type=int, default=256, help="held-out windows (the corpus' last bytes)")
    parser.add_argument("--keep", type=float, default=0.01,
                        help="p: the fraction of each row recorded (0.01, the p of the project's targets: a row is "
                             "18.5 k int8 values of the 1.85 M, the store 36 MB)")
    parser.add_argument("--scale", type=float, default=1.0, help="forget_keys' scale (the rows' multiple applied)")
    parser.add_argument("--scales", type=float, nargs="*", default=[2.0, 3.0, 5.0, 10.0, 100.0],
                        help="further multiples of the rows evaluated (not applied to the store)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's peak learning rate")
    parser.add_argument("--warmup", type=int, default=50, help="steps of linear learning-rate warmup")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny model and run, in seconds (the test's)")
