"""Sweeps: SweepConfig, grid parsing, the seed's table, CSV and plots, train_pct, model bundles, resume.

Every test that trains writes to its own tmp folder: no test depends on another one's outputs or order.
"""

import csv
import json
import os
import random
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

import fastlesson.export as export
import fastlesson.sweep as sweep
from fastlesson import load_model
from fastlesson.optim import OPTIMIZERS
from fastlesson.sweep import (
    DEFAULT_GRID,
    GRID_KEYS,
    SMOKE_GRID,
    SweepConfig,
    config_key,
    expand_grid,
    make_smoke_data,
    normalize_grid,
    run_sweep,
    subset_folder,
    sweep_table,
)

ROOT = Path(__file__).resolve().parents[1]
# the CLI must import this checkout's fastlesson even when it is not pip-installed
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(autouse=True)
def _seeded():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    """Read-only tiny image folder (3 classes, 12 train + 6 test each); tests never write into it."""
    return make_smoke_data(tmp_path_factory.mktemp("sweepdata") / "imgs", size=16)


@pytest.fixture
def capture_learners(monkeypatch):
    """The Learner behind every bundle the sweep exports, in order."""
    learners = []
    real = export.export_bundle

    def spy(learn, out_dir, **kw):
        learners.append(learn)
        return real(learn, out_dir, **kw)

    monkeypatch.setattr(export, "export_bundle", spy)
    return learners


# ---------------------------------------------------------------- grid and config


def test_bad_grid_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown grid key\(s\) \['learning_rate'\].*'lr'.*'dropout'"):
        normalize_grid({"learning_rate": [1e-3]})


@pytest.mark.parametrize("grid,match", [({"bs": [0]}, "bs"), ({"dropout": [1.5]}, "dropout"),
                                        ({"channels": ["a,b"]}, "channels"), ({"opt": ["adamw"]}, "ranger"),
                                        ({"lr": []}, "lr"), ({"convs": [0]}, "convs"),
                                        ({"bn": ["maybe"]}, "bn.*true or false"),
                                        ({"sched": ["cosine"]}, "one_cycle.*fixed")])
def test_bad_grid_values(grid, match):
    with pytest.raises(ValueError, match=match):
        normalize_grid(grid)


def test_grid_parsing_from_yaml_and_cli_strings():
    grid = normalize_grid(yaml.safe_load("lr: [1e-3, 0.003]\nchannels: ['32,64', [64, 128], 16]\n"
                                         "fc: [none, 512, '256,128']\nopt: Adam\nbs: 32\n"
                                         "bn: [no, 'true']\nconvs: ['1', 2]\nsched: fixed\n"))
    assert grid["lr"] == [1e-3, 3e-3]  # YAML reads 1e-3 as a string
    assert grid["channels"] == [(32, 64), (64, 128), (16,)]
    assert grid["fc"] == [(), (512,), (256, 128)]
    assert grid["opt"] == ["adam"] and grid["bs"] == [32]
    assert grid["bn"] == [False, True] and grid["convs"] == [1, 2] and grid["sched"] == ["fixed"]
    assert grid["dropout"] == DEFAULT_GRID["dropout"]  # missing keys take defaults
    configs = expand_grid({"lr": [1e-3, 3e-3], "dropout": [0, 0.5], "opt": ["sgd", "adam"]})
    assert len(configs) == 8 and all(set(c) == set(GRID_KEYS) for c in configs)


def test_config_fields_cover_every_grid_key_with_defaults_none():
    names = {f.name for f in fields(SweepConfig)}
    assert set(GRID_KEYS) <= names
    assert {"data", "grid", "out", "seed", "size", "limit", "aug", "smoke", "train_pct", "save_models"} <= names
    cfg = SweepConfig(data="x")
    assert all(getattr(cfg, k) is None for k in GRID_KEYS)
    assert normalize_grid(cfg.grid_spec()) == DEFAULT_GRID  # nothing set: the defaults
    assert normalize_grid(SweepConfig(smoke=True).grid_spec()) == normalize_grid(SMOKE_GRID)


