"""One continual run: a pretrained (or fresh) model trained task after task with a flat-minima method
and a continual-LoRA strategy, evaluated on every task after every task.

For a unit (method, seed, strategy, task order) :func:`train_continual`:

1. builds the model (seeded), wraps it in :class:`~flatminima.continual.adapters.ContinualLoRA`
   and measures the *baseline* ``b_i``: the accuracy of the initial model on every task (the
   stated baseline of forward transfer);
2. for task ``j``: starts the task's adapter, trains ``config.epochs`` epochs with the method (a new
   base optimizer and method over the trainable parameters, the strategy's penalty as the
   engine's ``regularizer``: once per pass, never per micro-batch), ends the task (O-LoRA/N-LoRA
   fold the adapter into the frozen past one), then evaluates every task: ``a[j][i]``;
3. optionally measures the top Hessian eigenvalue on the task just learned, in the LoRA subspace
   and/or in the full model (every weight, which for a LoRA layer is the merged ``W0 + s·BA``).

Split label sets (Split Fashion-MNIST) are evaluated twice: *task-incremental* (logits restricted
to the task's classes, the task identity given) and *class-incremental* (all classes). The
``scenario`` decides which one trains (``"task"``: the loss sees the task's classes only) and which
matrix the headline metrics come from. Domain sequences (VADER, permuted images) share one label
space: one matrix.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..continual.adapters import ContinualLoRA
from ..continual.metrics import continual_metrics, jsonable
from ..continual.tasks import ContinualTask, TaskSequence, load_sequence
from ..core.validation import check
from ..diagnostics import top_eigenvalues
from ..lora import lora_layers
from .config import RUN_DIAGNOSTIC_OPTIONS
from .continual_settings import HESSIAN_SPACES, SCENARIOS, ContinualSettings, order_name
from .models import build_model
from .training import cross_entropy, diagnostic_batches, evaluate, logits, steps_per_epoch, train_model


# --------------------------------------------------------------------------------------------
# losses and evaluation with the task-incremental mask


def _mask(num_classes: int, classes: Optional[Sequence[int]], device: torch.device) -> Optional[torch.Tensor]:
    if classes is None or len(classes) == num_classes:
        return None
    mask = torch.full((num_classes,), float("-inf"), device=device)
    mask[list(classes)] = 0.0
    return mask


def masked_loss(classes_mask: Optional[torch.Tensor]) -> Callable[[nn.Module, Any], torch.Tensor]:
    """Cross-entropy over the task's classes only (``-inf`` added to the other logits; their
    gradient is 0) — the task-incremental objective; ``None``: the runner's cross-entropy."""
    if classes_mask is None:
        return cross_entropy

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        out = logits(model, x)
        return F.cross_entropy(out + classes_mask.to(out.dtype), y)

    return loss_fn


