"""`python -m bench codecs`: the measurements behind two design choices.

1. The default int8 block size: bytes per value (all-in, on disk) against error.
2. How error grows with epochs: the store (lossless runs, one quantization at
   finalize) against quantizing each epoch's contribution and summing.

`python -m bench codecs --packed`: the sub-byte codecs' block sizes instead (issue 25):
bytes per value before zstd (raw parts) and on disk, against error, next to int8's.
"""

import json
from pathlib import Path

import numpy as np
import torch

import gradstore
from gradstore.codecs import Int8Block
from unlearn.runs.data import load_mnist
from unlearn.runs.models import build_model
from unlearn.recording.per_sample import per_sample_grads

from .gradients import BATCH, mnist_gradients
from .store import entropy_bytes_per_value, masked_rows

BLOCKS = [32, 64, 128, 256, 512, 1024, None]  # None: one scale per row


def rel_error(decoded, exact):
    return float(np.mean(np.linalg.norm(decoded - exact, axis=1) / np.maximum(np.linalg.norm(exact, axis=1), 1e-30)))


def block_size_table(rows, num_params, keep, out_dir, seed=0):
    n, k = rows.shape
    table = []
    for block in BLOCKS:
        for rounding in ("nearest", "stochastic"):
            codec = Int8Block(block or k, rounding)
            path = Path(out_dir) / f"block-{block or 'row'}-{rounding}.h5"
            store = gradstore.create(path, num_params, n, keep, codec=codec.get_config(), seed=seed, overwrite=True)
            store.accumulate(np.arange(n), rows)
            store = store.finalize()
            decoded = store.read(np.arange(n))
            table.append({
                "block_size": block or "row",
                "rounding": rounding,
                "bytes_per_value": store.info()["bytes_per_value"],
                "entropy_bytes_per_value": entropy_bytes_per_value(codec, rows, np.arange(n), seed),
                "rel_l2_error": rel_error(decoded, rows),
            })
            store.close()
    return table


PACKED_CODECS = ["int8", "int4", "int4-stochastic", "int2", "sign"]


def packed_block_table(rows, num_params, keep, out_dir, seed=0, codecs=PACKED_CODECS, blocks=BLOCKS):
    """Per (codec, block): raw bytes per value (the parts before zstd), bytes per value on disk (all-in),
    and the mean row relative L2 error and cosine against the rows."""
    n, k = rows.shape
    table = []
    exact = rows.astype(np.float64)
    for codec_id in codecs:
        for block in blocks:
            config = {"id": codec_id, "block_size": block or k}
            path = Path(out_dir) / f"packed-{codec_id}-{block or 'row'}.h5"
            store = gradstore.create(path, num_params, n, keep, codec=config, seed=seed, overwrite=True)
            store.accumulate(np.arange(n), rows)
            store = store.finalize()
            decoded = store.read(np.arange(n)).astype(np.float64)
            raw = sum(part.width * part.dtype.itemsize for part in store.parts) / k
            cosine = (decoded * exact).sum(1) / np.maximum(np.linalg.norm(decoded, axis=1) * np.linalg.norm(exact, axis=1), 1e-300)
            table.append({"codec": codec_id, "block_size": block or "row", "raw_bytes_per_value": raw,
                          "bytes_per_value": store.info()["bytes_per_value"], "rel_l2_error": rel_error(decoded, exact),
                          "cosine": float(np.mean(cosine))})
            store.close()
            path.unlink()
    return table


def epoch_gradients(num_samples, epochs, steps_between=50, seed=0):
    """Per-sample gradients of the same samples at ``epochs`` points of one training run."""
    torch.manual_seed(seed)
    images, labels = load_mnist(split="train")
    x, y = torch.from_numpy(images[:num_samples]), torch.from_numpy(labels[:num_samples])
    rest_x, rest_y = torch.from_numpy(images[num_samples:]), torch.from_numpy(labels[num_samples:])
    model = build_model("simple", 1, 10, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    snapshots = []
    for _ in range(epochs):
        snapshots.append(per_sample_grads(model, x, y, loss_scale=1 / BATCH).numpy())
        for _ in range(steps_between):
            batch = torch.randint(0, rest_x.shape[0], (BATCH,), generator=generator)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(rest_x[batch]), rest_y[batch]).backward()
            optimizer.step()
    return snapshots


