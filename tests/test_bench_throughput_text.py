"""`python -m bench throughput` on the text models: a byte-level GPT-2 LM and a BERT classifier on the stdlib's
own .py files, dict batches called as model(**batch), in a tiny configuration (short windows, a few samples, one
timed step). Every row has real numbers or says why it has none; an engine that cannot run a model gives a row
with the error its child caught instead of stopping the benchmark."""

import argparse

import pytest
import torch

pytest.importorskip("transformers")

from bench import throughput  # noqa: E402

TINY = ["--text-samples", "24", "--text-batch-size", "4", "--seq-len", "32", "--text-steps", "1", "--warmup", "1",
        "--repeats", "1", "--keeps", "0.01"]


def parse(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    return parser.parse_args([*TINY, "--out", str(tmp_path), *extra])


def test_lm_and_bert_rows_have_real_numbers(tmp_path):
    args = parse(tmp_path, "--models", "lm", "bert", "--engines", "plain", "masked", "opacus")
    rows, device = throughput.measure(args, log=lambda *a: None)
    assert [(row["model"], row["engine"]) for row in rows] == [
        ("lm", "plain"), ("lm", "masked"), ("lm", "opacus"), ("bert", "plain"), ("bert", "masked"), ("bert", "opacus")]
    for row in rows:
        if row["engine"] == "opacus":  # a time, or a note naming why there is none
            if not throughput.opacus_available():
                assert row["seconds_per_step"] is None and "opacus is not installed" in row["note"], row
            elif row["seconds_per_step"] is None:
                assert row["note"].startswith("Opacus cannot run"), row["note"]
            else:  # installed and ran: a real time, and every parameter's grad_sample had a row per sample
                assert row["seconds_per_step"] > 0 and row["overhead"] > 0 and row["peak_rss_mb"] > 100
                assert row["opacus_not_per_sample"] == [], row["note"]
                assert row["note"] == throughput.OPACUS_POSITION_IDS
                assert row["opacus_functorch_modules"] == (["Conv1D"] if row["model"] == "lm" else [])
            continue
        assert row["note"] == "", row["note"]
        assert row["seconds_per_step"] > 0 and row["cpu_seconds_per_step"] > 0 and row["peak_rss_mb"] > 100
        plain = rows[0 if row["model"] == "lm" else 3]
        assert row["overhead"] == pytest.approx(row["seconds_per_step"] / plain["seconds_per_step"])
        assert row["inputs"].startswith("stdlib .py")
    for masked in (rows[1], rows[4]):
        assert masked["keep"] == 0.01 and masked["hooks_ms_per_step"] > 0 and masked["scatter_add_values_per_s"] > 0
    assert rows[1]["forget_class_ms"] is None  # an LM's rows carry no class label
    assert rows[4]["forget_class_ms"] > 0 and rows[4]["class_rows"] > 0
    table = throughput.table(rows)
    assert table.count("\n| lm |") == 3 and table.count("\n| bert |") == 3


def test_an_engine_that_cannot_run_a_model_gives_a_row_saying_why():
    """transformers' padding-mask code checks the mask's values (``padding_mask.all()``), which torch.func's vmap
    cannot trace: the vmap engine cannot run BERT with padding, and the child reports it as the row's error."""
    spec = {"model": "bert", "engine": "vmap", "keep": 0.01, "device": "cpu", "samples": 8, "batch_size": 4,
            "warmup": 1, "steps": 1, "seq_len": 16}
    result = throughput.run_child_reporting(spec)
    assert result["error"].startswith("the vmap engine cannot run bert: RuntimeError: vmap"), result
    assert "(raised in transformers/masking_utils.py" in result["error"]  # where: the mask code, not the model
    rows = throughput.rows_from({("bert", "plain", None): [{"seconds_per_step": 0.01, "peak_rss_mb": 900.0}],
                                 ("bert", "vmap", 0.01): [result]}, have_opacus=False)
    assert rows[1]["seconds_per_step"] is None and rows[1]["note"] == result["error"]


def test_text_batches_are_dicts_with_padding_for_bert():
    tensors, where = throughput.text_data("bert", 16, 32)
    assert set(tensors) == {"input_ids", "attention_mask", "labels"} and where.startswith("stdlib .py")
    lengths = tensors["attention_mask"].sum(1)
    assert lengths.min() >= 8 and lengths.max() <= 32 and len(set(lengths.tolist())) > 1  # varying lengths
    assert bool((tensors["input_ids"][tensors["attention_mask"] == 0] == 256).all())  # PAD where masked
    lm, _ = throughput.text_data("lm", 8, 32)
    assert torch.equal(lm["input_ids"], lm["labels"]) and bool(lm["attention_mask"].eq(1).all())


@pytest.mark.parametrize("name, table", [("lm", "transformer.wpe.weight"),
                                         ("bert", "bert.embeddings.position_embeddings.weight")])
def test_opacus_position_embeddings_need_per_sample_position_ids(name, table):
    """Why the opacus rows pass ``position_ids`` [B, T]: called with the model's default [1, T] ids, Opacus gives the
    position table one grad_sample row (the batch's, summed) and no error; with [B, T] ids every row is the sample's
    own gradient, as autograd gives it for the sample alone."""
    opacus = pytest.importorskip("opacus")
    tensors, _ = throughput.text_data(name, 3, 16)
    model = throughput.build_text_model(name, 16).train()
    alone = []
    for i in range(3):
        model.zero_grad()
        model(**{key: value[i:i + 1] for key, value in tensors.items()}).loss.backward()
        alone.append(dict(model.named_parameters())[table].grad.clone())
    wrapped = opacus.GradSampleModule(model)
    wrapped(**tensors).loss.backward()
    assert throughput.not_per_sample(wrapped, 3) == [table]
    for param in model.parameters():
        param.grad_sample = None
    wrapped(**throughput.with_position_ids(tensors)).loss.backward()
    assert throughput.not_per_sample(wrapped, 3) == []
    rows = dict(model.named_parameters())[table].grad_sample
    torch.testing.assert_close(rows, torch.stack(alone), rtol=1e-4, atol=1e-6)
