"""RecordingOptimizer.step(closure) and the Lightning callback (issue 23, "loops people use").

Rows are checked against torch.func per-sample gradients of the user's own loss, or bit for
bit against the no-closure path; never against the engine itself.
"""

import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import gradstore
from unlearn import attach, create_recorder
from unlearn.errors import RecordingUsageError

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target, dtype=torch.int64)


def _rows(path):
    """Every key's row (zeros where nothing was recorded) and the live keys."""
    with gradstore.open(path) as opened:
        rows = np.zeros((opened.num_keys, opened.k), np.float32)
        live = np.flatnonzero(opened.state == gradstore.RowState.LIVE)
        rows[live] = opened.read(live)
        positions = {int(key): opened.positions(int(key)) for key in live}
        return rows, live, positions


def _reference(model, params, x, y, scale):
    """torch.func per-sample gradients of scale * cross_entropy of each sample, flat in parameter order."""
    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None]) * scale

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads[name].reshape(len(x), -1) for name in params], 1).numpy()


# ---------------------------------------------------------------- step(closure)


def _train(tmp_path, name, optimizer_class, use_closure, flavour, steps=3):
    x, y = _digits()
    data = torch.utils.data.TensorDataset(x[:16 * steps], y[:16 * steps])
    model = _mlp()
    recorder = create_recorder(tmp_path / f"{name}.h5", "per-sample", model, len(data), keep=0.1, codec="fp32",
                               flavour=flavour, seed=3)
    optimizer, loader = attach(model, optimizer_class(model.parameters(), lr=0.05), 
                               torch.utils.data.DataLoader(data, batch_size=16), [recorder])
    returned, losses = [], []
    for xb, yb in loader:
        if use_closure:
            def closure():
                optimizer.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                losses.append(loss)
                return loss

            returned.append(optimizer.step(closure))
        else:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    optimizer.finish()
    return _rows(recorder.store.path)[0], [p.detach().clone() for p in model.parameters()], returned, losses


@pytest.mark.parametrize("optimizer_class,flavour", [(torch.optim.SGD, "grad"), (torch.optim.SGD, "update"),
                                                     (torch.optim.Adam, "update"), (torch.optim.Adam, "grad")])
def test_step_with_a_closure_records_what_the_plain_step_records(tmp_path, optimizer_class, flavour):
    plain, plain_params, _, _ = _train(tmp_path, "plain", optimizer_class, False, flavour)
    rows, params, returned, losses = _train(tmp_path, "closure", optimizer_class, True, flavour)
    assert np.array_equal(rows, plain), "rows of step(closure) differ from the no-closure path's"
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params))
    assert len(losses) == 3, "the closure is called once per step"
    assert all(r is l for r, l in zip(returned, losses)), "step returns the closure's loss"
    assert np.abs(rows).sum(1).astype(bool).sum() == 48


def test_step_with_a_closure_rows_are_torch_func_per_sample_gradients(tmp_path):
    x, y = _digits()
    model = _mlp(1)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    recorder = create_recorder(tmp_path / "ref.h5", "per-sample", model, 16, keep=0.1, codec="fp32",
                               flavour="grad", seed=5)
    optimizer, _ = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), None, [recorder])
    keys = np.arange(16)[::-1].copy()

    def closure():
        optimizer.zero_grad()
        optimizer.set_batch(keys)
        loss = F.cross_entropy(model(x[:16]), y[:16])
        loss.backward()
        return loss

    optimizer.step(closure)
    optimizer.finish()
    rows, live, positions = _rows(recorder.store.path)
    assert sorted(live) == list(range(16))
    reference = _reference(model, params, x[:16], y[:16], 1 / 16)
    for b, key in enumerate(keys):
        np.testing.assert_allclose(rows[key], reference[b][positions[key]], rtol=1e-4, atol=1e-7)


