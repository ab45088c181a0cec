"""The recording defects of issue 22: rows are right or refused, never silently wrong.

Each model is small with random weights; the rows the masked engine records are compared
with torch.func per-sample gradients of the same loss (``test_engine``'s helpers).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_engine import DictImages, _rows, _store, assert_close, masked, reference
from unlearn import attach
from unlearn.recording.engine import MaskedEngine, UnsupportedModelError
from unlearn.runs.models import build_model

B, VOCAB, WIDTH, CLASSES = 6, 20, 8, 3


def _keys(batch):
    return np.array([11, 3, 40, 7, 25, 9, 31, 2, 17, 5])[:batch]


class SequenceModel(nn.Module):
    """Tokens [B, T] -> embedding -> a block of two Linears -> mean over time -> head.

    ``batch_first=False`` runs the block on [T, B, D] tensors (as nn.Transformer does by default),
    with a causal running mean over time between its Linears: the samples are then mixed along the
    first dimension of ``block.0.linear1`` and ``block.0.linear2``.
    """

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.block = nn.ModuleList([nn.ModuleDict({"linear1": nn.Linear(WIDTH, WIDTH), "linear2": nn.Linear(WIDTH, WIDTH)})])
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, idx):
        h = self.embed(idx)  # [B, T, D]
        time = 1 if self.batch_first else 0
        if not self.batch_first:
            h = h.transpose(0, 1)  # [T, B, D]
        layer = self.block[0]
        h = torch.tanh(layer["linear1"](h))
        steps = torch.arange(1, h.shape[time] + 1, dtype=h.dtype).reshape([-1 if d == time else 1 for d in range(3)])
        h = h.cumsum(time) / steps  # causal mean over time
        h = layer["linear2"](h)
        return self.head(h.mean(time))


@pytest.mark.parametrize("length", [B, B + 3], ids=["T==B", "T!=B"])
def test_sequence_first_linears_are_refused_by_path_and_batch_first_rows_equal_vmap(length):
    torch.manual_seed(0)
    x, y = torch.randint(0, VOCAB, (B, length)), torch.randint(0, CLASSES, (B,))
    model = SequenceModel(batch_first=False)
    with pytest.raises(UnsupportedModelError, match=r"block\.0\.linear1.*batch_first"):
        masked(model, lambda: F.cross_entropy(model(x), y), _keys(B), keep=0.3)
    assert all(p.grad is None for p in model.parameters())  # refused before the user's backward: nothing changed
    fixed = SequenceModel(batch_first=True)
    fixed.load_state_dict(model.state_dict())
    positions, values = masked(fixed, lambda: F.cross_entropy(fixed(x), y), _keys(B), keep=0.3)
    assert_close(values, reference(fixed, x, y, positions))


class PositionModel(nn.Module):
    """Token and position embeddings: positions shared by the batch, as [T] or as HF's [1, T] buffer."""

    def __init__(self, shared, length):
        super().__init__()
        self.shared = shared
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(length, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)
        self.register_buffer("position_ids", torch.arange(length).expand(1, -1), persistent=False)

    def forward(self, idx):
        length = idx.shape[1]
        if self.shared == "arange":
            pos = self.pos(torch.arange(length, device=idx.device))  # [T, D]
        else:
            pos = self.pos(self.position_ids[:, :length])  # [1, T, D]
        h = self.norm(self.tok(idx) + pos)
        return self.head(torch.tanh(self.proj(h)).mean(1))


@pytest.mark.parametrize("length", [B, B + 3], ids=["T==B", "T!=B"])
@pytest.mark.parametrize("shared", ["arange", "position_ids"])
def test_inputs_shared_by_the_batch_are_attributed_per_sample(shared, length):
    torch.manual_seed(0)
    model = PositionModel(shared, length)
    x, y = torch.randint(0, VOCAB, (B, length)), torch.randint(0, CLASSES, (B,))
    positions, values = masked(model, lambda: F.cross_entropy(model(x), y), _keys(B), keep=0.3)
    assert_close(values, reference(model, x, y, positions))
    out = model(x)  # outside recording the model is as it was
    assert out.shape == (B, CLASSES)


