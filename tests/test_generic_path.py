"""The generic path: modules no registered handler serves (a user's layer, a ViT's bare nn.Parameters) record through
torch.func on that module alone. Rows against torch.func's per-sample gradients of the user's own loss at the kept
positions; refusals where the recomputation cannot reproduce the forward; the plan says which path each module takes.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import gradstore
from test_engine import SEED, _rows, _store
from unlearn import attach, recording_plan
from unlearn.errors import UnsupportedModelError
from unlearn.recording.engine import MaskedEngine
from unlearn.recording.handlers.generic import GENERIC

N, B = 8, 4


class TinyViT(nn.Module):
    """A ViT in miniature: patches by a Linear, a bare cls_token concatenated and a bare pos_embed added in the
    root's forward, a TransformerEncoderLayer (nn.MultiheadAttention), a head on the cls token."""

    def __init__(self, patches=4, patch_dim=6, dim=8, classes=3):
        super().__init__()
        self.patch = nn.Linear(patch_dim, dim)
        self.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, patches + 1, dim))
        self.block = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.block(tokens))[:, 0])


class Gate(nn.Module):
    """A user's layer with a weight and a bias of its own, called with a keyword argument."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(dim))

    def forward(self, x, *, scale=1.0):
        return torch.sigmoid(x @ self.weight.T + self.bias) * x * scale


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.gate = Gate(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.gate(torch.tanh(self.inp(x)), scale=torch.tensor(0.5)))


def data(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N, *shape, generator=generator), torch.randint(0, 3, (N,), generator=generator)


def record(tmp_path, model, x, y, keep=0.3):
    recorder = _store(tmp_path, model, "generic", keep=keep, num_samples=N)
    optimizer, _ = attach(model, torch.optim.SGD(model.parameters(), lr=0.0), None, [recorder])
    for keys in (np.arange(0, B), np.arange(B, N)):
        optimizer.zero_grad()
        optimizer.set_batch(keys)
        F.cross_entropy(model(x[keys]), y[keys]).backward()  # a mean over the batch: each sample's share is 1/B
        optimizer.step()
    plan = optimizer.recording_plan()
    optimizer.finish()
    positions = gradstore.masks.positions_many(SEED, np.arange(N), recorder.store.num_params, recorder.store.k)
    return _rows(recorder.store)[:N], positions, plan


def func_rows(model, x, y, positions):
    params = {name: p.detach() for name, p in model.named_parameters()}
    rows = np.zeros(positions.shape, np.float32)
    for key in range(N):
        loss = lambda p: F.cross_entropy(functional_call(model, p, (x[key:key + 1],)), y[key:key + 1]) / B  # noqa: E731
        flat = torch.cat([g.reshape(-1) for g in grad(loss)(params).values()])
        rows[key] = flat[torch.from_numpy(positions[key])].numpy()
    return rows


def assert_rows_close(rows, expected):
    assert np.abs(expected).max() > 0
    for key in range(N):
        scale = np.abs(expected[key]).max()
        assert scale > 0
        error = np.abs(rows[key] - expected[key]).max() / scale
        assert error <= 1e-4, f"sample {key}: relative error {error:.2e}"


def test_a_vit_with_bare_parameters_records_its_cls_token_and_pos_embed(tmp_path):
    torch.manual_seed(0)
    model = TinyViT()
    x, y = data((4, 6))
    rows, positions, plan = record(tmp_path, model, x, y)
    assert_rows_close(rows, func_rows(model, x, y, positions))
    assert plan["model"] == GENERIC  # the root: its own cls_token and pos_embed
    assert plan["patch"] == "LinearHandler" and plan["block.self_attn"] == "MultiheadAttentionHandler"
    assert plan["norm"] == "LayerNormHandler"
    # the bare parameters' entries are among the rows, and non-zero: the generic path computed them
    offsets = np.cumsum([0] + [p.numel() for p in model.parameters()])
    names = [n for n, _ in model.named_parameters()]
    first, stop = offsets[names.index("cls_token")], offsets[names.index("pos_embed") + 1]
    assert ((positions >= first) & (positions < stop) & (rows != 0)).any()


def test_a_users_layer_called_with_a_keyword_records_through_the_generic_path(tmp_path):
    torch.manual_seed(1)
    model = WithGate()
    x, y = data((5,), seed=1)
    rows, positions, plan = record(tmp_path, model, x, y, keep=0.5)
    assert_rows_close(rows, func_rows(model, x, y, positions))
    assert plan == {"inp": "LinearHandler", "gate": GENERIC, "out": "LinearHandler"}


def test_the_generic_path_forms_large_parameters_a_block_at_a_time(tmp_path, monkeypatch):
    from unlearn.recording.handlers import base, generic

    monkeypatch.setattr(generic, "WHOLE_FLOATS", 1)  # never whole: per parameter, a block of samples at a time
    monkeypatch.setattr(base, "DENSE_BLOCK_FLOATS", 40)  # blocks of one sample (the gate's weight has 36 entries)
    torch.manual_seed(1)
    model = WithGate()
    x, y = data((5,), seed=1)
    rows, positions, _ = record(tmp_path, model, x, y, keep=0.5)
    assert_rows_close(rows, func_rows(model, x, y, positions))


def test_dropout_inside_a_generic_module_while_training_is_refused_naming_it():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return F.dropout(x * self.gain, 0.5, self.training)

    model = nn.Sequential(nn.Linear(3, 4), Noisy(), nn.Linear(4, 2))
    engine = MaskedEngine(model, [(SEED, 3)], sum(p.numel() for p in model.parameters()))
    try:
        with pytest.raises(UnsupportedModelError, match=r"1\.gain takes the generic path.*random.*dropout"):
            engine.begin_batch(np.arange(4))
            model(torch.randn(4, 3))
    finally:
        engine.close()
    model.eval()  # no dropout: recorded
    engine = MaskedEngine(model, [(SEED, 3)], sum(p.numel() for p in model.parameters()))
    engine.begin_batch(np.arange(4))
    model(torch.randn(4, 3)).sum().backward()
    assert engine.plan["1"] == GENERIC
    engine.close()


def test_without_the_generic_path_the_module_is_refused_and_the_plan_says_so():
    model = WithGate()
    with pytest.raises(UnsupportedModelError, match=r"gate \(Gate, parameters weight, bias\).*register a handler"):
        recording_plan(model, generic=False)
    assert recording_plan(model)["gate"] == GENERIC
    model.gate.requires_grad_(False)  # frozen: nothing to record, no path
    assert recording_plan(model) == {"inp": "LinearHandler", "out": "LinearHandler"}
