"""One run: a (method, seed) unit trained, evaluated and diagnosed into a JSON-ready record.

Inputs are image tensors or, for text tasks, dicts of token tensors fed as ``model(**inputs).logits``
(trailing padding trimmed per batch). The final train loss is the mean clean training loss (at ``w``)
over the last epoch's steps; methods whose steps have no clean pass (RWP, LPF-SGD, Flat-LoRA) report
their first (noisy) pass instead. The time per step is the wall time of the training steps only (the
device synchronized at the boundaries).

Data is an in-memory :class:`~flatminima.data.Dataset` (batches indexed from tensors) or a dataset
that streams from disk (:class:`~flatminima.data.FolderDataset`: images decoded by DataLoader
workers); both shuffle from the unit's generator, drop the last partial batch and evaluate the
whole test split.
"""

from __future__ import annotations

import time
import math
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import methods as _methods
from ..core.validation import check
from ..data import Dataset, Inputs, inputs_to, take
from ..diagnostics.report import report
from ..engine import TrainStep
from ..lora import support_from_spec
from .config import RUN_DIAGNOSTIC_OPTIONS, ExperimentConfig, batch_groups
from .models import build_model


#: What ``eval_train`` adds to a record's curves and final values (:func:`evaluate_train`).
TRAIN_EVAL_KEYS = ("train_acc", "memorized")


def resolve_device(spec: str) -> torch.device:
    """The device of a validated ``device`` field; ``ValueError`` naming it when CUDA or that
    CUDA device is not available here."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        check("device", torch.cuda.is_available(), spec, "'cpu' or 'auto': CUDA is not available here")
        count = torch.cuda.device_count()
        check("device", (device.index or 0) < count, spec, f"'cuda' or 'cuda:N' with N < {count} (the devices here)")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trim_padding(x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the columns that are padding in every row (right padding, ``attention_mask`` 0): the
    logits are the same, the cost follows the batch's longest sentence instead of ``max_length``."""
    mask = x.get("attention_mask")
    if mask is None:
        return dict(x)
    length = max(1, int(mask.sum(1).max()))
    return {k: v[:, :length] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v for k, v in x.items()}


def logits(model: nn.Module, x: Inputs) -> torch.Tensor:
    """``model(x)`` for tensor inputs; ``model(**x).logits`` for a dict (a Hugging Face model)."""
    if isinstance(x, Mapping):
        out = model(**trim_padding(x))
        return out.logits if hasattr(out, "logits") else out
    return model(x)


