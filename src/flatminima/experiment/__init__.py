"""The library's main job: train a model on a task with several methods over several seeds and report.

* :mod:`.models`: the model registry (``mlp``, ``cnn``, ``resnet``, the LoRA models) and its option checks.
* :mod:`.config`: :class:`ExperimentConfig` (fields, YAML/JSON loading, validation) and its constants.
* :mod:`.presets`: the named experiments (``--preset``) and suites.
* :mod:`.training`: one (method, seed) unit: training, evaluation, per-run diagnostics.
* :mod:`.records`: reading and checking a unit's record; :mod:`.tables`: means ± std over seeds as table data.
* :mod:`.units`: the units, their fingerprints and their state in an output folder; :mod:`.provenance`.
* :mod:`.results`: the result files; :mod:`.loggers`: TensorBoard, MLflow and W&B (the field ``loggers``).
* :mod:`.run`: :func:`run_experiment`: every unit of a config (resumable), the interpolation, the report;
  :func:`show_plan`: the same plan without training.
"""

from .config import (BASE_KEYS, DEFAULT_METHODS, LR_SCHEDULES, MAX_SEED, OPTIMIZERS, RUN_DIAGNOSTIC_OPTIONS,
                     RUN_DIAGNOSTICS, ExperimentConfig, batch_groups)
from .models import MODEL_OPTION_CHECKS, MODELS, available_models, build_model, lora_classifier, register_model
from .presets import MAIN_DIAGNOSTICS, MAIN_METHODS, PRESETS, SUITES, TEXT_METHODS, preset, suite
from .results import write_results
from .run import format_show, interpolate_methods, run_experiment, show_plan
from .tables import (DIAGNOSTIC_COLUMNS, Cell, Table, experiment_tables, mean_std, reference_method, summarize,
                     tables_markdown)
from .training import (accuracy_counts, cross_entropy, diagnostic_batches, evaluate, logits, resolve_device, run_diagnostics, run_one,
                       steps_per_epoch, train_model, trim_padding)

__all__ = [
    "BASE_KEYS", "DEFAULT_METHODS", "DIAGNOSTIC_COLUMNS", "LR_SCHEDULES", "MAIN_DIAGNOSTICS", "MAIN_METHODS",
    "MAX_SEED", "MODEL_OPTION_CHECKS", "MODELS", "OPTIMIZERS", "PRESETS", "RUN_DIAGNOSTICS", "RUN_DIAGNOSTIC_OPTIONS",
    "SUITES", "TEXT_METHODS", "Cell", "ExperimentConfig", "cross_entropy", "Table", "accuracy_counts", "available_models", "batch_groups", "build_model",
    "diagnostic_batches", "evaluate", "experiment_tables", "format_show", "interpolate_methods", "logits", "mean_std",
    "lora_classifier", "preset", "reference_method", "register_model", "resolve_device", "run_diagnostics",
    "run_experiment", "run_one", "show_plan", "steps_per_epoch", "suite", "summarize", "tables_markdown", "train_model",
    "trim_padding",
    "write_results",
]
