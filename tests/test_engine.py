"""The masked engine against the torch.func reference, and attach() as a drop-in."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradstore
from gradstore import keep_to_k
from unlearn.recording.handlers import base as layers
from unlearn import PerSampleRecorder, StepRecorder, attach, create_recorder
from unlearn.recording.engine import MaskBatch, MaskedEngine, UnsupportedModelError
from unlearn.runs.models import build_model
from unlearn.recording.per_sample import per_sample_grads

SEED = 7


def masked(model, batch_loss, keys, keep=0.05, backwards=1):
    """(positions, values) the engine records for one step of ``batch_loss()`` backwards."""
    num_params = sum(p.numel() for p in model.parameters())
    mask = (SEED, keep_to_k(keep, num_params))
    engine = MaskedEngine(model, [mask], num_params)
    try:
        engine.begin_batch(keys)
        for _ in range(backwards):
            batch_loss().backward()
        _, _, per_mask = engine.step_values()
        return per_mask[mask]
    finally:
        engine.close()


def reference(model, x, y, positions, loss_fn=None, scale=None):
    full = per_sample_grads(model, x, y, loss_scale=1.0 / len(x) if scale is None else scale, loss_fn=loss_fn)
    return torch.gather(full, 1, positions)


def assert_close(values, expected):
    error = (values - expected).abs().max() / expected.abs().max()
    assert error <= 1e-5, f"relative error {error:.2e}"


class TokenModel(nn.Module):
    """Embedding + LayerNorm + Linear over a sequence, the embedding used twice (adds up)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16, padding_idx=0)
        self.norm = nn.LayerNorm(16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, idx):
        h = self.embed(idx) + 0.5 * self.embed(idx.flip(1))
        return self.head(torch.tanh(self.mix(self.norm(h))).mean(1))


