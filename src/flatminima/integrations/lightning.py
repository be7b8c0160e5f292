"""Lightning integration: :class:`FlatMinimaModule`, a ``LightningModule`` that trains with any method.

Subclass it instead of ``lightning.LightningModule``, name the method in ``super().__init__``, write
``compute_loss(batch)`` (the mean loss of one micro-batch) and build the method in
``configure_optimizers`` with :meth:`FlatMinimaModule.flat_optimizer`::

    class Classifier(FlatMinimaModule):
        def __init__(self):
            super().__init__("sam", rho=0.05, accumulate=4)
            self.net = torch.nn.Linear(4, 3)

        def compute_loss(self, batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return self.flat_optimizer(torch.optim.SGD(self.parameters(), lr=0.1))

The module runs under manual optimization. Its ``training_step`` collects ``accumulate`` micro-batches
(the dataloader's batches) into a window and, on the window's last one, runs one optimizer step over
the window with :class:`flatminima.TrainStep`'s semantics (``accumulation``, ``bn``,
``max_grad_norm``; DDP ``no_sync``), so a run matches ``TrainStep`` on the same micro-batches step for
step. The last batch of an epoch closes a shorter window (as Lightning's own accumulation does).
``trainer.global_step`` and ``max_steps`` count optimizer steps. LR schedulers returned by
``configure_optimizers`` step after every optimizer step (``interval="step"``) or at the end of each
training epoch (``"epoch"``, Lightning's default), every ``frequency`` of them.

Precision: ``"32-true"``, ``"64-true"``, ``"bf16-mixed"`` and ``"16-mixed"`` (the autocast Lightning
puts around ``training_step`` covers every pass; under fp16 every pass is scaled by the precision
plugin's ``GradScaler`` and unscaled right after it, and the descent gradient is handed back scaled,
so Lightning's own unscale, clipping and overflow skip run as usual). Strategies: single device, ``"ddp"`` and
``"ddp_spawn"`` (passes that only feed a per-rank perturbation run without gradient sync; the
descent pass syncs once).

A plain ``LightningModule`` returning a flatminima optimizer from ``configure_optimizers``
(automatic optimization) works with ``accumulate_grad_batches=1``: Lightning's closure (training
step and backward) is re-run for each of the method's passes, equal to ``opt.step(closure)``. With
``accumulate_grad_batches > 1`` (Lightning would run the accumulating micro-batches outside the
method) and under ``"16-mixed"`` (its plugin runs the closure once) the first step refuses, before
any weight moves, naming this module's ``accumulate=`` (:mod:`flatminima.core.framework_loops`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .. import methods as _methods
from .. import lora  # noqa: F401 (registers flatlora and samlora)
from .._extras import require
from ..engine import TrainStep
from ..core.shell import FlatOptimizer
from ..core.validation import check, check_bool, check_int

pl = require("lightning.pytorch", "lightning", "flatminima.integrations.lightning")


class FlatMinimaModule(pl.LightningModule):
    """A ``LightningModule`` whose training steps run flat-minima method ``method``.

    ``method``: a name from :func:`flatminima.available`; ``hyperparameters``: its keyword arguments
    (``rho=...``, ``schedule=...``). ``total_steps`` defaults to the run's number of optimizer
    steps; methods that take the model (Flat-LoRA) get ``model=self`` unless given one.
    ``accumulate``: micro-batches per optimizer step (set it here, not in the Trainer's
    ``accumulate_grad_batches``). ``accumulation``, ``bn``, ``max_grad_norm``: as in
    :class:`flatminima.TrainStep`. ``log_statistics``: log the method's :attr:`statistics
    <flatminima.FlatOptimizer.track_statistics>` (under ``flat/``) at every optimizer step; the
    window's clean loss is logged as ``train_loss`` either way.

    Bad configuration raises ``ValueError`` here, when the module is built.
    """

    def __init__(self, method: str, *, accumulate: int = 1, accumulation: str = "last", bn: str = "clean",
                 max_grad_norm: Optional[float] = None, log_statistics: bool = False, **hyperparameters: Any):
        super().__init__()
        check_int("accumulate", accumulate, 1)
        check_bool("log_statistics", log_statistics)
        name = _methods.get(method).method_name  # raises on an unknown name
        accepted = _methods.hyperparameters(name)
        for key in hyperparameters:
            check(f"hyperparameter {key!r} for {name}", key in accepted, key, f"one of {', '.join(accepted)}")
        # Build the method and the engine once on a dummy parameter so that bad values fail now, not
        # when the Trainer sets up. A scope and a model refer to the real module: checked then.
        dummy = nn.Linear(1, 1)
        base = torch.optim.SGD(dummy.parameters(), lr=0.1)
        if "model" in accepted:
            probe = _methods.Base(base)
        else:
            values = {k: v for k, v in hyperparameters.items() if k != "scope"}
            probe = _methods.create(name, base, **{"total_steps": 1, **values})
        TrainStep(dummy, probe, lambda m, b: b, accumulation=accumulation, bn=bn, max_grad_norm=max_grad_norm)
        self.automatic_optimization = False
        self.flat_method, self.flat_hyperparameters = name, dict(hyperparameters)
        self.accumulate, self.accumulation, self.bn = accumulate, accumulation, bn
        self.max_grad_norm, self.log_statistics = max_grad_norm, log_statistics
        self._window: list[Any] = []
        self._engine: Optional[TrainStep] = None

    # -- what the user writes ------------------------------------------------------------------
    def compute_loss(self, batch: Any) -> Tensor:
        """The mean loss of one micro-batch (override). Called once per pass, at the weights the
        method chose; do not call ``backward`` in it."""
        raise NotImplementedError(f"{type(self).__name__} must define compute_loss(self, batch)")

    def flat_optimizer(self, base: torch.optim.Optimizer) -> FlatOptimizer:
        """Wrap ``base`` (any optimizer over this module's parameters) with the configured method;
        call it in ``configure_optimizers`` and build LR schedulers on the result."""
        trainer = self._trainer
        if trainer is not None:
            precision = str(trainer.precision)
            check("Trainer precision",
                  precision in ("32-true", "32", "64-true", "64", "bf16-mixed", "bf16-true", "16-mixed"),
                  precision, "'32-true', '64-true', 'bf16-mixed' or '16-mixed'")
            strategy = type(trainer.strategy).__name__
            check("Trainer strategy", strategy in ("SingleDeviceStrategy", "DDPStrategy"), strategy,
                  "a single device, 'ddp' or 'ddp_spawn'")
        hyper = dict(self.flat_hyperparameters)
        if _methods.needs_model(self.flat_method):
            hyper.setdefault("model", self)
        total = self._total_steps()
        if total is not None:
            hyper.setdefault("total_steps", total)
        opt = _methods.create(self.flat_method, base, **hyper)
        if self.log_statistics:
            opt.track_statistics()
        return opt

    # -- the loop ------------------------------------------------------------------------------
    def _total_steps(self) -> Optional[int]:
        """Optimizer steps this fit will take (None when unbounded): ``ceil(batches per epoch /
        accumulate)`` per epoch, capped by ``max_steps``."""
        trainer = self._trainer
        if trainer is None:
            return None
        trainer.estimated_stepping_batches  # noqa: B018 (sets up the train dataloader, hence its length)
        steps = math.inf
        batches = trainer.num_training_batches
        if trainer.max_epochs not in (None, -1) and math.isfinite(batches):
            steps = math.ceil(batches / self.accumulate) * max(trainer.max_epochs, 1)
        if trainer.max_steps not in (None, -1):
            steps = min(steps, trainer.max_steps)
        return int(steps) if math.isfinite(steps) else None

    def _build_engine(self) -> TrainStep:
        opt = self.optimizers(use_pl_optimizer=False)
        check("optimizer", isinstance(opt, FlatOptimizer), type(opt).__name__,
              "one flatminima method: return self.flat_optimizer(base) from configure_optimizers")
        wrapped = self.trainer.strategy.model
        ddp = wrapped if isinstance(wrapped, nn.parallel.DistributedDataParallel) else None

        def loss_fn(model: nn.Module, batch: Any) -> Tensor:
            # The forward runs on the module itself, not through DDP's forward (Lightning's manual
            # optimization does the same), so we do DDP's pre-backward step ourselves: a pass that
            # syncs then all-reduces in its backward; one under no_sync() does not.
            loss = self.compute_loss(batch)
            if ddp is not None:
                from lightning.pytorch.overrides.distributed import prepare_for_backward

                prepare_for_backward(ddp, loss)
            return loss

        # fp16 ("16-mixed"): the precision plugin's scaler scales our passes; it unscales and steps.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return TrainStep(ddp if ddp is not None else self, opt, loss_fn, accumulation=self.accumulation,
                         bn=self.bn, max_grad_norm=self.max_grad_norm, scaler=scaler)

    def on_fit_start(self) -> None:
        self._window, self._engine = [], None

    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        """Collect the micro-batch; on the window's last one, run the optimizer step and return
        the window's clean loss (None on the other micro-batches)."""
        self._window.append(batch)
        if len(self._window) < self.accumulate and not self.trainer.is_last_batch:
            return None
        window, self._window = self._window, []
        if self._engine is None:
            self._engine = self._build_engine()
        engine, lightning_opt = self._engine, self.optimizers()
        opt = engine.optimizer
        loss = engine.passes(window)
        grad_norm = _step_through(lightning_opt, opt, self.max_grad_norm)
        self._step_schedulers("step")
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=_batch_size(window))
        if grad_norm is not None:
            self.log("flat/grad_norm_before_clip", grad_norm)
        if self.log_statistics:
            for key, value in opt.statistics.items():
                if torch.is_tensor(value):
                    self.log(f"flat/{key}", value.detach().float())
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        self._step_schedulers("epoch")

    def _step_schedulers(self, interval: str) -> None:
        count = self.trainer.global_step if interval == "step" else self.trainer.current_epoch + 1
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval or count % config.frequency:
                continue
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                metric = self.trainer.callback_metrics.get(config.monitor)
                check("ReduceLROnPlateau monitor", metric is not None, config.monitor, "a logged metric")
                config.scheduler.step(metric)
            else:
                config.scheduler.step()


def _batch_size(window: list[Any]) -> int:
    """Micro-batches × rows of the first tensor found (what Lightning would infer per batch)."""
    batch = window[0]
    while isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if isinstance(batch, dict) and batch:
        batch = next(iter(batch.values()))
    rows = batch.shape[0] if torch.is_tensor(batch) and batch.dim() else 1
    return rows * len(window)


def _step_through(lightning_opt: Any, opt: FlatOptimizer, max_grad_norm: Optional[float]) -> Optional[Tensor]:
    """Complete the step through Lightning's optimizer wrapper, the passes having run already.

    ``LightningOptimizer.step`` is what counts ``global_step`` and runs the
    ``on_before_optimizer_step`` hooks, but its precision plugin calls ``opt.step(closure=...)``,
    which for a flatminima method would run the whole plan again through that closure. For the
    duration of the call ``opt.step`` runs Lightning's closure (the hooks), clips, and takes the
    update with no closure (the explicit form)."""
    grad_norm = None
    had_own = "step" in vars(opt)  # an LR scheduler wraps ``step`` on the instance: call through it
    inner = opt.step

    def step(closure: Any = None, **kwargs: Any) -> Any:
        nonlocal grad_norm
        if closure is not None:
            closure()
        if max_grad_norm is not None:
            grad_norm = nn.utils.clip_grad_norm_(opt.all_params_with_grad(), max_grad_norm, foreach=True)
        return inner(**kwargs)

    opt.step = step
    try:
        lightning_opt.step()
    finally:
        if had_own:
            opt.step = inner
        else:
            del opt.step
    return grad_norm
