"""The library's main job: train a model on a task with several methods over several seeds and report.

* :mod:`.models`: the model registry (``mlp``, ``cnn``, ``resnet``, the LoRA models) and its option checks.
* :mod:`.config`: :class:`ExperimentConfig` (fields, YAML/JSON loading, validation) and its constants.
* :mod:`.presets`: the named experiments (``--preset``) and suites.
* :mod:`.training`: one (method, seed) unit: training, evaluation, per-run diagnostics.
* :mod:`.results`: the summary over seeds, the Markdown tables and the result files.
* :mod:`.run`: :func:`run_experiment`: every unit of a config (resumable), the interpolation, the report.
"""

from .config import (BASE_KEYS, DEFAULT_METHODS, LR_SCHEDULES, MAX_SEED, OPTIMIZERS, RUN_DIAGNOSTIC_OPTIONS,
                     RUN_DIAGNOSTICS, ExperimentConfig, batch_groups)
from .models import MODEL_OPTION_CHECKS, MODELS, available_models, build_model, lora_classifier, register_model
from .presets import MAIN_DIAGNOSTICS, MAIN_METHODS, PRESETS, SUITES, TEXT_METHODS, preset, suite
from .results import DIAGNOSTIC_COLUMNS, diagnostics_table, format_table, reference_method, summarize, write_results
from .run import interpolate_methods, run_experiment
from .training import (accuracy_counts, diagnostic_batches, evaluate, logits, resolve_device, run_diagnostics, run_one,
                       steps_per_epoch, train_model, trim_padding)

# Private names, kept importable from here as before the split.
from .config import _DEVICE, _check_base_settings  # noqa: F401
from .models import (_check_blocks, _cnn, _dummy_lora_model, _efficientnet_lite0_lora, _mlp,  # noqa: F401
                     _minilm_lora, _resnet, _resnet18, _resnet_lora)
from .presets import (_preset_continual, _preset_continual_full, _preset_continual_quick,  # noqa: F401
                      _preset_fashion, _preset_fashion7, _preset_full, _preset_quick, _preset_repro_fashion,
                      _preset_repro_text, _preset_split_fashion, _preset_split_fashion_lora, _preset_text)
from .results import _CSV_FIELDS, _mean_std  # noqa: F401
from .run import _model_shapes, _progress_bar, _run_units  # noqa: F401
from .training import _base_optimizer, _cross_entropy, _sync, _train  # noqa: F401

__all__ = [
    "BASE_KEYS", "DEFAULT_METHODS", "DIAGNOSTIC_COLUMNS", "LR_SCHEDULES", "MAIN_DIAGNOSTICS", "MAIN_METHODS",
    "MAX_SEED", "MODEL_OPTION_CHECKS", "MODELS", "OPTIMIZERS", "PRESETS", "RUN_DIAGNOSTICS", "RUN_DIAGNOSTIC_OPTIONS",
    "SUITES", "TEXT_METHODS", "ExperimentConfig", "accuracy_counts", "available_models", "batch_groups", "build_model",
    "diagnostic_batches", "diagnostics_table", "evaluate", "format_table", "interpolate_methods", "logits",
    "lora_classifier", "preset", "reference_method", "register_model", "resolve_device", "run_diagnostics",
    "run_experiment", "run_one", "steps_per_epoch", "suite", "summarize", "train_model", "trim_padding",
    "write_results",
]