class ConvZoo(nn.Module):
    """Convolutions with stride, dilation, groups, 'same' and reflect padding, and a Conv1d."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.b = nn.Conv2d(6, 6, 3, dilation=2, groups=3, padding="same")
        self.c = nn.Conv2d(6, 4, (2, 3), padding=1, padding_mode="reflect", bias=False)
        self.d = nn.Conv1d(4, 4, 3, stride=2, groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.c(F.relu(self.b(F.relu(self.a(x))))))
        h = self.d(h.mean(2))
        return self.head(self.gn(h).mean(2))


PATHS = {  # (handlers.base.USE_NUMBA, handlers.base.DENSE_SHARE): each way a weight's entries are computed
    "numba": (True, 2.0),  # CPU kernels, entry by entry
    "torch": (False, 2.0),  # torch gathers (the GPU path)
    "dense": (True, 0.0),  # dense per-sample blocks, gathered
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["simple", "convs", "tokens"])
def test_rows_equal_vmap_at_kept_positions(name, path, monkeypatch):
    monkeypatch.setattr(layers, "USE_NUMBA", PATHS[path][0])
    monkeypatch.setattr(layers, "DENSE_SHARE", PATHS[path][1])
    torch.manual_seed(0)
    if name == "simple":
        model, x, y = build_model("simple", 1, 10), torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    elif name == "convs":
        model, x, y = ConvZoo(), torch.randn(5, 2, 11, 12), torch.randint(0, 3, (5,))
    else:
        model, x, y = TokenModel(), torch.randint(0, 50, (5, 7)), torch.randint(0, 5, (5,))
        x[0, :3] = 0  # padding tokens get no gradient
    keys = np.array([11, 3, 40, 7, 25, 9])[: len(x)]
    positions, values = masked(model, lambda: F.cross_entropy(model(x), y), keys, keep=0.2)
    assert_close(values, reference(model, x, y, positions))


def test_resnet18_groupnorm_equals_vmap():
    torch.manual_seed(0)
    model = build_model("resnet18", 1, 10)
    x, y = torch.randn(3, 1, 28, 28), torch.randint(0, 10, (3,))
    positions, values = masked(model, lambda: F.cross_entropy(model(x), y), np.array([5, 1, 8]), keep=0.01)
    assert_close(values, reference(model, x, y, positions))


@pytest.mark.parametrize("loss", ["sum", "smoothing"])
def test_losses_sum_and_label_smoothing(loss):
    torch.manual_seed(1)
    model, x, y = build_model("simple", 1, 10), torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    keys = np.arange(5)
    if loss == "sum":
        positions, values = masked(model, lambda: F.cross_entropy(model(x), y, reduction="sum"), keys)
        expected = reference(model, x, y, positions, scale=1.0)
    else:
        positions, values = masked(model, lambda: F.cross_entropy(model(x), y, label_smoothing=0.1), keys)
        expected = reference(model, x, y, positions, loss_fn=lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1))
    assert_close(values, expected)


def test_mask_batch_splits_every_position_once_by_parameter():
    rng = np.random.default_rng(0)
    offsets = np.array([0, 5, 5, 40, 41, 100])
    positions = np.sort(np.stack([rng.choice(100, 30, replace=False) for _ in range(4)]), 1)
    batch = MaskBatch(positions, offsets, torch.device("cpu"))
    pieces = {index: [t.numpy() for t in batch.pieces(index)] for index in range(5) if batch.count(index)}
    seen = np.zeros(positions.size, bool)
    for index, (b, j, out) in pieces.items():
        assert np.all(np.diff(b) >= 0)
        assert np.array_equal(positions.reshape(-1)[out], j + offsets[index])
        assert np.all((j >= 0) & (j < offsets[index + 1] - offsets[index]))
        seen[out] = True
    assert seen.all() and 1 not in pieces


def test_refuses_batchnorm_and_unsupported_modules_naming_them():
    with pytest.raises(UnsupportedModelError, match=r"bn .*BatchNorm2d.*GroupNorm.*vmap"):
        MaskedEngine(_with_bn(), [(0, 3)], 1)
    frozen = _with_bn().eval()
    frozen.bn.requires_grad_(False)  # frozen statistics and affine: samples do not interact
    MaskedEngine(frozen, [(0, 3)], 20).close()  # the conv's 20 parameters: frozen ones are not indexed

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.gain

    model = nn.Sequential(nn.Linear(3, 3), Scale())
    with pytest.raises(UnsupportedModelError, match=r"1 \(Scale, parameters gain\)"):
        MaskedEngine(model, [(0, 3)], 15, generic=False)  # without the generic path (tests/test_generic_path.py)
    model[1].gain.requires_grad_(False)  # frozen: nothing to attribute, and not indexed
    MaskedEngine(model, [(0, 3)], 12, generic=False).close()


def _with_bn():
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(1, 2, 3))
    model.add_module("bn", nn.BatchNorm2d(2))
    return model


def _store(tmp_path, model, name, keep=0.1, num_samples=64, flavour="grad", method="per-sample", steps=None):
    return create_recorder(tmp_path / f"{name}.h5", method, model, num_samples, steps, keep=keep, codec="fp32",
                           flavour=flavour, seed=SEED)


def _rows(store):
    """Every key's row, zeros where nothing was recorded."""
    with gradstore.open(store.path) as opened:
        rows = np.zeros((opened.num_keys, opened.k), np.float32)
        live = np.flatnonzero(opened.state == gradstore.RowState.LIVE)
        rows[live] = opened.read(live)
        return rows


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    results = []
    for micro in (1, 2):
        model = build_model("simple", 1, 10, seed=3)
        recorder = _store(tmp_path, model, f"acc{micro}")
        optimizer, _ = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), None, [recorder])
        optimizer.zero_grad()
        for part in range(micro):
            rows = slice(part * 8 // micro, (part + 1) * 8 // micro)
            optimizer.set_batch(np.arange(8)[rows], y[rows])
            (F.cross_entropy(model(x[rows]), y[rows]) / micro).backward()
        optimizer.step()
        optimizer.finish()
        results.append((_rows(recorder.store)[:8], [p.detach().clone() for p in model.parameters()]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-7)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_set_batch_after_backward_and_repeated_keys(tmp_path):
    """Keys given after the backward, and a sample twice in one step: one summed row."""
    torch.manual_seed(0)
    model = build_model("simple", 1, 10, seed=3)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    recorder = _store(tmp_path, model, "late")
    optimizer, _ = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), None, [recorder])
    F.cross_entropy(model(x), y, reduction="sum").backward()
    optimizer.set_batch([5, 6, 5, 9])
    optimizer.step()
    optimizer.finish()
    rows = _rows(recorder.store)
    positions = gradstore.masks.positions_many(SEED, np.array([5, 6, 5, 9]), recorder.store.num_params, recorder.store.k)
    expected = reference(build_model("simple", 1, 10, seed=3), x, y, torch.from_numpy(positions), scale=1.0)
    np.testing.assert_allclose(rows[5], (expected[0] + expected[2]).numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(rows[9], expected[3].numpy(), rtol=1e-4, atol=1e-7)


def test_attach_returns_a_torch_optimizer_for_schedulers(tmp_path):
    torch.manual_seed(0)
    model = build_model("simple", 1, 10)
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    recorder = _store(tmp_path, model, "sched", num_samples=32, flavour="update")
    optimizer, loader = attach(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), loader, [recorder])
    assert isinstance(optimizer, torch.optim.Optimizer)
    schedulers = [torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)]
    for epoch in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        schedulers[0].step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    state = optimizer.state_dict()
    optimizer.load_state_dict(state)
    assert optimizer.state_dict()["param_groups"][0]["lr"] == pytest.approx(0.05)
    for scheduler in (torch.optim.lr_scheduler.OneCycleLR(optimizer, 1.0, total_steps=10),
                      torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 5)):
        scheduler.step()
    optimizer.finish()
    with gradstore.open(recorder.store.path) as store:
        assert (store.state == gradstore.RowState.LIVE).sum() == 32


