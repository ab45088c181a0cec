"""What every layer handler shares: the ``Handler`` interface, ``Capture`` and the tunables.

A layer's per-sample weight gradient is built from its input ``a`` and the gradient
``delta`` at its output (Opacus' grad samplers and LoGra use the same decomposition):
Linear  g_b[o, i]       = sum_t delta[b, t, o] * a[b, t, i]
Conv    g_b[o, c, kpos] = sum_l delta[b, o, l] * unfold(a)[b, c, kpos, l]
Embed.  g_b[v, d]       = sum_{t: idx[b, t] = v} delta[b, t, d]
The recording store keeps only a few entries per sample, so a handler computes just
those: ``values(capture, name, b, j)`` gives g_b[j] for each pair (sample b, flat index j
of the parameter), at a cost proportional to the number of pairs, never a [B, numel]
tensor for a weight. Biases and norm affines are as small as the layer's output, so
their per-sample gradients are formed whole (``dense``) and gathered.

The tunables below are read at call time (tests and benchmarks set them here:
``unlearn.recording.handlers.base.USE_NUMBA``).
"""

from __future__ import annotations

from typing import Callable, ClassVar, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ...errors import UnsupportedModelError

# The fallback every refusal ends with.
VMAP_HELP = "or record with engine='vmap' (slower, any module torch.func supports)"

# Bound on the temporary [pairs, L] rows (floats) a weight handler gathers at once.
PAIR_CHUNK_FLOATS = 1 << 23
# CPU tensors go through the numba kernels (no temporaries); False forces the torch path everywhere.
USE_NUMBA = True
# Above this share of a weight's entries kept per sample, a dense per-sample product (a
# batched GEMM over a few samples at a time, then a gather) beats computing the entries one
# by one: measured on SimpleModel's conv2 on this project's 2-core CPU (docs/RESULTS.md).
DENSE_SHARE = 0.04
# Bound on the dense per-sample block (floats): samples at a time x the weight's size.
DENSE_BLOCK_FLOATS = 1 << 22

Pairs = tuple[torch.Tensor, torch.Tensor]  # (b, j): sample and flat index within the parameter, int64
DenseBlocks = tuple[Callable[[int, int], torch.Tensor], int, int]  # (dense_of(first, stop), batch, numel)


