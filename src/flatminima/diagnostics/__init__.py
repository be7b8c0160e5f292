"""Diagnostics: is this minimum flat? (DESIGN.md §5, §10.) Free functions that take
``(model, loss_fn, data)`` and return plain results; none of them writes the model (see
:mod:`flatminima.diagnostics.objective`)."""

from .objective import Objective, batch_size, is_batch, iter_batches, modes, select_params

__all__ = ["Objective", "batch_size", "is_batch", "iter_batches", "modes", "select_params"]