def epoch_growth_table(snapshots, keep, out_dir, seed=0):
    n, num_params = snapshots[0].shape
    per_epoch = [masked_rows(g, seed, keep) for g in snapshots]
    keys = np.arange(n)
    table = []
    for epochs in (1, 2, 4, 8):
        if epochs > len(per_epoch):
            break
        exact = np.sum([rows.astype(np.float64) for rows in per_epoch[:epochs]], axis=0)
        path = Path(out_dir) / f"epochs-{epochs}.h5"
        store = gradstore.create(path, num_params, n, keep, codec="int8", seed=seed, overwrite=True)
        for rows in per_epoch[:epochs]:
            store.accumulate(keys, rows)
            store.commit()  # one lossless run per epoch, as a big store would spill
        store = store.finalize()
        row = {"epochs": epochs, "store (runs, quantize once)": rel_error(store.read(keys), exact)}
        store.close()
        for rounding in ("nearest", "stochastic"):
            # the alternative design: keep the row quantized and requantize the running sum each epoch
            codec = Int8Block(rounding=rounding)
            running = np.zeros(exact.shape, np.float32)
            for e, rows in enumerate(per_epoch[:epochs]):
                running = codec.decode(codec.encode(running + rows, keys + e * n, seed))
            row[f"requantize each epoch ({rounding})"] = rel_error(running, exact)
        table.append(row)
    return table


def main(args):
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gradients = mnist_gradients(args.samples)["trained"]
    rows = masked_rows(gradients, 0, args.keep)
    if args.packed:
        table = packed_block_table(rows, gradients.shape[1], args.keep, out_dir)
        print(f"sub-byte codecs' block size (trained gradients, p={args.keep}, {args.samples} rows, one epoch):")
        print(f"{'codec':>16}{'block':>7}{'raw B/v':>9}{'disk B/v':>9}{'rel.err':>9}{'cosine':>8}")
        for r in table:
            print(f"{r['codec']:>16}{r['block_size']:>7}{r['raw_bytes_per_value']:>9.3f}{r['bytes_per_value']:>9.3f}"
                  f"{r['rel_l2_error']:>9.4f}{r['cosine']:>8.4f}")
        with open(out_dir / "codecs-packed-results.json", "w") as handle:
            json.dump({"keep": args.keep, "samples": args.samples, "block_size": table}, handle, indent=2)
        return 0
    blocks = block_size_table(rows, gradients.shape[1], args.keep, out_dir)
    print(f"int8 block size (trained gradients, p={args.keep}, {args.samples} rows, all-in bytes on disk):")
    print(f"{'block':>7}{'rounding':>12}{'B/value':>9}{'entropy':>9}{'rel.err':>9}")
    for r in blocks:
        print(f"{r['block_size']:>7}{r['rounding']:>12}{r['bytes_per_value']:>9.3f}{r['entropy_bytes_per_value']:>9.3f}{r['rel_l2_error']:>9.4f}")
    growth = epoch_growth_table(epoch_gradients(args.samples // 4, 8), args.keep, out_dir)
    print("\nrelative L2 error of the summed row against the exact float64 sum, int8 (default block):")
    names = [key for key in growth[0] if key != "epochs"]
    print(f"{'epochs':>7}" + "".join(f"{name:>36}" for name in names))
    for r in growth:
        print(f"{r['epochs']:>7}" + "".join(f"{r[name]:>36.4f}" for name in names))
    with open(out_dir / "codecs-results.json", "w") as handle:
        json.dump({"block_size": blocks, "epoch_growth": growth}, handle, indent=2)
    return 0


def add_arguments(parser):
    parser.add_argument("--out", default="out/bench-codecs", help="directory for the stores written")
    parser.add_argument("--samples", type=int, default=1024, help="MNIST samples")
    parser.add_argument("--keep", type=float, default=0.1, help="keep fraction p")
    parser.add_argument("--packed", action="store_true",
                        help="the sub-byte codecs' (int4, int4-stochastic, int2, sign) block sizes next to int8's, only")
