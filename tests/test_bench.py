"""bench footprint: analytic sizes, measured stores, the break-even check, its files."""

import argparse
import csv
import json

import numpy as np
import pytest

from bench import footprint
from unlearn.runs import data as datasets


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


def run_study(out, *extra):
    import argparse

    from bench import study

    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(out), "--keeps", "0.1", "0.02", "--codecs", "fp32", "int8",
                              "int2", "--flavours", "update", "--epochs", "2", "--no-progress", *extra])
    return study.main(args)


def test_study_writes_every_cell_and_resumes_without_redoing_any(tmp_path):
    import json

    import pytest

    out = tmp_path / "study"
    assert run_study(out, "--keep-stores") == 0
    result = json.loads((out / "results.json").read_text())
    cells = result["cells"]
    rows = {(c["task"], c["row"], c.get("scale_mode", "")) for c in cells}
    for task in ("class", "samples"):
        assert {(task, "after train", ""), (task, "retrain", ""), (task, "original", "1"), (task, "layer-p0.1", "1")} <= rows
        for keep in (0.1, 0.02):
            for codec in ("fp32", "int8"):
                assert {(task, f"ours-update-p{keep}-{codec}", mode) for mode in ("1", "auto")} <= rows
    assert ("class", "finetune only", "") in rows
    by_row = {(c["task"], c["row"], c.get("scale_mode", "")): c for c in cells}
    fp32, int8 = by_row[("class", "ours-update-p0.1-fp32", "1")], by_row[("class", "ours-update-p0.1-int8", "1")]
    assert int8["bytes_on_disk"] < fp32["bytes_on_disk"] / 3  # int8 transcoded from the same fp32 sums
    int2 = by_row[("class", "ours-update-p0.1-int2", "1")]  # a sub-byte codec, transcoded from the same sums
    assert int2["bytes_on_disk"] < int8["bytes_on_disk"] and int2["codec"] == "int2"
    from bench import frontier  # the target across study folders, read back from cells.json
    rows = {row["store"]: row for row in frontier.class_cells(out)}
    assert set(rows) == {f"ours-update-p{keep}-{codec}" for keep in (0.1, 0.02) for codec in ("fp32", "int8", "int2")}
    assert rows["ours-update-p0.1-int2"]["ratio"] == pytest.approx(
        by_row[("class", "original", "1")]["bytes_on_disk"] / by_row[("class", "ours-update-p0.1-int2", "auto")]["bytes_on_disk"])
    assert "size" in rows["ours-update-p0.1-int2"]["misses"]
    target = (out / "results.md").read_text().split("## Target below one byte")[1]
    assert "| update p = 0.1 int2 |" in target and "missed: size" in target  # 100x needs far smaller stores than these
    assert int8["ratio_vs_original"] == pytest.approx(by_row[("class", "original", "1")]["bytes_on_disk"] / int8["bytes_on_disk"])
    assert by_row[("class", "retrain", "")]["forgotten"] == 0.0  # never saw the class
    for field in ("forgotten", "rest", "forgotten_after_retrain", "rest_after_retrain", "seconds"):
        assert field in fp32
    for field in ("ua", "ra", "ta", "mia_efficacy"):
        assert 0 <= by_row[("samples", "ours-update-p0.1-int8", "auto")][field] <= 1
    assert (out / "results.csv").read_text().count("\n") == len(cells) + 1
    assert "Retrain from scratch" in (out / "results.md").read_text()
    for name in ("study-quality-vs-bytes.png", "study-frontier.png"):
        assert (out / name).stat().st_size > 10_000

    # an interrupted study: two cells lost; the rerun recomputes exactly those, identically, without training
    recorded = (out / "seed0" / "recorded.json").stat().st_mtime_ns
    saved = json.loads((out / "cells.json").read_text())
    lost = [key for key in saved["cells"] if "ours-update-p0.02-int8" in key and "|class|" in key]
    assert len(lost) == 2
    for key in lost:
        del saved["cells"][key]
    (out / "cells.json").write_text(json.dumps(saved))
    assert run_study(out, "--only-stores", "ours-update-p0.1-fp32") == 0  # another store's cells: the lost stay lost
    assert not any(key in json.loads((out / "cells.json").read_text())["cells"] for key in lost)
    assert (out / "seed0" / "ours-update-p0.02-int8.h5").exists()  # kept for the cells still to come
    assert run_study(out, "--keep-stores") == 0
    again = json.loads((out / "cells.json").read_text())["cells"]
    assert (out / "seed0" / "recorded.json").stat().st_mtime_ns == recorded
    for key in lost:
        for field in ("forgotten", "rest", "scale", "bytes_on_disk"):
            assert again[key][field] == json.loads(json.dumps(cells_by_key(cells)[key]))[field]

    table, summary = footprint.from_study(out)  # the footprint of the study's own training run
    by_store = {row["store"]: row for row in table}
    assert by_store["ours update p=0.1 int8"]["measured_bytes"] == int8["bytes_on_disk"]
    assert by_store["original"]["analytic_bytes"] == summary["steps"] * summary["M"] * 4
    assert summary["break_even_p_fp32"] == 2 / 64

    with pytest.raises(SystemExit, match="another configuration"):
        run_study(out, "--sample-fraction", "0.05")


