"""The ``torch.optim.Optimizer`` shell every method shares.

A :class:`FlatOptimizer` wraps any optimizer *instance* (the *base*), shares its ``param_groups``
(so LR schedulers and per-group hyperparameters act on both) and never re-implements its update.
A method is a choice along the axes, given to the constructor:

* ``scope``: which tensors move (:mod:`flatminima.core.scope`);
* ``ascent``: which gradient an adversarial perturbation follows (:mod:`flatminima.core.ascent`);
* ``perturbation``: how ε is made (:mod:`flatminima.core.perturbations`), with a scale ``T``
  (:mod:`flatminima.core.scale`) and a strength (``strength_key``, e.g. ``rho``) per group;
* ``combination``: which gradient drives the base step, and what runs after it
  (:mod:`flatminima.core.combine`);
* ``trigger`` and ``schedule``: when to perturb, and how strongly (:mod:`flatminima.core.schedules`).

The shell holds them, the groups and the method's state; running a step is the plan driver's
(:mod:`flatminima.core.plan`), visiting the points the perturbation's (:mod:`flatminima.core.perturb`).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from . import amp as _amp
from . import kernels as F
from .ascent import Ascent, AscentLink, AscentWeightDecay
from .checkpoint import checked_state_dict
from .combine import Combination, PerturbedGradient
from .framework_loops import refuse_framework_loop
from .passes import Pass, Plan
from .perturb import NoPerturbation, Perturbation
from .plan import PlanDriver, closure_runner
from .schedules import Always, Trigger, derive_seed, strength_schedule
from .scope import ScopeSpec, SupportScope, tensor_predicate
from .statistics import StatisticsTracker
from .validation import check, check_int, check_nonnegative


class FlatOptimizer(PlanDriver, StatisticsTracker, torch.optim.Optimizer):
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
                 ascent: Union[Ascent, Sequence[AscentLink], None] = None,
                 ascent_weight_decay: bool = False, sync_perturbation: bool = False, seed: int = 0,
                 foreach: Optional[bool] = None):
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
        check("foreach", foreach is None or isinstance(foreach, bool), foreach, "None, True or False")
        sched = strength_schedule(schedule, total_steps)
        perturbation_ = perturbation or NoPerturbation()
        support = scope if isinstance(scope, SupportScope) else None
        if support is not None:  # it validated itself; its in-place part may be empty (ε on frozen weights only)
            scope = support.parameters()
            held = {id(p) for g in base.param_groups for p in g["params"]}
            check("scope", all(id(p) in held for p in scope), "a support moving tensors the base optimizer does not hold",
                  "a support whose trained tensors are all in the base optimizer's param_groups")
            perturbation_ = support.wrap(perturbation_)
        predicate = tensor_predicate("scope", scope)
        if predicate is not None and support is None:
            matched = any(predicate(p) for g in base.param_groups for p in g["params"])
            check("scope", matched, scope if isinstance(scope, str) else type(scope).__name__,
                  "a scope that selects at least one parameter of the base optimizer")
        links = tuple(ascent.links if isinstance(ascent, Ascent) else (ascent or ()))
        check("ascent", all(isinstance(link, AscentLink) for link in links), type(ascent).__name__,
              "None, an Ascent or a sequence of AscentLink")
        chain = Ascent(((AscentWeightDecay(),) if ascent_weight_decay else ()) + links)
        perturbation_.check_ascent(chain)
        if any(F.is_sharded(p) for g in base.param_groups for p in g["params"]):
            check("base", perturbation_.sharded_ok(), f"{type(self).__name__} on FSDP2 (DTensor) parameters",
                  "a method that runs on sharded parameters: every method but parallel m-RWP (its noisy and "
                  "clean ranks need different weights, which shared shards cannot hold)")
        # Everything is validated: from here on we may touch the base optimizer.
        self.perturbation, self.ascent = perturbation_, chain
        self.combination = combination or PerturbedGradient()
        self.trigger = trigger or Always()
        self.strength_key, self.schedule = strength_key, sched
        self.ascent_weight_decay, self.sync_perturbation, self.seed = ascent_weight_decay, sync_perturbation, seed
        #: The engine's tensor-list ops: fused ``torch._foreach_*`` kernels (None, True) or per tensor (False).
        self.foreach = foreach
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
                f"perturbation={self.perturbation!r}, ascent={self.ascent!r}, combination={self.combination!r}, "
                f"trigger={self.trigger!r}, base={type(self.base).__name__})")

    @staticmethod
    def wrapping(base: torch.optim.Optimizer) -> Optional["FlatOptimizer"]:
        """The flatminima method built on ``base`` (None if none is)."""
        return getattr(base, "_flatminima_method", None)

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (AMP-skipped steps do not count)."""
        return self._step

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

    @property
    def keeps_gradients(self) -> bool:
        """Whether a step keeps gradient tensors of one pass while later passes run."""
        c = self.combination
        return c.uses_clean or c.uses_intermediate or self.perturbation.keeps_gradients

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
            loss = self.run_plan(closure_runner(closure, batches))
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


class Base(FlatOptimizer):
    """The base optimizer alone, through the same shell (the reference the methods reduce to)."""

    def __init__(self, base, **common):
        super().__init__(base, **common)
