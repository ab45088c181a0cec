"""What a store indexes: the trainable parameters in named_parameters() order, or a named subset of them; frozen
parameters never. Rows against torch.func per-sample gradients of the user's own loss over those parameters only;
``forget_keys`` maps positions back through the same list; PEFT LoRA adapters record as Linear layers.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import gradstore
from test_engine import SEED, _rows, _store
from unlearn import attach, create_recorder, forget_keys, recording_plan
from unlearn.errors import RecordingUsageError, UnlearnError
from unlearn.params import recorded_parameters

N, B = 8, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.body(self.embed(ids).mean(1)))


def data():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 11, (N, 5), generator=generator), torch.randint(0, 3, (N,), generator=generator)


def record(tmp_path, model, modules=None, engine="masked", name="store", keep=0.5):
    ids, y = data()
    recorder = create_recorder(tmp_path / f"{name}.h5", "per-sample", model, N, keep=keep, codec="fp32",
                               flavour="grad", seed=SEED, modules=modules)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, y), batch_size=B)
    optimizer, loader = attach(model, torch.optim.SGD(model.parameters(), lr=0.0), loader, [recorder], engine=engine)
    for x, target in loader:
        optimizer.zero_grad()
        if engine == "vmap":
            optimizer.session.backward(x, target)
        else:
            F.cross_entropy(model(x), target).backward()
        optimizer.step()
    optimizer.finish()
    positions = gradstore.masks.positions_many(SEED, np.arange(N), recorder.store.num_params, recorder.store.k)
    return recorder.store.path, _rows(recorder.store)[:N], positions


def func_rows(model, names, positions):
    """torch.func's gradient of each sample's share of the mean loss, over the parameters ``names`` in order."""
    ids, y = data()
    every = dict(model.named_parameters())
    params = {name: every[name].detach() for name in names}
    rows = np.zeros(positions.shape, np.float32)
    for key in range(N):
        loss = lambda p: F.cross_entropy(functional_call(model, p, (ids[key:key + 1],)), y[key:key + 1]) / B  # noqa: E731
        grads = grad(loss)(params)
        flat = torch.cat([grads[name].reshape(-1) for name in names]).detach()
        rows[key] = flat[torch.from_numpy(positions[key])].numpy()
    return rows


def assert_rows_close(rows, expected):
    for key in range(N):
        scale = np.abs(expected[key]).max()
        assert scale > 0
        assert np.abs(rows[key] - expected[key]).max() / scale <= 1e-4, f"sample {key}"


@pytest.mark.parametrize("engine", ["masked", "vmap"])
def test_frozen_parameters_are_not_indexed(tmp_path, engine):
    torch.manual_seed(0)
    model = Net()
    model.embed.requires_grad_(False)  # a frozen embedding: 66 values the store does not index
    path, rows, positions = record(tmp_path, model, engine=engine)
    names = ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias", "head.weight", "head.bias"]
    with gradstore.open(path) as store:
        assert store.config["fingerprint"]["names"] == names
        assert store.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert_rows_close(rows, func_rows(model, names, positions))


@pytest.mark.parametrize("engine", ["masked", "vmap"])
def test_a_named_subset_records_those_parameters_only_and_the_rest_still_trains(tmp_path, engine):
    torch.manual_seed(0)
    model = Net()
    path, rows, positions = record(tmp_path, model, modules=["head", "body.0.weight"], engine=engine)
    names = ["body.0.weight", "head.weight", "head.bias"]
    with gradstore.open(path) as store:
        assert store.config["fingerprint"]["names"] == names
    assert_rows_close(rows, func_rows(model, names, positions))
    if engine == "masked":
        assert recording_plan(model, modules=["head", "body.0.weight"]) == {"body.0": "LinearHandler",
                                                                            "head": "LinearHandler"}


def test_unrecorded_parameters_still_get_their_gradient_and_train(tmp_path):
    torch.manual_seed(0)
    model = Net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, y = data()
    recorder = create_recorder(tmp_path / "s.h5", "per-sample", model, N, keep=0.5, codec="fp32", flavour="grad",
                               seed=SEED, modules=["head"])
    optimizer, _ = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), None, [recorder])
    optimizer.set_batch(np.arange(N))
    F.cross_entropy(model(ids), y).backward()
    optimizer.step()
    optimizer.finish()
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), name  # every trainable parameter stepped, recorded or not


def test_forget_keys_maps_positions_back_through_the_recorded_list(tmp_path):
    torch.manual_seed(0)
    model = Net()
    model.body[0].requires_grad_(False)
    path, rows, positions = record(tmp_path, model, modules=["body", "head.weight"])
    names = ["body.2.weight", "body.2.bias", "head.weight"]  # body.0 frozen: not indexed
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = forget_keys(model, path, [1, 6], scale=2.0)
    assert result.keys.tolist() == [1, 6]
    expected = np.concatenate([before[n].reshape(-1).numpy() for n in names])
    for key in (1, 6):
        np.add.at(expected, positions[key], 2.0 * rows[key])
    got = np.concatenate([p.detach().reshape(-1).numpy() for n, p in model.named_parameters() if n in names])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    for name, p in model.named_parameters():
        if name not in names:
            assert torch.equal(p, before[name]), name  # what the store does not index is left alone


def test_bad_subsets_are_refused_naming_them(tmp_path):
    model = Net()
    with pytest.raises(UnlearnError, match=r"no module or parameter of the model: 'heads'"):
        create_recorder(tmp_path / "a.h5", "per-sample", model, N, modules=["heads"])
    with pytest.raises(UnlearnError, match=r"a list of names"):
        create_recorder(tmp_path / "a.h5", "per-sample", model, N, modules="head")
    model.head.requires_grad_(False)
    with pytest.raises(UnlearnError, match=r"no trainable parameter: 'head'"):
        create_recorder(tmp_path / "a.h5", "per-sample", model, N, modules=["head"])
    assert not (tmp_path / "a.h5").exists()
    model.requires_grad_(False)
    with pytest.raises(UnlearnError, match=r"no trainable parameter to record"):
        recorded_parameters(model)


def test_a_parameter_frozen_after_the_store_was_created_is_refused_at_attach(tmp_path):
    model = Net()
    recorder = _store(tmp_path, model, "late")
    model.head.requires_grad_(False)
    with pytest.raises(RecordingUsageError, match=r"records head\.weight, head\.bias, which the model has frozen"):
        attach(model, torch.optim.SGD(model.parameters(), lr=0.1), None, [recorder])
    recorder.store.close()


# ---------------------------------------------------------------- PEFT LoRA


def test_peft_lora_adapters_record_as_linear_layers_holding_the_adapters_only(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                     eos_token_id=2)
    config._attn_implementation = "eager"
    base = transformers.GPT2LMHeadModel(config)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                                      fan_in_fan_out=True, lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero: move it so every adapter parameter has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (N, 10), generator=generator)
    mask = (torch.arange(10)[None, :] < torch.tensor([10, 6, 10, 3, 8, 10, 5, 9])[:, None]).long()
    recorder = _store(tmp_path, model, "lora", keep=0.2, num_samples=N)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert recorder.store.config["fingerprint"]["names"] == names
    assert recorder.store.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer, _ = attach(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0), None,
                          [recorder])
    plan = optimizer.recording_plan()
    assert plan and all(handler == "LinearHandler" and ".lora_" in path for path, handler in plan.items())

    batches = (np.arange(0, B), np.arange(B, N))
    for keys in batches:
        optimizer.zero_grad()
        optimizer.set_batch(keys)
        labels = ids[keys].masked_fill(mask[keys] == 0, -100)
        model(input_ids=ids[keys], attention_mask=mask[keys], labels=labels).loss.backward()
        optimizer.step()
    optimizer.finish()
    positions = gradstore.masks.positions_many(SEED, np.arange(N), recorder.store.num_params, recorder.store.k)
    rows = _rows(recorder.store)[:N]
    every = dict(model.named_parameters())
    params = {n: every[n].detach() for n in names}
    expected = np.zeros_like(rows)
    for keys in batches:
        labels = ids[keys].masked_fill(mask[keys] == 0, -100)
        tokens = int((labels[:, 1:] != -100).sum())  # the batch's loss is a mean over its predicted tokens
        for row, key in enumerate(keys):
            def loss(p):
                out = functional_call(model, p, (), {"input_ids": ids[key:key + 1],
                                                     "attention_mask": mask[key:key + 1]})
                mine = labels[row:row + 1]
                return F.cross_entropy(out.logits[:, :-1].reshape(-1, 50), mine[:, 1:].reshape(-1),
                                       ignore_index=-100, reduction="sum") / tokens
            grads = grad(loss)(params)
            flat = torch.cat([grads[n].reshape(-1) for n in names]).detach()
            expected[key] = flat[torch.from_numpy(positions[key])].numpy()
    assert_rows_close(rows, expected)


def test_plan_and_apply_removal_work_in_a_subset_store_and_refuse_the_whole_model_rules(tmp_path):
    from unlearn import apply_removal, plan_removal
    from unlearn.errors import RequestError
    from unlearn.params import flat_params

    torch.manual_seed(0)
    model = Net()
    path, rows, positions = record(tmp_path, model, modules=["head"])
    names = ["head.weight", "head.bias"]
    ids, y = data()
    class Split:  # what plan_removal reads of a run's data
        train_x, train_y, num_classes = ids.numpy(), y.numpy(), 3

        def __len__(self):
            return N

    split = Split()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with gradstore.open(path) as store:
        removal = plan_removal(store, "per-sample", split, samples=np.array([2, 5]))
        base = flat_params(model, names)
        with pytest.raises(RequestError, match=r"indexes 2 of them"):
            apply_removal(model, base, removal, split, "samples", store=store)
        apply_removal(model, base, removal, split, 0.5, store=store)
    expected = base.copy()
    for key in (2, 5):
        np.add.at(expected, positions[key], 0.5 * rows[key])
    np.testing.assert_allclose(flat_params(model, names), expected, rtol=1e-6, atol=1e-7)
    for name, p in model.named_parameters():
        if name not in names:
            assert torch.equal(p, before[name]), name
