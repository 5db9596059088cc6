"""fastlesson: the fast.ai lesson-2 recipe, reproduced and repaired on top of fastai.

The public API is re-exported here explicitly: plain functions that take a fastai ``Learner``.
"""

__version__ = "0.1.0"

# --- core: finder ---
from fastlesson.finder import LRFinderResult, find_lr  # noqa: F401
# --- end core: finder ---
# --- core: schedule ---
from fastlesson.schedule import (  # noqa: F401
    SCHEDULE_KINDS,
    SGDRScheduler,
    fit_one_cycle,
    fit_sgdr,
    freeze,
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
# --- end core: schedule ---
# --- core: optim ---
from fastlesson.optim import OPTIMIZERS, Lookahead, lookahead, opt_func  # noqa: F401
# --- end core: optim ---
# --- core: precompute ---
from fastlesson.precompute import (  # noqa: F401
    CachedFeatures,
    PrecomputeResult,
    cache_key,
    clear_memory_cache,
    precompute_head,
)
# --- end core: precompute ---
# --- recipe: data ---
from .data import (
    SOURCES,
    DataResult,
    flower_names,
    image_problem,
    load_data,
    sample_path,
)

# --- end recipe: data ---
# --- recipe: models ---
from .models import (
    OFFLINE_ARCHS,
    WeightsUnavailableError,
    build_model,
    create_learner,
    model_stats,
    splitter,
)

# --- end recipe: models ---
# --- recipe: recipe/report/export ---
from fastlesson.export import (
    Prediction,
    Predictor,
    export_bundle,
    export_learner,
    image_files,
    load_model,
    load_rgb,
    predict_files,
)
from fastlesson.recipe import RecipeConfig, RecipeResult, fit_until_overfit, run_recipe
from fastlesson.report import (
    confusion_matrix,
    most_confused,
    plot_confusion,
    plot_losses,
    plot_lr_schedule,
    plot_top_losses,
    write_report,
)
# --- end recipe: recipe/report/export ---
# --- seed extras: callbacks ---
from fastlesson.callbacks import (  # noqa: F401
    BestCheckpoint,
    EarlyStopping,
    HardExampleMining,
    NonFiniteGuard,
    PlateauLR,
)
# --- end seed extras: callbacks ---
# --- seed extras: smallcnn/sweep ---
from fastlesson.smallcnn import small_cnn, small_cnn_splitter  # noqa: F401
from fastlesson.sweep import (  # noqa: F401
    GRID_KEYS,
    SweepResult,
    expand_grid,
    normalize_grid,
    run_sweep,
    sweep_table,
)
# --- end seed extras: smallcnn/sweep ---
# --- scrape ---
from fastlesson.scrape import (  # noqa: F401
    STATUSES,
    ScrapeConfig,
    ScrapeResult,
    UrlEntry,
    read_url_list,
    run_scrape,
    scrape_dataset,
)
from fastlesson.scrape_image import normalise_image  # noqa: F401
from fastlesson.scrape_search import (  # noqa: F401
    DDGSBackend,
    QueryOutcome,
    SearchBackend,
    SearchHit,
    StaticBackend,
    search_with_retry,
)
# --- end scrape ---
