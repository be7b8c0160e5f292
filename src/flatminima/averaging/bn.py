"""BatchNorm statistics for averaged weights: :func:`update_bn`, whatever the shape of the loader's batches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import swa_utils


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


# --------------------------------------------------------------------------------------------
# BatchNorm statistics


def _to(batch: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple takes positional fields
        return type(batch)(*(_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


class _BatchForward(nn.Module):
    """Calls the wrapped module on one loader batch, whatever its shape.

    ``torch.optim.swa_utils.update_bn`` calls ``model(batch[0])`` for list/tuple batches and
    ``model(batch)`` otherwise; it cannot call ``model(**batch)`` for a dict. The loader is
    re-wrapped so each item is the 1-tuple ``(batch,)`` and this module does the dispatch.
    """

    def __init__(self, module: nn.Module, forward: Optional[Callable[[nn.Module, Any], Any]],
                 device: Optional[torch.device]):
        super().__init__()
        self.module = module
        self.fn = forward
        self.device = device

    def forward(self, batch: Any) -> Any:
        batch = _to(batch, self.device)
        if self.fn is not None:
            return self.fn(self.module, batch)
        if isinstance(batch, Tensor):
            return self.module(batch)
        if isinstance(batch, (list, tuple)):
            return self.module(batch[0])
        if isinstance(batch, Mapping):
            return self.module(**batch)
        raise TypeError(f"Cannot feed a batch of type {type(batch).__name__} to the model: pass "
                        "forward=lambda module, batch: module(...)")


def update_bn(loader: Iterable[Any], module: nn.Module, *, device: Union[None, str, torch.device] = "auto",
              forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> nn.Module:
    """Recompute the BatchNorm running statistics of ``module`` with one pass over ``loader``.

    Runs ``torch.optim.swa_utils.update_bn``: every BatchNorm layer is reset and, with
    ``momentum=None``, accumulates the *cumulative* average of the batch statistics
    (``running_mean = (1/B)·Σ_b mean_b``, ``running_var = (1/B)·Σ_b var_b`` unbiased,
    ``num_batches_tracked = B``), in train mode and without gradients. Batches may be a tensor
    (``module(x)``), a tuple/list whose first element is the input (``module(batch[0])``), a dict
    (``module(**batch)``, the Hugging Face convention) or anything with ``forward(module, batch)``.
    ``device="auto"`` moves the inputs to the module's device (None: leave them where they are).
    Each submodule's train/eval mode and every momentum are restored afterwards; if a batch
    raises, the statistics are restored too.
    """
    if device == "auto":
        first = next(iter(module.parameters()), None)
        device = first.device if first is not None else None
    elif device is not None:
        device = torch.device(device)
    modes = [(m, m.training) for m in module.modules()]
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, [b.clone() for b in m.buffers()]) for m in norms]
    wrapper = _BatchForward(module, forward, device)
    try:
        swa_utils.update_bn(((batch,) for batch in loader), wrapper)
    except BaseException:
        # A batch that fails half-way would leave reset statistics and momentum=None behind.
        with torch.no_grad():
            for m, (momentum, buffers) in zip(norms, saved):
                m.momentum = momentum
                torch._foreach_copy_(list(m.buffers()), buffers)
        raise
    finally:
        # update_bn restores one mode for the whole tree; a model in train mode with a frozen
        # (eval) submodule must come back exactly as it was.
        for m, training in modes:
            m.training = training
    return module