def test_subclass_of_a_supported_module_is_recorded():
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    class Gated(nn.Linear):  # a user's subclass with the same forward
        pass

    torch.manual_seed(0)
    model = nn.Sequential(NonDynamicallyQuantizableLinear(6, 8), nn.Tanh(), Gated(8, 4))
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    positions, values = masked(model, lambda: F.cross_entropy(model(x), y), _keys(5), keep=0.3)
    assert_close(values, reference(model, x, y, positions))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class Borrower(nn.Module):
    """Reads its child Linear's weight without calling the child, as MultiheadAttention does with out_proj."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        return F.linear(x.mean(1), self.inner.weight, self.inner.bias)


def test_a_parameter_used_without_calling_its_module_is_refused_by_path():
    """No hook sees such a use, so no handler computes it: refused by path, never an empty row."""
    torch.manual_seed(0)
    model = Borrower()
    x, y = torch.randn(4, 5, WIDTH), torch.randint(0, CLASSES, (4,))
    with pytest.raises(UnsupportedModelError, match=r"inner\.weight.*without calling"):
        masked(model, lambda: F.cross_entropy(model(x), y), _keys(4), keep=0.3)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.gain


def test_refusals_name_the_path_with_advice_that_fits_the_module():
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(3, 4), Scale()))
    model.add_module("rnn", nn.GRU(4, 4))
    with pytest.raises(UnsupportedModelError) as refused:
        MaskedEngine(model, [(0, 3)], sum(p.numel() for p in model.parameters()), generic=False)
    message = str(refused.value)
    assert "body.1 (Scale" in message and "rnn (GRU" in message
    assert "BatchNorm" not in message and "GroupNorm instead" not in message
    assert "engine='vmap'" in message

    bn = nn.Sequential()
    bn.add_module("features", nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    with pytest.raises(UnsupportedModelError, match=r"features\.1 \(BatchNorm2d.*GroupNorm"):
        MaskedEngine(bn, [(0, 3)], sum(p.numel() for p in bn.parameters()))

    attention = Attention()
    attention.attn.dropout = 0.1  # what its handler refuses: dropout inside the attention while training
    with pytest.raises(UnsupportedModelError, match=r"attn \(MultiheadAttention: its dropout.*dropout = 0\.0") as refused:
        MaskedEngine(attention, [(0, 3)], sum(p.numel() for p in attention.parameters()))
    assert "BatchNorm" not in str(refused.value)


def test_a_batch_that_disagrees_with_its_keys_names_the_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match=r"4 keys.*\[5, 3\].*first dimension"):  # keys named before the forward
        masked(model, lambda: F.cross_entropy(model(x), y), _keys(4))
    engine = MaskedEngine(model, [(0, 3)], sum(p.numel() for p in model.parameters()))
    try:
        F.cross_entropy(model(x), y).backward()  # keys named after it
        with pytest.raises(ValueError, match=r"module 2 \(Linear\).*5 samples.*4 keys"):
            engine.assign_unkeyed(_keys(4))
    finally:
        engine.close()


@pytest.mark.parametrize("engine", ["masked", "vmap"])
def test_dict_batches_on_both_engines(tmp_path, engine):
    """Hugging Face style dict batches: the vmap engine calls the model on the dict's one input
    (or ``model(**inputs)`` when there are several) and takes the targets from its label entry."""
    import gradstore

    torch.manual_seed(0)
    x, y = torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))
    model = build_model("simple", 1, 10, seed=3)
    recorder = _store(tmp_path, model, f"dicts-{engine}", num_samples=12)
    loader = torch.utils.data.DataLoader(DictImages(x, y), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    optimizer, loader = attach(model, torch.optim.SGD(model.parameters(), lr=0.0), loader, [recorder], engine=engine)
    for batch in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(batch["pixels"]), batch["label"]).backward()
        optimizer.step()
    optimizer.finish()
    positions = torch.from_numpy(gradstore.masks.positions_many(7, np.arange(12), recorder.store.num_params,
                                                                recorder.store.k))
    expected = reference(build_model("simple", 1, 10, seed=3), x, y, positions, scale=1.0 / 4)  # lr 0: unchanged
    np.testing.assert_allclose(_rows(recorder.store)[:12], expected.numpy(), rtol=1e-4, atol=1e-8)
    with gradstore.open(recorder.store.path) as store:
        np.testing.assert_array_equal(store.labels[:12], y.numpy())


class KeywordModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Linear(12, 6)
        self.extra = nn.Linear(3, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, pixels, extra):
        return self.head(torch.tanh(self.image(pixels) + self.extra(extra)))


def test_vmap_engine_calls_the_model_with_a_dict_batch_keywords(tmp_path):
    torch.manual_seed(0)
    pixels, extra, y = torch.randn(8, 12), torch.randn(8, 3), torch.randint(0, 4, (8,))
    data = [{"pixels": pixels[i], "extra": extra[i], "labels": y[i]} for i in range(8)]
    rows = {}
    for engine in ("masked", "vmap"):
        torch.manual_seed(1)
        model = KeywordModel()
        recorder = _store(tmp_path, model, f"kw-{engine}", num_samples=8)
        optimizer, loader = attach(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                   torch.utils.data.DataLoader(data, batch_size=4), [recorder], engine=engine)
        for batch in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(batch["pixels"], extra=batch["extra"]), batch["labels"]).backward()
            optimizer.step()
        optimizer.finish()
        rows[engine] = _rows(recorder.store)[:8]
        assert np.abs(rows[engine]).sum() > 0
    np.testing.assert_allclose(rows["masked"], rows["vmap"], rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------- the Embedding through the values() check


def autograd_rows(model, x, y, positions):
    """Plain autograd, one sample at a time: sample b's share CE_b / B of the batch's mean cross-entropy,
    at the kept positions (for what torch.func cannot run: max_norm's in-place renorm, sparse gradients)."""
    rows = []
    for b in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[b:b + 1]), y[b:b + 1]) / len(x), list(model.parameters()))
        flat = torch.cat([(g.to_dense() if g.is_sparse else g).reshape(-1) for g in grads])
        rows.append(flat[positions[b]])
    return torch.stack(rows)