def gather_dense_blocks(dense_of: Callable[[int, int], torch.Tensor], batch: int, numel: int,
                        pieces: Sequence[Pairs]) -> list[torch.Tensor]:
    """g_b[j] for each piece's pairs from ``dense_of(first, stop)`` -> [stop - first, numel]:
    a few samples at a time, each block formed once for every piece (every recording mask)."""
    block = max(1, DENSE_BLOCK_FLOATS // max(1, numel))
    starts = list(range(0, batch, block))
    outs, bounds = [], []
    for b, _ in pieces:
        outs.append(torch.empty(b.numel(), device=b.device))
        bounds.append(torch.searchsorted(b, torch.tensor(starts + [batch], device=b.device)).tolist())
    for index, first in enumerate(starts):
        if all(edges[index] == edges[index + 1] for edges in bounds):
            continue
        dense = dense_of(first, min(batch, first + block)).reshape(-1)
        for (b, j), out, edges in zip(pieces, outs, bounds):
            lo, hi = edges[index], edges[index + 1]
            if lo < hi:
                out[lo:hi] = dense.index_select(0, (b[lo:hi] - first) * numel + j[lo:hi])
    return outs


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A float32 C-contiguous numpy view (or copy) for the numba kernels."""
    return tensor.detach().to(torch.float32).contiguous().numpy()


def on_cpu(*tensors: torch.Tensor) -> bool:
    """Whether the numba kernels serve these tensors (all on the CPU, and not switched off)."""
    return USE_NUMBA and all(t.device.type == "cpu" for t in tensors)


class Capture:
    """One call of a module: its positional inputs (``inputs[0]`` the first) and the gradient at its
    output, as float32."""

    def __init__(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor):
        self.module = module
        self.inputs = inputs
        self.delta = grad_output.float()


def sum_rows_dot(left: torch.Tensor, right: torch.Tensor, left_rows: torch.Tensor,
                 right_rows: torch.Tensor) -> torch.Tensor:
    """(left[left_rows] * right[right_rows]).sum(1), in chunks that bound the temporaries."""
    width = left.shape[1]
    step = max(1, PAIR_CHUNK_FLOATS // max(1, width))
    pieces = []
    for start in range(0, left_rows.numel(), step):
        stop = start + step
        pieces.append((left.index_select(0, left_rows[start:stop]) * right.index_select(0, right_rows[start:stop])).sum(1))
    return torch.cat(pieces) if pieces else left.new_zeros(0)


def gather(dense: torch.Tensor, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """dense[b, j] for the pairs, dense [B, n]."""
    return dense.reshape(-1).index_select(0, b * dense.shape[1] + j)


class Handler:
    """Per-sample gradient entries of one module type (register one with ``register_handler``).

    A subclass implements ``dense`` (enough for small parameters) and, for weights,
    ``values`` (entry by entry, cost per pair); the rest are optional speed-ups. A handler may
    give ``values`` only (``dense`` raising NotImplementedError, as the Embedding's): the engine's
    one-time check then compares ``values`` with autograd at a few thousand positions of one
    sample; any other failure there refuses the module by path. Names are
    the parameter's name within the module ("weight", "bias"), or a claimed child's dotted
    name ("out_proj.weight", see ``claims``). Every handler gives an ``example`` that the
    contract test (tests/test_handler_registry.py) checks against torch.func.
    """

    # Dotted names, relative to the module, of child parameters this handler computes rows for:
    # parameters the module's forward uses without calling the child that holds them (as
    # nn.MultiheadAttention uses out_proj.weight). The child's own handler then leaves them alone.
    claims: ClassVar[tuple[str, ...]] = ()
    # Whether the engine hooks the module's whole call: its keyword arguments too (the Capture's inputs are
    # ``inputs(module, args, kwargs)``) and an output that is a tuple by its first tensor (nn.MultiheadAttention's
    # (output, weights)), that tensor's batch along ``batch_dim(module)``. False: the module must return one
    # tensor (a module returning a tuple is not hooked) and the Capture gets its positional inputs.
    tuple_output: ClassVar[bool] = False

    def inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        """The Capture's inputs for one call (``tuple_output`` handlers only): every tensor with the batch
        along its first dimension, or shared by the batch (no batch dimension); the first the main input."""
        return args

    def batch_dim(self, module: nn.Module) -> int:
        """Where the batch is in the first tensor of the module's output (``tuple_output`` handlers only):
        the engine hands the handler, and checks, that tensor and its gradient with the batch moved first."""
        return 0

    def claimed(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """(dotted name, parameter) of the children's parameters this handler computes rows for."""
        found = []
        for name in self.claims:
            owner_path, _, leaf = name.rpartition(".")
            try:
                owner = module.get_submodule(owner_path) if owner_path else module
            except AttributeError as error:
                raise UnsupportedModelError(
                    f"{type(self).__name__} claims {name!r}, but the {type(module).__name__} it records has no "
                    f"submodule {owner_path!r}. Fix: the handler's claims name the module's own children") from error
            param = dict(owner.named_parameters(recurse=False, remove_duplicate=False)).get(leaf)
            if param is not None:  # an absent bias claims nothing
                found.append((name, param))
        return found

    def refusal(self, module: nn.Module) -> Optional[str]:
        """Why this module, though of a handled type, cannot be recorded, with the fix; None when it can."""
        return None

    @classmethod
    def example(cls, module_type: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
        """A small module of ``module_type`` and a batch of >= 2 inputs for it: what the contract test checks."""
        raise NotImplementedError(f"{cls.__name__} gives no example for {module_type.__name__}")

    def values(self, capture: Capture, name: str, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """g_b[j] for each pair: float32 [len(b)]."""
        return gather(self.dense(capture, name), b, j)

    def values_many(self, capture: Capture, name: str, pieces: Sequence[Pairs]) -> list[torch.Tensor]:
        """``values`` for several sets of pairs (one per recording mask), sharing the work they can."""
        blocks = self.dense_blocks(capture, name)
        if blocks is not None:
            dense_of, batch, numel = blocks
            if sum(b.numel() for b, _ in pieces) >= DENSE_SHARE * batch * numel:
                return gather_dense_blocks(dense_of, batch, numel, pieces)
        elif self.formed_whole(name):
            dense = self.dense(capture, name)
            return [gather(dense, b, j) for b, j in pieces]
        return [self.values(capture, name, b, j) for b, j in pieces]

    def adds_rows(self, capture: Capture, name: str, pairs: int) -> bool:
        """Whether ``add_rows`` serves this parameter now (CPU kernels, few entries kept)."""
        return False

    def add_rows(self, capture: Capture, name: str, positions: np.ndarray, first: np.ndarray, stop: np.ndarray,
                 offset: int, values: np.ndarray) -> None:
        """values[r, c] += g_r[positions[r, c] - offset] for c in first[r]:stop[r] (numpy, in place)."""
        raise NotImplementedError(f"{type(self).__name__} adds no rows in place (adds_rows is False)")

    def dense_blocks(self, capture: Capture, name: str) -> Optional[DenseBlocks]:
        """(dense_of(first, stop), batch, numel) when a weight's per-sample gradients can be formed
        a few samples at a time: cheaper than entry by entry once enough entries are kept."""
        return None

    def formed_whole(self, name: str) -> bool:
        """Whether this parameter's per-sample gradients are always formed whole (small: biases, norms)."""
        return name == "bias"

    def dense(self, capture: Capture, name: str) -> torch.Tensor:
        """Per-sample gradients of the parameter: float32 [B, numel] (small parameters only)."""
        raise NotImplementedError(f"{type(self).__name__} forms no dense per-sample gradient for {name!r}")

    def dense_is_cheap(self, name: str) -> bool:
        """Whether ``dense`` is cheap enough for this parameter to serve as the engine's probe (engine.Probe)."""
        return name == "bias"


class NormHandler(Handler):
    """Affine parameters of a normalization (LayerNorm, GroupNorm, RMSNorm): as small as a channel, always
    formed whole."""

    def formed_whole(self, name: str) -> bool:
        return True

    def dense_is_cheap(self, name: str) -> bool:
        return True

    @classmethod
    def example(cls, module_type: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
        """A norm over the last two dimensions (LayerNorm's and RMSNorm's signature; GroupNorm has its own)."""
        return module_type((3, 5)), torch.randn(4, 2, 3, 5, generator=torch.Generator().manual_seed(0))
