"""One continual run: a pretrained (or fresh) model trained task after task with a flat-minima method
and a continual strategy, evaluated on every task after every task.

For a unit (method, seed, strategy, task order) :func:`train_continual`:

1. builds the model (seeded), wraps it in :class:`~flatminima.continual.adapters.ContinualLoRA`
   (the strategy's lifecycle) and builds the strategy's baselines
   (:mod:`flatminima.continual.strategy`: EWC, replay, A-GEM, GPM, OGD, InfLoRA, LwF), then measures
   the *baseline* ``b_i``: the accuracy of the initial model on every task (forward transfer's);
2. for task ``j``: starts the task's adapter and the baselines, trains ``config.epochs`` epochs with
   the method (a fresh base optimizer, schedule and warm-up over the tensors that require grad;
   the lifecycle's and baselines' penalties as the engine's ``regularizer``, in every pass or at the
   clean weights; the baselines' projections on the descent gradient; their batch and loss terms),
   ends the baselines and then the task (O-LoRA/N-LoRA fold the adapter, merge-then-reset merges
   it), keeps the task's class prototypes (NME), and evaluates every task: ``a[j][i]``
   (:mod:`.continual_eval` says which logits each evaluation allows);
3. optionally measures the top Hessian eigenvalue on the task just learned (``hessian``) and the
   per-task flatness matrices (``flatness``: λ_max, trace and the loss along the line between
   checkpoints for every seen task, checkpoints saved under the unit's folder).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..continual.adapters import ContinualLoRA
from ..continual.flatness import PerTaskFlatness
from ..continual.metrics import continual_metrics, jsonable
from ..continual.strategy import TaskContext, make_baselines, split_strategy
from ..continual.tasks import TaskSequence, load_sequence
from ..core.schedules import derive_seed
from ..core.validation import check
from ..diagnostics import top_eigenvalues
from ..lora import lora_layers
from .config import RUN_DIAGNOSTIC_OPTIONS
from .continual_eval import Evaluator, logit_mask, task_loss, test_batches, train_classes
from .continual_settings import HESSIAN_SPACES, SCENARIOS, ContinualSettings, order_name
from .models import build_model
from .training import diagnostic_batches, ordered_train_batches, steps_per_epoch, train_model


def default_trainable(model: nn.Module) -> list[str]:
    """The classification head: the last ``nn.Linear`` module of the model that is not part of a
    LoRA layer (``classifier`` of a Hugging Face classifier, ``head`` of our CNNs)."""
    inside = {id(m) for layer in lora_layers(model) for m in layer.module.modules()}
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside
              and "lora_" not in name and not name.endswith("base_layer")]
    check("continual.trainable", bool(linear), None,
          "the modules to train in every task (the model has no nn.Linear head to take by default)")
    return [linear[-1]]


def _evaluations(sequence: TaskSequence, settings: ContinualSettings) -> tuple[str, list[str]]:
    """(the training scenario, the evaluations scored)."""
    scenario = settings.scenario
    if sequence.scenario == "domain":
        if scenario not in (None, "domain"):
            check("continual.scenario", False, scenario, f"'domain' (sequence {sequence.name} shares one label space)")
        chosen, default = "domain", ["domain"]
    else:
        chosen = scenario or sequence.scenario
        if chosen not in ("task", "class"):
            check("continual.scenario", False, chosen, f"'task' or 'class' (sequence {sequence.name} splits its labels)")
        default = ["task", "class"]
    evaluations = settings.evaluation or default
    wrong = [e for e in evaluations if (e == "domain") != (chosen == "domain") and e != "nme"]
    check("continual.evaluation", not wrong, evaluations,
          "'domain' and 'nme' for a sequence sharing one label space" if chosen == "domain"
          else "'task', 'class' and 'nme' for a sequence splitting its labels")
    if chosen != "domain" and chosen not in evaluations:
        evaluations = [chosen, *evaluations]  # the headline metrics come from the training scenario
    return chosen, list(dict.fromkeys(evaluations))


def lambda_max(model: nn.Module, loss_fn, batches: list, space: str, seed: int,
               options: dict[str, Any]) -> float:
    """The top Hessian eigenvalue of ``loss_fn`` on ``batches`` in parameter ``space`` (eval mode)."""

    result = top_eigenvalues(model, loss_fn, batches, **{"k": 1, **options}, params=space, seed=seed)
    return float(result.values[0])


def _head(model: nn.Module, name: str) -> nn.Module:
    """The module named ``name`` (exact, or a dotted suffix)."""
    found = [m for n, m in model.named_modules() if n == name or n.endswith("." + name)]
    check("continual.trainable", bool(found), name, "a module of the model (the head NME reads features from)")
    return found[-1]


def _chain(functions: list) -> Optional[Callable]:
    if not functions:
        return None
    if len(functions) == 1:
        return functions[0]

    def chained(value):
        for fn in functions:
            value = fn(value)
        return value

    return chained


def _penalty(continual: ContinualLoRA, baselines: list) -> Optional[Callable[[nn.Module], torch.Tensor]]:
    """The sum of the lifecycle's penalty (O-LoRA, N-LoRA) and the baselines' (EWC)."""
    terms = ([lambda _m: continual.penalty()] if continual.has_penalty else []) + \
        [b.penalty for b in baselines if b.has_penalty]
    if not terms:
        return None

    def penalty(model: nn.Module) -> torch.Tensor:
        values = [v for v in (t(model) for t in terms) if v is not None]
        return sum(values[1:], values[0]) if values else torch.zeros((), device=next(model.parameters()).device)

    return penalty


def _projection(baselines: list) -> Optional[Callable[[nn.Module], None]]:
    hooks = [b.project for b in baselines if b.has_projection]
    if not hooks:
        return None

    def project(model: nn.Module) -> None:
        for hook in hooks:
            hook(model)

    return project


def train_continual(config, sequence: TaskSequence, label: str, seed: int, strategy: str, order: Sequence[Any],
                    device: torch.device, on_step: Optional[Callable[[dict], None]] = None,
                    unit_dir: Optional[Path] = None) -> dict[str, Any]:
    """Train one continual unit; return its JSON-ready record (module docstring). ``unit_dir``: where
    the per-task checkpoints of the flatness matrices go (required when ``flatness`` is set).

    Runs inside ``fork_rng`` after ``torch.manual_seed(seed)`` (initialization, dropout): the
    caller's global RNG is left as it was.
    """
    settings = ContinualSettings.from_dict(config.continual)
    name, base_settings, hyper = config.method_spec(label)
    lifecycle, _ = split_strategy(strategy)
    sequence = sequence.ordered(order)
    train_scenario, evaluations = _evaluations(sequence, settings)
    tasks, T = sequence.tasks, len(sequence.tasks)
    classes = [list(t.classes) for t in tasks]
    options = settings.strategy_options

    record: dict[str, Any] = {
        "method": label, "registry_name": name, "hyperparameters": hyper, "base_optimizer": base_settings,
        "seed": seed, "strategy": strategy, "order": [t.name for t in tasks], "scenario": train_scenario,
        "evaluations": evaluations, "class_order": getattr(sequence, "class_order", None),
        "classes": classes, "config": config.to_dict(), "tasks": [t.name for t in tasks], "per_task": [],
        "lambda_max": {space: [] for space in settings.hessian}}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        shape_data = replace(tasks[0].data, num_classes=sequence.num_classes)
        model = build_model(config.model, shape_data, **config.model_options).to(device)
        trainable = settings.trainable if settings.trainable is not None else default_trainable(model)
        continual = ContinualLoRA(model, lifecycle, trainable=trainable, seed=seed, **options.get(lifecycle, {}))
        baselines = make_baselines(strategy, options, model=model, seed=seed, lifecycle=continual)
        replays = any(b.has_batch for b in baselines)
        evaluator = Evaluator(tasks, sequence.num_classes, evaluations, config.eval_batch_size, device,
                              head=_head(model, trainable[-1]) if "nme" in evaluations else None)
        flatness = None
        if settings.flatness is not None:
            check("unit_dir", unit_dir is not None, None, "the unit's folder (the flatness checkpoints go there)")
            flatness = PerTaskFlatness(**settings.flatness, seed=seed, checkpoint_dir=Path(unit_dir) / "checkpoints")
            flatness.start(model)  # the model as built: checkpoints then hold only the tensors that change
            flatness_batch = min(config.eval_batch_size, config.diagnostics_samples)
        baseline = evaluator.scores(model, -1)
        accuracy: dict[str, list] = {e: [] for e in evaluations}
        losses: dict[str, list] = {e: [] for e in evaluations}
        shuffle = torch.Generator().manual_seed(seed)
        train_time, steps = 0.0, 0
        train_masks = []
        for j, task in enumerate(tasks):
            continual.start_task(j)
            mask = logit_mask(sequence.num_classes, train_classes(settings.train_logits, classes, j, replays), device)
            train_masks.append(mask)
            seen = sorted({c for t in classes[:j + 1] for c in t})
            context = TaskContext(
                index=j, model=model, loss_fn=task_loss(mask), memory_loss_fn=task_loss(
                    logit_mask(sequence.num_classes, seen, device)),
                batches=lambda n, d=task.data: ordered_train_batches(d, config.batch_size, device, n),
                parameters=continual.trainable_parameters(), classes=classes[j], seen_classes=seen,
                seed=derive_seed(seed, j), device=device)
            for b in baselines:
                b.start_task(context)
            trained = train_model(
                config, task.data, model, name, base_settings, hyper, seed, device, on_step,
                loss_fn=task_loss(mask, baselines), regularizer=_penalty(continual, baselines),
                regularizer_at=settings.regularizer_at, descent_hook=_projection(baselines),
                batch_hook=_chain([b.extend_batch for b in baselines if b.has_batch]), shuffle=shuffle,
                method_seed=seed * 1000 + j, warmup_steps=settings.warmup_steps,
                evaluate_fn=lambda m, i=j: evaluator.during(m, train_scenario, i))
            context = replace(context, parameters=[p for p in model.parameters() if p.requires_grad])
            for b in baselines:
                b.end_task(context)
            continual.end_task()
            evaluator.learned(model, j)
            train_time += trained["final"]["train_time_s"]
            steps += trained["final"]["steps"]
            record["per_task"].append(trained)
            after = evaluator.scores(model, j)
            for e in evaluations:
                accuracy[e].append([acc for acc, _ in after[e]])
                losses[e].append([loss for _, loss in after[e]])
            if settings.hessian:
                batches = diagnostic_batches(config, task.data)
                for space in settings.hessian:
                    record["lambda_max"][space].append(
                        lambda_max(model, task_loss(mask), batches, space, seed,
                                   {**RUN_DIAGNOSTIC_OPTIONS["hessian"], **settings.hessian_options}))
            if flatness is not None:
                flatness.after_task(j, model, [
                    (task_loss(train_masks[i]), test_batches(tasks[i].data, flatness_batch, device,
                                                             settings.flatness["batches"]))
                    for i in range(j + 1)])
        record["baselines"] = {b_name: b.state() for b_name, b in zip(split_strategy(strategy)[1], baselines)}
    if flatness is not None:
        record["flatness"] = flatness.record()
    record["accuracy"] = accuracy
    record["test_loss"] = losses
    record["baseline"] = {e: [acc for acc, _ in baseline[e]] for e in evaluations}
    record["metrics"] = {e: jsonable(continual_metrics(accuracy[e], record["baseline"][e])) for e in evaluations}
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


__all__ = ["ContinualSettings", "HESSIAN_SPACES", "SCENARIOS", "continual_steps", "default_trainable", "lambda_max",
           "load_sequence", "order_name", "train_continual"]
