"""The ``continual`` section of an experiment config: strategies, orders, scenario, per-task Hessians."""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from ..continual.adapters import STRATEGIES, ContinualLoRA
from ..continual.strategy import BASELINES, split_strategy
from ..continual.tasks import TaskSequence
from ..core.validation import check, check_int, is_int


def _fail(name: str, value: Any, expected: str) -> None:
    check(name, False, value, expected)


#: Spaces the top Hessian eigenvalue can be measured in after each task.
HESSIAN_SPACES = ("lora", "all", "trainable")
SCENARIOS = ("domain", "task", "class")
EVALUATIONS = ("task", "class", "domain", "nme")
TRAIN_LOGITS = ("task", "seen", "all")
#: Per-task flatness: the quantities, the spaces, and the budget (see :mod:`flatminima.continual.flatness`).
FLATNESS_QUANTITIES = ("lambda_max", "trace", "line")
FLATNESS_SPACES = ("lora", "all")
FLATNESS_DEFAULTS = {"quantities": ["lambda_max", "trace", "line"], "spaces": ["lora", "all"], "batches": 2,
                     "iterations": 20, "line_points": 11}


@dataclass
class ContinualSettings:
    """The ``continual`` section of an experiment config.

    ``strategies``: continual-LoRA strategies to compare (:data:`STRATEGIES`); ``strategy_options``:
    per strategy, keyword arguments of :class:`~flatminima.continual.ContinualLoRA` (``orth_weight``, ``l2_weight``,
    ``orth_side``, ``squared``, ``l1_weight``); ``orders``: task orders, each a permutation of the
    sequence's tasks by index or name (default: the sequence's own order); ``trainable``: non-LoRA
    modules trained in every task (default: the model's classification head); ``scenario``:
    ``"task"`` or ``"class"`` for split label sets, ``"domain"`` otherwise (default: the
    sequence's); ``hessian``: spaces for λ_max after each task (:data:`HESSIAN_SPACES`), on the
    first ``diagnostics_samples`` test examples of the task just learned, by Lanczos with
    ``hessian_options`` (:func:`~flatminima.diagnostics.top_eigenvalues` keywords: ``tol``,
    ``max_iter``; default: the experiment's per-run settings).

    A strategy is a lifecycle optionally followed by ``+baseline`` terms (``seq-lora+ewc``,
    ``inc-lora+inflora``: :mod:`flatminima.continual.strategy`); ``strategy_options`` is keyed by
    lifecycle or baseline name. ``evaluation``: how the accuracy matrices are scored (``task``,
    ``class``, ``domain``, ``nme``; default: ``task`` and ``class`` for split label sets, ``domain``
    otherwise); ``train_logits``: the logits a task trains over (``task``, ``seen``, ``all``;
    default ``task``); ``regularizer_at``: a penalty (O-LoRA's, EWC's) in ``every`` pass of the
    method or once at the ``clean`` weights; ``warmup_steps``: a linear learning-rate warm-up at the
    start of every task (each task gets a fresh base optimizer and schedule); ``flatness``: per-task
    flatness matrices after every task (``None``: off; a mapping with ``quantities``, ``spaces``,
    ``batches``, ``iterations``, ``line_points``, defaults :data:`FLATNESS_DEFAULTS`).
    """

    strategies: list[str] = field(default_factory=lambda: ["seq-lora"])
    strategy_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    orders: Optional[list[list[Any]]] = None
    trainable: Optional[list[str]] = None
    scenario: Optional[str] = None
    hessian: list[str] = field(default_factory=list)
    hessian_options: dict[str, Any] = field(default_factory=dict)
    evaluation: Optional[list[str]] = None
    train_logits: str = "task"
    regularizer_at: str = "every"
    warmup_steps: int = 0
    flatness: Optional[dict[str, Any]] = None

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
                or len(set(settings.strategies)) != len(settings.strategies):
            _fail("continual.strategies", settings.strategies,
                  f"a list of distinct names: a lifecycle from {', '.join(STRATEGIES)}, optionally +baselines")
        for strategy in settings.strategies:
            try:
                split_strategy(strategy)
            except ValueError as error:  # name the config key, keep the accepted names
                raise ValueError(f"Invalid continual.strategies: {error}") from None
        names = set(STRATEGIES) | set(BASELINES.names())
        if not isinstance(settings.strategy_options, dict) \
                or not all(k in names and isinstance(v, dict) for k, v in settings.strategy_options.items()):
            _fail("continual.strategy_options", settings.strategy_options,
                  f"a mapping name -> keyword arguments, names from {', '.join(sorted(names))}")
        for key, kwargs in settings.strategy_options.items():
            accepted = _keywords(ContinualLoRA if key in STRATEGIES else BASELINES.get(key))
            unknown = sorted(set(kwargs) - accepted)
            if unknown:
                _fail(f"continual.strategy_options.{key}", unknown[0], f"one of {', '.join(sorted(accepted))}")
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
        if settings.evaluation is not None and (not isinstance(settings.evaluation, list) or not settings.evaluation
                                                or not set(settings.evaluation) <= set(EVALUATIONS)):
            _fail("continual.evaluation", settings.evaluation, f"None or a non-empty list from {', '.join(EVALUATIONS)}")
        if settings.train_logits not in TRAIN_LOGITS:
            _fail("continual.train_logits", settings.train_logits, f"one of {', '.join(TRAIN_LOGITS)}")
        if settings.regularizer_at not in ("every", "clean"):
            _fail("continual.regularizer_at", settings.regularizer_at, "'every' or 'clean'")
        check_int("continual.warmup_steps", settings.warmup_steps, 0)
        settings.flatness = flatness_settings(settings.flatness)
        return settings

    def order_list(self, sequence: TaskSequence) -> list[list[Any]]:
        return self.orders or [list(range(len(sequence.tasks)))]