class TiedTokens(nn.Module):
    """An embedding whose weight the head shares (tied): Embedding's values() and Linear's dense() add up."""

    def __init__(self, tied, **options):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH, **options)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.embed(idx))).mean(1))


EMBEDDINGS = {
    "padding_idx": dict(padding_idx=0),
    "max_norm": dict(max_norm=1.0),
    "padding_and_max_norm": dict(padding_idx=3, max_norm=0.5),
    "sparse": dict(sparse=True),
}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("options", EMBEDDINGS)
def test_embedding_options_pass_the_check_and_record_as_autograd(options, tied, monkeypatch):
    from unlearn.recording import engine as engine_module

    checked = []
    original = engine_module.check_positions
    monkeypatch.setattr(engine_module, "check_positions", lambda theirs: checked.append(theirs.numel()) or original(theirs))
    torch.manual_seed(0)
    model = TiedTokens(tied, **EMBEDDINGS[options])
    with torch.no_grad():
        model.embed.weight.mul_(2.0)  # rows above max_norm: the forward renorms them
    x = torch.arange(0, VOCAB, 2)[torch.randint(0, VOCAB // 2, (B, 5))]  # the perturbed check's tokens are new
    x[0, :2] = EMBEDDINGS[options].get("padding_idx", 0)
    y = torch.randint(0, VOCAB, (B,))
    plain = TiedTokens(tied, **EMBEDDINGS[options])
    plain.load_state_dict(model.state_dict())
    positions, values = masked(model, lambda: F.cross_entropy(model(x), y), _keys(B), keep=0.3)
    assert checked == [VOCAB * WIDTH]  # the embedding's weight went through the values() check
    F.cross_entropy(plain(x), y)  # the same forward without recording: the same renormed weights
    for mine, theirs in zip(model.parameters(), plain.parameters()):
        assert torch.equal(mine, theirs)  # the check's perturbed rerun renormed no other row
    assert_close(values, autograd_rows(model, x, y, positions))


class Tripled(nn.Embedding):
    """A subclass of a supported module whose forward is not its base's: recorded as an Embedding, 3x off."""

    def forward(self, idx):
        return super().forward(idx) * 3


class TripledModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = Tripled(VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, idx):
        return self.head(torch.tanh(self.tok(idx)).mean(1))


def test_an_embedding_subclass_whose_forward_scales_is_refused_by_path():
    torch.manual_seed(0)
    model = TripledModel()
    x, y = torch.randint(0, VOCAB, (B, 5)), torch.randint(0, CLASSES, (B,))
    with pytest.raises(UnsupportedModelError, match=r"differs from autograd's for: tok\.weight \(relative error 0\.67"):
        masked(model, lambda: F.cross_entropy(model(x), y), _keys(B), keep=0.3)
    assert all(p.grad is None for p in model.parameters())  # refused before the user's backward


class KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.body(input=x)))


def test_a_module_called_with_its_input_as_a_keyword_is_refused_by_path():
    torch.manual_seed(0)
    model = KeywordCall()
    x, y = torch.randn(4, 4), torch.randint(0, 2, (4,))
    with pytest.raises(UnsupportedModelError, match=r"cannot see the input of: body \(Linear\).*positional"):
        masked(model, lambda: F.cross_entropy(model(x), y), _keys(4))