def evaluate_task(model: nn.Module, task: ContinualTask, classes_mask: Optional[torch.Tensor],
                  batch_size: int) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` on ``task``'s test set (:func:`~flatminima.experiment.evaluate`)."""
    return evaluate(model, task.data.x_test, task.data.y_test, batch_size, classes_mask)


# --------------------------------------------------------------------------------------------
# one unit


def default_trainable(model: nn.Module) -> list[str]:
    """The classification head: the last ``nn.Linear`` module of the model that is not part of a
    LoRA layer (``classifier`` of a Hugging Face classifier, ``head`` of our CNNs)."""
    inside = {id(m) for layer in lora_layers(model) for m in layer.module.modules()}
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside
              and "lora_" not in name and not name.endswith("base_layer")]
    check("continual.trainable", bool(linear), None,
          "the modules to train in every task (the model has no nn.Linear head to take by default)")
    return [linear[-1]]


def _scenarios(sequence: TaskSequence, scenario: Optional[str]) -> tuple[str, list[str]]:
    """(the training scenario, the scenarios evaluated)."""
    if sequence.scenario == "domain":
        if scenario not in (None, "domain"):
            check("continual.scenario", False, scenario, f"'domain' (sequence {sequence.name} shares one label space)")
        return "domain", ["domain"]
    chosen = scenario or sequence.scenario
    if chosen not in ("task", "class"):
        check("continual.scenario", False, chosen, f"'task' or 'class' (sequence {sequence.name} splits its labels)")
    return chosen, ["task", "class"]


def lambda_max(model: nn.Module, loss_fn, batches: list, space: str, seed: int,
               options: dict[str, Any]) -> float:
    """The top Hessian eigenvalue of ``loss_fn`` on ``batches`` in parameter ``space`` (eval mode)."""

    result = top_eigenvalues(model, loss_fn, batches, **{"k": 1, **options}, params=space, seed=seed)
    return float(result.values[0])


def train_continual(config, sequence: TaskSequence, label: str, seed: int, strategy: str, order: Sequence[Any],
                    device: torch.device, on_step: Optional[Callable[[dict], None]] = None) -> dict[str, Any]:
    """Train one continual unit; return its JSON-ready record (module docstring).

    Runs inside ``fork_rng`` after ``torch.manual_seed(seed)`` (initialization, dropout): the
    caller's global RNG is left as it was.
    """
    settings = ContinualSettings.from_dict(config.continual)
    name, base_settings, hyper = config.method_spec(label)
    sequence = sequence.ordered(order)
    train_scenario, scenarios = _scenarios(sequence, settings.scenario)
    tasks, T = sequence.tasks, len(sequence.tasks)
    masks = {s: [_mask(sequence.num_classes, t.classes if s == "task" else None, device) for t in tasks]
             for s in scenarios}

    def evaluate_all(model: nn.Module) -> dict[str, list[tuple[float, float]]]:
        return {s: [evaluate_task(model, t, masks[s][i], config.eval_batch_size) for i, t in enumerate(tasks)]
                for s in scenarios}

    record: dict[str, Any] = {
        "method": label, "registry_name": name, "hyperparameters": hyper, "base_optimizer": base_settings,
        "seed": seed, "strategy": strategy, "order": [t.name for t in tasks], "scenario": train_scenario,
        "config": config.to_dict(), "tasks": [t.name for t in tasks], "per_task": [],
        "lambda_max": {space: [] for space in settings.hessian}}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        shape_data = replace(tasks[0].data, num_classes=sequence.num_classes)
        model = build_model(config.model, shape_data, **config.model_options).to(device)
        trainable = settings.trainable if settings.trainable is not None else default_trainable(model)
        options = dict(settings.strategy_options.get(strategy, {}))
        continual = ContinualLoRA(model, strategy, trainable=trainable, seed=seed, **options)
        baseline = evaluate_all(model)
        accuracy = {s: [] for s in scenarios}
        losses = {s: [] for s in scenarios}
        shuffle = torch.Generator().manual_seed(seed)
        train_time, steps = 0.0, 0
        for j, task in enumerate(tasks):
            continual.start_task(j)
            train_mask = masks["task"][j] if train_scenario == "task" else None
            penalty = (lambda _model: continual.penalty()) if continual.has_penalty else None
            trained = train_model(
                config, task.data, model, name, base_settings, hyper, seed, device, on_step,
                loss_fn=masked_loss(train_mask), regularizer=penalty, shuffle=shuffle,
                method_seed=seed * 1000 + j,
                evaluate_fn=lambda m, t=task, k=train_mask: evaluate_task(m, t, k, config.eval_batch_size))
            continual.end_task()
            train_time += trained["final"]["train_time_s"]
            steps += trained["final"]["steps"]
            record["per_task"].append(trained)
            after = evaluate_all(model)
            for s in scenarios:
                accuracy[s].append([acc for acc, _ in after[s]])
                losses[s].append([loss for _, loss in after[s]])
            if settings.hessian:
                batches = diagnostic_batches(config, task.data)
                for space in settings.hessian:
                    record["lambda_max"][space].append(
                        lambda_max(model, masked_loss(train_mask), batches, space, seed,
                                   {**RUN_DIAGNOSTIC_OPTIONS["hessian"], **settings.hessian_options}))
    record["accuracy"] = accuracy
    record["test_loss"] = losses
    record["baseline"] = {s: [acc for acc, _ in baseline[s]] for s in scenarios}
    record["metrics"] = {s: jsonable(continual_metrics(accuracy[s], record["baseline"][s])) for s in scenarios}
    final_metrics = record["metrics"][train_scenario]
    record["final"] = {
        "test_acc": final_metrics["average_accuracy"], "test_loss": sum(losses[train_scenario][-1]) / T,
        "train_loss": record["per_task"][-1]["final"]["train_loss"], "steps": steps, "train_time_s": train_time,
        "time_per_step_s": train_time / max(steps, 1), "forgetting": final_metrics["forgetting"],
        "backward_transfer": final_metrics["backward_transfer"], "learning_accuracy": final_metrics["learning_accuracy"],
        "forward_transfer": final_metrics["forward_transfer"]}
    return record


def continual_steps(config, sequence: TaskSequence) -> int:
    """Optimizer steps of one continual unit (for progress bars)."""
    return sum(steps_per_epoch(config, t.data) * config.epochs for t in sequence.tasks)


__all__ = ["ContinualSettings", "HESSIAN_SPACES", "SCENARIOS", "continual_steps", "default_trainable",
           "evaluate_task", "lambda_max", "load_sequence", "masked_loss", "order_name", "train_continual"]
