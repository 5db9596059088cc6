"""Training loggers for `--log csv|tensorboard|wandb`: fastai's own callbacks, set up for a run folder.

    cbs = logger_callbacks("tensorboard", out_dir)   # pass as `cbs=` to each fit of the run
    ...
    close_loggers(cbs)                               # at the end of the run (finishes the wandb run)

Everything goes under `out_dir/logs/`: `history.csv` (fastai's CSVLogger, one row per epoch, every fit
of the run appended), `tensorboard/` (fastai's TensorBoardCallback: train_loss and the LR of each layer
group per batch, valid_loss and metrics per epoch), `wandb/` (fastai's WandbCallback, in offline mode:
`wandb sync out_dir/logs/wandb/offline-run-*` uploads it later). Across the several fits of a run the
TensorBoard step keeps counting (fastai's restarts at 0 each fit), and fits made by an LR range test
(`fastlesson.find_lr`) are not logged. TensorBoard and W&B are optional extras:
`pip install 'fastlesson[tensorboard]'` / `pip install 'fastlesson[wandb]'`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from fastai.callback.core import Callback
from fastai.callback.progress import CSVLogger

__all__ = ["LOGGERS", "MissingExtraError", "NotLogging", "logger_callbacks", "close_loggers", "log_dir"]

LOGGERS = ("csv", "tensorboard", "wandb")  # what --log accepts
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> (pip package, fastlesson extra)
WANDB_PROJECT = "fastlesson"  # W&B project name of offline runs


class MissingExtraError(ImportError):
    """An optional logger's package is not installed; the message names the extra to install."""


def log_dir(out_dir: str | os.PathLike) -> Path:
    """Where the loggers write: `out_dir/logs`."""
    return Path(out_dir) / "logs"


def _in_range_test(learn) -> bool:
    from fastlesson.finder import _RangeTest

    return any(isinstance(cb, _RangeTest) for cb in learn.cbs)


def _require(kind: str) -> None:
    package = EXTRAS[kind]
    if importlib.util.find_spec(package) is None:
        raise MissingExtraError(f"--log {kind} needs the {package!r} package: "
                                f"pip install 'fastlesson[{kind}]' (or pip install {package})")


class NotLogging(Callback):
    """What a logger callback becomes when its learner is pickled (fastai's `export`): nothing, so an
    export.pkl neither holds open files or writers nor needs tensorboard/wandb to load."""


class _NotExported:
    def __reduce__(self):
        return NotLogging, ()


class RunCSVLogger(_NotExported, CSVLogger):
    """fastai's CSVLogger appending every fit of a run to one file; a header line is written when the
    columns change (a new file, or a fit with other metrics), not before every fit."""

    def __init__(self, fname: Path):
        super().__init__(fname=Path(fname), append=True)
        self._header = None

    def before_fit(self):
        if _in_range_test(self.learn) or hasattr(self, "gather_preds"):
            self.run = False  # fastai resets `run` after the fit
            return
        path = self.path / self.fname  # an absolute fname wins over learn.path
        path.parent.mkdir(parents=True, exist_ok=True)
        header = ",".join(self.recorder.metric_names)
        self.file = path.open("a")
        if header != self._header:
            self.file.write(header + "\n")
            self._header = header
        self.old_logger, self.learn.logger = self.logger, self._write_line


def _tensorboard_class():
    from fastai.callback.tensorboard import TensorBoardCallback

    class RunTensorBoard(_NotExported, TensorBoardCallback):
        """fastai's TensorBoardCallback with a step that keeps counting across the fits of a run, per
        training batch only, no graph trace and no image panels (they need a typed fastai DataLoader
        and slow a CPU run)."""

        def __init__(self, log_dir):
            super().__init__(log_dir=str(log_dir), trace_model=False, log_preds=False)
            self.step_offset = 0

        @property
        def train_iter(self):  # fastai's callback reads self.train_iter, which restarts at 0 each fit
            return self.learn.train_iter + self.step_offset

        def before_fit(self):
            if _in_range_test(self.learn):
                self.run = False
                return
            super().before_fit()

        def after_batch(self):
            if self.training:  # fastai's also logs train_loss after each validation batch (a repeated step)
                super().after_batch()

        def after_fit(self):
            super().after_fit()
            self.step_offset += self.learn.train_iter

        def close(self):
            pass  # the writer is closed at the end of each fit

    return RunTensorBoard


def _wandb_class():
    import wandb
    from fastai.callback.wandb import WandbCallback

    class RunWandb(_NotExported, WandbCallback):
        """fastai's WandbCallback on an offline run; no prediction tables (they need a typed fastai
        DataLoader). `close()` finishes the W&B run."""

        def __init__(self, run):
            super().__init__(log_preds=False)
            self.wandb_run = run

        def before_fit(self):
            if _in_range_test(self.learn):
                self.run = False
                return
            learn = self.learn
            # fastai's config logging fails on every plain value with current fastcore (its
            # init_args calls vars() on str/int): log no learner config here; logger_callbacks
            # passes the run's config to wandb.init instead
            learn.gather_args = dict  # for this call only
            try:
                super().before_fit()
            finally:
                del learn.gather_args

        def close(self):
            if wandb.run is not None and wandb.run is self.wandb_run:
                self.wandb_run.finish()

    return RunWandb


def logger_callbacks(kind: str | None, out_dir: str | os.PathLike, name: str | None = None,
                     config: dict | None = None) -> list:
    """fastai callbacks that log a run into `out_dir/logs/` for `kind` (csv | tensorboard | wandb);
    [] for None. `name` and `config` (e.g. the effective RecipeConfig as a dict) name and describe the
    W&B run. A missing optional package raises MissingExtraError naming the extra."""
    if kind is None:
        return []
    if kind not in LOGGERS:
        raise ValueError(f"--log {kind!r} is not a logger: use one of {', '.join(LOGGERS)}")
    logs = log_dir(out_dir)
    if kind == "csv":
        return [RunCSVLogger(logs / "history.csv")]
    _require(kind)
    if kind == "tensorboard":
        return [_tensorboard_class()(logs / "tensorboard")]
    import wandb

    logs.mkdir(parents=True, exist_ok=True)  # wandb writes logs/wandb/offline-run-*
    # offline: nothing leaves the machine; `wandb sync` uploads the run later. console="off": the
    # recipe's own output is not copied into the run
    run = wandb.init(project=WANDB_PROJECT, name=name or Path(out_dir).name, dir=str(logs),
                     mode="offline", config=config, reinit="finish_previous",
                     settings=wandb.Settings(silent=True, console="off"))
    return [_wandb_class()(run)]


def close_loggers(cbs) -> None:
    """Finish what the loggers hold open (the W&B run); call once, at the end of the run."""
    for cb in cbs:
        close = getattr(cb, "close", None)
        if callable(close):
            close()
