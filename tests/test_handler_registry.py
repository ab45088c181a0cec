"""The handler registry: every registered handler's example against torch.func, handlers from outside
the package (end to end through attach and a real store), claimed children, and the refusals' advice."""

import contextlib
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradstore
from test_engine import PATHS, SEED, _rows, _store, assert_close, masked
from unlearn import attach
from unlearn.errors import UnlearnError, UnsupportedModelError
from unlearn.recording import Capture, Handler, register_handler, registered_handlers, unregister_handler
from unlearn.recording.engine import ADVICE, MaskedEngine, advice_for
from unlearn.recording.handlers import base, handler_for
from unlearn.recording.per_sample import per_sample_grads

REGISTERED = registered_handlers()  # at collection: the package's handlers
KEYS = np.array([11, 3, 40, 7, 25, 9])


def projection_loss(out, target):
    """A per-sample loss for any output shape: tanh of the output against a fixed random direction."""
    return (torch.tanh(out.reshape(out.shape[0], -1)) * target).sum()


def reference_rows(model, x, targets, positions):
    """torch.func per-sample gradients of ``projection_loss``, at the kept positions."""
    full = per_sample_grads(model, x, targets, loss_scale=1.0, loss_fn=projection_loss)
    return torch.gather(full, 1, positions)


def example_rows(module, x, keep=0.3):
    """(engine values, torch.func values) at the kept positions for one module and batch."""
    with torch.no_grad():
        for p in module.parameters():  # away from the constructors' ones and zeros
            p.add_(0.3 * torch.randn_like(p))
    targets = torch.randn(x.shape[0], module(x[:1]).numel())
    positions, values = masked(module, lambda: projection_loss(module(x), targets), KEYS[:len(x)], keep=keep)
    return values, reference_rows(module, x, targets, positions)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("module_type", list(REGISTERED), ids=lambda t: t.__name__)
def test_every_registered_handler_records_its_example_as_torch_func_does(module_type, path, monkeypatch):
    monkeypatch.setattr(base, "USE_NUMBA", PATHS[path][0])
    monkeypatch.setattr(base, "DENSE_SHARE", PATHS[path][1])
    torch.manual_seed(0)
    handler = REGISTERED[module_type]
    module, x = type(handler).example(module_type)
    assert isinstance(module, module_type) and x.shape[0] >= 2
    values, expected = example_rows(module, x)
    assert expected.abs().max() > 0
    assert_close(values, expected)


def test_subclasses_find_the_nearest_registered_base():
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    class Wide(nn.Conv2d):
        pass

    assert handler_for(NonDynamicallyQuantizableLinear(2, 2)) is REGISTERED[nn.Linear]
    assert handler_for(Wide(1, 1, 1)) is REGISTERED[nn.Conv2d]
    assert handler_for(nn.ReLU()) is None


class Scale(nn.Module):
    """y = x * w, w broadcast along the last dimension: a module the package knows nothing of."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * self.weight


class ScaleHandler(Handler):
    """g_b = sum over the sample's other dimensions of delta * x."""

    @classmethod
    def example(cls, module_type):
        return Scale(5), torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))

    def formed_whole(self, name):
        return True

    def dense(self, capture, name):
        x = capture.inputs[0].float()
        return (capture.delta * x).reshape(x.shape[0], -1, x.shape[-1]).sum(1)


@contextlib.contextmanager
def registered(module_type, handler_class):
    """``handler_class`` registered for ``module_type`` as user code would, unregistered after: the registry as before."""
    before = registered_handlers()
    register_handler(module_type)(handler_class)
    try:
        yield
    finally:
        unregister_handler(module_type)
        assert registered_handlers() == before


@pytest.fixture
def scale_handler():
    with registered(Scale, ScaleHandler):
        yield


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.scale = Scale(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.scale(self.body(x))))


def test_a_handler_registered_outside_the_package_records_rows_end_to_end(tmp_path, scale_handler):
    torch.manual_seed(0)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    model = ScaledNet()
    with torch.no_grad():
        model.scale.weight.add_(0.5 * torch.randn(5))
    fresh = ScaledNet()
    fresh.load_state_dict(model.state_dict())
    recorder = _store(tmp_path, model, "scale", keep=0.3, num_samples=12)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    optimizer, loader = attach(model, torch.optim.SGD(model.parameters(), lr=0.0), loader, [recorder])
    for xb, yb in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    optimizer.finish()
    positions = torch.from_numpy(gradstore.masks.positions_many(SEED, np.arange(12), recorder.store.num_params,
                                                                recorder.store.k))
    expected = torch.gather(per_sample_grads(fresh, x, y, loss_scale=1.0 / 4), 1, positions)  # lr 0: unchanged
    scale_slice = slice(6 * 5 + 5, 6 * 5 + 5 + 5)  # Scale's weight in the flat vector
    assert ((positions >= scale_slice.start) & (positions < scale_slice.stop)).any()  # its rows are checked too
    np.testing.assert_allclose(_rows(recorder.store)[:12], expected.numpy(), rtol=1e-4, atol=1e-8)


