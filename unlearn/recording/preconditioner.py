"""The optimizer's preconditioner: what turns a sample's gradient into its update of the weights.

An ``update`` row is g_i times the multiplier m of the step (``update_preconditioner``
says which). The rows need m only at their kept positions: a few percent of M. Forming
m whole costs several passes over every parameter and a random gather of B·k entries
out of it each step (ResNet-18 at p = 0.01: 11.2 M parameters, 7.2 M entries);
``Preconditioner.at`` reads the optimizer's state at the kept positions only, in one
pass over the rows (a numba kernel on the CPU; torch gathers parameter by parameter
elsewhere).
"""

from typing import Any, Optional, Sequence

import numpy as np
import torch
from numba import njit, prange, typed

from gradstore.jit import parallel_and_serial

from ..errors import RecordingUsageError

_OPTIONS: dict[str, Any] = dict(cache=True, nogil=True)  # njit's options: Any for its overloads
_U = np.uint64  # unsigned indices: numba skips its negative-index check (see unlearn.recording.kernels)
# CPU tensors go through the numba kernels; False forces the torch path (a GPU's) everywhere.
USE_NUMBA = True
# Below this many entries a step's rows are scaled on one thread.
PARALLEL_MIN_ENTRIES = 1 << 16
# Positions the rows walk together (floats of optimizer state: 256 KB, within a core's L2).
WINDOW = 1 << 16


def _adam_like(optimizer):
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


