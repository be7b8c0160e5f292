"""The training-step engine: one optimizer step over a window of micro-batches.

:class:`TrainStep` runs the passes a method's plan asks for (:class:`~flatminima.core.passes.Pass`) with

* gradient accumulation over N micro-batches: the clean pass runs over all N (each loss divided by
  N); the perturbed passes run on the last micro-batch only (``accumulation="last"``, the
  default; its loss is not divided, so its gradient has the window's normalisation) or over all N
  (``accumulation="full"``, exact, twice the cost). Forward-only probes run over all N so that
  their losses compare with the clean one;
* AMP: ``autocast_dtype`` (bf16 needs nothing else) and an fp16 ``GradScaler``: every pass's
  gradients are unscaled once, right after it (norms and ε need true gradients); an inf/NaN in
  any pass, on any rank, skips the whole step: weights, optimizer state and method state untouched;
* DDP: passes that only feed a per-rank perturbation run under ``no_sync()``; the descent pass
  syncs once (per-rank ε is m-sharpness; ``sync_perturbation=True`` on the method shares ε); a
  forward-only pass that syncs averages its loss over ranks; a pass's ``loss_weight`` multiplies its
  loss before the backward (parallel m-RWP: one synced pass per rank, the all-reduce mixes them);
* BatchNorm: running statistics move with the step's first pass only (``bn="clean"``: the clean
  pass, or the first noisy pass of a method without one, such as RWP; buffers are snapshotted
  after that pass and copied back after the step, so ``momentum=None`` and ``num_batches_tracked``
  stay right), with every pass (``"all"``) or never (``"frozen"``);
* clipping of the final descent gradient (``max_grad_norm``);
* a regularizer ``R(model)`` (O-LoRA's orthogonality, N-LoRA's sparsity, BAR): added to the
  objective of every pass once, after the pass's micro-batches and outside any division by their
  number, so accumulation never changes its weight (the public O-LoRA code multiplies it by the
  accumulation steps). Under DDP every rank adds the same gradient after the all-reduce.
  ``regularizer_at="clean"`` instead takes ``∇R`` once, at the unperturbed weights ``w``, and adds
  it to the descent gradient: ``d = d_method(L) + ∇R(w)`` (R neither shapes ε nor is evaluated at
  ``w + ε``; one extra backward through R alone, no DDP hooks);
* a ``descent_hook(model)``: called once per step after every pass, with the weights at ``w`` and
  the descent gradient in ``.grad`` (true values, also under an fp16 scaler), before clipping and
  the update; it edits ``.grad`` in place (A-GEM, GPM and OGD project it).

The weights the base optimizer updates are bit-for-bit those from before the step's perturbations.
A pass that raises leaves the weights, the running statistics and the optimizer's and method's
state as they were before the step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core import foreach as fe
from ..core import amp as _amp
from ..core.amp import record_unscaled  # noqa: F401 (re-exported)
from ..core.kernels import is_sharded
from ..core.passes import Pass
from ..core.shell import Base, FlatOptimizer
from ..core.validation import check

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class StepResult:
    """``loss``: the clean loss of the window (a 0-dim tensor, not synced to the host; under DDP the
    rank's own, or the mean over ranks where the clean pass is a synced forward-only pass).
    ``skipped``: True when AMP found inf/NaN and the step was skipped (None without a scaler).
    ``grad_norm``: the descent gradient's norm before clipping (when ``max_grad_norm`` is set)."""

    loss: Tensor
    skipped: Optional[bool] = None
    grad_norm: Optional[Tensor] = None


def running_stat_buffers(model: nn.Module) -> list[Tensor]:
    """The running statistics (mean, variance, batch count) of every BatchNorm of ``model`` that tracks them."""
    buffers = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            buffers += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    return buffers


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _data_parallel_group(model: nn.Module) -> Optional[Any]:
    """The process group a model's ranks share data over: DDP's, or an FSDP2 model's mesh (its
    parameters are DTensors); None for a model on one process."""
    if _is_ddp(model):
        return model.process_group
    for p in model.parameters():
        if is_sharded(p):
            return p.device_mesh.get_group()
    return None


class TrainStep:
    """``step = TrainStep(model, opt, loss_fn, ...); result = step(micro_batches)``.

    ``loss_fn(model, batch)`` returns the mean loss of a micro-batch. ``optimizer`` is a flatminima
    method or a plain ``torch.optim.Optimizer`` (run as the base method). ``regularizer(model)``
    returns a 0-dim penalty added once to every pass's objective (and to the returned loss);
    ``regularizer_at="clean"`` adds its gradient at ``w`` to the descent gradient instead.
    ``descent_hook(model)`` edits the descent gradient in place before the update.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, *,
                 accumulation: str = "last", scaler: Optional["torch.amp.GradScaler"] = None,
                 autocast_dtype: Optional[torch.dtype] = None, bn: str = "clean",
                 max_grad_norm: Optional[float] = None,
                 regularizer: Optional[Callable[[nn.Module], Tensor]] = None, regularizer_at: str = "every",
                 descent_hook: Optional[Callable[[nn.Module], None]] = None):
        check("accumulation", accumulation in ("last", "full"), accumulation, "'last' or 'full'")
        check("bn", bn in ("clean", "all", "frozen"), bn, "'clean', 'all' or 'frozen'")
        check("autocast_dtype", autocast_dtype in (None, torch.float16, torch.bfloat16), autocast_dtype,
              "None, torch.float16 or torch.bfloat16")
        if max_grad_norm is not None:
            ok = isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool) and max_grad_norm > 0
            check("max_grad_norm", ok, max_grad_norm, "None or a float > 0")
        check("scaler", scaler is None or isinstance(scaler, torch.amp.GradScaler), type(scaler).__name__,
              "None or a torch.amp.GradScaler")
        check("regularizer", regularizer is None or callable(regularizer), type(regularizer).__name__,
              "None or a callable model -> 0-dim loss tensor")
        check("regularizer_at", regularizer_at in ("every", "clean"), regularizer_at, "'every' or 'clean'")
        check("descent_hook", descent_hook is None or callable(descent_hook), type(descent_hook).__name__,
              "None or a callable model -> None that edits .grad in place")
        if not isinstance(optimizer, FlatOptimizer):
            # A plain optimizer runs as the base method; ``train_step`` builds a TrainStep per call,
            # so reuse the Base it made before (a base optimizer takes one method).
            owner = FlatOptimizer.wrapping(optimizer)
            optimizer = owner if type(owner) is Base else Base(optimizer)
        check("model", not (_is_ddp(model) and model.gradient_as_bucket_view and optimizer.keeps_gradients),
              "DistributedDataParallel(gradient_as_bucket_view=True)",
              f"gradient_as_bucket_view=False: {type(optimizer).__name__} keeps the clean gradient across passes, "
              "which DDP's bucket views overwrite")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.accumulation, self.scaler, self.autocast_dtype, self.bn = accumulation, scaler, autocast_dtype, bn
        self.max_grad_norm, self.regularizer = max_grad_norm, regularizer
        self.regularizer_at, self.descent_hook = regularizer_at, descent_hook
        # A disabled scaler (``GradScaler(enabled=False)``, or a CUDA scaler without CUDA) is a no-op.
        self._amp = _amp.enabled(scaler)

    # -- helpers ---------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=self.autocast_dtype)

    def _snapshot(self) -> list[tuple[Tensor, Tensor]]:
        # Looked up at every step: ``model.to(...)``/``.half()`` replace buffer tensors (not parameters).
        return [(b, b.detach().clone()) for b in running_stat_buffers(self.model)]

    def _grads_by_device(self) -> dict[torch.device, list[Tensor]]:
        by_device: dict[torch.device, list[Tensor]] = {}
        for p in self.optimizer.all_params_with_grad():
            by_device.setdefault(p.grad.device, []).append(p.grad)
        return by_device

    def _unscale(self, found_inf: Tensor) -> None:
        """Unscale the gradients in ``.grad`` in place, OR-ing inf/NaN into ``found_inf``."""
        _amp.unscale_(self.scaler, [p.grad for p in self.optimizer.all_params_with_grad()], found_inf)

    def _rescale(self, found_inf: Tensor) -> None:
        """Multiply the descent gradient back by the scale; make it non-finite if any pass overflowed."""
        by_device = self._grads_by_device()
        if not by_device:
            return
        for device, grads in by_device.items():
            fe.mul_(grads, self.scaler._scale.to(device).reshape(()))
        # +inf into one entry where a pass overflowed, else 0 (no host sync).
        first = next(iter(by_device.values()))[0]
        first.add_(torch.where(found_inf > 0, float("inf"), 0.0).reshape(()).to(first.device, first.dtype))

    def _backward(self, loss: Tensor, request: Pass, last: bool) -> None:
        """Accumulate ``loss``'s gradient into ``.grad`` (DDP all-reduces it unless under
        ``no_sync``). ``last``: the pass's last micro-batch."""
        loss.backward()

    def _sync_group(self) -> Optional[Any]:
        """The process group forward-only synced passes average their loss over (None: one process)."""
        return _data_parallel_group(self.model)

    # -- one pass ----------------------------------------------------------------------------
    def _run_pass(self, request: Pass, micro_batches: Sequence[Any], found_inf: Optional[Tensor]) -> Tensor:
        n = len(micro_batches)
        if request.batch is not None:
            # The m-th of M groups of micro-batches (LPF-SGD's chunks, m-RWP's two batches).
            m, groups = request.batch
            check("micro_batches", n % groups == 0, n, f"a multiple of {groups} (the method uses {groups} batches)")
            batches = micro_batches[m * n // groups:(m + 1) * n // groups]
            weight = 1.0 / len(batches)
        elif request.role == "perturbed" and self.accumulation == "last" and not request.full_window:
            batches, weight = micro_batches[-1:], 1.0
        else:
            batches, weight = micro_batches, 1.0 / n
        ddp = _is_ddp(self.model)
        total = None
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            no_sync = ddp and request.backward and not (request.sync and last)
            with (self.model.no_sync() if no_sync else contextlib.nullcontext()):
                with torch.set_grad_enabled(request.backward), self._autocast():
                    loss = self.loss_fn(self.model, batch) * weight
                penalty = None
                if last and self.regularizer is not None and self.regularizer_at == "every":
                    # Once per pass, at the pass's point (w or w + ε), outside autocast, never divided
                    # by the micro-batch count nor weighted by the rank weight (DDP averages the
                    # ranks' identical penalty gradients back to one).
                    with torch.set_grad_enabled(request.backward):
                        penalty = self.regularizer(self.model)
                if request.backward:
                    # ``Pass.loss_weight`` (parallel m-RWP's rank weight) acts on the gradient only.
                    weighted = loss if request.loss_weight == 1.0 else loss * request.loss_weight
                    if penalty is not None:
                        weighted = weighted + penalty
                    self._backward(self.scaler.scale(weighted) if self._amp else weighted, request, last)
            # Sum in at least float32 (an fp16/bf16 loss under autocast), never below the loss's own
            # precision: float64 losses stay float64 (probe choices, the returned clean loss).
            loss = loss.detach().to(torch.promote_types(loss.dtype, torch.float32))
            if penalty is not None:
                loss = loss + penalty.detach().to(loss.dtype)
            total = loss if total is None else total + loss
        if request.backward and self._amp:
            self._unscale(found_inf)
        group = self._sync_group() if not request.backward and request.sync else None
        if group is not None:
            # A forward-only pass that must sync (a loss the plan decides from, e.g. a random-search
            # candidate shared by all ranks): every rank gets the mean over ranks.
            torch.distributed.all_reduce(total, group=group)
            total = total / torch.distributed.get_world_size(group)
        return total

    # -- one step ----------------------------------------------------------------------------
    def _check(self, micro_batches: Sequence[Any]) -> list[Any]:
        # A tensor or a dict would be iterated row by row / key by key: wrap one batch in a list.
        check("micro_batches", not isinstance(micro_batches, (Tensor, Mapping)), type(micro_batches).__name__,
              "a sequence of micro-batches, e.g. [batch]")
        micro_batches = list(micro_batches)
        check("micro_batches", len(micro_batches) >= 1, len(micro_batches), "at least one micro-batch")
        return micro_batches

    def _passes(self, micro_batches: list[Any], found_inf: Optional[Tensor]) -> Tensor:
        opt = self.optimizer
        # The statistics from before the step: put back if a pass raises (the clean pass may have
        # moved them already), and the state ``bn="frozen"`` keeps.
        before = self._snapshot()
        snapshot = before if self.bn == "frozen" else None

        passes = 0

        def runner(request: Pass) -> Tensor:
            nonlocal snapshot, passes
            if passes and snapshot is None and self.bn == "clean":
                snapshot = self._snapshot()  # the statistics as the step's first pass left them
            passes += 1
            return self._run_pass(request, micro_batches, found_inf)

        try:
            loss = opt.run_plan(runner)
            if self.regularizer is not None and self.regularizer_at == "clean":
                loss = self._add_clean_regularizer(loss)
            if self.descent_hook is not None:
                self.descent_hook(self.model)
            return loss
        except BaseException:
            snapshot = before  # run_plan has put the weights back; the statistics follow them
            raise
        finally:
            if snapshot is not None:
                with torch.no_grad():
                    for buf, saved in snapshot:
                        buf.copy_(saved)

    def _add_clean_regularizer(self, loss: Tensor) -> Tensor:
        """``.grad += ∇R(w)`` over the optimizer's trainable tensors; the loss gets ``R(w)``."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        penalty = self.regularizer(self.model)
        if not penalty.requires_grad:  # R does not depend on the trained tensors (e.g. task 0 of O-LoRA)
            return loss + penalty.detach().to(loss.dtype)
        # autograd.grad, not backward: DDP's reducer hooks must not fire for a term every rank has.
        grads = torch.autograd.grad(penalty, params, allow_unused=True)
        pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
        with torch.no_grad():
            for p, g in pairs:
                if p.grad is None:
                    p.grad = g.to(p.dtype)
            present = [(p.grad, g) for p, g in pairs if p.grad is not g]
            if present:
                fe.add_([d for d, _ in present], [g.to(d.dtype) for d, g in present])
        return loss + penalty.detach().to(loss.dtype)

    def passes(self, micro_batches: Sequence[Any]) -> Tensor:
        """Every pass of one step over ``micro_batches``, without the update: the descent gradient
        is left in ``.grad``, the weights are at ``w`` and the running statistics follow ``bn``;
        ``optimizer.step()`` (no closure) completes the step. For loops that clip and step the
        optimizer themselves (the HF Trainer, Lightning and Accelerate integrations); returns the
        clean loss.

        With an fp16 ``scaler`` the descent gradient is left *scaled*, as one
        ``scaler.scale(loss).backward()`` would leave it, so the caller's own
        ``scaler.unscale_`` / ``scaler.step`` / ``scaler.update`` work unchanged: every pass is
        still unscaled right after it (ε needs true gradients), the result is multiplied back by the
        scale (a power of two: exact), and an inf/NaN found in any pass, on any rank, is carried into
        it so that ``scaler.step`` skips the step (the method's uncommitted state is dropped by the
        next step)."""
        micro_batches = self._check(micro_batches)
        if not self._amp:
            return self._passes(micro_batches, None)
        found_inf = self._found_inf()
        loss = self._passes(micro_batches, found_inf)
        if distributed():
            torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX)
        self._rescale(found_inf)
        return loss

    def __call__(self, micro_batches: Sequence[Any]) -> StepResult:
        micro_batches = self._check(micro_batches)
        found_inf = self._found_inf()
        return self._update(self._passes(micro_batches, found_inf), found_inf)

    def _found_inf(self) -> Optional[Tensor]:
        """The inf/NaN flag a step's passes OR into (None without AMP)."""
        return _amp.new_found_inf(next(self.model.parameters()).device) if self._amp else None

    def _update(self, loss: Tensor, found_inf: Optional[Tensor]) -> StepResult:
        """After the passes: clip, and step (or, under AMP, let the scaler step or skip)."""
        opt, scaler = self.optimizer, (self.scaler if self._amp else None)
        params = opt.all_params_with_grad()
        grad_norm = None
        if scaler is None:
            if self.max_grad_norm is not None:
                grad_norm = nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
            opt.step()
            return StepResult(loss, None, grad_norm)

        if distributed():
            # Unsynced passes may have overflowed on one rank only: all ranks must agree to skip.
            torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX)
        if self.max_grad_norm is not None:
            grad_norm = nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        record_unscaled(scaler, opt, found_inf)
        skipped = bool(found_inf.item())  # GradScaler.step syncs on the same flag
        scaler.step(opt)
        scaler.update()
        if skipped:
            opt.finish_step(skipped=True)
        return StepResult(loss, skipped, grad_norm)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, micro_batches: Sequence[Any],
               **options: Any) -> StepResult:
    """Functional form of :class:`TrainStep` (builds one per call; keep a ``TrainStep`` in a loop)."""
    return TrainStep(model, optimizer, loss_fn, **options)(micro_batches)
