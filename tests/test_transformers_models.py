"""Hugging Face transformers models, called as users call them, recorded through attach() into a real store:
each sample's stored row against torch.func's gradient of that sample's share of the model's own loss.

GPT-2 (transformers' Conv1D, LayerNorm, token and position embeddings, the tied wte/lm_head) with its causal-LM
loss, BERT for sequence classification with its cross-entropy; tiny random-init configs, right padding, default
position ids. Also transformers' Conv1D on its own (2-d inputs, every way its entries are computed).
"""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

import gradstore
from test_engine import PATHS, SEED, _rows, _store
from unlearn import attach
from unlearn.recording.handlers import base, handler_for, registered_handlers

transformers = pytest.importorskip("transformers")

N, T, VOCAB = 8, 12, 300
LENGTHS = [12, 7, 12, 4, 9, 12, 5, 11]  # real tokens per sample: the others are right padding
BATCHES = [[5, 0, 3, 6], [1, 7, 2, 4]]  # sample indices (the keys) of each step


def token_data():
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, VOCAB, (N, T), generator=generator)
    attention_mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    input_ids = input_ids * attention_mask  # pad token 0
    return input_ids, attention_mask


def perturbed(model, scale=0.05):
    """Weights away from the constructors' ones and zeros (LayerNorm, biases), reproducibly."""
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


def record(tmp_path, name, model, batches, keep):
    """Rows of every sample, recorded through attach() and set_batch over one step per batch (lr 0: weights
    unchanged), read from the finished store; and the kept positions of each sample."""
    recorder = _store(tmp_path, model, name, keep=keep, num_samples=N)
    optimizer, _ = attach(model, torch.optim.SGD(model.parameters(), lr=0.0), None, [recorder])
    for keys, batch in batches:
        optimizer.zero_grad()
        optimizer.set_batch(keys)
        model(**batch).loss.backward()  # the model's own loss
        optimizer.step()
    optimizer.finish()
    positions = gradstore.masks.positions_many(SEED, np.arange(N), recorder.store.num_params, recorder.store.k)
    return _rows(recorder.store)[:N], positions


def func_rows(model, sample_loss, batches, positions, names=None):
    """torch.func's gradient of each sample's share of its batch's loss, flat in named_parameters() order
    (tied parameters once: their gradient sums every use), at the sample's kept positions; of the parameters
    ``names`` only (the store's index space), every one for None."""
    params = {name: p.detach() for name, p in model.named_parameters() if names is None or name in names}
    rows = np.zeros(positions.shape, np.float32)
    for keys, batch in batches:
        for row, key in enumerate(keys):
            one = {name: value[row:row + 1] for name, value in batch.items()}
            grads = grad(lambda p: sample_loss(functional_call(model, p, (), one), one, batch))(params)
            flat = torch.cat([g.reshape(-1) for g in grads.values()])
            rows[key] = flat[torch.from_numpy(positions[key])].detach().numpy()
    return rows


def assert_rows_close(rows, expected):
    assert np.abs(expected).max() > 0
    error = np.abs(rows - expected).max() / np.abs(expected).max()
    assert error <= 1e-4, f"relative error {error:.2e}"
    for key in range(N):  # each sample's row on its own scale too
        scale = max(np.abs(expected[key]).max(), 1e-30)
        assert np.abs(rows[key] - expected[key]).max() / scale <= 1e-4, f"sample {key}"


def covered(model, positions, prefixes):
    """Whether the kept positions reach each named parameter (so the comparison checks its rows); positions in the
    store's index space, the trainable parameters."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    offsets = np.cumsum([0] + [p.numel() for _, p in trainable])
    names = [n for n, _ in trainable]
    for prefix in prefixes:
        index = next(i for i, n in enumerate(names) if n.startswith(prefix))
        assert ((positions >= offsets[index]) & (positions < offsets[index + 1])).any(), prefix


def gpt2(attn_implementation):
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
                                     pad_token_id=0, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.config._attn_implementation == attn_implementation
    return perturbed(model).train()


def gpt2_batches():
    input_ids, attention_mask = token_data()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return [(np.array(keys), {"input_ids": input_ids[keys], "attention_mask": attention_mask[keys],
                              "labels": labels[keys]}) for keys in BATCHES]


def causal_lm_share(out, one, batch):
    """The sample's share of the batch's mean over its predicted (non-padding) tokens: its sum / the batch's count."""
    logits, labels = out.logits[:, :-1], one["labels"][:, 1:]
    total = int((batch["labels"][:, 1:] != -100).sum())
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                           reduction="sum") / total


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_gpt2_lm_head_rows_equal_torch_func_of_its_own_loss(tmp_path, attn_implementation):
    model = gpt2(attn_implementation)
    reference = gpt2(attn_implementation)
    reference.load_state_dict(model.state_dict())
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: its row sums both uses
    assert type(handler_for(model.transformer.h[0].attn.c_attn)).__name__ == "Conv1DHandler"
    batches = gpt2_batches()
    rows, positions = record(tmp_path, f"gpt2-{attn_implementation}", model, batches, keep=0.05)
    covered(model, positions, ["transformer.wte", "transformer.wpe", "transformer.h.0.ln_1", "transformer.h.0.attn.c_attn.weight",
                               "transformer.h.0.attn.c_attn.bias", "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f"])
    expected = func_rows(reference, causal_lm_share, batches, positions)
    assert_rows_close(rows, expected)
    # the model's loss is the sum of the shares the reference differentiates
    keys, batch = batches[0]
    with torch.no_grad():
        shares = sum(causal_lm_share(reference(**{n: v[r:r + 1] for n, v in batch.items()}),
                                     {n: v[r:r + 1] for n, v in batch.items()}, batch) for r in range(len(keys)))
        torch.testing.assert_close(shares, reference(**batch).loss, rtol=1e-5, atol=1e-6)


