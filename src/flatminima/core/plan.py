"""Driving a step's plan: by a closure, by the caller's own passes (the explicit form), or by a runner.

:class:`PlanDriver` is the part of :class:`~flatminima.core.shell.FlatOptimizer` that runs one
step: the plan (the clean pass, the trigger, then :func:`~flatminima.core.perturb.perturb`) is a
generator of :class:`~flatminima.core.passes.Pass` requests, answered three ways that share it:

* :meth:`PlanDriver.run_plan` with a runner (``step(closure)``, :class:`flatminima.TrainStep`);
* ``with opt.perturbed(): ...`` / ``for _ in opt.perturbations(): ...`` then ``opt.step()``, for
  loops that own their passes (HF Trainer, Accelerate), fp16 ``GradScaler`` included;
* :meth:`PlanDriver.finish_step` commits the method's state after the base step, or drops it.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from . import amp as _amp
from . import kernels as F
from .foreach import foreach_enabled
from .passes import Pass, Plan, Runner
from .perturb import NoPerturbation, perturb
from .validation import check


class PlanDriver:
    """Runs the plan of one step (mixed into :class:`~flatminima.core.shell.FlatOptimizer`)."""

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
            grads = self.perturbation.trigger_grads([p.grad for p in params])
            fire, commit = self.trigger.after(step, lambda: F.global_norm(grads) ** 2)
            commits.append(commit)
        if not fire:
            self.combination.off_step(self, self.all_params_with_grad())
            return commits
        commits += yield from perturb(self, clean_loss)
        return commits

    def _advance(self, result: Any) -> None:
        """Send a pass's result to the plan and fetch the next request (None when done)."""
        self._observe(self._answering, result)
        try:
            with foreach_enabled(self.foreach):
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
        with foreach_enabled(self.foreach):
            self._answering = next(self._plan_gen)
        return self._answering

    def abort(self) -> None:
        """Abandon the step in progress: weights back to ``w`` exactly, method state untouched."""
        if self._plan_gen is not None:
            with foreach_enabled(self.foreach):
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
            context = self.perturbation.clean_context(self) if request.role == "clean" else None
            with context() if context is not None else contextlib.nullcontext():
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
            with foreach_enabled(self.foreach):
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
            if self.perturbation.clean_context(self) is not None:
                raise RuntimeError(
                    f"{type(self).__name__} on this support reads gradients of frozen weights in the clean pass, "
                    "which it must run itself: use step(closure) or flatminima.TrainStep, not perturbed()/"
                    "perturbations() after your own backward")
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


def closure_accepts(closure: Callable[..., Any], name: str) -> bool:
    """Whether ``closure`` takes a keyword argument ``name``."""
    try:
        return name in inspect.signature(closure).parameters
    except (TypeError, ValueError):
        return False


def closure_runner(closure: Callable[..., Any], batches: Optional[Sequence[Any]] = None) -> Runner:
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