class Preconditioner:
    """The multiplier m of one step, read after ``optimizer.step()``; ``at(positions)`` is m[positions].

    SGD: lr, times (1 - dampening) / (1 - momentum) with momentum (nesterov:
    1 + momentum * (1 - dampening) / (1 - momentum)). Adam/AdamW: lr / (sqrt(v_hat) + eps),
    v_hat = exp_avg_sq / (1 - beta2**t). Weight decay is not attributed to samples.
    The optimizer's state is read when ``at`` runs: call it before the next step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]):
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self.params = list(params)
        self.adam = _adam_like(optimizer)
        if not self.adam and not isinstance(optimizer, torch.optim.SGD):
            raise RecordingUsageError(f"the update flavour supports SGD, Adam and AdamW, not {type(optimizer).__name__}")
        rates, corrections, epsilons, states = [], [], [], []
        for p in self.params:
            group = group_of.get(id(p))
            if group is None:
                raise RecordingUsageError("a model parameter is not in the optimizer's param_groups")
            lr = float(group["lr"])
            if self.adam:
                state = optimizer.state[p]
                if "exp_avg_sq" not in state:
                    raise RecordingUsageError("Adam state missing: call the preconditioner after optimizer.step()")
                if group.get("amsgrad"):
                    raise RecordingUsageError("the update flavour does not support amsgrad")
                corrections.append(1 - group["betas"][1] ** float(state["step"]))
                epsilons.append(float(group["eps"]))
                states.append(state["exp_avg_sq"])
            else:
                momentum, dampening = group.get("momentum", 0.0), group.get("dampening", 0.0)
                if momentum and group.get("nesterov"):
                    lr = lr * (1 + momentum * (1 - dampening) / (1 - momentum))
                elif momentum:
                    lr = lr * (1 - dampening) / (1 - momentum)
            rates.append(lr)
        self.rates, self.corrections, self.epsilons, self.states = rates, corrections, epsilons, states
        self.offsets = np.cumsum([0] + [p.numel() for p in self.params]).astype(np.int64)

    def piece(self, index: int, flat_indices: torch.Tensor) -> torch.Tensor:
        """m at these indices of parameter ``index`` (a tensor of indices within it)."""
        if not self.adam:
            return torch.full(flat_indices.shape, self.rates[index], device=flat_indices.device)
        v_hat = self.states[index].reshape(-1).index_select(0, flat_indices) / self.corrections[index]
        return self.rates[index] / (v_hat.sqrt() + self.epsilons[index])

    def flat(self) -> torch.Tensor:
        """m whole, [M] (the reference; ``at`` reads only the kept positions)."""
        pieces = []
        for index, p in enumerate(self.params):
            if self.adam:
                v_hat = self.states[index] / self.corrections[index]
                pieces.append((self.rates[index] / (v_hat.sqrt() + self.epsilons[index])).reshape(-1))
            else:
                pieces.append(torch.full((p.numel(),), self.rates[index], dtype=p.dtype, device=p.device))
        return torch.cat(pieces)

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """m[positions] for [n, k] positions, each row sorted (as every mask's rows are)."""
        return self.times(positions, None)

    def times(self, positions: torch.Tensor, values: Optional[torch.Tensor]) -> torch.Tensor:
        """values * m[positions] ([n, k], rows sorted) in one pass; m[positions] when values is None."""
        if USE_NUMBA and positions.device.type == "cpu" and all(s.device.type == "cpu" and s.dtype == torch.float32
                                                                for s in self.states):
            rows = positions.numpy()
            factors = np.ones((1, 1), np.float32) if values is None else values.detach().float().numpy()
            out = np.empty(rows.shape, np.float32)
            if self.adam:
                states = _state_list(self.states)
                kernel = _adam_times_parallel if rows.size >= PARALLEL_MIN_ENTRIES else _adam_times_serial
                kernel(rows, self.offsets, states, np.array(self.rates), np.array(self.corrections),
                       np.array(self.epsilons), factors, values is not None, out)
            else:
                _constant_times(rows, self.offsets, np.array(self.rates, np.float32), factors, values is not None, out)
            return torch.from_numpy(out)
        flat_positions = positions.reshape(-1)
        gathered = torch.empty(flat_positions.shape, device=positions.device)
        index = torch.bucketize(flat_positions, torch.as_tensor(self.offsets[1:], device=positions.device), right=True)
        for q in torch.unique(index).tolist():
            where = torch.nonzero(index == q).reshape(-1)
            gathered[where] = self.piece(q, flat_positions[where] - int(self.offsets[q]))
        gathered = gathered.reshape(positions.shape)
        return gathered if values is None else values * gathered


_STATE_LISTS: dict[str, tuple] = {}  # the last optimizer's state as a numba list: Adam updates its tensors in place


def _state_list(states):
    """The state tensors as a numba typed list (building one costs more than the kernel on small models)."""
    key = tuple((id(s), s.data_ptr(), s.numel()) for s in states)
    cached = _STATE_LISTS.get("last")
    if cached is None or cached[0] != key:
        cached = _STATE_LISTS["last"] = (key, typed.List([s.detach().reshape(-1).numpy() for s in states]))
    return cached[1]


def update_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """The flat [M] multiplier m of the step just taken (see ``Preconditioner``)."""
    return Preconditioner(optimizer, params).flat()


def _adam_times_body(rows, offsets, states, rates, corrections, epsilons, factors, scale, out):
    """out[r, c] = (factors[r, c] if scale else 1) * rate / (sqrt(v[j] / correction) + eps), for the
    parameter holding position rows[r, c] and j its index within that parameter.

    The rows walk the state together, one cache-sized window of positions at a time: a row
    alone touches one float in a hundred, and all of them re-read what the others loaded.
    """
    n, k = rows.shape[0], _U(rows.shape[1])
    cursor = np.zeros(n, np.int64)
    for window in range(0, offsets[-1], WINDOW):
        window_stop = window + WINDOW
        for q in range(offsets.shape[0] - 1):
            start, stop = offsets[q], offsets[q + 1]
            if stop <= window or start >= window_stop:
                continue
            state = states[q]  # once per parameter and window: a typed list's item is not free
            correction, rate, eps = np.float32(corrections[q]), np.float32(rates[q]), np.float32(epsilons[q])
            last = min(stop, window_stop)
            for r in prange(n):
                row, out_row = rows[r], out[r]
                factor_row = factors[r] if scale else factors[0]
                c = _U(cursor[r])
                while c < k and row[c] < last:
                    m = rate / (np.sqrt(state[_U(row[c] - start)] / correction) + eps)
                    out_row[c] = factor_row[c] * m if scale else m
                    c += _U(1)
                cursor[r] = c


_adam_times_parallel, _adam_times_serial = parallel_and_serial(_adam_times_body, **_OPTIONS)


@njit(**_OPTIONS)
def _constant_times(rows, offsets, rates, factors, scale, out):
    for r in range(rows.shape[0]):
        q = 0
        for c in range(rows.shape[1]):
            while rows[r, c] >= offsets[q + 1]:
                q += 1
            out[r, c] = factors[r, c] * rates[q] if scale else rates[q]
