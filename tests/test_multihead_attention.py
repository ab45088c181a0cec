"""nn.MultiheadAttention recorded in place by its handler (issue 23, part 1): no module of the user's is swapped.

Every model is recorded through attach() and set_batch into a real store (lr 0: weights unchanged), and every
stored row is compared with torch.func's gradient of that sample's share of the user's own loss at the sample's
kept positions: an nn.TransformerEncoder classifier with real padding (src_key_padding_mask), a bare
MultiheadAttention as cross-attention with kdim/vdim != embed_dim, an nn.TransformerDecoderLayer (causal self-
attention, cross-attention to a padded memory), causal masks (is_causal, bool and float
[T, S] masks, per-sample [B * H, T, S] masks), add_bias_kv and add_zero_attn, batch_first=False. Dropout inside
the attention while training is refused, by path.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import gradstore
from test_engine import PATHS, SEED, _rows, _store
from unlearn import attach
from unlearn.errors import UnsupportedModelError
from unlearn.recording.engine import ADVICE, MaskedEngine
from unlearn.recording.handlers import base, handler_for
from unlearn.recording.handlers.attention import MultiheadAttentionHandler

N, T, S, E, HEADS, CLASSES, VOCAB = 8, 7, 5, 16, 2, 3, 50
LENGTHS = [7, 3, 7, 5, 2, 7, 6, 4]  # real tokens per sample: the others are right padding
BATCHES = [[5, 0, 3, 6], [1, 7, 2, 4]]  # sample indices (the keys) of each step


def perturbed(model, scale=0.1):
    """Weights away from the constructors' ones and zeros (LayerNorm, biases), reproducibly."""
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


def padding_mask():
    return torch.arange(T)[None, :] >= torch.tensor(LENGTHS)[:, None]  # True: padding


def batches_of(data):
    """(keys, {name: the batch's slice}) of each step; every tensor of ``data`` is batch-first, [N, ...]."""
    return [(np.array(keys), {name: value[keys] for name, value in data.items()}) for keys in BATCHES]


def share(model, batch, size):
    """The batch's cross-entropy (mean over the batch): a sample's share is its own term / batch size."""
    logits = model(**{name: value for name, value in batch.items() if name != "labels"})
    return F.cross_entropy(logits, batch["labels"], reduction="sum") / size


def record(tmp_path, name, model, data, keep=0.1):
    """Every sample's stored row and its kept positions, through attach() and set_batch, one step per batch."""
    recorder = _store(tmp_path, model, name, keep=keep, num_samples=N)
    optimizer, _ = attach(model, torch.optim.SGD(model.parameters(), lr=0.0), None, [recorder])
    for keys, batch in batches_of(data):
        optimizer.zero_grad()
        optimizer.set_batch(keys)
        share(model, batch, len(keys)).backward()
        optimizer.step()
    optimizer.finish()
    positions = gradstore.masks.positions_many(SEED, np.arange(N), recorder.store.num_params, recorder.store.k)
    return _rows(recorder.store)[:N], positions


def func_rows(model, data, positions):
    """torch.func's gradient of each sample's share of its batch's loss, flat in parameters() order (the trainable
    ones: the store's index space)."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    rows = np.zeros(positions.shape, np.float32)
    for keys, batch in batches_of(data):
        for row, key in enumerate(keys):
            one = {name: value[row:row + 1] for name, value in batch.items()}
            grads = grad(lambda p: share(lambda **kw: functional_call(model, p, (), kw), one, len(keys)))(params)
            flat = torch.cat([g.reshape(-1) for g in grads.values()])
            rows[key] = flat[torch.from_numpy(positions[key])].numpy()
    return rows


def assert_rows_close(rows, expected):
    assert np.abs(expected).max() > 0
    error = np.abs(rows - expected).max() / np.abs(expected).max()
    assert error <= 1e-4, f"relative error {error:.2e}"
    for key in range(N):  # each sample's row on its own scale too
        scale = max(np.abs(expected[key]).max(), 1e-30)
        assert np.abs(rows[key] - expected[key]).max() / scale <= 1e-4, f"sample {key}"


def recorder_parameters(path):
    """The parameter names a store indexes, in order (its fingerprint)."""
    with gradstore.open(path) as opened:
        return opened.config["fingerprint"]["names"]


def covered(model, positions, names):
    """The kept positions reach each named parameter, so the comparison checks its rows."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # the store's index space
    offsets = np.cumsum([0] + [p.numel() for _, p in trainable])
    index = {n: i for i, (n, _) in enumerate(trainable)}
    for name in names:
        i = index[name]
        assert ((positions >= offsets[i]) & (positions < offsets[i + 1])).any(), name


# ---------------------------------------------------------------- nn.TransformerEncoder


class EncoderClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, E)
        layer = nn.TransformerEncoderLayer(d_model=E, nhead=HEADS, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, input_ids, padding):
        hidden = self.encoder(self.embed(input_ids), src_key_padding_mask=padding)
        real = (~padding).unsqueeze(-1).float()
        return self.head((hidden * real).sum(1) / real.sum(1))  # mean over the real tokens