def test_the_external_handler_passes_the_contract_and_is_listed_in_messages(scale_handler):
    torch.manual_seed(0)
    values, expected = example_rows(*ScaleHandler.example(Scale))
    assert_close(values, expected)
    model = nn.Sequential(Scale(3), nn.GRU(3, 3))
    with pytest.raises(UnsupportedModelError, match=r"Supported: .*GroupNorm.*, Scale and their subclasses"):
        MaskedEngine(model, [(0, 3)], sum(p.numel() for p in model.parameters()), generic=False)


def test_without_its_handler_the_custom_module_is_refused_with_the_registration_fix():
    model = nn.Sequential(nn.Linear(3, 3), Scale(3))
    with pytest.raises(UnsupportedModelError, match=r"1 \(Scale, parameters weight\).*register a handler for Scale"):
        MaskedEngine(model, [(0, 3)], 15, generic=False)  # the generic path off (on, it records: test_generic_path.py)


def test_registering_checks_its_arguments():
    with pytest.raises(UnlearnError, match="already registered: Linear"):
        register_handler(nn.Linear)(ScaleHandler)
    with pytest.raises(UnlearnError, match="nn.Module subclasses"):
        register_handler(int)
    with pytest.raises(UnlearnError, match="subclass of unlearn.recording.Handler"):
        register_handler(Scale)(object)
    with pytest.raises(UnlearnError, match="no handler is registered for Scale"):
        unregister_handler(Scale)
    assert registered_handlers() == REGISTERED


# ---------------------------------------------------------------- claimed children


class Projector(nn.Module):
    """Uses its child Linear's parameters without calling the child: y = F.linear(tanh(x), inner.weight, inner.bias)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 3)

    def forward(self, x):
        return F.linear(torch.tanh(x), self.inner.weight, self.inner.bias)


class ProjectorHandler(Handler):
    claims = ("inner.weight", "inner.bias")

    @classmethod
    def example(cls, module_type):
        return Projector(), torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(0))

    def dense(self, capture, name):
        a = torch.tanh(capture.inputs[0].float())
        batch = a.shape[0]
        a3, d3 = a.reshape(batch, -1, a.shape[-1]), capture.delta.reshape(batch, -1, capture.delta.shape[-1])
        if name == "inner.bias":
            return d3.sum(1)
        return torch.einsum("bto,bti->boi", d3, a3).reshape(batch, -1)


class ProjectorNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.proj = Projector()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.proj(self.embed(x)).mean(1))


@pytest.fixture
def projector_handler():
    with registered(Projector, ProjectorHandler):
        yield


def test_unclaimed_children_used_without_a_call_are_refused_by_path():
    torch.manual_seed(0)
    model, x = ProjectorNet(), torch.randn(5, 2, 4)
    y = torch.randint(0, 2, (5,))
    with pytest.raises(UnsupportedModelError, match=r"proj\.inner\.weight.*without calling.*Handler\.claims"):
        masked(model, lambda: F.cross_entropy(model(x), y), KEYS[:5])


def test_a_parents_handler_claims_the_children_it_uses(projector_handler):
    torch.manual_seed(0)
    model, x = ProjectorNet(), torch.randn(5, 2, 4)
    y = torch.randint(0, 2, (5,))
    positions, values = masked(model, lambda: F.cross_entropy(model(x), y), KEYS[:5], keep=0.4)
    expected = torch.gather(per_sample_grads(model, x, y, loss_scale=1.0 / 5), 1, positions)
    assert_close(values, expected)
    claimed = [i for i, (n, _) in enumerate(model.named_parameters()) if n.startswith("proj.inner")]
    offsets = np.cumsum([0] + [p.numel() for p in model.parameters()])
    assert ((positions >= int(offsets[claimed[0]])) & (positions < int(offsets[claimed[-1] + 1]))).any()
    values, expected = example_rows(*ProjectorHandler.example(Projector))  # its own example, as the contract
    assert_close(values, expected)


def test_a_claim_the_module_cannot_serve_is_refused(projector_handler):
    class Bad(ProjectorHandler):
        claims = ("missing.weight",)

    with pytest.raises(UnsupportedModelError, match=r"Bad claims 'missing\.weight'"):
        Bad().claimed(Projector())


# ---------------------------------------------------------------- advice


ADVISED = {
    nn.modules.batchnorm._BatchNorm: nn.BatchNorm1d(3),
    nn.MultiheadAttention: nn.MultiheadAttention(4, 2),
    nn.RNNBase: nn.LSTM(3, 3),
}


@pytest.mark.parametrize("module_type", list(ADVICE), ids=lambda t: t.__name__)
def test_each_advice_goes_to_its_own_modules_only(module_type):
    module = ADVISED[module_type]
    assert advice_for(module).startswith(ADVICE[module_type])
    for other, text in ADVICE.items():
        if other is not module_type:
            assert text not in advice_for(module)
    assert "engine='vmap'" in advice_for(module)


def test_the_default_advice_lists_the_registry_and_names_registration():
    advice = advice_for(Scale(3))
    for module_type in REGISTERED:
        assert module_type.__name__ in advice
    assert "register a handler for Scale" in advice
    assert not any(text in advice for text in ADVICE.values())


def test_a_handlers_refusal_names_the_module():
    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Linear(3, 2))
    with pytest.raises(UnsupportedModelError, match=r"0 \(Embedding: scale_grad_by_freq.*fix: construct it"):
        MaskedEngine(model, [(0, 3)], sum(p.numel() for p in model.parameters()))
    model[0].requires_grad_(False)  # frozen: nothing to attribute, and not indexed
    MaskedEngine(model, [(0, 3)], sum(p.numel() for p in model.parameters() if p.requires_grad)).close()


# ---------------------------------------------------------------- docs/RECORDING.md


def test_the_adding_a_layer_type_recipe_runs_as_written():
    doc = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "RECORDING.md")
    with open(doc, encoding="utf-8") as handle:
        text = handle.read()
    section = text[text.index("\n## Adding a layer type\n"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    try:
        exec(compile(code, doc, "exec"), namespace)  # noqa: S102
    finally:
        for module_type in list(registered_handlers()):
            if module_type not in REGISTERED:
                unregister_handler(module_type)
    assert registered_handlers() == REGISTERED


def test_capture_is_exported_for_handlers():
    capture = Capture(nn.Identity(), (torch.ones(2, 1),), torch.ones(2, 1, dtype=torch.float64))
    assert capture.delta.dtype == torch.float32


class CalledToo(nn.Module):
    """Claims inner's parameters but also calls inner: the claim misses a use."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(torch.tanh(x), self.inner.weight, self.inner.bias) + self.inner(x)