def test_a_study_without_the_baselines_stores_compares_with_the_original_size_computed(tmp_path):
    """--baselines computed (ResNet-18's default): no original or layer-wise store is recorded; "x smaller" is against
    steps x M x 4 bytes, what the original's store would hold."""
    import json

    out = tmp_path / "study"
    assert run_study(out, "--baselines", "computed", "--request", "class", "--keeps", "0.02", "--codecs", "int2",
                     "--finetune-epochs", "0", "--epochs", "1", "--keep-stores") == 0
    recorded = json.loads((out / "seed0" / "recorded.json").read_text())
    assert set(recorded["stores"]) == {"ours-update-p0.02-int2"}  # neither baseline's store
    assert not (out / "seed0" / "original.h5").exists()
    assert recorded["original_bytes"] == recorded["steps"] * recorded["num_params"] * 4
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert {c["row"] for c in cells} == {"after train", "retrain", "ours-update-p0.02-int2"}
    for cell in (c for c in cells if c["row"] == "ours-update-p0.02-int2"):
        assert cell["ratio_vs_original"] == recorded["original_bytes"] / cell["bytes_on_disk"] > 1
    assert "computed as steps x M x 4 bytes" in (out / "results.md").read_text()
    from bench import frontier  # the target across folders reads the computed size where no original was recorded
    (row,) = frontier.class_cells(out)
    assert row["original_computed"] and row["original_mb"] == recorded["original_bytes"] / 1e6
    assert "(computed, raw)" in frontier.markdown([row])


