"""A Hugging Face ``Trainer`` records through ``RecordingCallback``, the user's dataset, collator and loss unchanged.

Rows are checked against torch.func per-sample gradients of the model's own loss (BERT's mean
cross-entropy over the micro-batch, as the Trainer scales it), at the weights each step began
from, clipped as the step was: never against the engine. Which samples formed each batch is read
from the user's own collator (the padded tensors it returned), mapped back to dataset indices by
their tokens, so the keys are checked independently of the callback.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

import gradstore
from unlearn.errors import RecordingUsageError

transformers = pytest.importorskip("transformers")
from unlearn.integrations.huggingface import RecordingCallback  # noqa: E402

N, VOCAB, SEED = 12, 200, 7
LENGTHS = [9, 5, 12, 3, 7, 12, 6, 10, 4, 11, 8, 12]


class Texts(torch.utils.data.Dataset):
    """Unpadded token lists of different lengths, and a column the model does not take (remove_unused_columns)."""

    def __init__(self):
        generator = torch.Generator().manual_seed(3)
        self.ids = [torch.randint(1, VOCAB, (n,), generator=generator) for n in LENGTHS]
        self.labels = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(5))

    def __len__(self):
        return N

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "attention_mask": torch.ones(len(self.ids[index]), dtype=torch.long),
                "labels": self.labels[index], "note": f"sample {index}"}


class PadCollator:
    """The user's collator: right padding to the batch's longest; it keeps what it returned, in order."""

    def __init__(self):
        self.batches = []

    def __call__(self, features):
        assert "note" not in features[0]  # the Trainer removed the column the model does not take
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.zeros(len(features), width, dtype=torch.long)
        attention_mask = torch.zeros(len(features), width, dtype=torch.long)
        for row, f in enumerate(features):
            input_ids[row, : len(f["input_ids"])] = f["input_ids"]
            attention_mask[row, : len(f["input_ids"])] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "labels": torch.stack([f["labels"] for f in features])}
        self.batches.append({name: value.clone() for name, value in batch.items()})
        return batch


class Watch(transformers.TrainerCallback):
    """The weights each step starts from and the (clipped) gradient it steps with."""

    def __init__(self):
        self.weights, self.grads = [], []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())


def bert():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def arguments(tmp_path, **options):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=1,
                  learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                  dataloader_num_workers=0, disable_tqdm=True)
    values.update(options)
    return transformers.TrainingArguments(**values)


def keys_of(dataset, batch):
    """Dataset indices of a collated batch's rows, found by their tokens."""
    index = {tuple(ids.tolist()): i for i, ids in enumerate(dataset.ids)}
    return [index[tuple(ids[mask.bool()].tolist())] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def per_sample(model, weights, batch, share):
    """torch.func gradient of each sample's share of the micro-batch's mean cross-entropy, flat [B, M]."""
    rows = []
    for row in range(len(batch["labels"])):
        one = {name: value[row:row + 1] for name, value in batch.items()}

        def loss(p):
            logits = functional_call(model, p, (), {"input_ids": one["input_ids"],
                                                    "attention_mask": one["attention_mask"]}).logits
            return F.cross_entropy(logits.float(), one["labels"], reduction="sum") * share

        grads = grad(loss)(weights)
        rows.append(torch.cat([grads[n].reshape(-1) for n, _ in model.named_parameters()]))
    return torch.stack(rows)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_records_one_row_per_sample_equal_to_torch_func(tmp_path, accumulation):
    model, dataset, collator, watch = bert(), Texts(), PadCollator(), Watch()
    callback = RecordingCallback(tmp_path / "grads.h5", keep=0.05, codec="fp32", flavour="grad", seed=SEED)
    args = arguments(tmp_path, gradient_accumulation_steps=accumulation, max_grad_norm=0.5)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                   callbacks=[watch, callback])
    trainer.train()

    store = callback.store
    assert store.finished
    with gradstore.open(store.path) as opened:
        info = opened.info()
        assert info["finished"] and info["rows_live"] == N and info["rows_empty"] == 0
        assert (opened.state == gradstore.RowState.LIVE).all()
        rows = opened.read(np.arange(N))
        num_params, k = opened.num_params, opened.k
    assert num_params == sum(p.numel() for p in model.parameters())

    # the rows of every step: its micro-batches are the collator's batches, in order
    steps = [collator.batches[s:s + accumulation] for s in range(0, len(collator.batches), accumulation)]
    assert len(steps) == len(watch.weights) == len(watch.grads) == -(-N // (4 * accumulation))
    # transformers' rule (Trainer.training_step): a model taking **kwargs gets num_items_in_batch and its loss is
    # taken as normalized over the step, so the micro-batch's mean is not divided by the accumulation steps
    scale = 1.0 if trainer.model_accepts_loss_kwargs else 1.0 / accumulation
    seen, clipped = [], 0
    positions = gradstore.masks.positions_many(SEED, np.arange(N), num_params, k)
    model.train()
    for batches, weights, stepped in zip(steps, watch.weights, watch.grads):
        keys = [key for batch in batches for key in keys_of(dataset, batch)]
        full = torch.cat([per_sample(model, weights, batch, scale / len(batch["labels"])) for batch in batches])
        total = full.sum(0)
        clip = min(1.0, 0.5 / (float(total.norm()) + 1e-6))  # torch's clip_grad_norm_
        clipped += clip < 1.0
        # the reference is the loss the Trainer differentiated: its gradient is the one the step used
        torch.testing.assert_close(stepped, clip * total, rtol=1e-4, atol=1e-7)
        expected = (clip * full).gather(1, torch.from_numpy(positions[keys])).numpy()
        for row, key in enumerate(keys):
            scale_of = np.abs(expected[row]).max()
            assert scale_of > 0
            assert np.abs(rows[key] - expected[row]).max() <= 1e-4 * scale_of, f"sample {key}"
        seen += keys
    assert sorted(seen) == list(range(N)) != seen  # every sample once, shuffled: keys are the dataset's indices
    assert clipped  # clipping took part
    assert steps[0][0]["input_ids"].shape[1] < 12 or steps[0][0]["attention_mask"].min() == 0  # real padding


def test_the_run_trains_as_without_the_callback(tmp_path):
    """Same batches, same weights: the callback changes nothing in the training, scheduler and clipping included."""
    finals = []
    for record in (False, True):
        model, collator = bert(), PadCollator()
        callbacks = [RecordingCallback(tmp_path / "same.h5", keep=0.05, seed=SEED)] if record else []
        trainer = transformers.Trainer(model=model, args=arguments(tmp_path, lr_scheduler_type="linear"),
                                       train_dataset=Texts(), data_collator=collator, callbacks=callbacks)
        trainer.train()
        finals.append(([b["input_ids"] for b in collator.batches], [p.detach().clone() for p in model.parameters()]))
        if record:
            assert type(trainer.optimizer.optimizer) is torch.optim.AdamW  # put back after train()
            assert callbacks[0].store.finished
    for a, b in zip(finals[0][0], finals[1][0]):
        assert torch.equal(a, b)
    for a, b in zip(finals[0][1], finals[1][1]):
        torch.testing.assert_close(a, b)


def test_resume_from_checkpoint_is_refused(tmp_path):
    args = arguments(tmp_path, save_strategy="steps", save_steps=1, max_steps=2)
    transformers.Trainer(model=bert(), args=args, train_dataset=Texts(), data_collator=PadCollator()).train()
    callback = RecordingCallback(tmp_path / "resumed.h5", keep=0.05, seed=SEED)
    trainer = transformers.Trainer(model=bert(), args=arguments(tmp_path, save_strategy="steps", save_steps=1,
                                                                max_steps=3),
                                   train_dataset=Texts(), data_collator=PadCollator(), callbacks=[callback])
    with pytest.raises(RecordingUsageError, match="resume"):
        trainer.train(resume_from_checkpoint=True)


class TwiceTrainer(transformers.Trainer):
    """A compute_loss calling the model twice per batch: the second forward has no batch of its own."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        first = model(**inputs).loss
        return first + model(**inputs).loss


def test_a_forward_the_dataloader_did_not_feed_is_refused(tmp_path):
    callback = RecordingCallback(tmp_path / "twice.h5", keep=0.05, seed=SEED)
    trainer = TwiceTrainer(model=bert(), args=arguments(tmp_path, max_steps=1), train_dataset=Texts(),
                           data_collator=PadCollator(), callbacks=[callback])
    with pytest.raises(RecordingUsageError, match="did not feed|other inputs"):
        trainer.train()
    callback.abandon()  # no exception callback in transformers: the user rolls the store back
    assert not callback.store.finished


def test_fp16_grad_scaler_steps_through_the_recording_optimizer(tmp_path):
    """accelerate's AcceleratedOptimizer under a GradScaler steps through methods built at prepare time from the
    wrapped optimizer's step: the callback re-points them, so the step records, with the unscaled gradient."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer

    from unlearn.integrations.huggingface import _point_scaler_steps
    from unlearn.recording import attach, create_recorder

    accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    accelerated = AcceleratedOptimizer(inner, device_placement=False, scaler=scaler)
    recorder = create_recorder(tmp_path / "fp16.h5", "per-sample", model, 4, keep=0.5, codec="fp32", flavour="grad",
                               seed=SEED)
    recording, _ = attach(model, inner, None, [recorder])
    accelerated.optimizer = recording
    _point_scaler_steps(accelerated, recording)
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    recording.set_batch(np.arange(4))
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    accelerated.step()
    assert recording.session.step_index == 1 and not accelerated.step_was_skipped
    recording.finish()
    full = torch.stack([torch.cat([g.reshape(-1) for g in grad(
        lambda p: F.cross_entropy(functional_call(model, p, (x[i:i + 1],)), y[i:i + 1]) / 4)(weights).values()])
        for i in range(4)])
    with gradstore.open(recorder.store.path) as opened:
        rows, k = opened.read(np.arange(4)), opened.k
    positions = torch.from_numpy(gradstore.masks.positions_many(SEED, np.arange(4), full.shape[1], k))
    np.testing.assert_allclose(rows, full.gather(1, positions).numpy(), rtol=1e-4, atol=1e-7)


def test_the_docs_example_runs_as_written(tmp_path, monkeypatch):
    import os
    import re

    doc = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "RECORDING.md")
    with open(doc, encoding="utf-8") as handle:
        text = handle.read()
    section = text[text.index("\n## Hugging Face Trainer\n"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, doc, "exec"), namespace)  # noqa: S102
    store = namespace["callback"].store
    assert store.finished and store.num_keys == 8
    with gradstore.open(store.path) as opened:
        assert opened.info()["rows_live"] == 8