def test_config_list_fields_override_the_grid_file(tmp_path):
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text("lr: [1.0e-3, 1.0e-2]\nbs: [16]\nchannels: ['8,16']\n")
    cfg = SweepConfig(data="x", grid=str(grid_file), lr=[0.1], convs=[1], bn=[False])
    grid = normalize_grid(cfg.grid_spec())
    assert grid["lr"] == [0.1] and grid["bs"] == [16] and grid["channels"] == [(8, 16)]
    assert grid["convs"] == [1] and grid["bn"] == [False]
    # smoke fills what neither the file nor the fields set
    smoke = normalize_grid(SweepConfig(smoke=True, grid=str(grid_file)).grid_spec())
    assert smoke["bs"] == [16] and smoke["epochs"] == SMOKE_GRID["epochs"]


@pytest.mark.parametrize("kw,match", [(dict(train_pct=1.0), "train_pct=1.0"), (dict(train_pct=0), "train_pct=0"),
                                      (dict(limit=0), "limit=0"), (dict(size=4), "size=4"),
                                      (dict(threads=0), "threads=0"), (dict(data=None), "data=None.*smoke"),
                                      (dict(lr=[-1]), "lr=-1")])
def test_config_validate_names_the_bad_field(kw, match):
    with pytest.raises(ValueError, match=match):
        SweepConfig(**{"data": "x", **kw}).validate()


def test_bad_grid_file_fails_before_anything_is_written(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [0.1]\n")
    with pytest.raises(ValueError, match="valid keys"):
        run_sweep(SweepConfig(smoke=True, out=str(tmp_path / "o"), grid=str(bad)), log=None)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        run_sweep(SweepConfig(smoke=True, out=str(tmp_path / "o"), grid=str(tmp_path / "missing.yaml")), log=None)
    assert not (tmp_path / "o").exists()


def test_config_key_is_stable_and_sensitive():
    cfg = expand_grid(SMOKE_GRID)[0]
    same = json.loads(json.dumps(cfg))  # lists instead of tuples, as read back from results.json
    assert config_key(cfg, data="x", seed=1) == config_key(same, seed=1, data="x")
    assert config_key(cfg, data="x", seed=1) != config_key(cfg, data="x", seed=2)
    assert config_key(cfg, data="x", seed=1) != config_key({**cfg, "lr": 0.1}, data="x", seed=1)
    assert config_key(cfg, data="x", seed=1) != config_key(cfg, data="x", seed=1, train_pct=0.8)


def test_table_has_one_column_per_configuration():
    recs = [{**c, "key": f"k{i}", "accuracy": 0.5 + i / 10, "seconds": 3.0, "train_loss": [1.0, 0.5],
             "valid_loss": [1.1, 0.9]} for i, c in enumerate(expand_grid({"lr": [1e-3, 1e-2, 1e-1]}))]
    lines = sweep_table(recs).strip().splitlines()
    assert all(line.count("|") == 3 + 2 for line in lines)  # label column + 3 configurations
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in lines[2:]}
    assert [v.strip() for v in rows["learning rate"]] == ["0.001", "0.01", "0.1"]
    assert [v.strip() for v in rows["test accuracy"]] == ["0.5000", "0.6000", "0.7000"]
    assert [v.strip() for v in rows["best valid loss (epoch)"]] == ["0.900 (2)"] * 3
    assert {"feature maps", "FC sizes", "dropout", "batch size", "epochs", "optimizer", "conv layers per block",
            "BatchNorm", "LR schedule", "training time (s)"} <= set(rows)
    assert "valid accuracy" not in rows  # only with train_pct



