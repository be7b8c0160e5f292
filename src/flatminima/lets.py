"""LETS: the perturbation strength learned by a one-step hypergradient.

Wang, Jiang, Fu and Zhang, "Enhancing Sharpness-Aware Minimization by Learning Perturbation
Radius" (ECML PKDD 2024) make the radius an upper-level variable of a bilevel problem::

    min_ρ  Φ(ρ) = ½·(L(D_val; w*(ρ)) − L(D_tr; w*(ρ)))²,   w*(ρ): the SAM problem at radius ρ,

the squared generalization gap, with ``w*(ρ)`` approximated by one step of the method and ρ and
``w`` updated alternately. :class:`LETS` wraps any flatminima method and learns its strength (the
``strength_key`` of its ``param_groups``: ``rho`` for the SAM family, ``sigma`` for the RWP
family, ``epsilon`` for GA-SAM).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .core.plan import closure_runner
from .core.shell import FlatOptimizer
from .core.validation import check, check_int, is_real
from .engine import StepResult, TrainStep, running_stat_buffers


def _loss_value(loss: Any, name: str) -> float:
    check(name, torch.is_tensor(loss) and loss.numel() == 1 or is_real(loss), type(loss).__name__,
          "a closure that returns the loss (a scalar tensor or float)")
    return float(loss)


class LETS:
    """Learns a flatminima method's strength ``s`` (``ρ``/``σ``/``ε``) by the one-step hypergradient
    of ``Φ(s) = ½·(L_val(w⁺(s)) − L_tr(w⁺(s)))²`` on a validation batch (Wang et al., 2024).

    ``loss = lets.step(closure, val_closure)``, every ``update_every`` steps (plain
    ``optimizer.step(closure)`` on the others):

    1. ``d(s + h)``: the method's whole step (every pass it asks for) at strength ``s + h``,
       ``h = fd_step·s`` (``fd_step·max_strength`` while ``s = 0``), its descent gradient kept, its
       state (triggers, Fisher, LookSAM) not committed. Random methods draw the same ε as in 2.
       (the noise is seeded by the step), so the difference is the effect of the strength alone;
    2. the real step at ``s``: descent gradient ``d(s)``, base optimizer step ``w → w⁺``;
    3. ``L_val``, ``∇L_val`` (``val_closure``) and ``L_tr``, ``∇L_tr`` (``closure``, the same
       training batch) at ``w⁺``;
    4. ``∂Φ/∂s = (L_val − L_tr)·⟨∇L_val − ∇L_tr, ∂w⁺/∂s⟩`` with ``∂w⁺/∂s = −η·∂d/∂s`` and
       ``∂d/∂s ≈ (d(s + h) − d(s))/h``, ``η`` the lr of each tensor's group;
       ``s ← clip(s − lr·∂Φ/∂s, min_strength, max_strength)``, written into every param group.

    The approximation, stated: ``w⁺(s) = w − η·d(s)`` is the one-step SGD approximation of
    ``w*(s)`` the paper differentiates through (for SAM ``d(ρ) = ∇L(w + ρ·g/‖g‖)``, so
    ``∂d/∂ρ = H(w + ε)·g/‖g‖``, a Hessian-vector product); step 1 computes that product by a
    forward difference in the strength, which is exact when ``d`` is affine in ``s`` (every
    method on a quadratic) and works unchanged for every method, random ones included (for RWP
    ``∂d/∂σ = H(w + ε)·ε/σ``). The paper is reported to approximate the Hessian by a diagonal
    instead (cheaper, biased); the exact product here costs one more method step per update. ``w⁺`` is the
    base optimizer's real next iterate, and ``−η·∂d/∂s`` its exact derivative for SGD with or
    without (heavy-ball) momentum and weight decay; for Nesterov, Adam and the like it is the
    paper's first-order approximation.

    Cost per update: two method steps plus two forward/backward passes (SAM: 6 instead of 2),
    one gradient-sized buffer; ``update_every = k`` amortises it. ``model``: when given, the
    running statistics of its BatchNorm layers are put back after the extra passes (1 and 3), so
    that only the real step's passes move them. The strength lives in ``param_groups``, so the
    optimizer's ``state_dict`` checkpoints it. All groups share one learned strength.
    ``statistics`` holds the last update's ``hypergradient``, ``gap`` (``L_val − L_tr`` at ``w⁺``)
    and ``strength`` (after the update; a non-finite hypergradient leaves it unchanged).

    Use the closure form (``closure()`` runs forward and backward on the training batch and
    returns the loss; ``val_closure()`` the same on a validation batch).
    """

    def __init__(self, optimizer: FlatOptimizer, lr: float, *, min_strength: float = 0.0,
                 max_strength: Optional[float] = None, fd_step: float = 0.01, update_every: int = 1,
                 model: Optional[nn.Module] = None):
        check("optimizer", isinstance(optimizer, FlatOptimizer), type(optimizer).__name__,
              "a flatminima method (FlatOptimizer), e.g. fm.SAM(base, rho=0.05) or fm.RWP(base, sigma=0.01)")
        key = optimizer.strength_key
        values = [g[key] for g in optimizer.param_groups]
        check(key, len(set(values)) == 1, values, f"the same {key} in every param group (LETS learns one {key})")
        initial = float(values[0])
        check("lr", is_real(lr) and lr > 0, lr, "a finite float > 0")
        check("min_strength", is_real(min_strength) and min_strength >= 0, min_strength, "a finite float >= 0")
        if max_strength is None:
            check("max_strength", initial > 0, max_strength,
                  f"a float > min_strength (the default, 10 × the initial {key}, needs {key} > 0)")
            max_strength = 10.0 * initial
        check("max_strength", is_real(max_strength) and max_strength > min_strength, max_strength,
              f"a finite float > min_strength = {min_strength}")
        check(key, min_strength <= initial <= max_strength, initial,
              f"an initial {key} within [min_strength, max_strength] = [{min_strength}, {max_strength}]")
        check("fd_step", is_real(fd_step) and fd_step > 0, fd_step, "a finite float > 0")
        check_int("update_every", update_every, 1)
        check("model", model is None or isinstance(model, nn.Module), type(model).__name__, "None or a torch.nn.Module")
        self.optimizer, self.lr, self.fd_step, self.update_every = optimizer, float(lr), float(fd_step), update_every
        self.min_strength, self.max_strength = float(min_strength), float(max_strength)
        self.model = model
        self.statistics: dict[str, float] = {}

    def __repr__(self) -> str:
        return (f"LETS({self.optimizer.strength_key}={self.strength}, lr={self.lr}, "
                f"bounds=[{self.min_strength}, {self.max_strength}], fd_step={self.fd_step}, "
                f"update_every={self.update_every}, optimizer={type(self.optimizer).__name__})")

    @property
    def strength(self) -> float:
        """The current learned strength (``param_groups[i][strength_key]``)."""
        return float(self.optimizer.param_groups[0][self.optimizer.strength_key])

    def _set_strength(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group[self.optimizer.strength_key] = value

    def _buffers(self, model: Optional[nn.Module] = None) -> list[tuple[Tensor, Tensor]]:
        model = model if model is not None else self.model
        if model is None:
            return []
        return [(b, b.detach().clone()) for b in running_stat_buffers(model)]

    @staticmethod
    def _restore(snapshot: list[tuple[Tensor, Tensor]]) -> None:
        with torch.no_grad():
            for buf, saved in snapshot:
                buf.copy_(saved)

    def _grads(self) -> dict[Tensor, Tensor]:
        return {p: p.grad for p in self.optimizer.all_params_with_grad()}

    def step(self, closure: Callable[..., Any], val_closure: Callable[[], Any]) -> Any:
        """One optimizer step (and, every ``update_every`` steps, one update of the strength);
        returns the method's loss (the clean loss of the training batch)."""
        check("closure", callable(closure), type(closure).__name__, "a callable running forward and backward")
        check("val_closure", callable(val_closure), type(val_closure).__name__,
              "a callable running forward and backward on a validation batch")
        opt = self.optimizer
        if opt.step_count % self.update_every:
            return opt.step(closure)
        s, h = self.strength, self._fd_step()
        runner = closure_runner(closure)
        before = self._buffers()

        # 1. The method's step at s + h, then discarded (run_plan aborts it below).
        self._set_strength(s + h)
        try:
            opt.run_plan(runner)
        finally:
            self._set_strength(s)
            self._restore(before)
        probe = {p: g.detach().clone() for p, g in self._grads().items()}

        # 2. The real step at s.
        loss = opt.run_plan(runner)
        direction = self._direction(probe, h)
        opt.step()
        after = self._buffers()

        # 3. Validation and training losses and gradients at w⁺.
        try:
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                val_loss = _loss_value(val_closure(), "val_closure")
            grads_val = self._grads()
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                train_loss = _loss_value(closure(), "closure")
            grads_tr = self._grads()
            opt.zero_grad(set_to_none=True)
        finally:
            self._restore(after)
        self._learn(s, val_loss - train_loss, direction, grads_val, grads_tr)
        return loss

    def train_step(self, engine: TrainStep, micro_batches: Sequence[Any], val_batches: Sequence[Any]) -> StepResult:
        """The same update through :class:`flatminima.TrainStep` (gradient accumulation, AMP with a
        ``GradScaler``, the BatchNorm policy, DDP): ``result = lets.train_step(step, micro_batches,
        val_batches)``, with ``step = TrainStep(model, lets.optimizer, loss_fn, ...)``.

        The probe at ``s + h`` runs the engine's passes over ``micro_batches`` (then discarded, the
        running statistics put back); the real step is the engine's (clipping, AMP skip); ``L_tr``
        and ``L_val`` at ``w⁺`` are the mean of ``loss_fn`` over ``micro_batches`` and
        ``val_batches`` (under the engine's autocast, scaled and unscaled by its scaler). The direction
        uses the unclipped descent gradients. An AMP-skipped step, or an overflow in any extra pass,
        leaves the strength unchanged. Under DDP the hypergradient is averaged over the ranks, so every
        rank learns the same strength (one scalar all-reduce).
        """
        check("engine", isinstance(engine, TrainStep) and engine.optimizer is self.optimizer, type(engine).__name__,
              "a flatminima.TrainStep built on this LETS's optimizer")
        micro_batches, val_batches = engine._check(micro_batches), engine._check(val_batches)
        opt = self.optimizer
        if opt.step_count % self.update_every:
            return engine(micro_batches)
        s, h = self.strength, self._fd_step()
        model = engine.model
        before = self._buffers(model)

        # 1. The engine's passes at s + h, discarded.
        probe_inf = engine._found_inf()
        self._set_strength(s + h)
        try:
            engine._passes(micro_batches, probe_inf)
        finally:
            opt.abort()
            self._set_strength(s)
            self._restore(before)
        probe = {p: g.detach().clone() for p, g in self._grads().items()}

        # 2. The real step at s: its passes, the direction from the unclipped gradient, the update.
        found_inf = engine._found_inf()
        loss = engine._passes(micro_batches, found_inf)
        direction = self._direction(probe, h)
        result = engine._update(loss, found_inf)
        group = engine._sync_group()
        if probe_inf is not None and group is not None:  # every rank must take the same branch
            torch.distributed.all_reduce(probe_inf, op=torch.distributed.ReduceOp.MAX, group=group)
        if result.skipped or (probe_inf is not None and bool(probe_inf.item())):
            self.statistics = {"hypergradient": float("nan"), "gap": float("nan"), "strength": s}
            return result
        after = self._buffers(model)

        # 3. L_val, ∇L_val and L_tr, ∇L_tr at w⁺.
        try:
            val_loss, grads_val = self._engine_gradients(engine, val_batches)
            train_loss, grads_tr = self._engine_gradients(engine, micro_batches)
        finally:
            opt.zero_grad(set_to_none=True)
            self._restore(after)
        self._learn(s, val_loss - train_loss, direction, grads_val, grads_tr, group=group)
        return result

    # -- the pieces both forms share -------------------------------------------------------------
    def _fd_step(self) -> float:
        s = self.strength
        return self.fd_step * (s if s > 0 else self.max_strength)

    def _direction(self, probe: dict[Tensor, Tensor], h: float) -> dict[Tensor, Tensor]:
        """``∂w⁺/∂s = −η·(d(s + h) − d(s))/h`` per tensor, in ``probe``'s buffers (zero where only
        one pass had a gradient); ``.grad`` holds ``d(s)``."""
        lr_of = {p: float(g["lr"]) for g in self.optimizer.param_groups for p in g["params"]}
        with torch.no_grad():
            direction = {p: (probe.pop(p, torch.zeros_like(g)) - g).mul_(-lr_of[p] / h) for p, g in self._grads().items()}
            direction.update({p: d.mul_(-lr_of[p] / h) for p, d in probe.items()})
        return direction

    def _engine_gradients(self, engine: "TrainStep", batches: list[Any]) -> tuple[float, dict[Tensor, Tensor]]:
        """The mean loss over ``batches`` and its gradient, through the engine's loss, autocast and
        scaler (unscaled by the engine; a non-finite gradient makes the hypergradient non-finite)."""
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        ddp = isinstance(engine.model, nn.parallel.DistributedDataParallel)
        with torch.enable_grad():
            for i, batch in enumerate(batches):
                # Under DDP the gradient is averaged once, on the last micro-batch.
                with engine.model.no_sync() if ddp and i < len(batches) - 1 else contextlib.nullcontext():
                    with engine._autocast():
                        loss = engine.loss_fn(engine.model, batch) / len(batches)
                    (engine.scaler.scale(loss) if engine._amp else loss).backward()
                total = loss.detach() if total is None else total + loss.detach()
        if engine._amp:
            engine._unscale(engine._found_inf())  # inf/NaN stay in the gradient
        return float(total), self._grads()

    def _learn(self, s: float, gap: float, direction: dict[Tensor, Tensor], grads_val: dict[Tensor, Tensor],
               grads_tr: dict[Tensor, Tensor], group: Optional[Any] = None) -> None:
        """4. ``∂Φ/∂s = (L_val − L_tr)·⟨∇L_val − ∇L_tr, ∂w⁺/∂s⟩`` and the clipped step on s."""
        with torch.no_grad():
            terms = []
            for p, v in direction.items():
                g_val, g_tr = grads_val.get(p), grads_tr.get(p)
                if g_val is not None:
                    terms.append((g_val.double() * v.double()).sum())
                if g_tr is not None:
                    terms.append(-(g_tr.double() * v.double()).sum())
            derivative = torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)
            hypergradient = derivative * gap
            if group is not None:  # each rank's own gap: the mean over ranks, so all learn one strength
                torch.distributed.all_reduce(hypergradient, group=group)
                hypergradient = hypergradient / torch.distributed.get_world_size(group)
            # One host read: the new strength is a Python float in param_groups.
            hypergradient = float(hypergradient)
        new = s
        if math.isfinite(hypergradient):  # a diverged pass leaves the strength as it was
            new = min(max(s - self.lr * hypergradient, self.min_strength), self.max_strength)
            self._set_strength(new)
        self.statistics = {"hypergradient": hypergradient, "gap": gap, "strength": new}