def test_grad_scaler_skipped_step_records_nothing_and_rows_are_unscaled(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    plain_model = build_model("simple", 1, 10, seed=3)
    plain = _store(tmp_path, plain_model, "plain")
    optimizer, _ = attach(plain_model, torch.optim.SGD(plain_model.parameters(), lr=0.1), None, [plain])
    optimizer.set_batch([0, 1, 2, 3])
    F.cross_entropy(plain_model(x), y).backward()
    optimizer.step()
    optimizer.finish()

    model = build_model("simple", 1, 10, seed=3)
    recorder = _store(tmp_path, model, "scaled")
    optimizer, _ = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), None, [recorder])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer.zero_grad()
        optimizer.set_batch([10, 11, 12, 13])
        scaler.scale(F.cross_entropy(model(x), y) * float("inf")).backward()  # inf: the step is skipped
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        optimizer.set_batch([0, 1, 2, 3])
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(optimizer)
        scaler.update()
    optimizer.finish()
    rows, expected = _rows(recorder.store), _rows(plain.store)
    assert not rows[10:14].any()  # the skipped step recorded nothing
    with gradstore.open(recorder.store.path) as store:
        assert (store.state[10:14] != gradstore.RowState.LIVE).all()
    np.testing.assert_allclose(rows[:4], expected[:4], rtol=1e-4, atol=1e-8)


