"""fastlesson: the fast.ai lesson-2 recipe, reproduced and repaired on top of fastai.

The public API is re-exported here explicitly: plain functions that take a fastai ``Learner``.
"""

__version__ = "0.1.0"

# The names the README's API tour shows (tests/test_api.py checks that they agree); everything else is
# imported from its module, e.g. `from fastlesson.export import learner_tta`.

# training core: LR range test, schedules, freezing, optimizers, precomputed activations
from fastlesson.finder import LRFinderResult, find_lr
from fastlesson.schedule import (
    fit_one_cycle,
    fit_sgdr,
    freeze,
    freeze_to,
    lr_groups,
    n_groups,
    plot_schedules,
    schedule_preview,
    sgdr_cycle_lengths,
    sgdr_epochs,
    sgdr_lrs,
    unfreeze,
)
from fastlesson.optim import OPTIMIZERS, Lookahead, lookahead, opt_func
from fastlesson.precompute import precompute_head, precompute_learner
from fastlesson.distributed import distrib_ctx, is_main_process

# data, backbones, the recipe, export and predict
from fastlesson.data import load_data, sample_path
from fastlesson.models import create_learner
from fastlesson.export import export_bundle, load_model
from fastlesson.recipe import RecipeConfig, run_recipe

# callbacks and the small CNN of the seed projects
from fastlesson.callbacks import (
    BestCheckpoint,
    EarlyStopping,
    HardExampleMining,
    NonFiniteGuard,
    PlateauLR,
    ProgressiveResize,
    average_states,
)
from fastlesson.smallcnn import small_cnn, small_cnn_splitter

# data sets from a web image search
from fastlesson.scrape import ScrapeConfig, scrape_dataset

__all__ = [
    # training core
    "LRFinderResult", "find_lr",
    "fit_one_cycle", "fit_sgdr", "freeze", "freeze_to", "lr_groups", "n_groups", "plot_schedules",
    "schedule_preview", "sgdr_cycle_lengths", "sgdr_epochs", "sgdr_lrs", "unfreeze",
    "OPTIMIZERS", "Lookahead", "lookahead", "opt_func",
    "precompute_head", "precompute_learner",
    "distrib_ctx", "is_main_process",
    # data, backbones, recipe, export
    "load_data", "sample_path", "create_learner", "export_bundle", "load_model", "RecipeConfig", "run_recipe",
    # callbacks, small CNN
    "BestCheckpoint", "EarlyStopping", "HardExampleMining", "NonFiniteGuard", "PlateauLR", "ProgressiveResize",
    "average_states",
    "small_cnn", "small_cnn_splitter",
    # scraping (the rest of the scraper: fastlesson.scrape)
    "ScrapeConfig", "scrape_dataset",
]
