"""DeepSpeed ZeRO-1/2: any method of the registry on a ``deepspeed.initialize`` engine, with
DeepSpeed's own reduction, partitioned optimizer, clipping, LR scheduler and checkpoints.

    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(...), config=ds_config)
    step = DeepSpeedStep(engine, "sam", loss_fn, rho=0.05, total_steps=1000)
    for window in windows:            # gradient_accumulation_steps micro-batches each
        loss = step(window)

Why not DeepSpeed's backward for every pass: ZeRO-1/2 reduce each gradient into the partitions of
its flat fp32 master copy as it is accumulated (ZeRO-2 in hooks, then frees ``.grad``), and wrap the
optimizer so that its parameter groups point at those partitions. A method needs every pass's whole
gradient on the model's weights (which ZeRO-1/2 keep whole on every rank) before the update. So:

1. the passes of :class:`flatminima.TrainStep` run on ``engine.module`` with the engine's semantics
   (accumulation, BatchNorm policy, perturbations written into the weights and restored exactly,
   Flat-LoRA's functional noise), each backward through ``torch.autograd.grad`` so that DeepSpeed's
   gradient hooks do not fire, and every pass a DDP runner would sync is averaged over the ranks
   (one all-reduce per pass, in buckets): DDP's semantics, per-rank ε included;
2. the method (a :class:`~flatminima.FlatOptimizer` over a *shadow* of DeepSpeed's parameter
   groups: the model's weights, with each group's ``lr`` and ``weight_decay`` mirrored every step)
   leaves the descent gradient in ``.grad`` and the weights at ``w``;
3. the descent gradient is handed to DeepSpeed through one backward of a zero-valued loss whose
   gradient is exactly it (:class:`_HandOver`), with ``scale_wrt_gas=False``; DeepSpeed then
   reduces (the values are equal on all ranks already, so its average changes nothing), clips to
   ``gradient_clipping`` (with its own norm, accumulated in float64: it can differ from
   ``clip_grad_norm_``'s in the last bit), steps its optimizer on the fp32 master partitions,
   copies them back to the weights and steps its LR scheduler;
4. the method's state is committed unless DeepSpeed skipped the step.

Cost beyond DDP: one extra all-reduce of the trainable gradient per step (DeepSpeed's own
reduction of the already averaged gradient). The hand-over scales the descent gradient in place, so
it adds no buffer to what DeepSpeed allocates itself.
Supported: ZeRO stages 1 and 2, fp32 and bf16. Refused with a clear error: stage 0 and 3 (stage 3
partitions the weights themselves) and DeepSpeed's fp16 (its dynamic loss scaler would have to
scale each pass; use bf16), and methods that write the weights after the base step (decoupled
WSAM): DeepSpeed's next step would overwrite that write with its master copy.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import methods as _methods
from .. import lora  # noqa: F401 (registers flatlora and samlora)
from .._extras import require
from ..engine import TrainStep, distributed
from ..core.passes import Pass
from ..core.shell import FlatOptimizer
from ..core.validation import check, check_described

require("deepspeed", "deepspeed", "flatminima.integrations.deepspeed")  # a clear error without the extra

#: Elements per all-reduce bucket when passes are averaged over ranks (as DDP's 25 MB buckets).
BUCKET_ELEMENTS = 1 << 23


class _Shadow(torch.optim.Optimizer):
    """Parameter groups for a method to perturb: the model weights of DeepSpeed's groups. It never
    updates them: DeepSpeed's optimizer does, on its fp32 master partitions."""

    def __init__(self, groups: list[dict]):
        super().__init__(groups, {"lr": 0.0, "weight_decay": 0.0})

    def step(self, closure: Any = None) -> None:
        raise RuntimeError("DeepSpeed's optimizer takes the update (DeepSpeedStep hands it the gradient)")


class _HandOver(torch.autograd.Function):
    """``forward(grads, *params) = 0``; its gradient with respect to ``params[i]`` is ``grads[i]``
    times the incoming gradient (DeepSpeed's loss scale, 1 for fp32/bf16): the descent gradient
    enters DeepSpeed's reduction as if a backward had produced it, bit for bit."""

    @staticmethod
    def forward(ctx, grads: list[Optional[Tensor]], *params: Tensor) -> Tensor:
        ctx.grads = grads
        return params[0].new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, out: Tensor):
        grads, ctx.grads = ctx.grads, None
        return (None, *[None if g is None else g.mul_(out.to(g.dtype)) for g in grads])


def _all_reduce_mean(tensors: list[Tensor]) -> None:
    """Average ``tensors`` over all ranks in place, in flat buckets per dtype."""
    world = torch.distributed.get_world_size()
    by_dtype: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group in by_dtype.values():
        start = 0
        while start < len(group):
            bucket, size = [], 0
            while start < len(group) and (not bucket or size + group[start].numel() <= BUCKET_ELEMENTS):
                bucket.append(group[start])
                size += group[start].numel()
                start += 1
            flat = torch.cat([t.reshape(-1) for t in bucket])
            torch.distributed.all_reduce(flat)
            flat.div_(world)
            torch._foreach_copy_(bucket, [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in bucket]), bucket)])