def cross_entropy(model: nn.Module, batch: tuple[Inputs, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(logits(model, x), y)


@torch.no_grad()
def accuracy_counts(model: nn.Module, batch: tuple[Inputs, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(correct, count)`` on one batch: the metric the diagnostics report beside the loss."""
    x, y = batch
    return (logits(model, x).argmax(-1) == y).sum(), len(y)


@torch.no_grad()
def evaluate(model: nn.Module, x: Inputs, y: torch.Tensor, batch_size: int,
             logit_mask: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` in eval mode; the training mode is restored.
    ``logit_mask`` (0 for the allowed classes, ``-inf`` for the others) is added to the logits: the
    task-incremental evaluation of a continual run."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=y.device)
    correct = torch.zeros((), device=y.device, dtype=torch.long)
    for i in range(0, len(y), batch_size):
        logits_ = logits(model, take(x, slice(i, i + batch_size))).float()
        if logit_mask is not None:
            logits_ = logits_ + logit_mask
        loss += F.cross_entropy(logits_, y[i:i + batch_size], reduction="sum")
        correct += (logits_.argmax(1) == y[i:i + batch_size]).sum()
    model.train(was_training)
    return correct.item() / len(y), loss.item() / len(y)


@torch.no_grad()
def evaluate_train(model: nn.Module, data: Dataset, batch_size: int) -> dict[str, float]:
    """On the training set, in eval mode (the training mode is restored): ``train_acc``, accuracy on
    the labels trained on (noisy ones under label noise), and with noise ``memorized``, the share of
    the corrupted examples predicted as their wrong label (Zhang et al. 2017's memorization)."""
    check("eval_train", not streams(data), type(data).__name__, "a dataset held in memory")
    was_training = model.training
    model.eval()
    y = data.y_train
    predicted = torch.cat([logits(model, take(data.x_train, slice(i, i + batch_size))).argmax(-1)
                           for i in range(0, len(y), batch_size)])
    model.train(was_training)
    out = {"train_acc": (predicted == y).float().mean()}
    if data.y_train_clean is not None:
        corrupted = y != data.y_train_clean
        out["memorized"] = (predicted[corrupted] == y[corrupted]).float().mean()
    return {k: v.item() for k, v in out.items()}


def streams(data: Any) -> bool:
    """Whether ``data`` streams its batches from disk (a :class:`~flatminima.data.FolderDataset`)."""
    return hasattr(data, "train_loader")


@torch.no_grad()
def evaluate_data(model: nn.Module, data: Any, batch_size: int,
                  logit_mask: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """:func:`evaluate` on ``data``'s test split, in memory or streamed (same sums, same order)."""
    if not streams(data):
        return evaluate(model, data.x_test, data.y_test, batch_size, logit_mask)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in data.test_loader(batch_size):
        x, y = inputs_to(x, device), y.to(device)
        logits_ = logits(model, x).float()
        if logit_mask is not None:
            logits_ = logits_ + logit_mask
        loss += F.cross_entropy(logits_, y, reduction="sum")
        correct += (logits_.argmax(1) == y).sum()
    model.train(was_training)
    n = len(data.y_test)
    return correct.item() / n, loss.item() / n


def epoch_batches(data: Any, batch_size: int, shuffle: torch.Generator,
                  device: torch.device) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """One epoch of full training batches in the order ``shuffle`` draws, on ``device``."""
    if streams(data):
        for x, y in data.train_loader(batch_size, shuffle, drop_last=True):
            yield inputs_to(x, device), y.to(device)
        return
    order = torch.randperm(len(data.y_train), generator=shuffle).to(device)
    for b in range(len(data.y_train) // batch_size):
        idx = order[b * batch_size:(b + 1) * batch_size]
        yield take(data.x_train, idx), data.y_train[idx]


def ordered_train_batches(data: Any, batch_size: int, device: torch.device,
                          limit: Optional[int] = None) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """At most ``limit`` training batches in the split's own order, without augmentation (what a
    continual baseline computes its statistics on: a Fisher, an input subspace, prototypes)."""
    if streams(data):
        for b, (x, y) in enumerate(data.eval_train_loader(batch_size)):
            if limit is not None and b >= limit:
                return
            yield inputs_to(x, device), y.to(device)
        return
    n = len(data.y_train)
    for b, i in enumerate(range(0, n, batch_size)):
        if limit is not None and b >= limit:
            return
        yield inputs_to(take(data.x_train, slice(i, i + batch_size)), device), data.y_train[i:i + batch_size].to(device)


def lr_schedule(base: torch.optim.Optimizer, kind: str, total: int, warmup_steps: int = 0):
    """The per-step schedule: ``cosine`` (to 0 over ``total`` steps) or ``constant``, after a linear
    warm-up ``lr·(s+1)/W`` over the first ``W = warmup_steps`` steps (cosine then runs over the rest)."""
    if warmup_steps == 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(base, total) if kind == "cosine" else None
    check("warmup_steps", warmup_steps < total, warmup_steps, f"fewer than the {total} steps of the run")
    rest = total - warmup_steps

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (s - warmup_steps) / rest)) if kind == "cosine" else 1.0

    return torch.optim.lr_scheduler.LambdaLR(base, factor)


def _base_optimizer(params, base: dict[str, Any]) -> torch.optim.Optimizer:
    if base["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=base["lr"], momentum=base["momentum"], weight_decay=base["weight_decay"])
    return torch.optim.AdamW(params, lr=base["lr"], betas=(base["momentum"], 0.999), weight_decay=base["weight_decay"])


def steps_per_epoch(config: ExperimentConfig, data: Dataset) -> int:
    n = len(data.y_train) // config.batch_size
    check("batch_size", n >= 1, config.batch_size, f"at most the {len(data.y_train)} training examples")
    return n


def diagnostic_batches(config: ExperimentConfig, data: Dataset) -> list:
    """The data the diagnostics run on: the first ``diagnostics_samples`` test examples, in
    batches of at most 256."""
    n = min(config.diagnostics_samples, len(data.y_test))
    size = min(256, config.eval_batch_size)
    if streams(data):
        x, y = data.test_batch(n)
        return [(x[i:i + size], y[i:i + size]) for i in range(0, n, size)]
    return [(take(data.x_test, slice(i, min(i + size, n))), data.y_test[i:min(i + size, n)]) for i in range(0, n, size)]


def run_diagnostics(config: ExperimentConfig, data: Dataset, model: nn.Module, seed: int) -> dict[str, Any]:
    """The per-run diagnostics of ``config`` on ``model``: headline numbers and wall times."""
    names = [d for d in config.diagnostics if d != "interpolation"]
    if not names:
        return {}
    result = report(model, cross_entropy, diagnostic_batches(config, data), diagnostics=names, seed=seed,
                    options={k: v for k, v in RUN_DIAGNOSTIC_OPTIONS.items() if k in names}, figures=False)
    return {"summary": result["summary"], "seconds": result["seconds"]}


def run_one(config: ExperimentConfig, data: Dataset, label: str, seed: int, device: torch.device,
            on_step: Optional[Callable[[dict], None]] = None,
            on_model: Optional[Callable[[nn.Module], None]] = None) -> dict[str, Any]:
    """Train one (method, seed) unit; return its JSON-ready record.

    The seed fixes the initialization and everything else drawn from the global RNG during
    training (dropout): the unit runs inside ``fork_rng`` after ``torch.manual_seed(seed)``, so the
    caller's global RNG state is left as it was; the shuffling uses a local generator and the
    method its own generators. The training loss of every step stays on the device and is read at
    evaluation points only. ``on_step(info)`` is called after every step (progress display),
    ``on_model(model)`` with the trained model. The record holds the config's per-run diagnostics.
    """
    name, base_settings, hyper = config.method_spec(label)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = build_model(config.model, data, **config.model_options).to(device)
        record = _train(config, data, label, seed, device, on_step, model, name, base_settings, hyper)
    diagnostics = run_diagnostics(config, data, model, seed)
    if diagnostics:
        record["diagnostics"] = diagnostics
    if on_model is not None:
        on_model(model)
    return record


def _train(config: ExperimentConfig, data: Dataset, label: str, seed: int, device: torch.device,
           on_step: Optional[Callable[[dict], None]], model: nn.Module, name: str, base_settings: dict[str, Any],
           hyper: dict[str, Any]) -> dict[str, Any]:
    trained = train_model(config, data, model, name, base_settings, hyper, seed, device, on_step)
    return {"method": label, "registry_name": name, "hyperparameters": hyper, "base_optimizer": base_settings,
            "seed": seed, "config": config.to_dict(), **trained}


def train_model(config: ExperimentConfig, data: Dataset, model: nn.Module, name: str, base_settings: dict[str, Any],
                hyper: dict[str, Any], seed: int, device: torch.device,
                on_step: Optional[Callable[[dict], None]] = None, *,
                loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
                regularizer: Optional[Callable[[nn.Module], torch.Tensor]] = None,
                shuffle: Optional[torch.Generator] = None, method_seed: Optional[int] = None,
                evaluate_fn: Optional[Callable[[nn.Module], tuple[float, float]]] = None,
                regularizer_at: str = "every", descent_hook: Optional[Callable[[nn.Module], None]] = None,
                batch_hook: Optional[Callable[[tuple[Any, torch.Tensor]], tuple[Any, torch.Tensor]]] = None,
                warmup_steps: int = 0) -> dict[str, Any]:
    """``config.epochs`` epochs of method ``name`` on ``data`` over the trainable parameters of
    ``model``; returns ``{"curves", "final"}`` (the record's training part).

    ``loss_fn`` (default: cross-entropy), ``regularizer`` (added once per pass, see
    :class:`~flatminima.engine.TrainStep`), ``shuffle`` (the order's generator, default: seeded by
    ``seed``), ``method_seed`` (the method's noise seed, default ``seed``) and ``evaluate_fn``
    (``model -> (accuracy, loss)``, default: the whole test set) let a continual run train task after
    task with the same loop; so do ``regularizer_at`` and ``descent_hook`` (:class:`TrainStep`'s),
    ``batch_hook`` (``(x, y) -> (x, y)``: each step's batch before it is cut into micro-batches, e.g.
    replay appending buffered examples) and ``warmup_steps`` (:func:`lr_schedule`).
    """
    per_epoch = steps_per_epoch(config, data)
    total = per_epoch * config.epochs
    base = _base_optimizer([p for p in model.parameters() if p.requires_grad], base_settings)
    extra = {"model": model} if _methods.needs_model(name) else {}
    hyper = dict(hyper)
    if "support" in hyper:  # where the perturbation lives (a LoRA support), as the method's scope
        extra["scope"] = support_from_spec(model, hyper.pop("support"))
    opt = _methods.create(name, base, **{"seed": seed if method_seed is None else method_seed, "total_steps": total,
                                         **extra, **hyper})
    schedule = lr_schedule(base, config.lr_schedule, total, warmup_steps)
    train_step = TrainStep(model, opt, loss_fn or cross_entropy, accumulation=config.accumulation,
                           regularizer=regularizer, regularizer_at=regularizer_at, descent_hook=descent_hook)
    shuffle = shuffle if shuffle is not None else torch.Generator().manual_seed(seed)
    evaluate_fn = evaluate_fn or (lambda m: evaluate_data(m, data, config.eval_batch_size))
    losses = torch.zeros(total, device=device)
    evals: dict[str, list] = {"step": [], "test_acc": [], "test_loss": []}
    train_metrics = (lambda m: evaluate_train(m, data, config.eval_batch_size)) if config.eval_train else None
    # LPF-SGD (and m-RWP on two batches) take the batch as groups of micro-batches: each of the
    # accumulation_steps micro-batches is cut into that many chunks (validated to divide evenly).
    train_time, step = 0.0, 0
    chunks = config.accumulation_steps * batch_groups(name, hyper)

    def evaluate_now() -> None:
        acc, loss = evaluate_fn(model)
        evals["step"].append(step)
        evals["test_acc"].append(acc)
        evals["test_loss"].append(loss)
        for key, value in (train_metrics(model) if train_metrics else {}).items():
            evals.setdefault(key, []).append(value)

    was_training = model.training
    evaluate_now()
    model.train()
    _sync(device)
    started = time.perf_counter()
    for _ in range(config.epochs):
        for x, y in epoch_batches(data, config.batch_size, shuffle, device):
            if batch_hook is not None:
                x, y = batch_hook((x, y))
            check("batch size", len(y) % chunks == 0, len(y),
                  f"a multiple of {chunks} micro-batches (accumulation steps × the method's batch groups)")
            micro = len(y) // chunks
            result = train_step([(take(x, slice(i, i + micro)), y[i:i + micro])
                                 for i in range(0, len(y), micro)])
            losses[step] = result.loss
            if schedule is not None:
                schedule.step()
            step += 1
            if step % config.eval_every == 0 or step == total:
                _sync(device)
                train_time += time.perf_counter() - started
                evaluate_now()
                if on_step:
                    since = losses[step - min(step, config.eval_every):step]
                    on_step({"step": step, "train_loss": since.mean().item(), "test_acc": evals["test_acc"][-1]})
                started = time.perf_counter()
            elif on_step:
                on_step({"step": step})
    model.train(was_training)
    train_loss = losses.tolist()
    extra = [k for k in TRAIN_EVAL_KEYS if k in evals]
    return {
        "curves": {"train_loss": train_loss, "eval_step": evals["step"], "test_acc": evals["test_acc"],
                   "test_loss": evals["test_loss"], **{k: evals[k] for k in extra}},
        "final": {"test_acc": evals["test_acc"][-1], "test_loss": evals["test_loss"][-1],
                  "train_loss": sum(train_loss[-per_epoch:]) / per_epoch, "steps": total,
                  "train_time_s": train_time, "time_per_step_s": train_time / total,
                  **{k: evals[k][-1] for k in extra}},
    }
