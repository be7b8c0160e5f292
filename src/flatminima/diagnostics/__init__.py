"""Diagnostics: is this minimum flat? Free functions that take
``(model, loss_fn, data)`` and return plain results; none of them writes the model (see
:mod:`flatminima.diagnostics.objective`; :func:`regauge_` is the one tool here that does: it
applies a LoRA gauge transform in place, undone bitwise by its result's ``restore()``).
Figures: :mod:`flatminima.diagnostics.plots` (matplotlib, imported on use)."""

from .gauge import AdapterGauge, Gauge, GaugePoint, LoRAGauge, lora_gauge, regauge_, regauged
from .hessian import (BatchEigenvalues, CurvatureOperator, Eigenvalues, SpectralDensity, Trace, batch_top_eigenvalues,
                      hessian_trace, hvp, power_iteration, spectral_density, top_eigenvalues)
from .landscape import (Interpolation, Landscape, filter_normalize, filter_normalized_direction, interpolate,
                        landscape_directions, load_npz, loss_landscape, save_npz)
from .objective import Objective, batch_size, is_batch, iter_batches, modes, select_params
from .robustness import PerturbationCurve, RobustnessTable, accuracy, corruption_robustness, perturbation_curve
from .sharpness import AverageSharpness, MSharpness, Sharpness, average_sharpness, m_sharpness, worst_case_sharpness
from .shift import ShiftStrength, ShiftTrial, mixed_dataset, shift_strength, shift_trial
from .report import report
from .training import TrainingLog

__all__ = [
    "AdapterGauge", "Gauge", "GaugePoint", "LoRAGauge", "lora_gauge", "regauge_", "regauged",
    "BatchEigenvalues", "CurvatureOperator", "Eigenvalues", "SpectralDensity", "Trace", "batch_top_eigenvalues",
    "hessian_trace", "hvp", "power_iteration", "report", "spectral_density", "top_eigenvalues",
    "AverageSharpness", "Interpolation", "Landscape", "MSharpness", "Objective", "PerturbationCurve",
    "RobustnessTable", "Sharpness", "ShiftStrength", "ShiftTrial", "TrainingLog", "accuracy", "average_sharpness",
    "batch_size", "corruption_robustness", "filter_normalize", "filter_normalized_direction", "interpolate",
    "is_batch", "iter_batches", "landscape_directions", "load_npz", "loss_landscape", "m_sharpness", "mixed_dataset",
    "modes", "perturbation_curve", "save_npz", "select_params", "shift_strength", "shift_trial",
    "worst_case_sharpness",
]