def _keywords(cls: type) -> set[str]:
    """The keyword options a lifecycle or baseline takes from a config (the runner passes the rest)."""
    params = inspect.signature(cls).parameters
    return {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD} \
        - {"model", "strategy", "trainable", "seed", "config", "lifecycle"}


def flatness_settings(values: Any) -> Optional[dict[str, Any]]:
    """The validated ``continual.flatness`` mapping with its defaults filled in (None: off)."""
    if values is None:
        return None
    if not isinstance(values, dict) or not set(values) <= set(FLATNESS_DEFAULTS):
        _fail("continual.flatness", values, f"None or a mapping with keys from {', '.join(FLATNESS_DEFAULTS)}")
    out = {**FLATNESS_DEFAULTS, **values}
    for key, choices in (("quantities", FLATNESS_QUANTITIES), ("spaces", FLATNESS_SPACES)):
        if not isinstance(out[key], list) or not out[key] or not set(out[key]) <= set(choices):
            _fail(f"continual.flatness.{key}", out[key], f"a non-empty list from {', '.join(choices)}")
    for key, low in (("batches", 1), ("iterations", 1), ("line_points", 2)):
        check(f"continual.flatness.{key}", is_int(out[key]) and out[key] >= low, out[key], f"an integer >= {low}")
    return out


def order_name(sequence: TaskSequence, order: Sequence[Any]) -> str:
    """A file-name-safe name of a task order: the task names joined by ``-`` (alphanumerics only);
    past 64 characters (20 tasks of 10 classes), ``<T>tasks-`` and the first 12 hex digits of that
    name's SHA-256, so a unit's files stay within the file system's name limit."""
    names = [t.name for t in sequence.ordered(order).tasks]
    name = "-".join("".join(c if c.isalnum() else "" for c in n) or str(i) for i, n in enumerate(names))
    if len(name) > 64:
        name = f"{len(names)}tasks-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name