def test_step_recorders_and_vmap_engine_through_attach(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    rows = {}
    for engine in ("masked", "vmap"):
        model = build_model("simple", 1, 10, seed=3)
        recorder = _store(tmp_path, model, engine, num_samples=8, flavour="update")
        layer = create_recorder(tmp_path / f"layer-{engine}.h5", "layer", model, 8, 1, keep=0.1, codec="fp32", seed=1)
        data = torch.utils.data.TensorDataset(x, y)
        optimizer, loader = attach(model, torch.optim.Adam(model.parameters(), 1e-3),
                                   torch.utils.data.DataLoader(data, batch_size=8), [recorder, layer], engine=engine)
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        optimizer.finish()
        rows[engine] = (_rows(recorder.store), _rows(layer.store))
        assert isinstance(recorder, PerSampleRecorder) and isinstance(layer, StepRecorder)
    np.testing.assert_allclose(rows["masked"][0], rows["vmap"][0], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(rows["masked"][1], rows["vmap"][1], rtol=1e-5, atol=1e-9)


def test_clipped_step_rows_are_the_clipped_share(tmp_path):
    """clip_grad_norm_ scales the step's gradient by c: rows carry the same c."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    rows, factor = {}, None
    for clip in (False, True):
        model = build_model("simple", 1, 10, seed=3)
        recorder = _store(tmp_path, model, f"clip{clip}")
        optimizer, _ = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), None, [recorder])
        optimizer.set_batch([0, 1, 2, 3])
        F.cross_entropy(model(x), y).backward()
        if clip:
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01))
            factor = 0.01 / (norm + 1e-6)
        optimizer.step()
        optimizer.finish()
        rows[clip] = _rows(recorder.store)[:4]
    assert factor < 0.5
    np.testing.assert_allclose(rows[True], rows[False] * factor, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("share", [0.0, 2.0])
def test_several_masks_share_one_pass(share, monkeypatch):
    """Recorders with different p and seeds are served by one backward, each at its own positions."""
    monkeypatch.setattr(layers, "DENSE_SHARE", share)
    torch.manual_seed(0)
    model, x, y = ConvZoo(), torch.randn(4, 2, 11, 12), torch.randint(0, 3, (4,))
    num_params = sum(p.numel() for p in model.parameters())
    mask_specs = [(1, keep_to_k(0.3, num_params)), (2, keep_to_k(0.05, num_params))]
    engine = MaskedEngine(model, mask_specs, num_params)
    engine.begin_batch(np.array([3, 1, 4, 2]))
    F.cross_entropy(model(x), y).backward()
    _, _, per_mask = engine.step_values()
    engine.close()
    for mask in mask_specs:
        positions, values = per_mask[mask]
        assert_close(values, reference(model, x, y, positions))


class DictImages(torch.utils.data.Dataset):
    """Batches of any structure: here dicts, as Hugging Face datasets give."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        return {"pixels": self.x[index], "label": self.y[index]}


def test_dict_batches_through_the_wrapped_loader_keep_keys_and_labels(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))
    model = build_model("simple", 1, 10, seed=3)
    recorder = _store(tmp_path, model, "dicts", num_samples=12)
    loader = torch.utils.data.DataLoader(DictImages(x, y), batch_size=5, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    optimizer, loader = attach(model, torch.optim.SGD(model.parameters(), lr=0.0), loader, [recorder])
    for batch in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(batch["pixels"]), batch["label"], reduction="sum").backward()
        optimizer.step()
    optimizer.finish()
    positions = torch.from_numpy(gradstore.masks.positions_many(SEED, np.arange(12), recorder.store.num_params,
                                                                recorder.store.k))
    expected = reference(build_model("simple", 1, 10, seed=3), x, y, positions, scale=1.0)  # lr 0: weights unchanged
    np.testing.assert_allclose(_rows(recorder.store)[:12], expected.numpy(), rtol=1e-4, atol=1e-7)
    with gradstore.open(recorder.store.path) as store:
        np.testing.assert_array_equal(store.labels[:12], y.numpy())


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.1),
    "nesterov": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, eps=1e-6),
}


@pytest.mark.parametrize("use_numba", [True, False])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_preconditioner_at_kept_positions_equals_the_whole_one_gathered(monkeypatch, name, use_numba):
    """Update rows read the optimizer's state at their kept positions only; the whole multiplier,
    gathered, is the reference. Two parameter groups with their own lr; every parameter's range."""
    from unlearn.recording import preconditioner

    monkeypatch.setattr(preconditioner, "USE_NUMBA", use_numba)
    monkeypatch.setattr(preconditioner, "PARALLEL_MIN_ENTRIES", 64)  # the parallel kernel too
    torch.manual_seed(0)
    model = build_model("simple", 1, 10)
    params = list(model.parameters())
    optimizer = OPTIMIZERS[name]([{"params": params[:2]}, {"params": params[2:], "lr": 0.03}])
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    num_params = sum(p.numel() for p in params)
    positions = torch.from_numpy(gradstore.masks.positions_many(SEED, np.arange(6), num_params, 2_000))
    values = torch.randn(positions.shape)
    multiplier = preconditioner.Preconditioner(optimizer, params)
    whole = multiplier.flat()
    torch.testing.assert_close(multiplier.at(positions), whole[positions], rtol=1e-6, atol=0)
    torch.testing.assert_close(multiplier.times(positions, values), values * whole[positions], rtol=1e-6, atol=0)
    assert len(set(np.searchsorted(np.cumsum([p.numel() for p in params]), positions.numpy().ravel(),
                                   side="right"))) == len(params)  # every parameter had kept positions