class CalledTooHandler(ProjectorHandler):
    pass


class ValuesOnlyHandler(ProjectorHandler):
    def dense(self, capture, name):
        raise NotImplementedError


@pytest.mark.parametrize("handler_class", [CalledTooHandler, ValuesOnlyHandler])
def test_a_claim_that_misses_a_use_or_cannot_be_checked_is_refused(handler_class):
    torch.manual_seed(0)
    model, x = CalledToo(), torch.randn(5, 2, 4)
    target = torch.randn(5, 8)
    with registered(CalledToo, handler_class):
        with pytest.raises(UnsupportedModelError, match=r"inner\.weight") as refused:
            masked(model, lambda: projection_loss(model(x), target), KEYS[:5])
    expected = "cannot form" if handler_class is ValuesOnlyHandler else "misses a use"
    assert expected in str(refused.value)


# ---------------------------------------------------------------- the one-time check sees every handler


class ScaleValuesHandler(Handler):
    """Scale's weight entry by entry only (no dense): g_b[j] = sum_t delta[b, t, j] * x[b, t, j]."""

    factor = 1.0

    @classmethod
    def example(cls, module_type):
        return ScaleHandler.example(module_type)

    def values(self, capture, name, b, j):
        x = capture.inputs[0].float()
        sums = (capture.delta * x).reshape(x.shape[0], -1, x.shape[-1]).sum(1)
        return self.factor * sums[b, j]


class WrongScaleValuesHandler(ScaleValuesHandler):
    factor = 2.0  # a wrong formula


def test_a_values_only_handler_records_as_torch_func():
    torch.manual_seed(0)
    with registered(Scale, ScaleValuesHandler):
        values, expected = example_rows(*ScaleValuesHandler.example(Scale))
        assert_close(values, expected)
        model, x = ScaledNet(), torch.randn(6, 6)
        y = torch.randint(0, 3, (6,))
        positions, values = masked(model, lambda: F.cross_entropy(model(x), y), KEYS, keep=0.4)
    assert_close(values, torch.gather(per_sample_grads(model, x, y, loss_scale=1.0 / 6), 1, positions))


