"""Episodic-memory baselines of continual learning: experience replay and A-GEM.

* ``replay`` (:class:`Replay`; Chaudhry et al., 2019, *On Tiny Episodic Memories in Continual
  Learning*): a reservoir of training examples (Vitter's algorithm R, :class:`Reservoir`), mixed
  into every step's batch;
* ``agem`` (:class:`AGEM`; Chaudhry et al., ICLR 2019, *Efficient Lifelong Learning with A-GEM*):
  examples of the finished tasks, whose mean loss the step may not increase to first order: the
  descent gradient ``g`` is projected when it conflicts with the memory's gradient ``g_ref``.

Every random choice comes from a CPU ``torch.Generator`` seeded from the baseline's ``seed``;
examples are stored on the device their batch came on; inputs are tensors or dicts of tensors.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from ..core import foreach as fe
from ..core.kernels import dot
from ..core.schedules import derive_seed
from ..core.validation import check, check_int, check_optional_int
from ..data.base import take
from ..engine.train_step import running_stat_buffers
from .strategy import Baseline, TaskContext, register_baseline

#: seed streams (with the baseline's seed): the replay reservoir, replay's draws, A-GEM's memory and draws
REPLAY_STREAM, SAMPLE_STREAM, AGEM_STREAM = 0x5E1, 0x5E2, 0xA6E


def _shapes(x: Any) -> dict[str, tuple]:
    items = x.items() if isinstance(x, Mapping) else [("", x)]
    return {k: (tuple(v.shape[1:]), v.dtype) for k, v in items}


def cat(a: Any, b: Any) -> Any:
    """Inputs ``a`` then ``b`` along the first dimension (tensors, or dicts of tensors key by key)."""
    if isinstance(a, Mapping):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


class Reservoir:
    """A uniform sample of ``size`` examples of a stream (Vitter's algorithm R, 1985).

    The ``n``-th example (0-based, over every :meth:`add`) fills slot ``n`` while ``n < size``;
    after that it replaces slot ``j = ⌊u·(n + 1)⌋`` (``u ~ U[0, 1)``, so ``j`` is uniform on
    ``0…n``) when ``j < size``. After ``N`` examples every one of them is stored with probability
    ``size/N``. Each :meth:`add` of ``b`` examples draws ``torch.rand(b, float64)`` from the
    generator (one ``u`` per example, in order, drawn during the fill too) and applies the rule in
    order, a later example of the batch winning a slot drawn twice; slots are written on the
    data's device with one indexed copy per tensor.
    """

    def __init__(self, size: int, seed: int):
        self.size = check_int("size", size, 1)
        self.generator = torch.Generator().manual_seed(seed)
        self.seen, self.x, self.y = 0, None, None

    @property
    def filled(self) -> int:
        return min(self.size, self.seen)

    def check_like(self, x: Any) -> None:
        """Refuse inputs shaped unlike the stored ones (before anything changes)."""
        if self.x is not None:
            check("batch", _shapes(x) == _shapes(self.x), _shapes(x),
                  f"inputs shaped like the earlier batches: {_shapes(self.x)} (examples of a fixed shape)")

    def add(self, x: Any, y: Tensor) -> None:
        b = len(y)
        if b == 0:
            return
        if self.x is None:
            device = y.device
            self.x = ({k: torch.empty((self.size, *v.shape[1:]), dtype=v.dtype, device=device) for k, v in x.items()}
                      if isinstance(x, Mapping) else torch.empty((self.size, *x.shape[1:]), dtype=x.dtype, device=device))
            self.y = torch.empty((self.size, *y.shape[1:]), dtype=y.dtype, device=device)
        self.check_like(x)
        n = torch.arange(self.seen, self.seen + b, dtype=torch.float64)
        u = torch.rand(b, dtype=torch.float64, generator=self.generator)
        j = torch.where(n < self.size, n, torch.minimum(torch.floor(u * (n + 1)), n)).long()
        keep = j < self.size
        last = torch.full((self.size,), -1, dtype=torch.long)
        last.scatter_reduce_(0, j[keep], torch.arange(b)[keep], "amax")
        slots = torch.nonzero(last >= 0).squeeze(1)
        dst, src = slots.to(self.y.device), last[slots].to(self.y.device)
        if isinstance(x, Mapping):
            for k, v in x.items():
                self.x[k][dst] = v[src].to(self.x[k].device)
        else:
            self.x[dst] = x[src].to(self.x.device)
        self.y[dst] = y[src].to(self.y.device)
        self.seen += b

    def content(self) -> tuple[Any, Tensor]:
        """The stored examples ``(x, y)``, slot order (views)."""
        return take(self.x, slice(0, self.filled)), self.y[:self.filled]

    def sample(self, m: int, generator: torch.Generator) -> tuple[Any, Tensor]:
        """``min(m, filled)`` stored examples drawn uniformly without replacement (copies)."""
        idx = torch.randperm(self.filled, generator=generator)[:m].to(self.y.device)
        return take(self.x, idx), self.y[idx]


@register_baseline("replay", "er")
class Replay(Baseline):
    """Experience replay with a reservoir memory (Chaudhry et al., 2019).

    Every training batch ``B_t`` of every task is offered to a :class:`Reservoir` of ``size``
    examples; the step trains on ``B_t ∪ M_t`` where ``M_t`` is ``min(batch_size, |memory|)``
    examples drawn uniformly without replacement from the memory *before* ``B_t`` is added
    (``batch_size`` default: ``|B_t|``; an empty memory, at the very first step, adds nothing).
    The loss is the mean over the joined batch: the runner masks it to the classes seen so far.
    ``seed``: the reservoir's and the draws' generators (:data:`REPLAY_STREAM`, :data:`SAMPLE_STREAM`).
    """

    has_batch = True

    def __init__(self, size: int = 1000, batch_size: Optional[int] = None, seed: int = 0):
        check_int("size", size, 1)
        self.batch_size = check_optional_int("batch_size", batch_size, 1)
        check_int("seed", seed, 0)
        self.memory = Reservoir(size, derive_seed(seed, REPLAY_STREAM))
        self.sampler = torch.Generator().manual_seed(derive_seed(seed, SAMPLE_STREAM))

    def extend_batch(self, batch: tuple[Any, Tensor]) -> tuple[Any, Tensor]:
        x, y = batch
        out = batch
        self.memory.check_like(x)
        if self.memory.filled:
            xm, ym = self.memory.sample(self.batch_size or len(y), self.sampler)
            out = (cat(x, xm), torch.cat([y, ym]))
        self.memory.add(x, y)
        return out

    def state(self) -> dict[str, Any]:
        return {"memory": self.memory.filled, "seen": self.memory.seen}


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@register_baseline("agem")
class AGEM(Baseline):
    """Averaged gradient episodic memory (Chaudhry et al., ICLR 2019), on the method's descent gradient.

    :meth:`end_task` keeps ``per_task`` examples of the task, a uniform sample (a seeded
    :class:`Reservoir`) of at most ``n_batches`` batches of ``context.batches`` (None: one epoch).
    Once per step, at ``w``, :meth:`project` draws ``batch_size`` memory examples (uniformly,
    without replacement), takes ``g_ref = ∇_θ ℓ_mem(θ)`` with ``ℓ_mem`` the context's
    ``memory_loss_fn`` (stored at :meth:`start_task`: cross-entropy over the classes seen so far),
    over the tensors holding a ``.grad``, and replaces the descent gradient ``g`` by::

        g − (g·g_ref / g_ref·g_ref)·g_ref   if g·g_ref < 0,   g otherwise

    (eq. 11 of the paper), so ``g̃·g_ref ≥ 0``. Foreach ops, the choice made by ``torch.where`` on
    the device (no host sync). The memory forward runs in the model's mode, under a forked RNG
    (the global generators do not move) with BatchNorm's running statistics restored; under DDP
    ``g_ref`` is averaged over the ranks so every rank projects alike.
    """

    has_projection = True

    def __init__(self, per_task: int = 256, batch_size: int = 256, n_batches: Optional[int] = None, seed: int = 0):
        self.per_task = check_int("per_task", per_task, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.n_batches = check_optional_int("n_batches", n_batches, 1)
        self.seed = check_int("seed", seed, 0)
        self.x: Any = None
        self.y: Optional[Tensor] = None
        self.loss_fn: Optional[Callable[[nn.Module, Any], Tensor]] = None
        self.sampler = torch.Generator().manual_seed(derive_seed(seed, AGEM_STREAM))
        self.tasks = 0

    def start_task(self, context: TaskContext) -> None:
        self.loss_fn = context.memory_loss_fn

    def end_task(self, context: TaskContext) -> None:
        reservoir = Reservoir(self.per_task, derive_seed(self.seed, AGEM_STREAM, context.index))
        for x, y in context.batches(self.n_batches):
            reservoir.add(x, y)
        check("context.batches", reservoir.filled > 0, "no examples", "at least one training example for the memory")
        x, y = reservoir.content()
        if self.x is None:  # copies: the reservoir's storage is ``per_task`` long even when less is filled
            y = y.clone()
            x = {k: v.clone() for k, v in x.items()} if isinstance(x, Mapping) else x.clone()
        else:
            check("batch", _shapes(x) == _shapes(self.x), _shapes(x), f"inputs shaped like the memory's: {_shapes(self.x)}")
            x, y = cat(self.x, x), torch.cat([self.y, y])
        self.x, self.y = x, y
        self.tasks += 1

    def reference_gradient(self, model: nn.Module, params: list[Tensor]) -> list[Tensor]:
        """``∇ℓ_mem`` on a fresh memory batch for ``params`` (zeros where a tensor is unused)."""
        idx = torch.randperm(len(self.y), generator=self.sampler)[:self.batch_size].to(self.y.device)
        batch = (take(self.x, idx), self.y[idx])
        net = _unwrapped(model)
        device = params[0].device
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        saved = [(b, b.detach().clone()) for b in running_stat_buffers(net)]
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                loss = self.loss_fn(net, batch)
                refs = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            with torch.no_grad():
                for b, s in saved:
                    b.copy_(s)
        refs = [torch.zeros_like(p) if r is None else r for p, r in zip(params, refs)]
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and isinstance(model, nn.parallel.DistributedDataParallel):
            world = torch.distributed.get_world_size(model.process_group)
            for r in refs:
                torch.distributed.all_reduce(r, group=model.process_group)
            fe.div_(refs, world)
        return refs

    def project(self, model: nn.Module) -> None:
        if self.y is None or self.loss_fn is None:
            return
        params = [p for p in model.parameters() if p.grad is not None and p.requires_grad]
        if not params:
            return
        refs = self.reference_gradient(model, params)
        grads = [p.grad for p in params]
        along, norm2 = dot(grads, refs), dot(refs, refs)
        tiny = torch.finfo(norm2.dtype).tiny
        coef = torch.where(along < 0, along / norm2.clamp_min(tiny), torch.zeros_like(along))
        fe.sub_(grads, fe.mul(refs, coef))

    def state(self) -> dict[str, Any]:
        return {"memory": 0 if self.y is None else len(self.y), "tasks": self.tasks}


__all__ = ["AGEM", "AGEM_STREAM", "REPLAY_STREAM", "Replay", "Reservoir", "SAMPLE_STREAM", "cat"]
