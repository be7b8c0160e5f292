"""How ε is made: adversarial ascent, random search, random noise, and the rank split of parallel m-RWP.

Each is a producer of points for the one loop (:func:`flatminima.core.perturb.perturb`): it says
where the model goes and which pass runs there; saving, restoring and combining are the loop's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
from torch import Tensor

from . import foreach as fe
from . import kernels as F
from .perturb import Perturbation, PerturbationContext, Point
from .passes import Pass
from .scale import Scale
from .state import StateSlot
from .validation import check, is_real

if TYPE_CHECKING:  # the shell imports this module
    from .shell import FlatOptimizer


class Adversarial(Perturbation):
    """Gradient ascent on the loss inside ``{‖T⁻¹ε‖_p ≤ ρ}`` (Foret et al. 2021; Zhang et al. 2022).

    ``steps = 1`` without projection is SAM's ``ε = ρ·T ⊙ dual(T ⊙ g)``. ``steps = K`` with
    ``project=True`` is GA-SAM's multi-step ascent: ``u_k = η·T ⊙ dual(T ⊙ g_{k−1})``,
    ``a_k = Π(a_{k−1} + u_k)`` with ``η = step_size·ρ/K`` (1.5ε/K in the paper). ``scale`` gives
    ``T`` from the clean gradient, held for the whole step. The gradient it follows is the
    optimizer's ascent direction (:mod:`flatminima.core.ascent`: weight decay, SSAM's mask, an EMA…),
    applied to the ascent gradient of every step. ``different_batches=True``: the ascent gradient from batch
    ``B1`` (the clean pass) and the descent gradient at ``w + ε`` from ``B2`` (Li et al., 2024, Table A1).
    """

    supports_sharded = True

    def __init__(self, norm: float = 2.0, scale=None, steps: int = 1, project: bool = False,
                 step_size: float = 1.0, per_tensor: bool = False, different_batches: bool = False):
        self.norm, self.scale = norm, scale or Scale()
        self.steps, self.project, self.step_size = steps, project, step_size
        self.per_tensor = per_tensor
        self.clean_batch, self.perturbed_batch = ((0, 2), (1, 2)) if different_batches else (None, None)

    @property
    def batch_count(self) -> Optional[int]:
        return 2 if self.perturbed_batch else None

    def check_ascent(self, ascent) -> None:
        check("steps", self.steps == 1 or not ascent.stateful, self.steps,
              f"1 with an ascent direction that keeps state across steps ({ascent!r}): it defines one "
              "direction per optimizer step")

    def points(self, ctx: PerturbationContext):
        params, gidx = ctx.params, ctx.gidx
        if not params:
            return
        grads = ctx.clean_grads
        scale = self.scale(params, grads)
        radius = ctx.opt.strengths()
        sizes = [self.step_size * r / self.steps for r in radius]
        # One strength for every group (the usual case): fold it into the normalization scalar.
        factor = sizes[0] if len(set(sizes)) == 1 else None
        radius_per_tensor = [radius[i] for i in gidx]
        inv_scale = F.inverse(scale) if self.project else None
        a = None
        for k in range(1, self.steps + 1):
            with torch.no_grad():
                direction = ctx.ascent(grads, first=k == 1)
                u = F.ascent_direction(direction.grads, scale, self.norm, self.per_tensor, factor)
                if direction.norm_of is not None:  # ε normalized by another vector's norm (SSAM "full")
                    kept = F._norms(direction.grads, 2.0, self.per_tensor)
                    ratios = [k_ / n.clamp_min(F.TINY) for k_, n in zip(kept, F._norms(direction.norm_of, 2.0,
                                                                                        self.per_tensor))]
                    fe.mul_(u, F._cast(ratios, u))
                del direction
                if factor is None:
                    F.scale_by_group(u, sizes, gidx)
                if a is None:
                    a = u
                else:
                    fe.add_(a, u)
                del u
                if self.project:
                    F.project(a, scale, radius_per_tensor, self.norm, self.per_tensor, inv_scale)
            last = k == self.steps
            eps = list(a)
            if last:  # only the saved weights (and what the combination keeps) live through the pass
                a = scale = inv_scale = None
            grads = None
            outcome = yield Point(ctx.perturbed(last, batch=self.perturbed_batch), eps)
            if not last:
                grads = outcome.grads


class GradientNormAscent(Perturbation):
    """The three points of first-order flatness (GAM, Zhang et al., CVPR 2023; C-Flat, Bian et al.,
    NeurIPS 2024), from the clean gradient ``g₀`` (its ascent direction ``d``):

    * ``ε₁ = ρ·d/‖d‖`` (SAM's point), whose gradient is ``g₁``;
    * ``ε₂ = ρ'·(g₁ − g₀)/‖g₁ − g₀‖``: ascent on the gradient norm (``g₁ − g₀ ≈ ρ·H·g₀/‖g₀‖``, the
      direction of ``∇‖∇L‖``), gradient ``g₂``;
    * ``ε₃ = ε₂ + ρ·g₂/‖g₂‖``: SAM's point seen from ``w + ε₂``, gradient ``g₃``.

    ``ρ`` is the method's strength per group; ``ρ' = norm_radius`` (GAM's ``norm_rho``), or ``ρ``
    when None (C-Flat). Norms are global (L2); the combination decides what to descend along.
    """

    keeps_gradients = True  # g₀ and g₁ live until ε₂ is made

    def __init__(self, norm_radius: Optional[float] = None):
        self.norm_radius = norm_radius

    def points(self, ctx: PerturbationContext):
        params, gidx = ctx.params, ctx.gidx
        if not params:
            return
        radius = ctx.opt.strengths()
        norm_radius = radius if self.norm_radius is None else [self.norm_radius] * len(radius)

        def step(direction, radii):
            return F.scale_by_group(F.dual_direction(direction, 2.0), radii, gidx)

        g0 = ctx.clean_grads
        with torch.no_grad():
            e1 = step(ctx.ascent(g0).grads, radius)
        g1 = (yield Point(ctx.perturbed(last=False), e1)).grads
        with torch.no_grad():
            e2 = step(fe.sub(g1, g0), norm_radius)
        del g0, g1
        g2 = (yield Point(ctx.perturbed(last=False), list(e2))).grads
        with torch.no_grad():
            e3 = fe.add(e2, step(g2, radius))
        del e2, g2
        yield Point(ctx.perturbed(last=True), e3)


class RandomSearch(Perturbation):
    """Best of ``candidates`` random points on the ρ-sphere, by loss (randomized SAM search).

    The clean point (it lies in the ball) is a candidate too, which also gives the loss the step
    returns; the search costs ``candidates + 1`` forward passes and one forward/backward at the
    chosen point. Directions ``z/‖z‖`` come from generators seeded by (seed, step, candidate) and
    are regenerated rather than stored.
    """

    needs_clean_grad = False
    supports_sharded = True  # candidates drawn whole, each rank keeps its chunk (_shard_like)

    def __init__(self, candidates: int = 4, per_tensor: bool = False):
        self.candidates, self.per_tensor = candidates, per_tensor

    def _delta(self, opt, params, gidx, j: int) -> list[Tensor]:
        gen = {}
        z = []
        for _idx, p in enumerate(params):
            dev = p.device
            if dev not in gen:
                gen[dev] = torch.Generator(device=dev)
                gen[dev].manual_seed(opt.rng_seed(stream=1000 + j, device_index=len(gen)))
            z.append(torch.randn(p.shape, generator=gen[dev], device=dev, dtype=p.dtype))
            if F.is_sharded(p):
                z[-1] = shard_like(z[-1], p)
        d = F.dual_direction(z, 2.0, self.per_tensor)
        return F.scale_by_group(d, opt.strengths(), gidx)

    def points(self, ctx: PerturbationContext):
        opt, params, gidx = ctx.opt, ctx.params, ctx.gidx
        sharded = any(F.is_sharded(p) for p in params)
        losses = []
        for j in range(self.candidates):
            # With a shared ε the ranks draw the same candidates and compare global losses; with
            # sharded parameters (FSDP2) the choice must be one for all shards, so always.
            outcome = yield Point(Pass("probe", backward=False, sync=opt.sync_perturbation or sharded),
                                  self._delta(opt, params, gidx, j))
            loss = outcome.loss
            check("closure", (torch.is_tensor(loss) and loss.numel() == 1) or is_real(loss),
                  f"a closure returning {type(loss).__name__}",
                  f"a closure (or forward=) that returns the loss, a number or a one-element tensor: "
                  f"{type(opt).__name__} picks the candidate with the highest loss")
            losses.append(torch.as_tensor(loss).detach().reshape(()))
        # In the explicit form the clean loss may be unknown: the clean point is then no candidate.
        clean_loss = ctx.clean_loss
        clean = torch.as_tensor(-math.inf if clean_loss is None else clean_loss).detach().reshape(())
        device = losses[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        scores = torch.stack([t.to(device, dtype) for t in [clean, *losses]])
        best = int(scores.argmax()) - 1  # the choice needs the losses on the host: one read
        eps = self._delta(opt, params, gidx, best) if best >= 0 else None
        yield Point(Pass("perturbed", backward=True, sync=True), eps)


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (a whole tensor, the same on every rank) as a DTensor placed like ``like``: each rank
    keeps its own chunk, so sharded noise is exactly the unsharded noise (FSDP2: ``Shard(0)``)."""
    from torch.distributed.tensor import DTensor, Shard

    check("params", len(like.placements) == 1, like.placements, "DTensors on a 1-D device mesh (FSDP2)")
    mesh, (placement,) = like.device_mesh, like.placements
    local = full
    if isinstance(placement, Shard):
        chunks = torch.chunk(full, mesh.size(), dim=placement.dim)
        rank = mesh.get_local_rank()
        local = chunks[rank] if rank < len(chunks) else full.narrow(placement.dim, 0, 0)
    return DTensor.from_local(local.contiguous(), mesh, like.placements, shape=like.shape, stride=like.stride())


class RandomNoise(Perturbation):
    """Random weight perturbation ``ε = σ·Z ⊙ S`` (Li et al., 2024; Bisla et al., 2022).

    ``Z ~ N(0, 1)`` from a generator per tensor seeded by (seed, step, rank, tensor index, sample),
    so one draw per optimizer step, reproducible and resumable, never the global RNG. ``S`` is a
    :class:`~flatminima.core.scale.Scale` of the weights (uniform, matrix ``‖W‖_F``, element ``|W|``,
    filter ``‖W_{i,:}‖``, Flat-LoRA ``‖W_{i,:}‖/√n_in``), Fisher-damped to ``S/√(1 + η·F)`` when
    ``fisher_eta > 0``, with ``F`` an EMA (``fisher_decay``) of the squared descent gradient.
    ``samples = M`` noisy passes with independent ε (LPF-SGD), on M batches when ``per_batch``.
    ``noisy_batch``: the batch index ``(m, M)`` of the single noisy pass (m-RWP with two batches).
    The noise is made and added one tensor at a time; the weights are restored from a copy.
    """

    needs_clean_pass = False
    needs_clean_grad = False
    supports_sharded = True  # the noise is drawn whole and each rank keeps its chunk (shard_like)
    slot = StateSlot("noise")

    def __init__(self, scale, fisher_eta: float = 0.0, fisher_decay: float = 0.99, samples: int = 1,
                 per_batch: bool = False, noisy_batch: Optional[tuple[int, int]] = None,
                 clean_batch: Optional[tuple[int, int]] = None):
        self.scale, self.fisher_eta, self.fisher_decay = scale, fisher_eta, fisher_decay
        self.samples, self.per_batch, self.noisy_batch, self.clean_batch = samples, per_batch, noisy_batch, clean_batch

    @property
    def batch_count(self) -> Optional[int]:
        if self.per_batch:
            return self.samples
        return self.noisy_batch[1] if self.noisy_batch else None

    def noise(self, opt: "FlatOptimizer", params: list[Tensor], gidx: list[int], sample: int = 0,
              scale=None) -> Iterator[Tensor]:
        """ε per tensor, made lazily (at most one tensor's noise exists at a time)."""
        sigma = opt.strengths()
        scale = self.scale(params, params) if scale is None else scale
        for i, (p, s) in enumerate(zip(params, scale)):
            gen = torch.Generator(device=p.device).manual_seed(opt.rng_seed(stream=i, device_index=sample))
            z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
            if F.is_sharded(p):
                z = shard_like(z, p)
            if s is not None:
                z.mul_(s)
            fisher = self.slot.read(opt, [p], "fisher")[0] if self.fisher_eta else None
            if fisher is not None:
                z.div_(torch.sqrt(1.0 + self.fisher_eta * fisher))
            yield z.mul_(sigma[gidx[i]])

    def points(self, ctx: PerturbationContext, loss_weight: float = 1.0):
        opt, params, gidx = ctx.opt, ctx.params, ctx.gidx
        scale = self.scale(params, params)  # of the weights at w: the same for every sample
        full_window = not opt.combination.uses_clean
        for m in range(self.samples):
            batch = (m, self.samples) if self.per_batch else self.noisy_batch
            yield Point(Pass("perturbed", backward=True, sync=True, full_window=full_window, batch=batch,
                             loss_weight=loss_weight), self.noise(opt, params, gidx, m, scale))

    def finish(self, ctx: PerturbationContext) -> Optional[Callable[[], None]]:
        """``F ← β·F + (1 − β)·g²`` from the descent gradient, applied when the step is taken."""
        if not self.fisher_eta:
            return None
        opt, beta = ctx.opt, self.fisher_decay
        params = [p for p in ctx.params if p.grad is not None]
        squares = [p.grad.detach().square() for p in params]
        return self.slot.update(opt, params, "fisher", lambda old, i: squares[i].mul_(1 - beta) if old is None
                                else old.mul_(beta).add_(squares[i], alpha=1 - beta))


class RankSplit(Perturbation):
    """Parallel m-RWP: the ranks of the default process group split into ``k`` noisy and ``m = W − k``
    clean ones (the *last* k are noisy, so rank 0, whose buffers DDP broadcasts, is clean). Every rank
    runs one synced forward/backward: a noisy rank at ``w + ε_r`` (``noise``, seeded with its rank),
    a clean one at ``w``, with the loss weighted ``λ·W/k`` or ``(1 − λ)·W/m``, so DDP's average is
    ``λ·mean_noisy ∇L_r(w + ε_r) + (1 − λ)·mean_clean ∇L_r(w)``. ``noisy_ranks=None``: ``k`` is
    ``λ·W`` rounded half up, clamped to ``[1, W − 1]``. Checked at every step (before anything moves).
    """

    needs_clean_pass = False
    needs_clean_grad = False

    def __init__(self, noise: RandomNoise, noisy_weight: float, noisy_ranks: Optional[int] = None):
        self.noise, self.noisy_weight, self.noisy_ranks = noise, noisy_weight, noisy_ranks

    def split(self) -> tuple[int, int, int]:
        """``(rank, W, k)`` of the default process group; raises when there is none or W < 2."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("MRWP(parallel=True) splits the ranks of a process group into noisy and clean ones: "
                               "call torch.distributed.init_process_group (world size >= 2) before the first step, "
                               "or use parallel=False")
        world = dist.get_world_size()
        if world < 2:
            raise RuntimeError(f"MRWP(parallel=True) needs a world size >= 2 (got {world}): use parallel=False")
        k = self.noisy_ranks
        if k is None:
            k = min(max(1, math.floor(self.noisy_weight * world + 0.5)), world - 1)
        check("noisy_ranks", 1 <= k <= world - 1, k, f"an int in [1, {world - 1}] for world size {world}")
        return dist.get_rank(), world, k

    def points(self, ctx: PerturbationContext):
        rank, world, k = self.split()
        lam = self.noisy_weight
        if rank >= world - k:
            yield from self.noise.points(ctx, loss_weight=lam * world / k)
        else:
            yield Point(Pass("clean", backward=True, sync=True, loss_weight=(1.0 - lam) * world / (world - k)))

    def finish(self, ctx: PerturbationContext) -> Optional[Callable[[], None]]:
        # The synced descent gradient is the same on every rank: F stays identical on all of them.
        return self.noise.finish(ctx)
