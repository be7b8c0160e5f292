"""Hugging Face ``Trainer`` integration: any method of the registry, with the Trainer's own
gradient accumulation, clipping, LR schedule, logging and checkpoints.

    from flatminima.integrations.hf import FlatMinimaTrainer
    trainer = FlatMinimaTrainer(model=model, args=TrainingArguments(..., gradient_accumulation_steps=4),
                                train_dataset=train, flat_method="sam", flat_hyperparameters={"rho": 0.05})
    trainer.train()

How it fits the Trainer without copying its internals (:class:`FlatMinimaMixin` overrides two
methods and installs a callback):

* ``create_optimizer`` wraps the optimizer the Trainer builds (its parameter groups, its
  ``optim``) in the method: ``fm.create(flat_method, base, **flat_hyperparameters)``, with
  ``total_steps`` = the Trainer's number of optimizer steps (``max_steps``, or its epoch rule), so the
  strength schedules (Flat-LoRA's ramp, LPF-SGD's σ_t) follow the real number of optimizer steps;
  methods that take the model (Flat-LoRA, SAM-LoRA) get ``model=trainer.model``.
* ``training_step`` keeps the micro-batches of the accumulation window and, on the window's last
  one (``accelerator.sync_gradients``), runs every pass of the step through the library's engine
  (:meth:`flatminima.TrainStep.passes`: the clean pass over the window, the perturbed passes on the
  last micro-batch or the whole window, BatchNorm policy, DDP ``no_sync``), leaving the descent
  gradient in ``.grad``; the Trainer then clips it, steps the optimizer (which restores ``w`` and
  runs the base update) and the scheduler, as usual. The window's mean clean loss is returned on
  its last micro-batch (0 on the others), so the logged training loss is the usual one.
* :class:`FlatMinimaCallback` (installed first, so every reporter sees it) adds the method's
  step statistics to each log: ``flat/grad_norm`` ‖g‖, ``flat/eps_norm`` ‖ε‖,
  ``flat/sharpness`` ``L(w+ε) − L(w)``, ``flat/cosine`` between the clean and perturbed gradients,
  ``flat/strength``.

Each micro-batch's loss is the model's mean loss (``compute_loss`` without ``num_items_in_batch``):
with equal micro-batches this is the Trainer's normalization. Supported: fp32, bf16 (``bf16=True``),
fp16 (``fp16=True``: every pass is scaled by the Trainer's ``GradScaler`` and unscaled right after
it, and the descent gradient is handed back scaled, so the Trainer's own unscale, clipping and
overflow skip run as usual; :meth:`flatminima.TrainStep.passes`), DDP, and DeepSpeed ZeRO-1/2 in
fp32 or bf16 (``deepspeed=config``): the Trainer's optimizer goes to DeepSpeed unwrapped, and each
window runs through :class:`flatminima.integrations.deepspeed.DeepSpeedStep`, which hands the
descent gradient to DeepSpeed's backward and step (``accelerator.backward``); DeepSpeed clips to
``max_grad_norm`` and steps the scheduler. Refused before training: the Trainer's FSDP (shard with
``fully_shard`` in your own loop and use :class:`flatminima.TrainStep`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional, Union

import torch
from transformers import Trainer, TrainerCallback

from .. import methods as _methods
from ..engine import TrainStep
from ..optim import FlatOptimizer
from ..validation import check

@dataclasses.dataclass
class FlatMinimaArguments:
    """The method as command-line / config fields (``HfArgumentParser`` reads this dataclass beside
    ``TrainingArguments``); ``flat_hyperparameters`` may be a dict or its JSON text."""

    flat_method: str = "sam"
    flat_hyperparameters: Union[str, dict] = "{}"
    flat_accumulation: str = "last"
    flat_bn: str = "clean"

    def kwargs(self) -> dict[str, Any]:
        hyper = self.flat_hyperparameters
        if isinstance(hyper, str):
            try:
                hyper = json.loads(hyper)
            except json.JSONDecodeError as exc:
                raise ValueError(f"Invalid flat_hyperparameters: {self.flat_hyperparameters!r} "
                                 f"(expected a JSON object: {exc})") from None
        return {"flat_method": self.flat_method, "flat_hyperparameters": hyper,
                "flat_accumulation": self.flat_accumulation, "flat_bn": self.flat_bn}


def _flat(optimizer: Any) -> Optional[FlatOptimizer]:
    """The flatminima optimizer inside the Trainer's (possibly accelerate-wrapped) optimizer."""
    while optimizer is not None and not isinstance(optimizer, FlatOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class FlatMinimaCallback(TrainerCallback):
    """Adds the flatminima optimizer's last step statistics to the Trainer's logs (one host read
    per log)."""

    def __init__(self, trainer: Optional["FlatMinimaMixin"] = None):
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        opt = self.trainer.flat_optimizer if self.trainer is not None else _flat(optimizer)
        if logs is None or opt is None:
            return
        stats = {f"flat/{key}": float(value) for key, value in opt.statistics.items() if key != "step"}
        stats["flat/strength"] = opt.strengths()[0]
        logs.update(stats)
        # The Trainer appended a copy of these logs to its history before calling us: keep both alike.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)


class FlatMinimaMixin:
    """Mixin for ``transformers.Trainer`` subclasses: ``class MyTrainer(FlatMinimaMixin, Trainer)``
    (module docstring). ``flat_method``: a registry name (``fm.available()``);
    ``flat_hyperparameters``: its keyword arguments; ``flat_accumulation``: the engine's ``"last"``
    or ``"full"``; ``flat_bn``: ``"clean"``, ``"all"`` or ``"frozen"``."""

    def __init__(self, *args, flat_method: str = "sam", flat_hyperparameters: Optional[dict] = None,
                 flat_accumulation: str = "last", flat_bn: str = "clean", **kwargs):
        method = _methods.get(flat_method)  # ValueError naming the accepted methods
        hyper = dict(flat_hyperparameters or {})
        known = set(_methods.hyperparameters(flat_method))
        unknown = sorted(set(hyper) - known - {"model"})
        check("flat_hyperparameters", not unknown, unknown, f"keys among {', '.join(sorted(known))}")
        check("flat_accumulation", flat_accumulation in ("last", "full"), flat_accumulation, "'last' or 'full'")
        check("flat_bn", flat_bn in ("clean", "all", "frozen"), flat_bn, "'clean', 'all' or 'frozen'")
        super().__init__(*args, **kwargs)
        check("gradient_accumulation_steps", self.args.gradient_accumulation_steps >= 1,
              self.args.gradient_accumulation_steps, "an int >= 1")
        check("fsdp", not self.is_fsdp_enabled, "enabled",
              "off: under the Trainer use DDP or DeepSpeed ZeRO-1/2; for FSDP2 shard the model with "
              "torch.distributed.fsdp.fully_shard in a loop of your own and use flatminima.TrainStep "
              "(examples/torchrun_ddp.py --fsdp)")
        self.flat_method, self.flat_hyperparameters = method.method_name, hyper
        self.flat_accumulation, self.flat_bn = flat_accumulation, flat_bn
        self._flat_window: list[Any] = []
        self._flat_deepspeed: Any = None  # the DeepSpeedStep, built on the first window
        self.callback_handler.callbacks.insert(0, FlatMinimaCallback(self))

    @property
    def flat_optimizer(self) -> Optional[FlatOptimizer]:
        """The method (its ``statistics``, ``step_count``); None before training starts."""
        if self._flat_deepspeed is not None:
            return self._flat_deepspeed.optimizer
        return _flat(self.optimizer)

    def _flat_max_steps(self) -> Optional[int]:
        """The number of optimizer steps the Trainer will take (its own rule: ``max_steps``, else
        epochs × ⌈batches per epoch / accumulation⌉), for the method's schedules."""
        if self.state.max_steps and self.state.max_steps > 0:
            return self.state.max_steps
        if self.args.max_steps > 0:
            return self.args.max_steps
        try:
            batches = len(self.get_train_dataloader())
        except TypeError:  # an iterable dataset without a length: schedules need max_steps
            return None
        accumulation = self.args.gradient_accumulation_steps
        per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
        return math.ceil(self.args.num_train_epochs * per_epoch)

    def _flat_kwargs(self, model: torch.nn.Module) -> dict[str, Any]:
        hyper = dict(self.flat_hyperparameters)
        total = self._flat_max_steps()
        if total is not None:
            hyper.setdefault("total_steps", total)
        if _methods.needs_model(self.flat_method):
            hyper.setdefault("model", model)
        return hyper

    def create_optimizer(self, *args, **kwargs):
        base = super().create_optimizer(*args, **kwargs)
        if isinstance(base, FlatOptimizer) or self.is_deepspeed_enabled:
            return base  # DeepSpeed takes the plain optimizer; the method runs in DeepSpeedStep
        self.optimizer = _methods.create(self.flat_method, base, **self._flat_kwargs(self.model))
        self.optimizer.track_statistics()
        return self.optimizer

    def _flat_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        with self.compute_loss_context_manager():
            return self.compute_loss(model, inputs)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Optional[Union[torch.Tensor, int]] = None) -> torch.Tensor:
        model.train()
        self._flat_window.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        window, self._flat_window = self._flat_window, []
        if self.is_deepspeed_enabled:
            return self._flat_deepspeed_step(model, window)
        step = TrainStep(model, _flat(self.optimizer), self._flat_loss, accumulation=self.flat_accumulation,
                         bn=self.flat_bn, scaler=self.accelerator.scaler)
        return step.passes(window).detach()

    def _flat_deepspeed_step(self, engine: Any, window: list[Any]) -> torch.Tensor:
        from .deepspeed import DeepSpeedStep

        if self._flat_deepspeed is None:
            self._flat_deepspeed = DeepSpeedStep(
                engine, self.flat_method, self._flat_loss, accumulation=self.flat_accumulation, bn=self.flat_bn,
                start_step=self.state.global_step, **self._flat_kwargs(engine.module))
            self._flat_deepspeed.optimizer.track_statistics()
        # One DeepSpeed backward and step per window, at its boundary, undivided by the accumulation.
        return self._flat_deepspeed(window, lambda loss: self.accelerator.backward(loss, scale_wrt_gas=False)).detach()


class FlatMinimaTrainer(FlatMinimaMixin, Trainer):
    """``transformers.Trainer`` with a flatminima method (:class:`FlatMinimaMixin`)."""
