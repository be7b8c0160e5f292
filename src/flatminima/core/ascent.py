"""The ascent direction: which gradient an adversarial perturbation follows.

SAM's ε follows the clean gradient ``g``. Many methods change only that: add weight decay (the
original SAM code), restrict it to a sparse mask (SSAM), follow an EMA of gradients (VaSSO) or
the gradient minus its EMA (FriendlySAM). Each is an :class:`AscentLink`, and an :class:`Ascent` is
a chain of them applied in order to the ascent gradient of every ascent step::

    Ascent([AscentWeightDecay(), GradientEMA(theta=0.9)])      # d = EMA of (g + λw)

A link maps a :class:`Direction` to a new one (never writing the gradients in place) and keeps its
state under its own namespace (:class:`~flatminima.core.state.StateSlot`), *staged* with
``ctx.stage(commit)``: the state moves only when the optimizer step is really taken. Links with
state across steps (the EMAs) define one direction per step, so they take a single ascent step.
The perturbation normalizes what the chain gives: ``ε = ρ·T ⊙ dual(T ⊙ d)``, by ``d``'s norm or,
when a link sets :attr:`Direction.norm_of`, by the norm of that other vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import foreach as fe
from .schedules import step_generator
from .state import StateSlot


@dataclass
class Direction:
    """The ascent gradient ``grads`` (one tensor per scoped parameter); ``norm_of``: normalize ``ε`` by
    this vector's norm instead of ``grads``' own (SSAM's official ``ρ·(m⊙g)/‖g‖``; L2, ``T = 1``)."""

    grads: list[Tensor]
    norm_of: Optional[list[Tensor]] = None


class AscentLink:
    """One transform of the ascent direction. ``first``: the first ascent step of the optimizer step
    (the gradient is the clean one); a link with ``stateful = True`` may only be used there."""

    #: Keeps state across optimizer steps: the chain then allows a single ascent step.
    stateful = False

    def __call__(self, ctx, direction: Direction, first: bool) -> Direction:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Ascent:
    """A chain of :class:`AscentLink` applied in order (empty: the gradient itself)."""

    def __init__(self, links: Sequence[AscentLink] = ()):
        self.links = tuple(links)

    def __repr__(self) -> str:
        return f"Ascent({list(self.links)!r})"

    def __bool__(self) -> bool:
        return bool(self.links)

    @property
    def stateful(self) -> bool:
        return any(link.stateful for link in self.links)

    def then(self, *links: AscentLink) -> "Ascent":
        return Ascent(self.links + links)

    def __call__(self, ctx, grads: Sequence[Tensor], first: bool = True) -> Direction:
        direction = Direction(list(grads))
        for link in self.links:
            direction = link(ctx, direction, first)
        return direction


def _moving_average(old: Sequence[Optional[Tensor]], grads: Sequence[Tensor], weight: float) -> list[Tensor]:
    """``m + weight·(g − m)`` in one foreach op; a copy of ``g`` where there is no ``m`` yet."""
    new = [g.detach().clone() if m is None else None for g, m in zip(grads, old)]
    have = [i for i, m in enumerate(old) if m is not None]
    for i, m in zip(have, fe.lerp([old[i] for i in have], [grads[i] for i in have], weight)):
        new[i] = m
    return new


class AscentWeightDecay(AscentLink):
    """``d = g + λ·w`` with each parameter group's ``weight_decay`` λ (the original SAM code's ascent
    on the regularized loss; off by default: ``ascent_weight_decay=True``)."""

    def __call__(self, ctx, direction, first):
        grads, out = direction.grads, list(direction.grads)
        for i, group in enumerate(ctx.opt.param_groups):
            wd = float(group.get("weight_decay", 0.0))
            idx = [j for j, gi in enumerate(ctx.gidx) if gi == i]
            if wd and idx:
                summed = fe.add([grads[j] for j in idx], [ctx.params[j] for j in idx], alpha=wd)
                for j, s in zip(idx, summed):
                    out[j] = s
        return Direction(out, direction.norm_of)


class GradientEMA(AscentLink):
    """VaSSO (Li & Giannakis, NeurIPS 2023): follow the EMA ``d_t = (1 − θ)·d_{t−1} + θ·g_t`` of the
    ascent gradient (``d_0 = g_0``), a lower-variance estimate of the adversarial direction."""

    stateful = True
    slot = StateSlot("vasso")

    def __init__(self, theta: float):
        self.theta = theta

    def __call__(self, ctx, direction, first):
        new = _moving_average(self.slot.read(ctx.opt, ctx.params, "ema"), direction.grads, self.theta)
        ctx.stage(self.slot.write(ctx.opt, ctx.params, "ema", new))
        return Direction(new, direction.norm_of)


class SubtractEMA(AscentLink):
    """FriendlySAM (Li et al., CVPR 2024): follow ``g_t − σ·m_{t−1}``, the gradient without its
    full-batch component (an EMA ``m_t = λ·m_{t−1} + (1 − λ)·g_t``, ``m_0 = g_0``; the first step
    follows ``g_0``)."""

    stateful = True
    slot = StateSlot("friendlysam")

    def __init__(self, sigma: float, lmbda: float):
        self.sigma, self.lmbda = sigma, lmbda

    def __call__(self, ctx, direction, first):
        grads, old = direction.grads, self.slot.read(ctx.opt, ctx.params, "momentum")
        out = list(grads)
        have = [i for i, m in enumerate(old) if m is not None]
        if have:
            for i, d in zip(have, fe.sub([grads[i] for i in have], [old[i] for i in have], alpha=self.sigma)):
                out[i] = d
        new = _moving_average(old, grads, 1.0 - self.lmbda)
        ctx.stage(self.slot.write(ctx.opt, ctx.params, "momentum", new))
        return Direction(out, direction.norm_of)


def keep_count(sparsity: float, n: int) -> int:
    """``⌈(1 − s)·n⌉`` entries kept, from the decimal value of ``s`` (``s = 0.7``, ``n = 10`` keeps 3,
    not the 4 that the float ``(1 − 0.7)·10 = 3.0000000000000004`` would give); at least 1."""
    return max(1, math.ceil((1 - Fraction(repr(float(sparsity)))) * n))


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """Exactly ``k`` True entries at the largest ``scores``; ties at the k-th value go to the lowest
    indices (deterministic, unlike ``torch.topk``'s order), e.g. all-zero gradients of dead units."""
    kth = torch.topk(scores, k, sorted=False).values.min()
    above, tied = scores > kth, scores == kth
    return above | (tied & (tied.cumsum(0) <= k - above.sum()))


class SparseMask(AscentLink):
    """SSAM's sparse perturbation mask (Mi et al., NeurIPS 2022): ``d = m ⊙ g``, ``sparsity`` = the
    fraction of entries left out.

    Exactly ``⌈(1 − sparsity)·n⌉`` of the ``n`` scoped entries are kept (:func:`keep_count`).
    ``mode="fisher"``: the top entries of the empirical Fisher ``g⊙g`` of the clean gradient over the
    whole scope (:func:`top_k_mask`), refreshed every ``interval`` steps. ``mode="random"``: a random
    mask; every ``interval`` steps a ``fraction`` of its entries is dropped at random and as many are
    grown at random among the others (dynamic sparse training), so the sparsity stays exact.

    ``normalize``: ``"masked"`` gives ``ε = ρ·(m⊙g)/‖m⊙g‖``, the maximiser over the masked ball
    (‖ε‖ = ρ); ``"full"`` gives the official code's ``ε = ρ·(m⊙g)/‖g‖`` (‖ε‖ ≤ ρ).
    """

    slot = StateSlot("ssam")

    def __init__(self, mode: str, sparsity: float, interval: int, fraction: float, seed: int,
                 normalize: str = "masked"):
        self.mode, self.sparsity, self.interval, self.fraction, self.seed = mode, sparsity, interval, fraction, seed
        self.normalize = normalize

    def __repr__(self) -> str:
        return (f"SparseMask({self.mode!r}, sparsity={self.sparsity}, interval={self.interval}, "
                f"normalize={self.normalize!r})")

    def __call__(self, ctx, direction, first):
        if first:
            ctx.memo[self] = self._masks(ctx)
        masks = ctx.memo[self]
        masked = list(fe.mul(direction.grads, masks))
        return Direction(masked, direction.grads if self.normalize == "full" else direction.norm_of)

    def _masks(self, ctx) -> list[Tensor]:
        """This step's masks: the committed ones, or new ones (staged) every ``interval`` steps."""
        opt, params = ctx.opt, ctx.params
        masks = self.slot.read(opt, params, "mask")
        step = opt.step_count
        if all(m is not None for m in masks) and step % self.interval != 0:
            return masks
        sizes = [p.numel() for p in params]
        n = sum(sizes)
        keep = keep_count(self.sparsity, n)
        with torch.no_grad():
            if self.mode == "fisher":  # the Fisher of the loss: the raw clean gradient
                flat = top_k_mask(torch.cat([(g.detach().float() ** 2).flatten() for g in ctx.clean_grads]), keep)
            else:
                flat = self._random(masks, sizes, n, keep, step, params[0].device)
        new = [m.view_as(p) for m, p in zip(torch.split(flat, sizes), params)]
        ctx.stage(self.slot.write(opt, params, "mask", new))
        return new

    def _random(self, masks, sizes, n, keep, step, device) -> Tensor:
        gen = step_generator(self.seed, step, stream=2)
        if any(m is None for m in masks):
            flat = torch.zeros(n, dtype=torch.bool)
            flat[torch.randperm(n, generator=gen)[:keep]] = True
            return flat.to(device)
        flat = torch.cat([m.flatten().cpu() for m in masks])
        active, inactive = flat.nonzero().flatten(), (~flat).nonzero().flatten()
        swap = min(int(self.fraction * active.numel()), inactive.numel())
        drop = active[torch.randperm(active.numel(), generator=gen)[:swap]]
        grow = inactive[torch.randperm(inactive.numel(), generator=gen)[:swap]]
        flat[drop], flat[grow] = False, True
        return flat.to(device)
