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

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..experiment import (RUN_DIAGNOSTIC_OPTIONS, _cross_entropy, build_model, diagnostic_batches, evaluate,
                          logits, steps_per_epoch, train_model)
from ..core.validation import check
from ..diagnostics import top_eigenvalues
from ..lora import lora_layers
from .adapters import STRATEGIES, ContinualLoRA
from .metrics import _jsonable, continual_metrics
from .tasks import ContinualTask, TaskSequence, load_sequence


def _fail(name: str, value: Any, expected: str) -> None:
    check(name, False, value, expected)


#: Spaces the top Hessian eigenvalue can be measured in after each task.
HESSIAN_SPACES = ("lora", "all", "trainable")
SCENARIOS = ("domain", "task", "class")


@dataclass
class ContinualSettings:
    """The ``continual`` section of an experiment config.

    ``strategies``: continual-LoRA strategies to compare (:data:`STRATEGIES`); ``strategy_options``:
    per strategy, keyword arguments of :class:`ContinualLoRA` (``orth_weight``, ``l2_weight``,
    ``orth_side``, ``squared``, ``l1_weight``); ``orders``: task orders, each a permutation of the
    sequence's tasks by index or name (default: the sequence's own order); ``trainable``: non-LoRA
    modules trained in every task (default: the model's classification head); ``scenario``:
    ``"task"`` or ``"class"`` for split label sets, ``"domain"`` otherwise (default: the
    sequence's); ``hessian``: spaces for λ_max after each task (:data:`HESSIAN_SPACES`), on the
    first ``diagnostics_samples`` test examples of the task just learned, by Lanczos with
    ``hessian_options`` (:func:`~flatminima.diagnostics.top_eigenvalues` keywords: ``tol``,
    ``max_iter``; default: the experiment's per-run settings).
    """

    strategies: list[str] = field(default_factory=lambda: ["seq-lora"])
    strategy_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    orders: Optional[list[list[Any]]] = None
    trainable: Optional[list[str]] = None
    scenario: Optional[str] = None
    hessian: list[str] = field(default_factory=list)
    hessian_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> "ContinualSettings":
        if isinstance(values, ContinualSettings):
            return values
        if not isinstance(values, dict):
            _fail("continual", values, "a mapping of continual settings")
        known = [f for f in cls.__dataclass_fields__]
        unknown = sorted(set(values) - set(known))
        if unknown:
            _fail("continual field", unknown[0], f"one of {', '.join(known)}")
        settings = cls(**values)
        if not isinstance(settings.strategies, list) or not settings.strategies \
                or not all(s in STRATEGIES for s in settings.strategies) \
                or len(set(settings.strategies)) != len(settings.strategies):
            _fail("continual.strategies", settings.strategies, f"a list of distinct names from {', '.join(STRATEGIES)}")
        if not isinstance(settings.strategy_options, dict) \
                or not all(k in STRATEGIES and isinstance(v, dict) for k, v in settings.strategy_options.items()):
            _fail("continual.strategy_options", settings.strategy_options,
                  f"a mapping strategy -> keyword arguments, strategies from {', '.join(STRATEGIES)}")
        if settings.orders is not None and (not isinstance(settings.orders, list) or not settings.orders
                                            or not all(isinstance(o, list) and o for o in settings.orders)):
            _fail("continual.orders", settings.orders, "None or a non-empty list of task orders (lists)")
        if settings.trainable is not None and not (isinstance(settings.trainable, list)
                                                   and all(isinstance(t, str) for t in settings.trainable)):
            _fail("continual.trainable", settings.trainable, "None or a list of module names")
        if settings.scenario is not None and settings.scenario not in SCENARIOS:
            _fail("continual.scenario", settings.scenario, f"None or one of {', '.join(SCENARIOS)}")
        if not isinstance(settings.hessian, list) or not all(h in HESSIAN_SPACES for h in settings.hessian):
            _fail("continual.hessian", settings.hessian, f"a list from {', '.join(HESSIAN_SPACES)}")
        allowed = ("tol", "max_iter", "bound", "max_vectors")
        if not isinstance(settings.hessian_options, dict) or not set(settings.hessian_options) <= set(allowed):
            _fail("continual.hessian_options", settings.hessian_options, f"a mapping with keys from {', '.join(allowed)}")
        return settings

    def order_list(self, sequence: TaskSequence) -> list[list[Any]]:
        return self.orders or [list(range(len(sequence.tasks)))]


def order_name(sequence: TaskSequence, order: Sequence[Any]) -> str:
    """A file-name-safe name of a task order: the task names joined by ``>`` → ``-``."""
    names = [t.name for t in sequence.ordered(order).tasks]
    return "-".join("".join(c if c.isalnum() else "" for c in n) or str(i) for i, n in enumerate(names))


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
        return _cross_entropy

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
            _fail("continual.scenario", scenario, f"'domain' (sequence {sequence.name} shares one label space)")
        return "domain", ["domain"]
    chosen = scenario or sequence.scenario
    if chosen not in ("task", "class"):
        _fail("continual.scenario", chosen, f"'task' or 'class' (sequence {sequence.name} splits its labels)")
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
    record["metrics"] = {s: _jsonable(continual_metrics(accuracy[s], record["baseline"][s])) for s in scenarios}
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