def bert():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    assert model.config._attn_implementation == "eager"
    return perturbed(model).train()


def classification_share(out, one, batch):
    """The sample's share of the batch's mean cross-entropy: its own / the batch size."""
    return F.cross_entropy(out.logits.float(), one["labels"], reduction="sum") / len(batch["labels"])


class Texts(torch.utils.data.Dataset):
    def __init__(self, input_ids, attention_mask, labels):
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "labels": self.labels[index]}


# Attention's key bias adds q . b_k to every score of a query: softmax does not see it, its gradient is 0 and
# autograd's is rounding noise (~1e-10 against ~1e-3 for the query bias). The engine's one-time check compares
# on the scale of the sample's whole gradient (engine.NOISE_FLOOR), so the model records as built; frozen key
# biases (what a user may also choose) are not indexed.
@pytest.mark.parametrize("freeze_key_bias", [False, True],
                         ids=["as-built", "key-bias-frozen"])
def test_bert_sequence_classification_through_the_wrapped_loader(tmp_path, freeze_key_bias):
    model, reference = bert(), bert()
    reference.load_state_dict(model.state_dict())
    if freeze_key_bias:
        for layer in model.bert.encoder.layer:
            layer.attention.self.key.bias.requires_grad_(False)  # frozen parameters are not indexed
    input_ids, attention_mask = token_data()
    labels = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(5))
    recorder = _store(tmp_path, model, "bert", keep=0.05, num_samples=N)
    loader = torch.utils.data.DataLoader(Texts(input_ids, attention_mask, labels), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    optimizer, loader = attach(model, torch.optim.SGD(model.parameters(), lr=0.0), loader, [recorder])
    seen = []
    for batch in loader:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        seen.append(batch)
    optimizer.finish()
    positions = gradstore.masks.positions_many(SEED, np.arange(N), recorder.store.num_params, recorder.store.k)
    rows = _rows(recorder.store)[:N]
    # which samples each batch held: the loader shuffles; the batch's rows of input_ids name them
    batches = []
    for batch in seen:
        keys = [next(i for i in range(N) if torch.equal(input_ids[i], ids)) for ids in batch["input_ids"]]
        batches.append((np.array(keys), dict(batch)))
    assert sorted(k for keys, _ in batches for k in keys) == list(range(N))
    covered(model, positions, ["bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings",
                               "bert.embeddings.LayerNorm", "bert.encoder.layer.0.attention.self.query.weight",
                               "bert.pooler.dense", "classifier"])
    # frozen key biases are not indexed: the store's index space is the trainable parameters, in order
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert recorder.store.config["fingerprint"]["names"] == trainable
    assert len(trainable) == len(list(model.parameters())) - (2 if freeze_key_bias else 0)
    expected = func_rows(reference, classification_share, batches, positions, trainable)
    assert_rows_close(rows, expected)
    with gradstore.open(recorder.store.path) as store:
        np.testing.assert_array_equal(store.labels[:N], labels.numpy())


# ---------------------------------------------------------------- transformers' Conv1D on its own


def test_conv1d_is_registered_without_importing_transformers_at_import_unlearn():
    import subprocess

    code = ("import sys, unlearn, unlearn.recording; from unlearn.recording.handlers import registry; "
            "assert 'transformers' not in sys.modules, 'imported'; print(registry.supported())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Conv1D (transformers)" in done.stdout and "RMSNorm" in done.stdout
    conv1d = transformers.pytorch_utils.Conv1D
    assert conv1d in registered_handlers() and torch.nn.RMSNorm in registered_handlers()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(6, 5), (6, 4, 5)], ids=["[B, in]", "[B, T, in]"])
def test_conv1d_rows_equal_torch_func_on_every_path(shape, path, monkeypatch):
    import test_handler_registry as contract

    monkeypatch.setattr(base, "USE_NUMBA", PATHS[path][0])
    monkeypatch.setattr(base, "DENSE_SHARE", PATHS[path][1])
    torch.manual_seed(0)
    module = transformers.pytorch_utils.Conv1D(3, 5)  # weight [in 5, out 3]: not square, so a transposed index shows
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    values, expected = contract.example_rows(module, x, keep=0.5)
    assert expected.abs().max() > 0
    contract.assert_close(values, expected)