def token_data():
    generator = torch.Generator().manual_seed(3)
    padding = padding_mask()
    input_ids = torch.randint(1, VOCAB, (N, T), generator=generator).masked_fill(padding, 0)
    return {"input_ids": input_ids, "padding": padding,
            "labels": torch.randint(0, CLASSES, (N,), generator=generator)}


def test_transformer_encoder_classifier_rows_equal_torch_func_of_its_own_loss(tmp_path):
    torch.manual_seed(0)
    model = perturbed(EncoderClassifier()).train()
    keys_before = list(model.state_dict())
    params_before = [id(p) for p in model.parameters()]
    fired = []
    for layer in model.encoder.layers:
        layer.self_attn.register_forward_hook(lambda *args: fired.append(1))
    data = token_data()
    rows, positions = record(tmp_path, "encoder", model, data, keep=0.1)
    assert fired, "the attention ran outside its module (a fast path): no hook saw it"
    assert list(model.state_dict()) == keys_before and [id(p) for p in model.parameters()] == params_before
    covered(model, positions, [f"encoder.layers.{i}.self_attn.{n}" for i in range(2)
                               for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")])
    assert_rows_close(rows, func_rows(model, data, positions))


# ---------------------------------------------------------------- a bare MultiheadAttention


class Attending(nn.Module):
    """MultiheadAttention called as users call it, then mean-pooled into a Linear head. The data is batch-first;
    with batch_first=False the attention gets [T, B, E] and its output is transposed back."""

    def __init__(self, cross=False, batch_first=True, mask=None, is_causal=False, need_weights=False, **options):
        super().__init__()
        kdim, vdim = (6, 10) if cross else (None, None)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, kdim=kdim, vdim=vdim, **options)
        self.head = nn.Linear(E, CLASSES)
        self.cross, self.batch_first, self.mask, self.is_causal = cross, batch_first, mask, is_causal
        self.need_weights = need_weights

    def forward(self, x, memory=None, values=None, padding=None, masks=None):
        query, key, value = (x, x, x) if not self.cross else (x, memory, values)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
            if not self.cross:
                key = value = query
        kwargs = {}
        if padding is not None:
            kwargs["key_padding_mask"] = padding
        if self.mask is not None:
            kwargs["attn_mask"] = self.mask
        if masks is not None:  # per sample, [B, H, T, S] -> [B * H, T, S]
            kwargs["attn_mask"] = masks.reshape(-1, *masks.shape[2:])
        if self.is_causal:
            kwargs["is_causal"] = True
        out, _ = self.attn(query, key, value, need_weights=self.need_weights, **kwargs)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out.mean(1))


def attention_data(cross=False, padding=False, masks=False):
    generator = torch.Generator().manual_seed(5)
    data = {"x": torch.randn(N, T, E, generator=generator)}
    if cross:
        data["memory"] = torch.randn(N, S, 6, generator=generator)
        data["values"] = torch.randn(N, S, 10, generator=generator)
    if padding:
        length = S if cross else T
        data["padding"] = torch.arange(length)[None, :] >= torch.tensor([max(1, n % (length + 1)) for n in LENGTHS])[:, None]
    if masks:
        data["masks"] = torch.randn(N, HEADS, T, S if cross else T, generator=generator)
    data["labels"] = torch.randint(0, CLASSES, (N,), generator=generator)
    return data


CAUSAL = nn.Transformer.generate_square_subsequent_mask(T)  # float, -inf above the diagonal


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
@pytest.mark.parametrize("case", ["self", "self-padding", "cross-kdim-vdim", "cross-padding-weights", "causal",
                                  "causal-bool-weights", "per-sample-masks", "bias-kv-zero-attn", "zero-attn-padding",
                                  "cross-bias-kv", "no-bias"])
def test_multihead_attention_rows_equal_torch_func(tmp_path, case, batch_first):
    torch.manual_seed(0)
    cross = case.startswith("cross")
    options = {"add_bias_kv": "bias-kv" in case, "add_zero_attn": "zero-attn" in case}
    if case == "no-bias":
        options["bias"] = False
    mask = {"causal": CAUSAL, "causal-bool-weights": CAUSAL.isinf()}.get(case)
    model = perturbed(Attending(cross=cross, batch_first=batch_first, mask=mask, is_causal=case == "causal",
                                need_weights=case.endswith("weights"), **options)).train()
    data = attention_data(cross=cross, padding="padding" in case, masks=case == "per-sample-masks")
    rows, positions = record(tmp_path, case, model, data, keep=0.2)
    names = [n for n, _ in model.attn.named_parameters()]
    covered(model, positions, [f"attn.{n}" for n in names])
    assert_rows_close(rows, func_rows(model, data, positions))


