"""The ``torch.optim.Optimizer`` shell every method shares.

A :class:`FlatOptimizer` wraps any optimizer *instance* (the *base*), shares its ``param_groups``
(so LR schedulers and per-group hyperparameters act on both) and never re-implements its update.
One step is a *plan*: a generator that asks for forward/backward passes (:class:`Pass`) and, between
them, perturbs the weights, restores them exactly and combines gradients. The plan is written once
per component and driven three ways, so all forms share one implementation:

* ``opt.step(closure)`` calls the closure for every pass the plan asks for;
* ``with opt.perturbed(): ...`` / ``for _ in opt.perturbations(): ...`` then ``opt.step()``, for
  loops that own their passes (HF Trainer, Accelerate);
* :class:`flatminima.engine.TrainStep`, which runs each pass over micro-batches with gradient
  accumulation, AMP, DDP ``no_sync`` and a BatchNorm policy.

A method (``flatminima.methods``) is a choice of the components: a perturbation (how ε is made,
with a scale ``T`` and a schedule of its strength), a combination (which gradient drives the base
step), a trigger (when to perturb) and a scope (which tensors move).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _amp
from . import _functional as F
from ._checkpoint import checked_state_dict
from ._framework_loops import refuse_framework_loop
from .schedules import Always, Trigger, derive_seed, strength_schedule
from .validation import check, check_int, check_nonnegative, check_norm, is_real  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Pass:
    """One forward(/backward) pass a plan asks for.

    ``role``: ``"clean"`` (at ``w``), ``"perturbed"`` (at the perturbed weights) or ``"probe"`` (a
    forward-only evaluation). A step starts with the clean pass unless the method needs no
    clean gradient at all (RWP). ``backward``: whether gradients are needed. ``sync``: whether a DDP
    runner must all-reduce this pass's gradients (passes that only feed a per-rank perturbation do
    not). Every pass with ``backward`` starts from empty ``.grad`` (the driver sets them to None).
    """

    role: str
    backward: bool = True
    sync: bool = True
    #: Under gradient accumulation, run over every micro-batch even when the engine would run a
    #: perturbed pass on the last one only (a step without a clean pass: RWP).
    full_window: bool = False
    #: ``(m, M)``: run on the m-th of M batches (``step(closure, batches=...)``; in ``TrainStep``
    #: the m-th of M groups of micro-batches). None: the step's batch.
    batch: Optional[tuple[int, int]] = None
    #: Factor on the pass's loss before its backward (parallel m-RWP weighs each rank's loss so that
    #: DDP's gradient average is the mix). Runners apply it to the gradient only: the loss a pass
    #: reports is unweighted. A closure applies it itself (``closure(loss_weight=...)``).
    loss_weight: float = 1.0


Plan = Generator[Pass, Any, list]
Runner = Callable[[Pass], Any]


# --------------------------------------------------------------------------------------------
# Combinations: which gradient drives the base step (DESIGN.md §2)


class Combination:
    """Turns the gradients of a step's passes into the descent gradient."""

    #: The clean gradient enters the descent gradient (so under DDP the clean pass must sync).
    uses_clean = False

    def start(self, opt: "FlatOptimizer", params: list[Tensor]) -> Any:
        """Called once the clean gradient is in ``.grad`` and before the first perturbed pass."""
        return None

    def after_pass(self, state: Any, params: list[Tensor]) -> None:
        """Called after each perturbed pass, with its gradients in ``.grad``."""

    def finish(self, opt: "FlatOptimizer", state: Any, params: list[Tensor], passes: int) -> Optional[Callable[[], None]]:
        """Leaves the descent gradient in ``.grad``; may return a commit of method state."""
        return None

    def off_step(self, opt: "FlatOptimizer", params: list[Tensor]) -> None:
        """A step whose trigger did not fire: ``.grad`` holds the clean gradient."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PerturbedGradient(Combination):
    """Descend along ``∇L(w + ε)`` (SAM and its single-point variants)."""


def _grads(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


class MeanGradient(Combination):
    """Descend along the mean of the gradients of the step's passes: ``∇L(w + a_k)`` over
    ``k = 0..K`` with the clean one (GA-SAM eq. 14, ``a_0 = 0``), or over the perturbed passes
    alone (``include_clean=False``: LPF-SGD's Monte Carlo mean)."""

    def __init__(self, include_clean: bool = True):
        self.uses_clean = include_clean

    def __repr__(self) -> str:
        return f"MeanGradient(include_clean={self.uses_clean})"

    def start(self, opt, params):
        # References, not copies: the next pass writes fresh .grad tensors.
        return [params, _grads(params) if self.uses_clean else None]

    def after_pass(self, state, params):
        if state[1] is None:
            state[0], state[1] = params, _grads(params)
        else:
            torch._foreach_add_(state[1], _grads(state[0]))

    def finish(self, opt, state, params, passes):
        params, total = state
        torch._foreach_div_(total, float(passes + int(self.uses_clean)))
        for p, g in zip(params, total):
            p.grad = g
        return None


class LookSAMGradient(Combination):
    """LookSAM (Liu et al. 2022): reuse the SAM-specific part of the gradient between SAM steps.

    On a SAM step store ``g_v = g_s − (⟨g, g_s⟩/‖g‖²)·g`` (``g_s`` the perturbed and ``g`` the clean
    gradient; this is ``g_s − ‖g_s‖cos(g, g_s)·g/‖g‖``) and descend along ``g_s``; on the other
    steps descend along ``g + α·(‖g‖/‖g_v‖)·g_v``. The weights are always restored from the copy
    taken at this step, never from a stale one.
    """

    uses_clean = True

    def __init__(self, alpha: float):
        self.alpha = alpha

    def __repr__(self) -> str:
        return f"LookSAMGradient(alpha={self.alpha})"

    def start(self, opt, params):
        return _grads(params)

    def finish(self, opt, state, params, passes):
        clean, perturbed = state, _grads(params)
        dot = torch.stack([(a * b).sum(dtype=F.reduction_dtype(a)) for a, b in zip(clean, perturbed)]).sum()
        coef = dot / (F.global_norm(clean) ** 2).clamp_min(F.TINY)
        g_v = torch._foreach_sub(perturbed, torch._foreach_mul(clean, coef))

        def commit():
            for p, v in zip(params, g_v):
                opt.method_state[p]["looksam_gv"] = v

        return commit

    def off_step(self, opt, params):
        pairs = [(p, opt.method_state[p].get("looksam_gv")) for p in params if p.grad is not None]
        pairs = [(p, v) for p, v in pairs if v is not None]
        if not pairs:
            return
        grads, g_v = [p.grad for p, _ in pairs], [v for _, v in pairs]
        coef = self.alpha * F.global_norm(grads) / F.global_norm(g_v).clamp_min(F.TINY)
        torch._foreach_add_(grads, torch._foreach_mul(g_v, coef))


# --------------------------------------------------------------------------------------------
# Perturbations: how ε is made


class Perturbation:
    """Makes ε and asks for the passes at the perturbed weights (a sub-plan)."""

    #: Whether the step starts with a pass at ``w`` (also for the loss only)…
    needs_clean_pass = True
    #: …and whether that pass must produce gradients.
    needs_clean_grad = True
    #: The batch index ``(m, M)`` of the clean pass when the method uses several batches.
    clean_batch: Optional[tuple[int, int]] = None
    #: Whether it runs on FSDP2 (DTensor) parameters (checked against single-process runs).
    supports_sharded = False

    def sharded_ok(self) -> bool:
        """Whether this perturbation, as configured, runs on DTensor parameters."""
        return self.supports_sharded

    @property
    def batch_count(self) -> Optional[int]:
        """M when the passes run on M different batches (``step(closure, batches=...)``)."""
        return None

    def run(self, opt: "FlatOptimizer", clean_loss: Any) -> Plan:
        raise NotImplementedError
        yield  # pragma: no cover

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class NoPerturbation(Perturbation):
    """The base optimizer alone (the reference every method reduces to)."""

    supports_sharded = True

    def run(self, opt, clean_loss):
        return []
        yield  # pragma: no cover


class Adversarial(Perturbation):
    """Gradient ascent on the loss inside ``{‖T⁻¹ε‖_p ≤ ρ}`` (DESIGN.md §3).

    ``steps = 1`` without projection is SAM's ``ε = ρ·T ⊙ dual(T ⊙ g)``. ``steps = K`` with
    ``project=True`` is GA-SAM's multi-step ascent: ``u_k = η·T ⊙ dual(T ⊙ g_{k−1})``,
    ``a_k = Π(a_{k−1} + u_k)`` with ``η = step_size·ρ/K`` (1.5ε/K in the paper). ``scale`` gives
    ``T`` from the clean gradient, held for the whole step; ``mask`` (SSAM) zeroes the ascent
    gradient outside a sparse set. ``different_batches=True``: the ascent gradient from batch
    ``B1`` (the clean pass) and the descent gradient at ``w + ε`` from ``B2`` (seed 004, Table A1).
    """

    supports_sharded = True

    def __init__(self, norm: float = 2.0, scale=None, steps: int = 1, project: bool = False,
                 step_size: float = 1.0, per_tensor: bool = False, mask=None, different_batches: bool = False):
        from .scale import Scale

        self.norm, self.scale = norm, scale or Scale()
        self.steps, self.project, self.step_size = steps, project, step_size
        self.per_tensor, self.mask = per_tensor, mask
        self.clean_batch, self.perturbed_batch = ((0, 2), (1, 2)) if different_batches else (None, None)

    @property
    def batch_count(self) -> Optional[int]:
        return 2 if self.perturbed_batch else None

    def run(self, opt, clean_loss):
        params, gidx = opt.scoped_params(with_grad=True)
        if not params:
            return []
        commits: list = []
        grads = [p.grad for p in params]
        scale = self.scale(params, grads)
        mask = None
        if self.mask is not None:
            mask, commit = self.mask(opt, params, grads)
            commits.append(commit)
        radius = opt.strengths()
        sizes = [self.step_size * r / self.steps for r in radius]
        # One strength for every group (the usual case): fold it into the normalization scalar.
        factor = sizes[0] if len(set(sizes)) == 1 else None
        radius_per_tensor = [radius[i] for i in gidx]
        inv_scale = F.inverse(scale) if self.project else None
        combination, every = opt.combination, opt.all_params_with_grad()
        saved = F.clone(params)
        a = state = None
        try:
            for k in range(1, self.steps + 1):
                with torch.no_grad():
                    g = opt.ascent_gradients(params, grads, gidx)
                    if mask is None:
                        u = F.ascent_direction(g, scale, self.norm, self.per_tensor, factor)
                    else:  # the mask owns how it enters (SSAM's two normalizations)
                        u = self.mask.ascent(g, mask, scale, self.norm, self.per_tensor, factor)
                    del g
                    if factor is None:
                        F.scale_by_group(u, sizes, gidx)
                    if a is None:
                        a = u
                    else:
                        torch._foreach_add_(a, u)
                    del u
                    if self.project:
                        F.project(a, scale, radius_per_tensor, self.norm, self.per_tensor, inv_scale)
                    if k > 1:
                        F.restore_(params, saved)
                    torch._foreach_add_(params, a)
                opt.note_perturbation(params, saved)
                last = k == self.steps
                if last:
                    # Only the saved weights (and what the combination keeps) live through the pass.
                    a = scale = inv_scale = mask = None
                if k == 1:
                    state = combination.start(opt, every)
                grads = None
                yield Pass("perturbed", backward=True, sync=last or combination.uses_clean or opt.sync_perturbation,
                           batch=self.perturbed_batch)
                if not last:
                    grads = _grads(params)
                combination.after_pass(state, every)
        finally:
            F.restore_(params, saved)
        commits.append(combination.finish(opt, state, every, self.steps))
        return commits


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
                z[-1] = _shard_like(z[-1], p)
        d = F.dual_direction(z, 2.0, self.per_tensor)
        return F.scale_by_group(d, opt.strengths(), gidx)

    def run(self, opt, clean_loss):
        params, gidx = opt.scoped_params(with_grad=False)
        sharded = any(F.is_sharded(p) for p in params)
        saved = F.clone(params)
        losses = []
        try:
            for j in range(self.candidates):
                with torch.no_grad():
                    torch._foreach_add_(params, self._delta(opt, params, gidx, j))
                # With a shared ε the ranks draw the same candidates and compare global losses; with
                # sharded parameters (FSDP2) the choice must be one for all shards, so always.
                loss = yield Pass("probe", backward=False, sync=opt.sync_perturbation or sharded)
                check("closure", (torch.is_tensor(loss) and loss.numel() == 1) or is_real(loss),
                      f"a closure returning {type(loss).__name__}",
                      f"a closure (or forward=) that returns the loss, a number or a one-element tensor: "
                      f"{type(opt).__name__} picks the candidate with the highest loss")
                losses.append(torch.as_tensor(loss).detach().reshape(()))
                F.restore_(params, saved)
            # In the explicit form the clean loss may be unknown: the clean point is then no candidate.
            clean = torch.as_tensor(-math.inf if clean_loss is None else clean_loss).detach().reshape(())
            device = losses[0].device
            dtype = torch.float32 if device.type == "mps" else torch.float64
            scores = torch.stack([t.to(device, dtype) for t in [clean, *losses]])
            best = int(scores.argmax()) - 1  # the choice needs the losses on the host: one read
            if best >= 0:
                with torch.no_grad():
                    torch._foreach_add_(params, self._delta(opt, params, gidx, best))
            opt.note_perturbation(params, saved)
            yield Pass("perturbed", backward=True, sync=True)
        finally:
            F.restore_(params, saved)
        return []


def _shard_like(full: Tensor, like: Tensor) -> Tensor:
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
    """Random weight perturbation ``ε = σ·Z ⊙ S`` (DESIGN.md §3; seeds 000 and 004).

    ``Z ~ N(0, 1)`` from a generator per tensor seeded by (seed, step, rank, tensor index, sample),
    so one draw per optimizer step, reproducible and resumable, never the global RNG. ``S`` is a
    :class:`~flatminima.scale.Scale` of the weights (uniform, matrix ``‖W‖_F``, element ``|W|``,
    filter ``‖W_{i,:}‖``, Flat-LoRA ``‖W_{i,:}‖/√n_in``), Fisher-damped to ``S/√(1 + η·F)`` when
    ``fisher_eta > 0``, with ``F`` an EMA (``fisher_decay``) of the squared descent gradient.
    ``samples = M`` noisy passes with independent ε (LPF-SGD), on M batches when ``per_batch``.
    ``noisy_batch``: the batch index ``(m, M)`` of the single noisy pass (m-RWP with two batches).
    The noise is made and added one tensor at a time; the weights are restored from a copy.
    """

    needs_clean_pass = False
    needs_clean_grad = False
    supports_sharded = True  # the noise is drawn whole and each rank keeps its chunk (_shard_like)

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
                z = _shard_like(z, p)
            if s is not None:
                z.mul_(s)
            fisher = opt.method_state[p].get("fisher") if self.fisher_eta else None
            if fisher is not None:
                z.div_(torch.sqrt(1.0 + self.fisher_eta * fisher))
            yield z.mul_(sigma[gidx[i]])

    def run(self, opt, clean_loss, loss_weight: float = 1.0):
        params, gidx = opt.scoped_params(with_grad=False)
        combination, every = opt.combination, opt.all_params_with_grad()
        scale = self.scale(params, params)  # of the weights at w: the same for every sample
        saved = F.clone(params)
        state = combination.start(opt, every)
        full_window = not combination.uses_clean
        try:
            for m in range(self.samples):
                with torch.no_grad():
                    if m:
                        F.restore_(params, saved)
                    for p, eps in zip(params, self.noise(opt, params, gidx, m, scale)):
                        p.add_(eps)
                opt.note_perturbation(params, saved)
                batch = (m, self.samples) if self.per_batch else self.noisy_batch
                yield Pass("perturbed", backward=True, sync=True, full_window=full_window, batch=batch,
                           loss_weight=loss_weight)
                if m < self.samples - 1:
                    combination.after_pass(state, opt.all_params_with_grad())
        finally:
            F.restore_(params, saved)
        every = opt.all_params_with_grad()
        combination.after_pass(state, every)
        commits = [combination.finish(opt, state, every, self.samples)]
        if self.fisher_eta:
            commits.append(self._fisher_commit(opt, params))
        return commits

    def _fisher_commit(self, opt, params) -> Callable[[], None]:
        """``F ← β·F + (1 − β)·g²`` from the descent gradient, applied when the step is taken."""
        beta = self.fisher_decay
        grads = [(p, p.grad.detach().square()) for p in params if p.grad is not None]

        def commit():
            for p, sq in grads:
                old = opt.method_state[p].get("fisher")
                opt.method_state[p]["fisher"] = sq.mul_(1 - beta) if old is None else old.mul_(beta).add_(sq, alpha=1 - beta)

        return commit


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

    def run(self, opt, clean_loss):
        rank, world, k = self.split()
        lam = self.noisy_weight
        if rank >= world - k:
            return (yield from self.noise.run(opt, clean_loss, loss_weight=lam * world / k))
        yield Pass("clean", backward=True, sync=True, loss_weight=(1.0 - lam) * world / (world - k))
        if not self.noise.fisher_eta:
            return []
        # The synced descent gradient is the same on every rank: keep F identical on all of them.
        return [self.noise._fisher_commit(opt, opt.scoped_params(with_grad=False)[0])]


class MixGradient(Combination):
    """m-RWP (seed 004, eq. 8): descend along ``λ·∇L(w + ε) + (1 − λ)·∇L(w)``, ``λ = noisy_weight``."""

    uses_clean = True

    def __init__(self, noisy_weight: float):
        self.noisy_weight = noisy_weight

    def __repr__(self) -> str:
        return f"MixGradient(noisy_weight={self.noisy_weight})"

    def start(self, opt, params):
        return params, _grads(params)

    def finish(self, opt, state, params, passes):
        clean_params, clean = state
        noisy = _grads(clean_params)
        torch._foreach_mul_(noisy, self.noisy_weight)
        torch._foreach_add_(noisy, clean, alpha=1.0 - self.noisy_weight)
        for p, g in zip(clean_params, noisy):
            p.grad = g
        return None


# --------------------------------------------------------------------------------------------
# Scope: which tensors move

ScopeSpec = Union[None, Iterable[Tensor], Callable[[Tensor], bool]]


def params_by_name(model: torch.nn.Module, include: Optional[str] = None, exclude: Optional[str] = None) -> list[Tensor]:
    """The parameters of ``model`` whose qualified names match the regex ``include`` (``re.search``;
    all when None) and not ``exclude``: a name scope, e.g. ``exclude=r"bias|norm"``."""
    patterns = {}
    for name, pattern in (("include", include), ("exclude", exclude)):
        if pattern is not None:
            try:
                patterns[name] = re.compile(pattern)
            except (re.error, TypeError) as exc:
                check(name, False, pattern, f"a regular expression: {exc}")
    chosen = [p for n, p in model.named_parameters()
              if ("include" not in patterns or patterns["include"].search(n))
              and not ("exclude" in patterns and patterns["exclude"].search(n))]
    check("include/exclude", bool(chosen), (include, exclude), "patterns that select at least one parameter")
    return chosen


def tensor_predicate(name: str, scope: ScopeSpec) -> Optional[Callable[[Tensor], bool]]:
    """A tensor set given as None (every tensor), an ``nn.Module`` (its parameters), an iterable of
    parameters or a predicate, as a predicate on tensors; anything else is refused naming ``name``."""
    if scope is None:
        return None
    if callable(scope) and not isinstance(scope, torch.nn.Module):
        return scope
    if isinstance(scope, torch.nn.Module):
        scope = list(scope.parameters())
    # A string is an iterable of characters, a tensor one of rows: neither lists parameters.
    ok = isinstance(scope, Iterable) and not isinstance(scope, (str, bytes, Tensor))
    items = list(scope) if ok else []
    check(name, ok and all(isinstance(p, Tensor) for p in items), scope if not ok else type(scope).__name__,
          "None, an nn.Module, an iterable of parameters, or a callable parameter -> bool")
    ids = {id(p) for p in items}
    return lambda p: id(p) in ids


# --------------------------------------------------------------------------------------------
# The shell


class FlatOptimizer(torch.optim.Optimizer):
    """Wraps ``base`` (any ``torch.optim.Optimizer`` instance) with a flat-minima method.

    Shares ``base.param_groups``; the method's strength (``strength_key``, e.g. ``rho``) is a
    per-group hyperparameter there, multiplied by ``schedule(step, group)``. ``step(closure)``
    returns the clean loss. ``state`` is the base optimizer's state (shared too); the method's
    own per-parameter state is :attr:`method_state`. ``state_dict`` is torch's layout with the step
    counter and the method's state under ``"flatminima"``, so a resumed run continues
    bit-identically. A base optimizer takes one method: wrapping it twice is refused.
    """

    method_name = "base"

    def __init__(self, base: torch.optim.Optimizer, *, perturbation: Perturbation | None = None,
                 combination: Combination | None = None, trigger: Trigger | None = None,
                 strength_key: str = "rho", strength: float = 0.0, schedule=None,
                 total_steps: Optional[int] = None, scope: ScopeSpec = None,
                 ascent_weight_decay: bool = False, sync_perturbation: bool = False, seed: int = 0):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer instance, got {type(base).__name__}")
        if isinstance(base, FlatOptimizer):
            raise TypeError("base is already a flatminima optimizer; wrap the plain optimizer instead")
        owner = FlatOptimizer.wrapping(base)
        # Two methods on one base would share its param_groups: the second one's strength would be
        # the first one's (setdefault), and each would step the other's parameters.
        check("base", owner is None, f"{type(base).__name__} already wrapped by {type(owner).__name__}",
              "a base optimizer not wrapped by another flatminima method: build a new base optimizer "
              "for each method")
        check_nonnegative(strength_key, strength)
        for i, group in enumerate(base.param_groups):
            if strength_key in group:
                check_nonnegative(f"{strength_key} (param group {i})", group[strength_key])
        check_int("seed", seed, 0)
        check("ascent_weight_decay", isinstance(ascent_weight_decay, bool), ascent_weight_decay, "True or False")
        check("sync_perturbation", isinstance(sync_perturbation, bool), sync_perturbation, "True or False")
        sched = strength_schedule(schedule, total_steps)
        predicate = tensor_predicate("scope", scope)
        if predicate is not None:
            matched = any(predicate(p) for g in base.param_groups for p in g["params"])
            check("scope", matched, scope if isinstance(scope, str) else type(scope).__name__,
                  "a scope that selects at least one parameter of the base optimizer")
        perturbation_ = perturbation or NoPerturbation()
        if any(F.is_sharded(p) for g in base.param_groups for p in g["params"]):
            check("base", perturbation_.sharded_ok(), f"{type(self).__name__} on FSDP2 (DTensor) parameters",
                  "a method that runs on sharded parameters: every method but parallel m-RWP (its noisy and "
                  "clean ranks need different weights, which shared shards cannot hold)")
        # Everything is validated: from here on we may touch the base optimizer.
        self.perturbation = perturbation or NoPerturbation()
        self.combination = combination or PerturbedGradient()
        self.trigger = trigger or Always()
        self.strength_key, self.schedule = strength_key, sched
        self.ascent_weight_decay, self.sync_perturbation, self.seed = ascent_weight_decay, sync_perturbation, seed
        self._in_scope = predicate
        defaults = {**base.defaults, strength_key: strength}
        super().__init__(base.param_groups, defaults)
        self.base = base
        for group in base.param_groups:
            group.setdefault(strength_key, strength)
            group.setdefault("initial_lr", group["lr"])
        self.param_groups = base.param_groups  # shared, not copied
        self.state = base.state  # shared too: ``opt.state`` is the base optimizer's, as torch expects
        #: The method's own per-parameter state (LookSAM's ``g_v``, SSAM's mask, the Fisher EMA).
        self.method_state: defaultdict[Tensor, dict] = defaultdict(dict)
        base._flatminima_method = self
        self._fresh_trigger = copy.deepcopy(self.trigger.state_dict())  # a plain checkpoint restarts it
        self._step = 0
        self._plan_gen: Optional[Plan] = None
        self._request: Optional[Pass] = None
        self._answering: Optional[Pass] = None  # the pass whose result _advance receives next
        self._commits: list = []
        self._explicit_amp: Optional[tuple[Any, Tensor]] = None  # (scaler, found_inf) of an explicit step
        self._explicit = False
        self._tracking: Optional[dict] = None
        self.statistics: dict[str, Any] = {}

    # -- views -------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.strength_key}={self.defaults[self.strength_key]}, "
                f"perturbation={self.perturbation!r}, combination={self.combination!r}, "
                f"trigger={self.trigger!r}, base={type(self.base).__name__})")

    @staticmethod
    def wrapping(base: torch.optim.Optimizer) -> Optional["FlatOptimizer"]:
        """The flatminima method built on ``base`` (None if none is)."""
        return getattr(base, "_flatminima_method", None)

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (AMP-skipped steps do not count)."""
        return self._step

    def track_statistics(self, enabled: bool = True, cosine: bool = True) -> None:
        """Record, for every step taken, :attr:`statistics`: ``clean_loss`` and ``grad_norm`` (the
        clean pass), ``perturbed_loss`` and ``perturbed_grad_norm`` (the last perturbed pass),
        ``sharpness = perturbed_loss − clean_loss``, ``eps_norm`` (‖ε‖₂ of the last perturbation,
        for methods that write ε into the weights) and, with ``cosine``, ``cosine`` between the
        clean and the perturbed gradient (this keeps a copy of the clean gradient during the step).
        Values are 0-dim tensors (no host sync); a key is absent when the step had no such pass
        (RWP has no clean pass; a trigger that does not fire has no perturbed one). Losses are
        known when the step runs through ``step(closure)`` or :class:`~flatminima.TrainStep`."""
        check("enabled", isinstance(enabled, bool), enabled, "True or False")
        self._tracking = {"cosine": bool(cosine), "pending": {}, "clean_grad": None} if enabled else None
        self.statistics = {}

    def note_perturbation(self, params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
        """Called by a perturbation with the weights at ``w + ε`` and the saved ``w``: records
        ``‖ε‖₂`` when statistics are tracked (a no-op otherwise)."""
        if self._tracking is not None and params:
            with torch.no_grad():
                self._tracking["pending"]["eps_norm"] = F.global_norm(torch._foreach_sub(list(params), list(saved)))

    def _observe(self, request: Optional[Pass], loss: Any) -> None:
        """Fold one pass's loss and gradient into the step's pending statistics."""
        track = self._tracking
        if track is None or request is None:
            return
        pending, clean = track["pending"], request.role == "clean"
        if torch.is_tensor(loss) or isinstance(loss, (int, float)):
            pending["clean_loss" if clean else "perturbed_loss"] = torch.as_tensor(loss).detach().reshape(())
        if not request.backward or request.role == "probe":
            return
        with torch.no_grad():
            grads = [p.grad for p in self.all_params_with_grad()]
            if not grads:
                return
            norm = F.global_norm(grads)
            if clean:
                pending["grad_norm"] = norm
                if track["cosine"]:
                    track["clean_grad"] = F.clone(grads)
            else:
                pending["perturbed_grad_norm"] = norm
                reference = track["clean_grad"]
                if reference is not None and len(reference) == len(grads):
                    dot = torch.stack([(a.double() * b.double()).sum() for a, b in zip(grads, reference)]).sum()
                    pending["cosine"] = (dot / (norm.double() * F.global_norm(reference).double())).float()

    def rng_seed(self, stream: int = 0, device_index: int = 0) -> int:
        """Seed for the method's own generators: a function of (seed, step, rank, stream).

        With ``sync_perturbation`` every rank uses rank 0's seed, so random ε is shared."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed and not self.sync_perturbation else 0
        return derive_seed(self.seed, self._step, rank, stream, device_index)

    def strengths(self) -> list[float]:
        """The scheduled strength of each parameter group at this step."""
        return [float(g[self.strength_key]) * float(self.schedule(self._step, g)) for g in self.param_groups]

    def scoped_params(self, with_grad: bool = True) -> tuple[list[Tensor], list[int]]:
        """Scoped parameters (with a gradient, or requiring one) and the index of their group."""
        params, gidx = [], []
        for i, group in enumerate(self.param_groups):
            for p in group["params"]:
                if (p.grad is None) if with_grad else (not p.requires_grad):
                    continue
                if self._in_scope is None or self._in_scope(p):
                    params.append(p)
                    gidx.append(i)
        return params, gidx

    def all_params_with_grad(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def ascent_gradients(self, params: list[Tensor], grads: list[Tensor], gidx: list[int]) -> list[Tensor]:
        """The gradient the ascent follows: ``g``, or ``g + λ·w`` with ``ascent_weight_decay``."""
        if not self.ascent_weight_decay:
            return grads
        out = list(grads)
        for i, group in enumerate(self.param_groups):
            wd = float(group.get("weight_decay", 0.0))
            idx = [j for j, gi in enumerate(gidx) if gi == i]
            if wd and idx:
                summed = torch._foreach_add([grads[j] for j in idx], [params[j] for j in idx], alpha=wd)
                for j, s in zip(idx, summed):
                    out[j] = s
        return out

    def _null_grads(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    # -- the plan ----------------------------------------------------------------------------
    def _plan(self) -> Plan:
        step = self._step
        fire = self.trigger.before(step)
        if isinstance(self.perturbation, NoPerturbation):
            fire = False
        clean_loss = None
        if fire is not True or self.perturbation.needs_clean_pass or self.combination.uses_clean:
            clean_backward = fire is not True or self.perturbation.needs_clean_grad or self.combination.uses_clean
            clean_sync = fire is not True or self.sync_perturbation or self.combination.uses_clean
            clean_loss = yield Pass("clean", backward=clean_backward, sync=clean_sync,
                                    batch=self.perturbation.clean_batch)
        commits: list = []
        if fire is None:
            params, _ = self.scoped_params(with_grad=True)
            fire, commit = self.trigger.after(step, lambda: F.global_norm([p.grad for p in params]) ** 2)
            commits.append(commit)
        if not fire:
            self.combination.off_step(self, self.all_params_with_grad())
            return commits
        commits += yield from self.perturbation.run(self, clean_loss)
        return commits

    def _advance(self, result: Any) -> None:
        """Send a pass's result to the plan and fetch the next request (None when done)."""
        self._observe(self._answering, result)
        try:
            self._request = self._plan_gen.send(result)
        except StopIteration as stop:
            self._commits = [c for c in (stop.value or []) if c is not None]
            self._request = None
            if self._explicit_amp is not None:
                self._record_explicit_amp()
        self._answering = self._request

    def _start(self) -> Pass:
        self._plan_gen = self._plan()
        self._explicit = False  # set by the explicit form, whose caller runs the passes
        self._request = None
        self._commits = []
        if self._tracking is not None:
            self._tracking["pending"], self._tracking["clean_grad"] = {}, None
        self._answering = next(self._plan_gen)
        return self._answering

    def abort(self) -> None:
        """Abandon the step in progress: weights back to ``w`` exactly, method state untouched."""
        if self._plan_gen is not None:
            self._plan_gen.close()
        self._plan_gen, self._request, self._answering, self._commits = None, None, None, []
        self._explicit_amp = None
        if self._tracking is not None:
            self._tracking["pending"], self._tracking["clean_grad"] = {}, None

    def run_plan(self, runner: Runner) -> Any:
        """Drive a whole step's passes with ``runner(pass) -> loss``; return the clean loss.

        Leaves the descent gradient in ``.grad`` and the weights at ``w``; ``step()`` (or
        ``finish_step(skipped=True)``) completes the step. Restores the weights if a pass raises.
        """
        self.abort()
        request = self._start()
        try:
            if request.backward:
                self._null_grads()
            clean_loss = runner(request)
            self._advance(clean_loss)
            while self._request is not None:
                if self._request.backward:
                    self._null_grads()
                self._advance(runner(self._request))
        except BaseException:
            self.abort()
            raise
        return clean_loss

    def finish_step(self, skipped: bool = False) -> None:
        """Commit the method's state and count the step, or (``skipped``) drop both."""
        if not skipped:
            for commit in self._commits:
                commit()
            if self._tracking is not None:
                stats = dict(self._tracking["pending"], step=self._step)
                if "clean_loss" in stats and "perturbed_loss" in stats:
                    stats["sharpness"] = stats["perturbed_loss"] - stats["clean_loss"]
                self.statistics = stats
            self._step += 1
        if self._tracking is not None:
            self._tracking["pending"], self._tracking["clean_grad"] = {}, None
        self._plan_gen, self._request, self._commits = None, None, []
        self._explicit_amp = None

    # -- explicit form -----------------------------------------------------------------------
    def _unscale_explicit(self) -> None:
        """Unscale the pass just run (explicit form with ``scaler=``): ε needs true gradients."""
        if self._explicit_amp is not None:
            scaler, found_inf = self._explicit_amp
            _amp.unscale_(scaler, [p.grad for p in self.all_params_with_grad()], found_inf)

    def _record_explicit_amp(self) -> None:
        """The step's passes are done: hand the unscaled result to ``scaler.step(opt)``."""
        scaler, found_inf = self._explicit_amp
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Unsynced passes may overflow on one rank only: every rank must skip together.
            torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX)
        _amp.record_unscaled(scaler, self, found_inf)

    def _ensure_started(self, forward: Optional[Callable[[], Any]] = None, scaler: Any = None) -> None:
        if self._plan_gen is not None and self._request is None and self._explicit_amp is not None:
            # The last explicit step ran all its passes but ``scaler.step`` skipped it (inf/NaN):
            # its uncommitted method state is dropped, the step is not counted.
            self.finish_step(skipped=True)
        if self._plan_gen is None:
            check("scaler", scaler is None or isinstance(scaler, torch.amp.GradScaler), type(scaler).__name__,
                  "None or a torch.amp.GradScaler")
            if _amp.enabled(scaler):
                check("scaler", scaler._scale is not None, "a GradScaler that has not scaled a loss yet",
                      "the GradScaler of this step's scaler.scale(loss).backward()")
            request = self._start()
            self._explicit = True
            if _amp.enabled(scaler):
                self._explicit_amp = (scaler, _amp.new_found_inf(scaler._scale.device))
                if request.role == "clean" and request.backward:
                    self._unscale_explicit()  # the caller's clean backward
            # The caller has already run the clean pass. A method that wants only the clean loss
            # (random search) gets it from ``forward`` when given; a method without a clean pass
            # (RWP) starts with a perturbed pass, which the caller runs next.
            if request.role != "clean":
                self._request = request
            elif not request.backward and forward is not None:
                with torch.no_grad():
                    self._advance(forward())
            else:
                self._advance(None)

    def _next_backward_request(self, forward: Optional[Callable[[], Any]]) -> Optional[Pass]:
        while self._request is not None and not self._request.backward:
            if forward is None:
                self.abort()
                raise RuntimeError(
                    f"{type(self).__name__} evaluates the loss at extra points without a backward pass: "
                    "pass forward=<callable returning the loss> to perturbed()/perturbations(), or use step(closure)")
            with torch.no_grad():
                self._advance(forward())
        return self._request

    @contextlib.contextmanager
    def perturbed(self, forward: Optional[Callable[[], Any]] = None, scaler: Any = None) -> Iterator[bool]:
        """Run the body (a forward and backward) at the perturbed weights; restore on exit.

        Call after the clean forward/backward, then call ``step()``. Yields whether the weights
        are perturbed this step: when the method skips this step (a trigger that did not fire)
        the body's gradients are discarded and the clean gradient is kept. Methods with several
        perturbed passes (GA-SAM ``steps > 1``) need one ``perturbed()`` block per pass, or use
        ``perturbations()``. If the body raises, the weights are restored exactly. ``scaler``: the
        fp16 ``GradScaler`` of the backward passes (see :meth:`perturbations`).
        """
        self._ensure_started(forward, scaler)
        request = self._next_backward_request(forward)
        if request is None:
            stash = [(p, p.grad) for g in self.param_groups for p in g["params"]]
            self._null_grads()
            try:
                yield False
            finally:
                for p, grad in stash:
                    p.grad = grad
            return
        self._null_grads()
        try:
            yield True
        except BaseException:
            self.abort()
            raise
        self._unscale_explicit()
        self._advance(None)

    def perturbations(self, forward: Optional[Callable[[], Any]] = None, scaler: Any = None) -> Iterator[Pass]:
        """Iterate over the perturbed passes this step needs (0, 1 or K); run one forward and
        backward per iteration, then call ``step()``. Each item is the :class:`Pass`; its
        ``batch = (m, M)`` says which of M batches to use for methods that take several.

        With an fp16 ``GradScaler`` pass it here and finish with ``scaler.step(opt);
        scaler.update()``: every backward is ``scaler.scale(loss).backward()``, and each pass's
        gradients (the clean one included) are unscaled right after it, so ε and the descent
        gradient come from true gradients; an inf/NaN in any pass makes ``scaler.step`` skip the
        step (weights, base and method state untouched; the next step starts afresh). Without
        ``scaler=`` the gradients are taken as they are: scaled ones would give a wrong ε."""
        self._ensure_started(forward, scaler)
        try:
            while self._next_backward_request(forward) is not None:
                self._null_grads()
                yield self._request
                self._unscale_explicit()
                self._advance(None)
        except BaseException:
            self.abort()
            raise

    # -- torch.optim.Optimizer API -----------------------------------------------------------
    def step(self, closure: Optional[Callable[..., Any]] = None, batches: Optional[Sequence[Any]] = None) -> Any:
        """One optimizer step. With a closure (forward + backward, returns the loss) the method
        runs every pass itself and returns the loss of the step's first pass (the clean loss;
        for RWP, which has no clean pass, the loss at ``w + ε``); without one, the passes must
        already have run (explicit form; under fp16 AMP, ``scaler.step(opt)`` after
        ``perturbations(scaler=scaler)``).

        The closure need not zero the gradients: every pass that needs them, the first included,
        starts from ``.grad = None``, so gradients already in ``.grad`` never enter the step.

        ``batches``: for methods whose passes use different batches (LPF-SGD's M chunks, m-RWP
        with ``different_batches``), the closure takes a batch (``closure(batch)``) and each pass
        gets its own; without it every pass calls ``closure()`` on the step's one batch.
        """
        refuse_framework_loop(self, closure)  # Accelerate/Lightning idioms that would step silently wrong
        loss = None
        if batches is not None:
            count = self.perturbation.batch_count
            check("batches", count is not None, "a sequence",
                  f"None: {type(self).__name__} runs every pass on the same batch")
            check("batches", closure is not None and len(batches) == count, f"{len(batches)} batches",
                  f"{count} batches and a closure(batch)")
        if closure is not None:
            loss = self.run_plan(_closure_runner(closure, batches))
        elif self._request is not None or self._plan_gen is None:
            self._ensure_started()
            if self._request is not None:
                self.abort()
                if all(not p.grad.any() for p in self.all_params_with_grad()):  # a host sync, off the hot path
                    # ``torch.distributed.checkpoint`` creates the optimizer state by a step with zero
                    # gradients (and lr = 0): it reaches the base optimizer and is no method step.
                    self.base.step()
                    return None
                raise RuntimeError(
                    f"{type(self).__name__} needs forward/backward passes at perturbed weights before step(): "
                    "pass a closure to step(), or run them inside `with opt.perturbed():` / `for _ in opt.perturbations():`")
        if (closure is None and self._explicit and self._explicit_amp is None
                and not isinstance(self.perturbation, NoPerturbation) and _amp.called_by_grad_scaler()):
            # scaler.step(opt) after passes that never saw the scaler: ε came from scaled gradients.
            self.abort()
            raise RuntimeError(
                f"{type(self).__name__}'s passes ran on gradients scaled by a GradScaler that they were not given, "
                "so the perturbation is wrong: pass it, `opt.perturbations(scaler=scaler)` / "
                "`opt.perturbed(scaler=scaler)`, then call scaler.step(opt); scaler.update()")
        self.base.step()
        self.finish_step()
        return loss

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base"):  # during Optimizer.__init__
            return super().add_param_group(param_group)
        value = param_group.get(self.strength_key, self.defaults[self.strength_key])
        check_nonnegative(self.strength_key, value)
        self.base.add_param_group(param_group)
        param_group = self.base.param_groups[-1]
        param_group.setdefault(self.strength_key, value)
        param_group.setdefault("initial_lr", param_group["lr"])

    def _param_index(self) -> dict[int, Tensor]:
        return {i: p for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def state_dict(self) -> dict:
        """torch's layout: the base optimizer's ``state`` and ``param_groups`` (which hold the
        strength), plus ``"flatminima"``: the method's name, step counter, per-parameter state (by
        parameter index, like ``state``) and trigger state. Plain torch optimizers and
        ``torch.distributed.checkpoint`` read it as the base optimizer's state dict."""
        index = {id(p): i for i, p in self._param_index().items()}
        own = {index[id(p)]: dict(s) for p, s in self.method_state.items() if s and id(p) in index}
        out = dict(self.base.state_dict())
        out["flatminima"] = {"method": self.method_name, "step": self._step, "state": own,
                             "trigger": self.trigger.state_dict()}
        return out

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Load this method's ``state_dict()``, an old ``{'base', 'flat'}`` one, or a plain base
        optimizer's (the method's step counter, trigger and per-parameter state start fresh; a group
        without the strength keeps the current one). The whole state is validated first (method,
        groups, strength and ``lr`` in range, method state); nothing changes when it is refused."""
        base_sd, flat = checked_state_dict(self, state_dict)
        kept = [{k: g[k] for k in (self.strength_key, "initial_lr") if k in g} for g in self.param_groups]
        self.base.load_state_dict(base_sd)
        self.param_groups, self.state = self.base.param_groups, self.base.state
        for group, old in zip(self.param_groups, kept):
            for key, value in old.items():
                group.setdefault(key, value)
        flat = flat or {"step": 0, "state": {}, "trigger": self._fresh_trigger}
        params = self._param_index()
        self.method_state = defaultdict(dict)
        for i, s in flat["state"].items():
            p = params[int(i)]
            # Copies: the method updates its state in place (Fisher EMA); the caller's dict stays as loaded.
            self.method_state[p] = {k: v.detach().to(p.device, copy=True) if torch.is_tensor(v) else v
                                    for k, v in s.items()}
        self._step = int(flat["step"])
        self.trigger.load_state_dict(copy.deepcopy(flat["trigger"]))
        self.abort()


def closure_accepts(closure: Callable[..., Any], name: str) -> bool:
    """Whether ``closure`` takes a keyword argument ``name``."""
    try:
        return name in inspect.signature(closure).parameters
    except (TypeError, ValueError):
        return False


def _closure_runner(closure: Callable[..., Any], batches: Optional[Sequence[Any]] = None) -> Runner:
    weighted = closure_accepts(closure, "loss_weight")

    def run(request: Pass) -> Any:
        kwargs = {"loss_weight": request.loss_weight} if weighted else {}
        if request.loss_weight != 1.0 and not weighted:
            raise TypeError("this method weighs the loss of a pass before its backward: the closure must accept "
                            "`loss_weight` (e.g. def closure(loss_weight=1.0): ...; (loss * loss_weight).backward()), "
                            "or use flatminima.TrainStep")
        if batches is not None:
            with torch.enable_grad():
                return closure(batches[request.batch[0]], **kwargs)
        if request.backward:
            with torch.enable_grad():
                return closure(**kwargs)
        if not closure_accepts(closure, "backward"):
            raise TypeError("this method evaluates the loss without a backward pass: the closure must accept "
                            "`backward=False` (e.g. def closure(backward=True): ...; if backward: loss.backward())")
        with torch.no_grad():
            return closure(backward=False)

    return run
