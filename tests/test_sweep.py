"""Sweeps: grid parsing, the seed's table, CSV and plots, resume, optimizers, the CLI."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import fastlesson.sweep as sweep
from fastlesson.optim import OPTIMIZERS
from fastlesson.sweep import (
    GRID_KEYS,
    SMOKE_GRID,
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


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    return make_smoke_data(tmp_path_factory.mktemp("sweepdata") / "imgs", size=16)


def test_bad_grid_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown grid key\(s\) \['learning_rate'\].*'lr'.*'dropout'"):
        normalize_grid({"learning_rate": [1e-3]})


@pytest.mark.parametrize("grid,match", [({"bs": [0]}, "bs"), ({"dropout": [1.5]}, "dropout"),
                                        ({"channels": ["a,b"]}, "channels"), ({"opt": ["adamw"]}, "ranger"),
                                        ({"lr": []}, "lr")])
def test_bad_grid_values(grid, match):
    with pytest.raises(ValueError, match=match):
        normalize_grid(grid)


def test_grid_parsing_from_yaml_and_cli_strings():
    grid = normalize_grid(yaml.safe_load("lr: [1e-3, 0.003]\nchannels: ['32,64', [64, 128], 16]\n"
                                         "fc: [none, 512, '256,128']\nopt: Adam\nbs: 32\n"))
    assert grid["lr"] == [1e-3, 3e-3]  # YAML reads 1e-3 as a string
    assert grid["channels"] == [(32, 64), (64, 128), (16,)]
    assert grid["fc"] == [(), (512,), (256, 128)]
    assert grid["opt"] == ["adam"] and grid["bs"] == [32]
    assert grid["dropout"] == sweep.DEFAULT_GRID["dropout"]  # missing keys take defaults
    configs = expand_grid({"lr": [1e-3, 3e-3], "dropout": [0, 0.5], "opt": ["sgd", "adam"]})
    assert len(configs) == 8 and all(set(c) == set(GRID_KEYS) for c in configs)


def test_config_key_is_stable_and_sensitive():
    cfg = expand_grid(SMOKE_GRID)[0]
    same = json.loads(json.dumps(cfg))  # lists instead of tuples, as read back from results.json
    assert config_key(cfg, data="x", seed=1) == config_key(same, seed=1, data="x")
    assert config_key(cfg, data="x", seed=1) != config_key(cfg, data="x", seed=2)
    assert config_key(cfg, data="x", seed=1) != config_key({**cfg, "lr": 0.1}, data="x", seed=1)


def test_table_has_one_column_per_configuration():
    recs = [{**c, "key": f"k{i}", "accuracy": 0.5 + i / 10, "seconds": 3.0, "train_loss": [1.0, 0.5],
             "valid_loss": [1.1, 0.9]} for i, c in enumerate(expand_grid({"lr": [1e-3, 1e-2, 1e-1]}))]
    lines = sweep_table(recs).strip().splitlines()
    assert all(line.count("|") == 3 + 2 for line in lines)  # label column + 3 configurations
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in lines[2:]}
    assert [v.strip() for v in rows["learning rate"]] == ["0.001", "0.01", "0.1"]
    assert [v.strip() for v in rows["test accuracy"]] == ["0.5000", "0.6000", "0.7000"]
    assert {"feature maps", "FC sizes", "dropout", "batch size", "epochs", "optimizer",
            "training time (s)"} <= set(rows)


def test_subset_folder_keeps_first_n_per_class(tmp_path, smoke_data):
    out = subset_folder(smoke_data, tmp_path / "sub", limit=4)
    for split in ("train", "test"):
        for cls in (smoke_data / split).iterdir():
            kept = sorted(p.name for p in (out / split / cls.name).iterdir())
            assert kept == sorted(p.name for p in cls.iterdir())[:4]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        subset_folder(tmp_path / "nowhere", tmp_path / "x", 2)


def test_optimizer_comparison_same_budget(tmp_path, smoke_data):
    grid = {**SMOKE_GRID, "lr": [3e-3], "epochs": [1], "opt": list(OPTIMIZERS)}
    result = run_sweep(grid, smoke_data, tmp_path, size=16, limit=4, log=None)
    assert [r["opt"] for r in result.records] == list(OPTIMIZERS)
    # limit=4: 4 images per class (3 classes) in each split
    assert {(r["n_train"], r["n_valid"]) for r in result.records} == {(12, 12)} and all(len(r["train_loss"]) == 1 for r in result.records)
    # the optimizer really changes training: same seed and data, different losses
    assert len({round(r["train_loss"][0], 6) for r in result.records}) == len(OPTIMIZERS)
    assert "| optimizer | " + " | ".join(OPTIMIZERS) + " |" in result.table


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One smoke sweep through the CLI in a subprocess (imports dominate its time)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc.stdout


def test_cli_smoke_writes_table_csv_plots(cli_run):
    out, stdout = cli_run
    table = (out / "sweep.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| |"))
    assert header.count("#") == 2  # one column per configuration
    assert "test accuracy" in table and "training time" in table and "test split" in table
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 2 and {r["lr"] for r in rows} == {"0.001", "0.003"}
    assert sorted(p.stem for p in (out / "plots").glob("*.png")) == sorted(r["key"] for r in rows)
    effective = yaml.safe_load((out / "grid.yaml").read_text())
    assert effective["grid"]["lr"] == [0.001, 0.003] and effective["n_configs"] == 2
    assert "trained 2, resumed 0" in stdout


def test_resume_skips_finished_configurations(cli_run, monkeypatch):
    out, _ = cli_run
    calls = []
    real = sweep.train_config

    def counting(cfg, dls, seed=42):
        calls.append(cfg["lr"])
        return real(cfg, dls, seed=seed)

    monkeypatch.setattr(sweep, "train_config", counting)
    before = json.loads((out / "results.json").read_text())
    # the CLI's run, resumed in-process: same grid and data -> nothing trained, same records
    again = run_sweep(SMOKE_GRID, out / "smoke-data", out, size=16, log=None)
    assert calls == [] and (again.trained, again.resumed) == (0, 2)
    assert again.records == [before[r["key"]] for r in again.records]
    bigger = run_sweep({**SMOKE_GRID, "lr": [1e-3, 3e-3, 1e-2]}, out / "smoke-data", out, size=16, log=None)
    assert calls == [1e-2] and (bigger.trained, bigger.resumed) == (1, 2)
    assert len(bigger.records) == 3 and "#3" in (out / "sweep.md").read_text()
    rec = bigger.records[2]
    assert rec["seed"] == 42 and ("threads" in rec["hardware"] or "CUDA" in rec["hardware"])
    assert len(rec["train_loss"]) == len(rec["valid_loss"]) == 2 and 0 <= rec["accuracy"] <= 1


def test_cli_bad_grid_key(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("sweep_cli", ROOT / "scripts" / "sweep.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [0.1]\n")
    with pytest.raises(ValueError, match="valid keys"):
        cli.main(["--smoke", "--out", str(tmp_path / "o"), "--grid", str(bad)])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        cli.main(["--data", "x", "--grid", str(tmp_path / "missing.yaml")])
    assert not (tmp_path / "o").exists()  # checked before any data or output is written
