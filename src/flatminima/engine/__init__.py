"""Training steps that own the passes: gradient accumulation, AMP, DDP ``no_sync`` and the BatchNorm policy."""

from .train_step import StepResult, TrainStep, distributed, record_unscaled, running_stat_buffers, train_step

__all__ = ["StepResult", "TrainStep", "distributed", "record_unscaled", "running_stat_buffers", "train_step"]