def test_the_study_takes_resnet18_with_the_masked_engine_and_computed_baselines():
    """ResNet-18 is built from the study's options, recorded by the masked engine, and its original store (steps x
    11.2 M x 4 bytes) is computed, not recorded; SimpleModel studies compare as they did before these options."""
    import argparse

    from bench import study
    from bench.study import record
    from bench.study.grid import needed_cells
    from unlearn.runs import data as datasets

    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    config = study.build_config(parser.parse_args(["--quick", "--model", "resnet18", "--request", "class"]))
    assert (config["model"], config["baselines"], record.study_engine(config)) == ("resnet18", "computed", "masked")
    assert not any("original" in key or "layer" in key for key in needed_cells(0, config))
    data = datasets.load_dataset("digits")
    model = record.study_model(config, data, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 11_175_370  # 1 channel and 10 classes, as on MNIST
    assert any(type(m).__name__ == "GroupNorm" for m in model.modules())
    assert not any(type(m).__name__.startswith("BatchNorm") for m in model.modules())
    simple = study.build_config(parser.parse_args(["--quick"]))
    assert (simple["model"], simple["baselines"], record.study_engine(simple)) == ("simple", "recorded", "vmap")
    assert "model" not in record.comparable(simple) and "baselines" not in record.comparable(simple)
    assert record.comparable(config)["model"] == "resnet18"
    assert record.original_bytes({"epochs": 4, "batch_size": 64}, 54_051, 11_175_370) == 4 * 845 * 11_175_370 * 4


def cells_by_key(cells):
    return {f"{c['seed']}|{c['task']}|{c['row']}" + (f"|{c['scale_mode']}" if c.get("scale_mode") else ""): c for c in cells}


def test_the_study_package_keeps_its_names_and_default_grid_and_has_no_import_circle():
    import argparse
    import ast
    from pathlib import Path

    import gradstore.codecs
    from bench import study

    assert study.CODECS == list(gradstore.codecs.CODECS)  # every registered codec may be asked for
    assert study.DEFAULT_CODECS == ["fp32", "fp16", "int8"]
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    config = study.build_config(parser.parse_args(["--quick"]))
    assert (config["codecs"], config["flavours"]) == (["fp32", "fp16", "int8"], ["grad", "update"])
    assert config["keeps"] == [0.2, 0.1, 0.075, 0.05, 0.02, 0.01] and config["requests"] == ["class", "samples"]
    folder = Path(study.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .grid import x; from . import cells
                targets.update([node.module.split(".")[0]] if node.module else [alias.name for alias in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bench.study"):
                targets.add((node.module.split(".") + ["__init__"])[2])  # bench.study itself is its __init__
        graph[path.stem] = targets
    assert not any("__init__" in targets for name, targets in graph.items() if name != "__init__")

    def reach(start, seen):
        for target in graph.get(start, ()):
            assert target != "__init__" and target not in seen, f"import circle through {target}"
            reach(target, seen | {target})

    for name in graph:
        if name != "__init__":
            reach(name, {name})


def test_a_phase_recorded_under_other_options_runs_again(tmp_path):
    """Markers carry the options: a stopped study restarted with other options does not reuse its files."""
    from bench.study import record

    config = {"dataset": "digits", "forget_class": 3, "epochs": 2, "seeds": [0], "progress": False}
    record.write_json(tmp_path / "recorded.json", {"config": record.comparable(config), "seed": 0})
    assert record.read_marker(tmp_path / "recorded.json", {**config, "seeds": [0, 1], "progress": True})["seed"] == 0
    assert record.read_marker(tmp_path / "recorded.json", {**config, "forget_class": 5}) is None
    assert record.read_marker(tmp_path / "missing.json", config) is None


def test_throughput_rows_measure_engines_in_child_processes(tmp_path):
    """Every engine row has the documented keys; plain is the reference; a missing Opacus says why."""
    import argparse
    from bench import throughput

    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    args = parser.parse_args(["--models", "simple", "--engines", "plain", "masked", "opacus", "--keeps", "0.01",
                              "--samples", "256", "--steps", "2", "--warmup", "1", "--repeats", "1",
                              "--out", str(tmp_path)])
    rows, device = throughput.measure(args, log=lambda *a: None)
    assert [row["engine"] for row in rows] == ["plain", "masked", "opacus"]
    for row in rows:
        assert {"model", "engine", "keep", "seconds_per_step", "overhead", "peak_rss_mb", "note"} <= set(row)
    plain, masked, opacus = rows
    assert plain["overhead"] == 1.0 and plain["peak_rss_mb"] > 0
    assert masked["keep"] == 0.01 and masked["seconds_per_step"] > 0 and masked["scatter_add_values_per_s"] > 0
    if throughput.opacus_available():
        assert opacus["seconds_per_step"] > 0, opacus["note"]
    else:
        assert opacus["seconds_per_step"] is None and "opacus is not installed" in opacus["note"]


def test_bench_scatter_times_every_store_against_the_int8_store_of_its_p_in_rounds(tmp_path):
    """`python -m bench scatter` on real stores (int8, int2, sign at one p; an fp16 store of another p): every
    store timed in every round, ratios to the int8 store of the same p; a store without one is refused by name."""
    import argparse
    import json

    import gradstore
    import pytest

    from bench import scatter

    rng = np.random.default_rng(0)
    paths = []
    for codec, keep in (("int8", 0.05), ("int2", 0.05), ("sign", 0.05), ("fp16", 0.1)):
        path = tmp_path / f"{codec}-{keep}.h5"
        store = gradstore.create(path, 4000, 64, keep, codec=codec, seed=3)
        store.accumulate(np.arange(64), rng.standard_normal((64, store.k)).astype(np.float32))
        store.finalize().close()
        paths.append(path)
    with pytest.raises(SystemExit, match="0 int8 stores of p = 0.1"):
        scatter.run(paths, 2, "int8")
    with pytest.raises(SystemExit, match="2 int8 stores of p = 0.05"):
        scatter.run([paths[0], paths[0], paths[1]], 2, "int8")
    out = tmp_path / "out"
    assert scatter.main(argparse.Namespace(stores=[str(p) for p in paths[:3]], rounds=3, baseline="int8", threads=None,
                                           out=str(out))) == 0
    results = {r["codec"]: r for r in json.loads((out / "scatter.json").read_text())}
    assert set(results) == {"int8", "int2", "sign"} and results["int8"]["ratio_to_baseline_median"] == 1.0
    for r in results.values():
        assert r["rounds"] == 3 and r["rows"] == 64 and 0 < r["mvalues_s_min"] <= r["mvalues_s_median"] <= r["mvalues_s_max"]
        assert 0 < r["ratio_to_baseline_median"] and 0 <= r["rounds_at_least_baseline"] <= 3
    assert (out / "scatter.md").read_text().count("\n") == 2 + 3


def test_request_spread_trains_the_studys_pair_and_more_seeds_and_pairs_every_gap(tmp_path):
    """bench.request_spread: the study's split and random request; its retrained model with the study's seed is the
    study's own reference (bit for bit), other training seeds differ, every (trained, retrained) TA gap is reported, and
    the models are cached."""
    from bench import request_spread
    from bench.study.record import forget_samples, load_data, reference_model
    from unlearn.evaluation import accuracy
    from unlearn.params import load_flat_params

    out = tmp_path / "spread"
    argv = ["--dataset", "digits", "--epochs", "1", "--training-seeds", "0", "7", "--out", str(out)]
    assert request_spread.main(argv) == 0
    report = json.loads((out / "request_spread.json").read_text())
    config = request_spread.study_config(argparse.Namespace(
        seed=0, forget_class=3, epochs=1, sample_fraction=0.01, dataset="digits", data_dir=None))
    data = load_data(config)
    assert report["request"] == forget_samples(config, 0, len(data)).size == round(0.01 * len(data))
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    reference, _ = reference_model("samples", 0, config, study_dir, data, log=lambda *_: None)
    assert np.array_equal(np.load(out / "retrained-0.npy"), reference)  # the study's own retrained model
    assert not np.array_equal(np.load(out / "trained-0.npy"), np.load(out / "trained-7.npy"))
    assert not np.array_equal(np.load(out / "trained-0.npy"), reference)  # trained with the request
    models = {(m["model"], m["training_seed"]): m for m in report["models"]}
    model = request_spread.study_model(config, data, 0)
    load_flat_params(model, np.load(out / "trained-7.npy"))
    model.eval()
    assert models[("trained", 7)]["ta"] == accuracy(model, data.test_x, data.test_y)  # the saved weights, on the test set
    assert set(models) == {("trained", 0), ("retrained", 0), ("trained", 7), ("retrained", 7)}
    gaps = report["pairs"]["gaps"]
    assert len(gaps) == 4 and report["pairs"]["pairs"] == 4
    for gap in gaps:
        expected = 100 * (models[("trained", gap["trained"])]["ta"] - models[("retrained", gap["retrained"])]["ta"])
        assert gap["ta_gap_points"] == pytest.approx(expected)
    assert report["pairs"]["within_target"] == sum(abs(g["ta_gap_points"]) <= 0.5 for g in gaps)
    cached = (out / "trained-7.npy").stat().st_mtime_ns
    assert request_spread.main(argv) == 0  # resumed from the cache: nothing retrained
    assert (out / "trained-7.npy").stat().st_mtime_ns == cached
    with pytest.raises(SystemExit):
        request_spread.main(["--dataset", "digits", "--training-seeds", "1", "1", "--out", str(out)])
