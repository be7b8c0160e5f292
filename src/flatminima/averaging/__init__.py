"""Weight averaging: SWA, EMA and SWAD.

Each averager keeps a copy of the model in a ``torch.optim.swa_utils.AveragedModel`` and is fed
the weights the training loop holds after every optimizer step, so it works alone or on top of any
optimizer, flatminima's methods included (they restore ``w`` before the base optimizer steps, so
the averaged weights are never the perturbed ones)::

    avg = fm.SWA(model, start=1000, every=100)     # or fm.EMA(model, decay=0.999), fm.SWAD(model)
    for step, batch in enumerate(batches):
        opt.step(closure)
        avg.update(step)                             # decides whether this step counts
        if swad_eval_due(step):                      # SWAD only
            avg.report_validation(step, val_loss(model))
            if avg.finished:
                break
    final = avg.finalize(train_loader)               # BatchNorm statistics recomputed; averaged model

All averaging is the foreach path (``torch._foreach_lerp_`` through ``get_swa_multi_avg_fn`` /
``get_ema_multi_avg_fn``). Integer tensors (BatchNorm's ``num_batches_tracked``) are never
averaged: they are counters, so the averaged model takes the model's current value.

**Buffers.** ``use_buffers=False`` (SWA, SWAD default): only parameters are averaged; buffers are
copied from the model, so BatchNorm running statistics belong to the *last* model, not to the
averaged weights: pass a loader to ``finalize`` to recompute them for the averaged weights (what
Izmailov et al. do). ``use_buffers=True`` (EMA default): floating buffers are averaged like the
parameters (the mean of the running statistics, a cheap approximation that needs no data pass);
``finalize(loader)`` still recomputes BatchNorm statistics if a loader is given.

Modules: :mod:`.base` (the shell every averager shares), :mod:`.swa`, :mod:`.ema`, :mod:`.swad`,
:mod:`.bn` (:func:`update_bn`).
"""

from .bn import update_bn
from .ema import EMA
from .swa import SWA
from .swad import SWAD

# The private helpers stay importable from here, as before the split.
from .base import (AvgFn, _Averager, _AvgFn, _check_device, _check_model, _floating, _merge_,  # noqa: F401
                   _schedule_counts, _split, _tensors)
from .bn import _BatchForward, _has_batchnorm, _to  # noqa: F401
from .swad import _Evaluation  # noqa: F401

__all__ = ["SWA", "EMA", "SWAD", "update_bn"]