@pytest.mark.parametrize("path", PATHS)
def test_every_way_the_engine_gathers_the_rows(tmp_path, path, monkeypatch):
    """CPU kernels, torch gathers (the GPU path), dense blocks: the attention's rows are formed whole either way."""
    monkeypatch.setattr(base, "USE_NUMBA", PATHS[path][0])
    monkeypatch.setattr(base, "DENSE_SHARE", PATHS[path][1])
    torch.manual_seed(0)
    model = perturbed(Attending(cross=True)).train()
    data = attention_data(cross=True, padding=True)
    rows, positions = record(tmp_path, path, model, data, keep=0.2)
    assert_rows_close(rows, func_rows(model, data, positions))


def test_frozen_projections_leave_the_claimed_out_proj_recorded(tmp_path):
    """What the engine refused before the handler: out_proj's weight, used without calling out_proj."""
    torch.manual_seed(0)
    model = perturbed(Attending()).train()
    model.attn.in_proj_weight.requires_grad_(False)
    model.attn.in_proj_bias.requires_grad_(False)
    data = attention_data()
    rows, positions = record(tmp_path, "frozen", model, data, keep=0.3)
    covered(model, positions, ["attn.out_proj.weight", "attn.out_proj.bias"])
    # the frozen in_proj_weight and in_proj_bias are not indexed: the store's positions are out_proj's and head's
    assert recorder_parameters(tmp_path / "frozen.h5") == [n for n, p in model.named_parameters() if p.requires_grad]
    assert_rows_close(rows, func_rows(model, data, positions))


class Decoder(nn.Module):
    """nn.TransformerDecoderLayer: causal self-attention over the target, cross-attention to a padded memory."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x, memory, padding):
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        out = self.layer(x, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=padding)
        return self.head(out.mean(1))


def test_transformer_decoder_layer_rows_equal_torch_func(tmp_path):
    torch.manual_seed(0)
    model = perturbed(Decoder()).train()
    generator = torch.Generator().manual_seed(6)
    data = {"x": torch.randn(N, T, E, generator=generator), "memory": torch.randn(N, S, E, generator=generator),
            "padding": torch.arange(S)[None, :] >= torch.tensor([1 + n % S for n in LENGTHS])[:, None],
            "labels": torch.randint(0, CLASSES, (N,), generator=generator)}
    rows, positions = record(tmp_path, "decoder", model, data, keep=0.1)
    covered(model, positions, [f"layer.{a}.{n}" for a in ("self_attn", "multihead_attn")
                               for n in ("in_proj_weight", "out_proj.weight")])
    assert_rows_close(rows, func_rows(model, data, positions))


# ---------------------------------------------------------------- refusals


def test_dropout_inside_the_attention_is_refused_by_path():
    model = Attending(dropout=0.1).train()
    with pytest.raises(UnsupportedModelError, match=r"attn \(MultiheadAttention: its dropout \(dropout=0\.1\)"):
        MaskedEngine(model, [(0, 3)], sum(p.numel() for p in model.parameters()))
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.1, batch_first=True)
    with pytest.raises(UnsupportedModelError, match=r"self_attn \(MultiheadAttention: its dropout.*module\.dropout = 0"):
        MaskedEngine(layer, [(0, 3)], sum(p.numel() for p in layer.parameters()))
    layer.self_attn.dropout = 0.0  # the fix the message gives: the layer's own dropouts stay
    MaskedEngine(layer, [(0, 3)], sum(p.numel() for p in layer.parameters())).close()


def test_dropout_switched_on_after_attach_is_refused_at_the_first_forward(tmp_path):
    model = Attending().train()
    recorder = _store(tmp_path, model, "late", keep=0.1, num_samples=N)
    optimizer, _ = attach(model, torch.optim.SGD(model.parameters(), lr=0.0), None, [recorder])
    model.attn.dropout = 0.2
    keys, batch = batches_of(attention_data())[0]
    optimizer.set_batch(keys)
    with pytest.raises(UnsupportedModelError, match=r"attn\.in_proj_weight.*dropout"):
        share(model, batch, len(keys)).backward()


def test_an_unbatched_query_is_refused():
    model = Attending().train()
    engine = MaskedEngine(model, [(0, 3)], sum(p.numel() for p in model.parameters()))
    try:
        x = torch.randn(T, E)
        with pytest.raises(UnsupportedModelError, match=r"batched \(3-d\) attention only"):
            model.attn(x, x, x)
    finally:
        engine.close()


def test_the_handler_is_registered_and_claims_out_proj():
    attention = nn.MultiheadAttention(E, HEADS)
    handler = handler_for(attention)
    assert isinstance(handler, MultiheadAttentionHandler) and handler.tuple_output
    assert [name for name, _ in handler.claimed(attention)] == ["out_proj.weight", "out_proj.bias"]
    advice = ADVICE[nn.MultiheadAttention]
    assert "planned" not in advice and "dropout" in advice


def test_calls_without_grad_are_left_alone():
    """Evaluation under no_grad while attached: unbatched calls too, the output as the module returns it."""
    model = Attending(batch_first=False).train()
    engine = MaskedEngine(model, [(0, 3)], sum(p.numel() for p in model.parameters()))
    try:
        with torch.no_grad():
            x = torch.randn(T, E)
            out, weights = model.attn(x, x, x)
            assert out.shape == (T, E) and weights.shape == (T, T)
    finally:
        engine.close()