def test_loss_plot_is_a_png_written_without_pyplot(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    import fastlesson._io as io

    monkeypatch.setattr(plt, "figure", lambda *a, **k: pytest.fail("plot_losses used pyplot"))
    saved = []
    monkeypatch.setattr(sweep, "save_png", lambda fig, path: saved.append(path) or io.save_png(fig, path))
    rec = {**expand_grid(None)[0], "train_loss": [1.0, 0.6, 0.4], "valid_loss": [1.1, 0.9, 1.0]}
    path = sweep.plot_losses(rec, tmp_path / "plots" / "k.png")
    assert saved == [path] and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(path.parent.iterdir()) == [path]  # written atomically: no temporary file left beside it


def test_hardware_is_the_shared_record_string():
    from fastlesson import env

    assert sweep.hardware is env.hardware
    assert "threads" in env.hardware() or "CUDA" in env.hardware()


def test_subset_folder_keeps_first_n_per_class(tmp_path, smoke_data):
    out = subset_folder(smoke_data, tmp_path / "sub", limit=4)
    for split in ("train", "test"):
        for cls in (smoke_data / split).iterdir():
            kept = sorted(p.name for p in (out / split / cls.name).iterdir())
            assert kept == sorted(p.name for p in cls.iterdir())[:4]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        subset_folder(tmp_path / "nowhere", tmp_path / "x", 2)


# ---------------------------------------------------------------- training


def test_optimizer_comparison_same_budget(tmp_path, smoke_data):
    cfg = SweepConfig(data=str(smoke_data), out=str(tmp_path), size=16, limit=4, save_models=False,
                      **{**SMOKE_GRID, "lr": [3e-3], "epochs": [1], "opt": list(OPTIMIZERS)})
    result = run_sweep(cfg, log=None)
    assert [r["opt"] for r in result.records] == list(OPTIMIZERS)
    # limit=4: 4 images per class (3 classes) in each split
    assert {(r["n_train"], r["n_valid"]) for r in result.records} == {(12, 12)}
    assert all(len(r["train_loss"]) == 1 for r in result.records)
    # the optimizer really changes training: same seed and data, different losses
    assert len({round(r["train_loss"][0], 6) for r in result.records}) == len(OPTIMIZERS)
    assert "| optimizer | " + " | ".join(OPTIMIZERS) + " |" in result.table
    assert not (tmp_path / "models").exists()  # save_models=False


def test_train_pct_validates_on_part_of_train_and_tests_on_test(tmp_path, smoke_data, capture_learners):
    cfg = SweepConfig(data=str(smoke_data), out=str(tmp_path), size=16, train_pct=0.75,
                      **{**SMOKE_GRID, "lr": [3e-3]})
    rec = run_sweep(cfg, log=None).records[0]
    # 12 train images per class -> 9 train + 3 valid; the 6 test images per class are the test set
    assert (rec["n_train"], rec["n_valid"], rec["n_test"]) == (27, 9, 18)
    assert rec["eval_split"] == "test" and rec["valid_split"] == "random 25% of train"
    dls = capture_learners[0].dls
    train_files = {Path(p).resolve() for p in dls.train_ds.items["path"]}
    valid_files = {Path(p).resolve() for p in dls.valid_ds.items["path"]}
    train_dir = (smoke_data / "train").resolve()
    assert not train_files & valid_files and all(train_dir in p.parents for p in train_files | valid_files)
    # the test accuracy is the learner's accuracy on the test folder, not the validation set's
    learn = capture_learners[0]
    test_dl = sweep._test_dl(dls, smoke_data / "test")
    assert rec["accuracy"] == pytest.approx(float(learn.validate(dl=test_dl)[1]))
    assert rec["valid_accuracy"] == pytest.approx(float(learn.validate()[1]))
    table = (tmp_path / "sweep.md").read_text()
    assert "trained on 75% of train/" in table and "| valid accuracy |" in table


def test_train_pct_needs_a_test_folder(tmp_path, smoke_data):
    with pytest.raises(ValueError, match="train_pct needs .*train/ and test/"):
        run_sweep(SweepConfig(data=str(smoke_data / "train"), out=str(tmp_path), size=16, train_pct=0.8,
                              **SMOKE_GRID), log=None)


def test_smoke_sweep_saves_bundles_that_predict_like_the_learner(tmp_path, capture_learners):
    cfg = SweepConfig(smoke=True, out=str(tmp_path), train_pct=0.75, convs=[1], bn=[False])
    result = run_sweep(cfg, log=None)
    assert result.trained == 2 and len(capture_learners) == 2
    files = sorted((tmp_path / "smoke-data" / "test").rglob("*.png"))
    for rec, learn in zip(result.records, capture_learners):
        bundle = tmp_path / "models" / rec["key"]
        assert rec["model"] == str(bundle) and (bundle / "model.safetensors").is_file()
        meta = json.loads((bundle / "model.json").read_text())
        assert meta["arch"] == "small_cnn" and meta["arch_kwargs"] == {
            "channels": [8], "fc": [16], "dropout": 0.0, "convs_per_block": 1, "bn": False, "size": 16}
        # the sweep's images are plain [0, 1] pixels resized to 16 px: the bundle must say so
        assert meta["mean"] == [0.0] * 3 and meta["std"] == [1.0] * 3 and meta["size"] == [16, 16]
        predictor = load_model(bundle, device="cpu")
        learn.model.eval()
        want, _ = learn.get_preds(dl=learn.dls.test_dl(files))
        got = predictor.probs(files)
        assert torch.allclose(got, want, atol=1e-5)
        assert [p.label for p in predictor.predict(files)] == [learn.dls.vocab[i] for i in want.argmax(1)]


def test_fixed_schedule_keeps_the_lr_and_one_cycle_varies_it(tmp_path, smoke_data, capture_learners):
    cfg = SweepConfig(data=str(smoke_data), out=str(tmp_path), size=16,
                      **{**SMOKE_GRID, "lr": [2e-3], "sched": ["fixed", "one_cycle"]})
    run_sweep(cfg, log=None)
    fixed, cycle = (learn.recorder.lrs for learn in capture_learners)
    assert fixed == pytest.approx([2e-3] * len(fixed))
    assert max(cycle) == pytest.approx(2e-3, rel=0.01) and min(cycle) < 2e-4


def test_resume_skips_finished_configurations(tmp_path, smoke_data, monkeypatch):
    calls = []
    real = sweep.train_config

    def counting(cfg, dls, **kw):
        calls.append(cfg["lr"])
        return real(cfg, dls, **kw)

    monkeypatch.setattr(sweep, "train_config", counting)
    cfg = SweepConfig(data=str(smoke_data), out=str(tmp_path), size=16, save_models=False, **SMOKE_GRID)
    first = run_sweep(cfg, log=None)
    assert calls == [1e-3, 3e-3] and (first.trained, first.resumed) == (2, 0)
    before = json.loads((tmp_path / "results.json").read_text())
    again = run_sweep(cfg, log=None)
    assert calls == [1e-3, 3e-3] and (again.trained, again.resumed) == (0, 2)
    assert again.records == [before[r["key"]] for r in again.records]
    cfg.lr = [1e-3, 3e-3, 1e-2]
    bigger = run_sweep(cfg, log=None)
    assert calls[2:] == [1e-2] and (bigger.trained, bigger.resumed) == (1, 2)
    assert len(bigger.records) == 3 and "#3" in (tmp_path / "sweep.md").read_text()
    rec = bigger.records[2]
    assert rec["seed"] == 42 and ("threads" in rec["hardware"] or "CUDA" in rec["hardware"])
    assert len(rec["train_loss"]) == len(rec["valid_loss"]) == 2 and 0 <= rec["accuracy"] <= 1
    # another train_pct is another experiment: nothing resumed
    cfg.train_pct = 0.75
    assert run_sweep(cfg, log=None).resumed == 0


def test_legacy_call_still_works(tmp_path, smoke_data):
    result = run_sweep({**SMOKE_GRID, "lr": [3e-3]}, smoke_data, tmp_path, size=16, limit=4, log=None)
    assert result.trained == 1 and result.records[0]["n_train"] == 12
    assert json.loads((tmp_path / "config.json").read_text())["limit"] == 4
    with pytest.raises(ValueError, match="unknown grid key"):
        run_sweep({"learning_rate": [1]}, smoke_data, tmp_path, log=None)


def test_cli_smoke_writes_table_csv_plots(tmp_path):
    """scripts/sweep.py --smoke end to end in a subprocess (its own output folder)."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (out / "sweep.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| |"))
    assert header.count("#") == 2  # one column per configuration
    assert "test accuracy" in table and "training time" in table and "test split" in table
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 2 and {r["lr"] for r in rows} == {"0.001", "0.003"}
    assert sorted(p.stem for p in (out / "plots").glob("*.png")) == sorted(r["key"] for r in rows)
    effective = yaml.safe_load((out / "grid.yaml").read_text())
    assert effective["grid"]["lr"] == [0.001, 0.003] and effective["n_configs"] == 2
