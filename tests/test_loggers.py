"""--log csv|tensorboard|wandb: fastai's own logger callbacks write readable logs of a tiny run."""

from __future__ import annotations

import csv
import importlib.util
import pickle
import random
import time

import pytest
import torch

from fastlesson import find_lr
from fastlesson.loggers import (
    LOGGERS,
    MissingExtraError,
    NotLogging,
    close_loggers,
    log_dir,
    logger_callbacks,
)

from _tiny import make_tiny_learner

N_TRAIN, BS = 32, 16  # 2 batches an epoch


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def two_fits(cbs, tmp_path):
    """A tiny run as the recipe makes one: an LR range test, then two fits (2 and 1 epochs)."""
    random.seed(0)
    learn = make_tiny_learner(n_train=N_TRAIN, n_valid=16, size=8, bs=BS, path=tmp_path)
    with learn.no_bar():
        find_lr(learn, num_it=24, end_lr=1e-2)  # must not be logged
        learn.fit(2, 1e-3, cbs=cbs)
        learn.fit(1, 1e-3, cbs=cbs)
    close_loggers(cbs)
    return learn


def test_csv_rows_for_every_epoch_of_every_fit(tmp_path):
    cbs = logger_callbacks("csv", tmp_path / "run")
    two_fits(cbs, tmp_path)
    rows = list(csv.reader((log_dir(tmp_path / "run") / "history.csv").open()))
    assert rows[0] == ["epoch", "train_loss", "valid_loss", "accuracy", "time"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "0"]  # 2 + 1 epochs, one header (same columns)
    assert all(float(r[2]) > 0 and 0 <= float(r[3]) <= 1 for r in rows[1:])


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="extra 'tensorboard' not installed")
def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cbs = logger_callbacks("tensorboard", tmp_path / "run")
    learn = two_fits(cbs, tmp_path)
    tb = log_dir(tmp_path / "run") / "tensorboard"
    files = list(tb.glob("events.out.tfevents.*"))
    assert files
    scalars = {}
    for f in files:  # one event file per fit
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    n_groups = len(learn.opt.hypers)
    assert {"train_loss", "valid_loss", "accuracy", *(f"lr_{i}" for i in range(n_groups))} <= set(scalars)
    n_batches = 3 * (N_TRAIN // BS)  # 3 epochs, none from the LR range test
    steps = sorted(e.step for e in scalars["train_loss"])
    assert steps == list(range(1, n_batches + 1))  # counting on across both fits
    assert len(scalars["valid_loss"]) == 3 and all(e.value > 0 for e in scalars["valid_loss"])
    assert {round(e.value, 9) for e in scalars[f"lr_{n_groups - 1}"]} == {1e-3}  # not the sweep's LRs


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="extra 'wandb' not installed")
def test_wandb_offline_run_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cbs = logger_callbacks("wandb", tmp_path / "run", name="tiny")
    two_fits(cbs, tmp_path)
    runs = list((log_dir(tmp_path / "run") / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (data,) = runs[0].glob("run-*.wandb")
    keys = ("train_loss", "valid_loss", "accuracy", "lr_0")
    for _ in range(100):  # wandb's service process may still be writing its record log after finish()
        missing = [k for k in keys if k.encode() not in data.read_bytes()]
        if not missing:
            break
        time.sleep(0.2)
    assert missing == []  # the logged keys appear in the record log
    import wandb

    assert wandb.run is None  # close_loggers finished it


@pytest.mark.parametrize("kind", LOGGERS)
def test_a_pickled_learner_carries_no_logger(kind, tmp_path, monkeypatch):
    """fastai's export pickles the learner with its callbacks: a logger must not break it (open files,
    writers, local classes) nor make export.pkl need tensorboard/wandb."""
    if importlib.util.find_spec({"csv": "csv"}.get(kind, kind)) is None:
        pytest.skip(f"extra {kind!r} not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cbs = logger_callbacks(kind, tmp_path / "run")
    learn = two_fits(cbs, tmp_path)
    learn.add_cbs(cbs)
    back = pickle.loads(pickle.dumps(learn.cbs))
    assert [type(cb) for cb in back if isinstance(cb, NotLogging)] == [NotLogging]


def test_none_is_no_loggers_and_bad_kind_is_named(tmp_path):
    assert logger_callbacks(None, tmp_path) == []
    with pytest.raises(ValueError, match="'tb'.*csv, tensorboard, wandb"):
        logger_callbacks("tb", tmp_path)
    assert LOGGERS == ("csv", "tensorboard", "wandb")


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_missing_package_names_the_extra(kind, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == kind else real(name, *a))
    with pytest.raises(MissingExtraError, match=rf"pip install 'fastlesson\[{kind}\]'"):
        logger_callbacks(kind, tmp_path)
    assert not (tmp_path / "logs").exists()
