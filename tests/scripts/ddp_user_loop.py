"""A user's own DistributedDataParallel loop with `attach()` (run by tests/test_distributed.py).

`python ddp_user_loop.py OUT` under torchrun: DistributedSampler, 16 samples a rank, the
user's mean loss, DDP. `python ddp_user_loop.py OUT --reference`: one process stepping
on the same global batches (the union of the ranks' batches), the reference store.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from unlearn import attach
from unlearn.runs import data as datasets
from unlearn.runs.models import build_model
from unlearn.recording.recorders import create_recorder

RANKS, PER_RANK, SEED = 2, 16, 5


def main(out, reference):
    split = datasets.load_dataset("digits")
    dataset = TensorDataset(torch.as_tensor(split.train_x[:512]), torch.as_tensor(split.train_y[:512]))
    samplers = [DistributedSampler(dataset, num_replicas=RANKS, rank=rank, shuffle=True, seed=SEED) for rank in range(RANKS)]
    if reference:
        shares = [list(sampler) for sampler in samplers]
        batches = [sum((share[i : i + PER_RANK] for share in shares), []) for i in range(0, len(shares[0]), PER_RANK)]
        loader = DataLoader(dataset, batch_sampler=batches)
    else:
        dist.init_process_group("gloo")
        loader = DataLoader(dataset, batch_size=PER_RANK, sampler=samplers[dist.get_rank()])
    model = build_model("simple", split.in_channels, split.num_classes, seed=0)
    network = model if reference else torch.nn.parallel.DistributedDataParallel(model)
    recorder = create_recorder(f"{out}/store.h5", "per-sample", model, len(dataset), keep=0.1, codec="fp32",
                               flavour="grad", seed=0)
    optimizer, loader = attach(network, torch.optim.Adam(model.parameters(), 1e-3), loader, [recorder])
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(network(x), y).backward()
        optimizer.step()
    optimizer.finish()
    if not reference:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], "--reference" in sys.argv)
