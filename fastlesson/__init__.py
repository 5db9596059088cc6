"""fastlesson: the fast.ai lesson-2 recipe, reproduced and repaired on top of fastai.

The public API is re-exported here explicitly: plain functions that take a fastai ``Learner``.
"""

__version__ = "0.1.0"

# training core
from fastlesson.finder import LRFinderResult, find_lr
from fastlesson.schedule import (
    SCHEDULE_KINDS,
    SGDRScheduler,
    fit_one_cycle,
    fit_sgdr,
    freeze,
    freeze_to,
    lr_groups,
    n_groups,
    plot_schedules,
    resolve_lrs,
    schedule_preview,
    sgdr_cycle_lengths,
    sgdr_epochs,
    sgdr_lrs,
    unfreeze,
)
from fastlesson.optim import OPTIMIZERS, Lookahead, lookahead, opt_func
from fastlesson.precompute import (
    CachedFeatures,
    PrecomputeResult,
    cache_key,
    clear_memory_cache,
    precompute_head,
    precompute_learner,
)
from fastlesson.distributed import (
    broadcast_object,
    distrib_ctx,
    init_distributed,
    is_main_process,
    rank,
    world_size,
)

# data, backbones, the recipe, its report, export and predict
from fastlesson.data import SOURCES, DataResult, flower_names, image_problem, load_data, sample_path
from fastlesson.models import (
    OFFLINE_ARCHS,
    WeightsUnavailableError,
    build_model,
    create_learner,
    model_stats,
    native_size,
    splitter,
)
from fastlesson.export import (
    TTA,
    BadModelFileError,
    OnnxPredictor,
    Prediction,
    Predictor,
    TorchPredictor,
    export_bundle,
    export_learner,
    export_onnx,
    image_files,
    learner_tta,
    load_model,
    load_rgb,
    predict_files,
    save_examples,
)
from fastlesson.app import build_app, export_space
from fastlesson.recipe import RecipeConfig, RecipeResult, RecipeState, resume_recipe, run_recipe
from fastlesson.schedule import OverfitProgress, ValidateAtFitEnd, fit_until_overfit
from fastlesson.finder import rise_lr
from fastlesson.budget import BudgetPlan, plan_budget
from fastlesson.report import (
    confusion_matrix,
    most_confused,
    plot_confusion,
    plot_losses,
    plot_lr_schedule,
    plot_top_losses,
    write_report,
)

# what the other seed projects did: callbacks, small CNN, sweeps
from fastlesson.callbacks import (
    BestCheckpoint,
    BestWeights,
    EarlyStopping,
    HardExampleMining,
    NonFiniteGuard,
    PlateauLR,
)
from fastlesson.smallcnn import small_cnn, small_cnn_splitter
from fastlesson.sweep import (
    GRID_KEYS,
    SweepConfig,
    SweepResult,
    expand_grid,
    normalize_grid,
    run_sweep,
    sweep_table,
)

# data sets from a web image search
from fastlesson.scrape import (
    STATUSES,
    ScrapeConfig,
    ScrapeResult,
    UrlEntry,
    read_url_list,
    run_scrape,
    scrape_dataset,
)
from fastlesson.scrape_image import normalise_image
from fastlesson.scrape_search import (
    DDGSBackend,
    QueryOutcome,
    SearchBackend,
    SearchHit,
    StaticBackend,
    search_with_retry,
)

__all__ = [
    # training core
    "LRFinderResult", "find_lr",
    "SCHEDULE_KINDS", "SGDRScheduler", "fit_one_cycle", "fit_sgdr", "freeze", "freeze_to", "lr_groups", "n_groups",
    "plot_schedules", "resolve_lrs", "schedule_preview", "sgdr_cycle_lengths", "sgdr_epochs", "sgdr_lrs",
    "unfreeze",
    "OPTIMIZERS", "Lookahead", "lookahead", "opt_func",
    "CachedFeatures", "PrecomputeResult", "cache_key", "clear_memory_cache", "precompute_head",
    "precompute_learner",
    "broadcast_object", "distrib_ctx", "init_distributed", "is_main_process", "rank", "world_size",
    # data, backbones, recipe, report, export
    "SOURCES", "DataResult", "flower_names", "image_problem", "load_data", "sample_path",
    "OFFLINE_ARCHS", "WeightsUnavailableError", "build_model", "create_learner", "model_stats", "native_size",
    "splitter",
    "Prediction", "Predictor", "export_bundle", "export_learner", "image_files", "load_model", "load_rgb",
    "predict_files", "TTA", "BadModelFileError", "OnnxPredictor", "TorchPredictor", "export_onnx", "learner_tta",
    "save_examples", "build_app", "export_space",
    "RecipeConfig", "RecipeResult", "RecipeState", "fit_until_overfit", "resume_recipe", "run_recipe",
    "OverfitProgress", "ValidateAtFitEnd", "rise_lr", "BudgetPlan", "plan_budget",
    "confusion_matrix", "most_confused", "plot_confusion", "plot_losses", "plot_lr_schedule",
    "plot_top_losses", "write_report",
    # callbacks, small CNN, sweeps
    "BestCheckpoint", "BestWeights", "EarlyStopping", "HardExampleMining", "NonFiniteGuard", "PlateauLR",
    "small_cnn", "small_cnn_splitter",
    "GRID_KEYS", "SweepConfig", "SweepResult", "expand_grid", "normalize_grid", "run_sweep", "sweep_table",
    # scraping
    "STATUSES", "ScrapeConfig", "ScrapeResult", "UrlEntry", "read_url_list", "run_scrape", "scrape_dataset",
    "normalise_image",
    "DDGSBackend", "QueryOutcome", "SearchBackend", "SearchHit", "StaticBackend", "search_with_retry",
]
