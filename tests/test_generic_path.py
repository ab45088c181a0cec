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


# ---------------------------------------------------------------- what the generic path refuses or gets right (review)


def run_steps(model, x, y, batches, tmp_path, scale=1.0, keep=0.5):
    """Record ``batches`` through attach; the loss times ``scale``, .grad divided back before the step (what a
    GradScaler does). Returns (rows, positions, names)."""
    recorder = _store(tmp_path, model, "review", keep=keep, num_samples=x.shape[0])
    optimizer, _ = attach(model, torch.optim.SGD(model.parameters(), lr=0.0), None, [recorder])
    for keys in batches:
        optimizer.zero_grad()
        optimizer.set_batch(keys)
        (F.cross_entropy(model(x[keys]), y[keys]) * scale).backward()
        for p in model.parameters():
            p.grad /= scale
        optimizer.step()
    optimizer.finish()
    positions = gradstore.masks.positions_many(SEED, np.arange(x.shape[0]), recorder.store.num_params,
                                               recorder.store.k)
    return _rows(recorder.store), positions


def batch_func_rows(model, x, y, batches, positions):
    params = {name: p.detach() for name, p in model.named_parameters()}
    rows = np.zeros(positions.shape, np.float32)
    for keys in batches:
        for key in keys:
            loss = lambda p: F.cross_entropy(functional_call(model, p, (x[key:key + 1],)), y[key:key + 1]) / len(keys)  # noqa: E731
            flat = torch.cat([g.reshape(-1) for g in grad(loss)(params).values()])
            rows[key] = flat[torch.from_numpy(positions[key])].numpy()
    return rows


class Mix(nn.Module):
    """An attention-like layer of a user's, with a keyword [T, T] mask shared by the batch."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)

    def forward(self, x, *, mask):
        return torch.softmax((x @ self.w) @ x.transpose(-1, -2) + mask, -1) @ x


class Masked(nn.Module):
    def __init__(self, tokens=4, dim=6):
        super().__init__()
        self.inp, self.mix, self.out = nn.Linear(dim, dim), Mix(dim), nn.Linear(dim, 3)
        self.register_buffer("mask", torch.triu(torch.full((tokens, tokens), -1e4), 1))

    def forward(self, x):
        return self.out(self.mix(self.inp(x), mask=self.mask).mean(1))


def test_a_shared_input_whose_size_equals_a_later_batch_is_not_sliced(tmp_path):
    """The check (batch of 8) learns the [4, 4] mask is shared; the last batch has 4 samples: still shared."""
    torch.manual_seed(0)
    model = Masked()
    x, y = torch.randn(12, 4, 6), torch.randint(0, 3, (12,))
    batches = [np.arange(0, 8), np.arange(8, 12)]
    rows, positions = run_steps(model, x, y, batches, tmp_path)
    expected = batch_func_rows(model, x, y, batches, positions)
    for key in range(12):
        assert np.abs(rows[key] - expected[key]).max() <= 1e-4 * np.abs(expected[key]).max(), key


class Split(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)

    def forward(self, x):
        return x * 2, torch.tanh(x @ self.w)  # the gradient reaches w through the second output only


class UsesSecond(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.split, self.out = nn.Linear(5, 6), Split(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.split(self.inp(x))[1])


def test_a_generic_module_whose_other_outputs_carry_gradient_is_refused(tmp_path):
    model = UsesSecond()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with pytest.raises(UnsupportedModelError, match=r"split \(Split\) takes the generic path.*more tensors"):
        run_steps(model, x, y, [np.arange(8)], tmp_path)


class Late(nn.Module):
    """A generic module switched on after the first step: it never ran at the one-time check."""

    def __init__(self):
        super().__init__()
        self.inp, self.gate, self.out = nn.Linear(5, 6), Gate(6), nn.Linear(6, 3)
        self.use_gate = False

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(self.gate(h) if self.use_gate else h)


def test_a_generic_module_first_run_after_the_check_is_refused(tmp_path):
    model = Late()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    recorder = _store(tmp_path, model, "late", keep=0.5, num_samples=8)
    optimizer, _ = attach(model, torch.optim.SGD(model.parameters(), lr=0.0), None, [recorder])
    optimizer.set_batch(np.arange(4))
    F.cross_entropy(model(x[:4]), y[:4]).backward()
    optimizer.step()
    model.use_gate = True
    optimizer.zero_grad()
    optimizer.set_batch(np.arange(4, 8))
    with pytest.raises(UnsupportedModelError, match=r"gate \(Gate\) takes the generic path and first ran after"):
        model(x[4:])
    recorder.store.close()


class Branch(nn.Module):
    """alpha * tanh(x): autograd keeps tanh's output, not x, so an in-place change of x afterwards is legal."""

    def __init__(self, dim):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        return self.alpha * torch.tanh(x)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.gate, self.out = nn.Linear(5, 6), Branch(6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.inp(x)
        h += self.gate(h)  # changes the branch's input in place after the call
        return self.out(h)


def test_an_input_changed_in_place_after_the_call_is_refused(tmp_path):
    model = Residual()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with pytest.raises(UnsupportedModelError, match=r"gate\.alpha takes the generic path.*changed in place"):
        run_steps(model, x, y, [np.arange(8)], tmp_path)


class Bare(nn.Module):
    """Bare parameters only: every parameter takes the generic path, one of them serves as the probe."""

    def __init__(self, dim=6):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)
        self.w2 = nn.Parameter(torch.randn(3, dim) / dim ** 0.5)

    def forward(self, x):
        return torch.tanh(x @ self.w1.T) @ self.w2.T


def test_a_scaled_loss_is_taken_out_of_generic_rows_by_the_probe(tmp_path):
    torch.manual_seed(0)
    model = Bare()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    batches = [np.arange(0, 4), np.arange(4, 8)]
    rows, positions = run_steps(model, x, y, batches, tmp_path, scale=1024.0)
    expected = batch_func_rows(model, x, y, batches, positions)
    assert np.abs(rows - expected).max() <= 1e-4 * np.abs(expected).max()  # not 1024 times too large