class _Passes(TrainStep):
    """``TrainStep`` on ``engine.module`` whose backward bypasses DeepSpeed's gradient hooks
    (``torch.autograd.grad``) and whose synced passes are averaged over the ranks by us."""

    def __init__(self, module: nn.Module, optimizer: FlatOptimizer, loss_fn, **options: Any):
        super().__init__(module, optimizer, loss_fn, **options)
        self._params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]

    def _backward(self, loss: Tensor, request: Pass, last: bool) -> None:
        grads = torch.autograd.grad(loss, self._params, allow_unused=True)
        fresh = [(p, g) for p, g in zip(self._params, grads) if g is not None and p.grad is None]
        for p, g in fresh:
            p.grad = g
        later = [(p.grad, g) for p, g in zip(self._params, grads) if g is not None and p.grad is not g]
        if later:  # micro-batches after the first: one foreach add, as autograd's own accumulation
            torch._foreach_add_(*map(list, zip(*later)))
        if last and request.sync and distributed() and torch.distributed.get_world_size() > 1:
            _all_reduce_mean([p.grad for p in self._params if p.grad is not None])

    def _sync_group(self) -> Optional[Any]:
        return torch.distributed.group.WORLD if distributed() else None


def _zero_optimizer(engine: Any) -> Any:
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
    check("DeepSpeed zero_optimization.stage", stage in (1, 2), stage,
          "1 or 2 (stage 3 partitions the weights; the perturbations need them whole)")
    check("DeepSpeed fp16", not engine.fp16_enabled(), "enabled", "disabled: use bf16 (\"bf16\": {\"enabled\": true})")
    zero = engine.optimizer
    check("DeepSpeed optimizer", hasattr(zero, "bit16_groups"), type(zero).__name__,
          "a ZeRO-1/2 optimizer (deepspeed.initialize with an optimizer and zero_optimization.stage 1 or 2)")
    return zero


class DeepSpeedStep:
    """One optimizer step of a flatminima method on a DeepSpeed ZeRO-1/2 engine per call (module
    docstring). ``method`` and ``hyperparameters``: as :func:`flatminima.create` (``total_steps`` for
    the schedules; methods that take the model get ``engine.module``). ``loss_fn(module, batch)``:
    the mean loss of one micro-batch. ``accumulation``, ``bn``: as :class:`flatminima.TrainStep`.
    ``start_step``: the method's step counter when resuming (its schedules continue from there).

    ``step(micro_batches, backward=None)`` runs the window's passes and the update and returns the
    window's clean loss. ``backward(loss)`` must run DeepSpeed's backward and step at an accumulation
    boundary with ``scale_wrt_gas=False`` (default: ``engine.set_gradient_accumulation_boundary(True)``,
    ``engine.backward(loss, scale_wrt_gas=False)``, ``engine.step()``; the HF Trainer passes
    ``accelerator.backward``).
    """

    def __init__(self, engine: Any, method: str, loss_fn: Callable[[nn.Module, Any], Tensor], *,
                 accumulation: str = "last", bn: str = "clean", start_step: int = 0, **hyperparameters: Any):
        zero = _zero_optimizer(engine)
        name = _methods.get(method).method_name
        self.engine, self._zero = engine, zero
        groups = []
        for params, source in zip(zero.bit16_groups, zero.optimizer.param_groups):
            groups.append({"params": list(params), "lr": float(source["lr"]),
                           "weight_decay": float(source.get("weight_decay", 0.0))})
        hyper = dict(hyperparameters)
        if _methods.needs_model(name):
            hyper.setdefault("model", engine.module)
        self.optimizer: FlatOptimizer = _methods.create(name, _Shadow(groups), **hyper)
        # DeepSpeed steps its fp32 master partitions and copies them over the weights at the next step:
        # a write into the weights after the base step (decoupled WSAM) would be lost without a word.
        check_described("method", not self.optimizer.combination.writes_weights_after_step,
              f"{method!r} with {self.optimizer.combination!r}",
              "a method whose whole update is the base optimizer's step under DeepSpeed "
              "(for WSAM: decouple=False, or train with flatminima.TrainStep)")
        self.optimizer._step = int(start_step)
        self.passes = _Passes(engine.module, self.optimizer, loss_fn, accumulation=accumulation, bn=bn)

    def _mirror_hyperparameters(self) -> None:
        for group, source in zip(self.optimizer.param_groups, self._zero.optimizer.param_groups):
            group["lr"] = float(source["lr"])
            group["weight_decay"] = float(source.get("weight_decay", 0.0))

    def _backward(self, loss: Tensor) -> None:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def __call__(self, micro_batches: Sequence[Any], backward: Optional[Callable[[Tensor], Any]] = None) -> Tensor:
        self._mirror_hyperparameters()
        opt = self.optimizer
        loss = self.passes.passes(micro_batches)
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        (backward or self._backward)(_HandOver.apply(grads, *params))
        applied = self.engine.was_step_applied() if hasattr(self.engine, "was_step_applied") else True
        opt.finish_step(skipped=not applied)
        return loss