def test_lbfgs_records_the_first_evaluation_only(tmp_path):
    x, y = _digits()
    model = _mlp(2)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    recorder = create_recorder(tmp_path / "lbfgs.h5", "per-sample", model, 16, keep=0.1, codec="fp32",
                               flavour="grad", seed=5)
    optimizer, _ = attach(model, torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), None, [recorder])
    optimizer.set_batch(np.arange(16))
    calls = []

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[:16]), y[:16])
        loss.backward()
        calls.append(loss)
        return loss

    returned = optimizer.step(closure)
    optimizer.finish()
    assert len(calls) > 1, "LBFGS evaluates again: the test needs it"
    assert returned is calls[0]
    rows, live, positions = _rows(recorder.store.path)
    reference = _reference(model, params, x[:16], y[:16], 1 / 16)
    for key in range(16):
        np.testing.assert_allclose(rows[key], reference[key][positions[key]], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- Lightning

pl = pytest.importorskip("lightning.pytorch")
from unlearn.integrations.lightning import RecordingCallback  # noqa: E402


class Digits(pl.LightningModule):
    def __init__(self, through_forward=True):
        super().__init__()
        self.net = _mlp(4)
        self.through_forward = through_forward
        self.seen = []  # the batches training_step got, in order

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((x.clone(), y.clone()))
        logits = self(x) if self.through_forward else self.net(x)
        return F.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(callback, **options):
    return pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], **options)


def _index_of(x_all):
    lookup = {row.numpy().tobytes(): i for i, row in enumerate(x_all)}
    return lambda xb: np.array([lookup[row.numpy().tobytes()] for row in xb])


def _fit(tmp_path, accumulate=1, **module_options):
    x, y = _digits()
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    module = Digits(**module_options)
    initial = {name: p.detach().clone() for name, p in module.named_parameters()}
    callback = RecordingCallback(tmp_path / "lightning.h5", keep=0.1, codec="fp32", flavour="grad", seed=7)
    _trainer(callback, accumulate_grad_batches=accumulate).fit(module, loader)
    return module, initial, callback, x


@pytest.mark.parametrize("accumulate,prefetch", [(1, 0), (2, 0), (1, 3)])
def test_lightning_callback_records_every_sample_with_torch_func_rows(tmp_path, monkeypatch, accumulate, prefetch):
    if prefetch:  # Lightning fetches ahead when the loader's length is unknown: the loader runs ahead of the hooks
        from lightning.pytorch.loops import fetchers

        monkeypatch.setattr(fetchers, "sized_len", lambda _: None)
        monkeypatch.setattr(fetchers._PrefetchDataFetcher.__init__, "__defaults__", (prefetch,))
        fetched = []
        original_next = fetchers._DataFetcher.__next__

        def counting_next(self):
            batch = original_next(self)
            fetched.append(len(self.batches) if hasattr(self, "batches") else 0)
            return batch

        monkeypatch.setattr(fetchers._DataFetcher, "__next__", counting_next)
    module, initial, callback, x_all = _fit(tmp_path, accumulate)
    if prefetch:
        assert max(fetched) >= 2, "the test needs batches fetched ahead of training_step"
    assert callback.store.finished
    rows, live, positions = _rows(callback.store.path)
    assert live.tolist() == list(range(len(x_all))), "one live row per training sample"
    index_of = _index_of(x_all)
    # the first optimizer step: the first `accumulate` batches, all at the initial weights;
    # Lightning divides each batch's loss by accumulate_grad_batches
    first = module.seen[:accumulate]
    assert len({int(k) for xb, _ in first for k in index_of(xb)}) == 16 * accumulate
    shuffled = False
    for xb, yb in first:
        keys = index_of(xb)
        shuffled |= keys.tolist() != list(range(keys[0], keys[0] + 16))
        reference = _reference(module.net, {n[len("net."):]: p for n, p in initial.items()}, xb, yb,
                               1 / (16 * accumulate))
        for b, key in enumerate(keys):
            np.testing.assert_allclose(rows[key], reference[b][positions[key]], rtol=1e-4, atol=1e-7)
    assert shuffled, "the loader shuffles: keys are not batch positions"
    # the trainer's optimizer is the module's own again
    assert type(module.trainer.optimizers[0]) is torch.optim.SGD


def test_lightning_refuses_a_training_step_that_bypasses_the_module_and_leaves_no_rows(tmp_path):
    with pytest.raises(RecordingUsageError, match="did not call the LightningModule itself"):
        _fit(tmp_path, through_forward=False)
    with gradstore.open(tmp_path / "lightning.h5") as opened:
        assert not opened.finished
        assert not (opened.state == gradstore.RowState.LIVE).any()


def test_lightning_section_of_recording_md_runs_as_written(tmp_path, monkeypatch):
    doc = os.path.join(ROOT, "docs", "RECORDING.md")
    with open(doc, encoding="utf-8") as handle:
        text = handle.read()
    section = text[text.index("\n## Lightning\n"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, doc, "exec"), namespace)  # noqa: S102
    assert namespace["callback"].store.finished
