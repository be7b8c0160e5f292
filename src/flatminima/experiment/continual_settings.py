"""The ``continual`` section of an experiment config: strategies, orders, scenario, per-task Hessians."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from ..continual.adapters import STRATEGIES
from ..continual.tasks import TaskSequence
from ..core.validation import check


def _fail(name: str, value: Any, expected: str) -> None:
    check(name, False, value, expected)


#: Spaces the top Hessian eigenvalue can be measured in after each task.
HESSIAN_SPACES = ("lora", "all", "trainable")
SCENARIOS = ("domain", "task", "class")


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