def test_a_values_only_handler_with_a_wrong_formula_is_refused_by_path():
    torch.manual_seed(0)
    model, x = ScaledNet(), torch.randn(6, 6)
    y = torch.randint(0, 3, (6,))
    with registered(Scale, WrongScaleValuesHandler):
        with pytest.raises(UnsupportedModelError, match=r"differs from autograd's for: scale\.weight \(relative error 1"):
            masked(model, lambda: F.cross_entropy(model(x), y), KEYS, keep=0.4)


class FailingHandler(ScaleHandler):
    def dense(self, capture, name):
        raise ValueError("shapes do not fit")


class BiasValuesHandler(ScaleValuesHandler):
    def formed_whole(self, name):  # says recording forms it whole, but gives no dense()
        return True


@pytest.mark.parametrize("handler_class, message", [
    (FailingHandler, r"FailingHandler cannot form the per-sample gradient of scale\.weight .*ValueError"),
    (BiasValuesHandler, r"BiasValuesHandler forms no dense\(\) for scale\.weight.*formed_whole"),
], ids=["raises", "formed_whole_without_dense"])
def test_a_handler_that_fails_on_the_call_is_refused_naming_it_and_the_path(handler_class, message):
    torch.manual_seed(0)
    model, x = ScaledNet(), torch.randn(6, 6)
    y = torch.randint(0, 3, (6,))
    with registered(Scale, handler_class):
        with pytest.raises(UnsupportedModelError, match=message):
            masked(model, lambda: F.cross_entropy(model(x), y), KEYS)


class Gate(nn.Module):
    """y = x * g * w: reads its second positional input."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x, g):
        return x * g * self.weight


class GateHandler(Handler):
    def formed_whole(self, name):
        return True

    def dense(self, capture, name):
        x, g = capture.inputs[0].float(), capture.inputs[1].float()
        return (capture.delta * x * g).reshape(x.shape[0], -1, x.shape[-1]).sum(1)


class GatedNet(nn.Module):
    def __init__(self, shared):
        super().__init__()
        self.shared = shared
        self.body = nn.Linear(6, 5)
        self.gate = Gate(5)
        self.head = nn.Linear(5, 3)
        self.register_buffer("fixed", torch.linspace(0.5, 1.5, 5))

    def forward(self, x):
        h = self.body(x)
        return self.head(torch.tanh(self.gate(h, self.fixed if self.shared else torch.sigmoid(h))))


@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
def test_the_check_hands_the_handler_every_input_as_recording_does(shared):
    torch.manual_seed(0)
    model, x = GatedNet(shared), torch.randn(6, 6)
    with torch.no_grad():
        model.gate.weight.add_(0.5 * torch.randn(5))
    y = torch.randint(0, 3, (6,))
    with registered(Gate, GateHandler):
        positions, values = masked(model, lambda: F.cross_entropy(model(x), y), KEYS, keep=0.4)
    assert_close(values, torch.gather(per_sample_grads(model, x, y, loss_scale=1.0 / 6), 1, positions))


class Paired(nn.Module):
    """Returns a tuple, as nn.MultiheadAttention does: never hooked."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(5))

    def forward(self, x):
        return x * self.weight, x


def test_a_handled_module_returning_a_tuple_is_refused_by_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    model.add_module("pair", Paired())
    head = nn.Linear(5, 3)
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    with registered(Paired, ScaleHandler):
        with pytest.raises(UnsupportedModelError, match=r"pair\.weight \(pair returns a tuple, not a tensor"):
            masked(model, lambda: F.cross_entropy(head(model(x)[0]), y), KEYS)


def test_the_multihead_attention_advice_names_what_works_today():
    advice = ADVICE[nn.MultiheadAttention]
    assert "scaled_dot_product_attention" in advice and "handler" in advice and "planned" not in advice


class SquaredGateHandler(GateHandler):
    def dense(self, capture, name):  # reads inputs[1], with a wrong formula (g squared)
        x, g = capture.inputs[0].float(), capture.inputs[1].float()
        return (capture.delta * x * g * g).reshape(x.shape[0], -1, x.shape[-1]).sum(1)


@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
def test_a_wrong_handler_reading_the_second_input_is_refused_by_path(shared):
    torch.manual_seed(0)
    model, x = GatedNet(shared), torch.randn(6, 6)
    y = torch.randint(0, 3, (6,))
    with registered(Gate, SquaredGateHandler):
        with pytest.raises(UnsupportedModelError, match=r"differs from autograd's for: gate\.weight"):
            masked(model, lambda: F.cross_entropy(model(x), y), KEYS)
