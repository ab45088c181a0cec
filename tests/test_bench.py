"""bench footprint: analytic sizes, measured stores, the break-even check, its files."""

import csv

import numpy as np

from bench import footprint
from unlearn import data as datasets


def test_footprint_measures_every_method_of_one_run(tmp_path):
    split = datasets.load_dataset("digits")
    split = split.subset(np.arange(len(split)) < 128)
    config = {"epochs": 2, "batch_size": 32, "seed": 0, "keeps": [0.01, 0.5], "codecs": ["fp32", "int8"], "layer_keep": 0.1}
    table, summary = footprint.footprint(split, config, tmp_path)
    footprint.write_outputs(table, summary, tmp_path)
    assert summary["steps"] == 8 and summary["break_even_p_fp32"] == 2 / 32
    by_name = {row["store"]: row for row in table}
    assert set(by_name) == {"ours p=0.01 fp32", "ours p=0.01 int8", "ours p=0.5 fp32", "ours p=0.5 int8", "original", "layer p=0.1"}
    assert by_name["original"]["analytic_bytes"] == 8 * 95110 * 4
    assert by_name["ours p=0.01 fp32"]["analytic_bytes"] == 128 * 951 * 4
    # int8 with one block of 1024 per row at k=951: 951 bytes + a 4-byte scale
    assert by_name["ours p=0.01 int8"]["analytic_bytes"] == 128 * (951 + 4)
    assert by_name["ours p=0.01 fp32"]["predicted_smaller_fp32"] and not by_name["ours p=0.5 fp32"]["predicted_smaller_fp32"]
    assert summary["break_even_holds_analytic"]
    for row in table:
        assert row["measured_bytes"] == (tmp_path / footprint_file(row)).stat().st_size
    with open(tmp_path / "footprint.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(table)
    assert (tmp_path / "footprint.png").stat().st_size > 10_000


def footprint_file(row):
    if row["method"] == "per-sample":
        return f"per-sample-{row['keep']}-{row['codec']}.h5"
    return f"{row['method']}.h5"
