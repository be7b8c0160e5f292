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
* ``regularizer(model)`` (a 0-dim penalty ``R``: O-LoRA's orthogonality, N-LoRA's sparsity, EWC,
  BAR) goes to that :class:`~flatminima.TrainStep`, so it enters exactly as in the library's own
  loop: the window runs as one engine step at its last micro-batch, hence ``R`` is added once per
  pass (``regularizer_at="every"``: at the pass's weights, ``w`` or ``w + ε``) or its gradient once
  per step at ``w`` (``"clean"``), outside autocast and never divided by
  ``gradient_accumulation_steps``: the objective of one optimizer step is
  ``(1/N) Σ_n L(w; B_n) + R(w)`` whatever the window's length ``N``. A ``descent_hook(model)``
  (a projection of the descent gradient: A-GEM, GPM, OGD) runs once per optimizer step, at ``w``,
  on the true (unscaled) descent gradient, before the Trainer clips it.
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
``fully_shard`` in your own loop and use :class:`flatminima.TrainStep`), and a ``regularizer`` or
``descent_hook`` under DeepSpeed (:class:`~flatminima.integrations.deepspeed.DeepSpeedStep` takes neither).

:class:`FlatMinimaSeq2SeqTrainer` is the same mixin on ``transformers.Seq2SeqTrainer`` (encoder-decoder
models, ``predict_with_generate``; :mod:`flatminima.continual.seq2seq`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Literal, Optional, Union

import torch

from .._extras import require

_transformers = require("transformers", "hf", "flatminima.integrations.hf")
require("accelerate", "hf", "flatminima.integrations.hf")  # the Trainer's own requirement

from .. import methods as _methods  # noqa: E402
from .. import lora  # noqa: F401, E402 (registers flatlora and samlora)
from ..engine import TrainStep  # noqa: E402
from ..core.shell import FlatOptimizer  # noqa: E402
from ..core.validation import check, check_choice, check_int  # noqa: E402
from .accelerate import _flat  # noqa: E402

Trainer, TrainerCallback = _transformers.Trainer, _transformers.TrainerCallback

ACCUMULATIONS, BN_POLICIES = ("last", "full"), ("clean", "all", "frozen")
#: Where the regularizer enters a step (:class:`flatminima.TrainStep`'s ``regularizer_at``).
REGULARIZER_AT = ("every", "clean")


def _hyperparameters(value: Any) -> dict[str, Any]:
    """``flat_hyperparameters`` as a dict: a dict (copied), its JSON text (an object), or None ({})."""
    if value is None:
        return {}
    given = value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            check("flat_hyperparameters", False, given, f"a JSON object: {exc}")
    check("flat_hyperparameters", isinstance(value, dict), given, "a dict or a JSON object of the method's keyword arguments")
    return dict(value)


def _check_method(method: Any, hyper: dict[str, Any], accumulation: Any, bn: Any) -> str:
    """Validate the four settings; returns the method's registry name."""
    name = _methods.get(method).method_name  # ValueError naming the accepted methods
    known = set(_methods.hyperparameters(name))
    unknown = sorted(set(hyper) - known - {"model"})
    check("flat_hyperparameters", not unknown, unknown, f"keys among {', '.join(sorted(known))}")
    check_choice("flat_accumulation", accumulation, ACCUMULATIONS)
    check_choice("flat_bn", bn, BN_POLICIES)
    return name


@dataclasses.dataclass
class FlatMinimaArguments:
    """The method as command-line / config fields: ``HfArgumentParser((TrainingArguments,
    FlatMinimaArguments))`` reads them (``--flat_method mrwp --flat_hyperparameters '{"sigma": 0.02}'
    --flat_accumulation full --flat_bn frozen``); pass ``**args.kwargs()`` to the Trainer.

    ``flat_hyperparameters``: a dict, its JSON text, or None (no hyperparameters); typed ``dict | str
    | None`` like ``TrainingArguments``' dict fields, so the parser hands it over as text (a bare
    ``dict`` type would make argparse call ``dict('{}')``) and ``__post_init__`` makes it a dict. Every
    field is checked when the dataclass is built (``ValueError`` naming it)."""

    flat_method: str = dataclasses.field(default="sam", metadata={"help": "a flatminima method (fm.available())"})
    flat_hyperparameters: Optional[Union[dict, str]] = dataclasses.field(
        default=None, metadata={"help": 'the method\'s keyword arguments as a JSON object, e.g. \'{"rho": 0.05}\''})
    flat_accumulation: Literal["last", "full"] = dataclasses.field(
        default="last", metadata={"help": "perturbed pass on the window's last micro-batch, or on all of them"})
    flat_bn: Literal["clean", "all", "frozen"] = dataclasses.field(
        default="clean", metadata={"help": "which passes update BatchNorm running statistics"})

    def __post_init__(self) -> None:
        self.flat_hyperparameters = _hyperparameters(self.flat_hyperparameters)
        _check_method(self.flat_method, self.flat_hyperparameters, self.flat_accumulation, self.flat_bn)

    def kwargs(self) -> dict[str, Any]:
        """The Trainer's keyword arguments (``FlatMinimaTrainer(..., **args.kwargs())``)."""
        return {"flat_method": self.flat_method, "flat_hyperparameters": dict(self.flat_hyperparameters),
                "flat_accumulation": self.flat_accumulation, "flat_bn": self.flat_bn}


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
    or ``"full"``; ``flat_bn``: ``"clean"``, ``"all"`` or ``"frozen"``. ``regularizer``: None or
    ``R(model) -> 0-dim tensor`` added to each step's objective once (not per micro-batch);
    ``regularizer_at``: ``"every"`` (``R`` in every pass, at that pass's weights) or ``"clean"``
    (``∇R(w)`` once, added to the descent gradient); ``descent_hook(model)``: edits the step's
    descent gradient in ``.grad`` in place, once per optimizer step at ``w``, before the Trainer
    clips it (A-GEM, GPM, OGD projections): :class:`flatminima.TrainStep`."""

    def __init__(self, *args, flat_method: str = "sam", flat_hyperparameters: Optional[dict] = None,
                 flat_accumulation: str = "last", flat_bn: str = "clean",
                 regularizer: Optional[Callable[[torch.nn.Module], torch.Tensor]] = None,
                 regularizer_at: str = "every", descent_hook: Optional[Callable[[torch.nn.Module], None]] = None,
                 **kwargs):
        hyper = _hyperparameters(flat_hyperparameters)
        name = _check_method(flat_method, hyper, flat_accumulation, flat_bn)
        check("regularizer", regularizer is None or callable(regularizer), type(regularizer).__name__,
              "None or a callable model -> 0-dim loss tensor")
        check_choice("regularizer_at", regularizer_at, REGULARIZER_AT)
        check("descent_hook", descent_hook is None or callable(descent_hook), type(descent_hook).__name__,
              "None or a callable model -> None that edits .grad in place")
        super().__init__(*args, **kwargs)
        check_int("gradient_accumulation_steps", self.args.gradient_accumulation_steps, 1)
        check("fsdp", not self.is_fsdp_enabled, "enabled",
              "off: under the Trainer use DDP or DeepSpeed ZeRO-1/2; for FSDP2 shard the model with "
              "torch.distributed.fsdp.fully_shard in a loop of your own and use flatminima.TrainStep "
              "(examples/torchrun_ddp.py --fsdp)")
        for hook, value in (("regularizer", regularizer), ("descent_hook", descent_hook)):
            check(hook, value is None or not self.is_deepspeed_enabled, f"a {hook} under DeepSpeed",
                  f"None under DeepSpeed (its step takes no {hook}): train with DDP or in a loop of your own")
        self.flat_method, self.flat_hyperparameters = name, hyper
        self.regularizer, self.regularizer_at, self.descent_hook = regularizer, regularizer_at, descent_hook
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
        # The whole window is one engine step: the regularizer enters once per pass (or once at w), never
        # once per micro-batch nor divided by the accumulation (TrainStep).
        step = TrainStep(model, _flat(self.optimizer), self._flat_loss, accumulation=self.flat_accumulation,
                         bn=self.flat_bn, scaler=self.accelerator.scaler, regularizer=self.regularizer,
                         regularizer_at=self.regularizer_at, descent_hook=self.descent_hook)
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


class FlatMinimaSeq2SeqTrainer(FlatMinimaMixin, _transformers.Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` (encoder-decoder models, generation in evaluation) with a
    flatminima method (:class:`FlatMinimaMixin`)."""
