"""docs/DESIGN.md's three extension-point examples run as written, and what they register passes its contract.

Each example is executed from the page itself; the registry is put back as it was afterwards.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import unlearn
from gradstore.codecs import CODECS
from unlearn.cli import main as unlearn_main
from unlearn.forgetting.rules.registry import registered_rules, unregister_rule
from unlearn.recording import unregister_handler
from unlearn.recording.handlers.registry import registered_handlers

DOC = Path(__file__).resolve().parent.parent / "docs" / "DESIGN.md"


def examples() -> list:
    """The python blocks of the section "Three extension points": layer type, codec, step rule."""
    text = DOC.read_text()
    section = text[text.index("## Three extension points"):text.index("## Choices the issues left open")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3, "DESIGN.md's extension points: one example each"
    return blocks


def test_the_layer_type_example_records_rows_as_torch_func_does(monkeypatch):
    import test_handler_registry as contract

    namespace: dict = {}
    exec(examples()[0], namespace)
    scale = namespace["Scale"]
    try:
        assert scale in registered_handlers()
        torch.manual_seed(0)
        module, x = namespace["ScaleHandler"].example(scale)
        values, expected = contract.example_rows(module, x)
        assert expected.abs().max() > 0
        torch.testing.assert_close(values, expected)
    finally:
        unregister_handler(scale)
    assert scale not in registered_handlers()


def test_the_codec_example_passes_the_codec_contract(tmp_path):
    import test_codec_registry as contract

    before = dict(CODECS)
    namespace: dict = {}
    exec(examples()[1], namespace)
    try:
        codec = CODECS["bf16"]()
        contract.check_round_trip(codec, np.random.default_rng(0))
        contract.check_config_round_trip(codec)
        contract.check_zero_rows(codec)
        contract.check_store(codec, tmp_path)
    finally:
        CODECS.pop("bf16", None)
    assert CODECS == before


def test_the_rule_example_forgets_through_its_name(tmp_path):
    run = tmp_path / "run"
    assert unlearn_main(["train", "--dataset", "digits", "--model", "simple", "--method", "per-sample", "--epochs", "1",
                         "--keep", "0.05", "--keep-first", "3:60", "--quiet", "--out", str(run)]) == 0
    before = (run / "store.h5").read_bytes()
    namespace: dict = {"run": run}
    try:
        exec(examples()[2], namespace)
        result = namespace["result"]
        given = unlearn.forget(run, samples=[3, 7], scale=0.5, progress=False)
    finally:
        unregister_rule("dampen")
    assert "dampen" not in registered_rules()
    assert result.report["scale"] == 0.5 and result.report["scale_search"]["factor"] == 0.5
    for mine, theirs in zip(result.model.parameters(), given.model.parameters()):
        assert torch.equal(mine, theirs)
    assert (run / "store.h5").read_bytes() == before
    with pytest.raises(unlearn.errors.RequestError, match="dampen"):  # gone from the registry, refused by name
        unlearn.forget(run, samples=[3, 7], scale="dampen", progress=False)
