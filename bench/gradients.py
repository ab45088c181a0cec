"""Real per-sample gradients for storage benchmarks: the seed's CNN on real MNIST.

Computed once per process (at initialisation and after a short training) and
reused by every configuration, so configurations differ only in what they store.
"""

import time

import torch

from unlearn.runs.data import load_dataset
from unlearn.runs.models import build_model
from unlearn.recording.per_sample import per_sample_grads

BATCH = 64


def mnist_gradients(num_samples, train_steps=200, seed=0, log=print, dataset="mnist"):
    """{'init': float32 [n, M], 'trained': float32 [n, M]}, with the 1/B of the mean loss.

    The samples are the first ``num_samples`` training images of ``dataset`` (MNIST, or
    scikit-learn's bundled digits: the same CNN, M = 95,110, on 8x8 inputs); 'trained' is
    after ``train_steps`` Adam(1e-3) steps of batch 64 on the images that follow them
    (digits: on all of its training images, as it has too few to hold out).
    """
    torch.manual_seed(seed)
    split = load_dataset(dataset)
    images, labels = split.train_x, split.train_y
    if num_samples > len(labels):
        raise ValueError(f"{dataset} has {len(labels)} training images; asked for {num_samples}")
    x = torch.from_numpy(images[:num_samples])
    y = torch.from_numpy(labels[:num_samples])
    model = build_model("simple", 1, 10, seed=seed)
    started = time.perf_counter()
    grads = {"init": per_sample_grads(model, x, y, loss_scale=1 / BATCH).numpy()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    held_out = num_samples if len(labels) - num_samples >= 10 * BATCH else 0
    rest_x = torch.from_numpy(images[held_out:])
    rest_y = torch.from_numpy(labels[held_out:])
    generator = torch.Generator().manual_seed(seed)
    for _ in range(train_steps):
        batch = torch.randint(0, rest_x.shape[0], (BATCH,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(rest_x[batch]), rest_y[batch]).backward()
        optimizer.step()
    grads["trained"] = per_sample_grads(model, x, y, loss_scale=1 / BATCH).numpy()
    log(f"per-sample gradients ({dataset}): {num_samples} samples x {grads['init'].shape[1]} params, "
        f"init + after {train_steps} steps, {time.perf_counter() - started:.1f} s")
    return grads
