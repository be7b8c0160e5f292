"""The units of an experiment, their fingerprints, and the state of each in an output folder.

A *unit* is one training run: (method label, seed) or, for a continual experiment, (method label,
seed, strategy, task order). A finished unit is written atomically to ``runs/<unit id>.json``
holding its *fingerprint*: the SHA-256 of :func:`unit_settings`, the resolved settings that shape
the unit's result. In an output folder each unit is (:func:`scan_units`):

* ``done``: its record holds the unit's fingerprint and passes the record checks
  (:func:`~flatminima.experiment.records.record_problem`; its checkpoint too, where the run needs one);
* ``stale``: its record was made with other settings (another fingerprint): trained again by a
  run, left out of a ``--report-only`` table, the changed settings named;
* ``broken``: its record does not parse, fails the checks, or its checkpoint does not fit;
* ``missing``: no record yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..core.validation import check
from .._files import load_state_dict
from .config import ExperimentConfig
from ..continual.strategy import split_strategy
from .continual_settings import order_name
from .provenance import resolved_method, sha256_json
from .records import read_record, record_problem

#: Config fields a unit's fingerprint leaves out: its seed and method stand for ``seeds`` and
#: ``methods`` (the method resolved, with the base optimizer's settings it trains with), the
#: continual settings are narrowed to the unit's strategy and order; the rest (names, paths, the
#: device spec, what is saved or logged) does not change a result. Every other field is in.
NOT_IN_FINGERPRINT = ("name", "out_dir", "device", "seeds", "methods", "optimizer", "lr", "momentum", "weight_decay",
                      "save_models", "tensorboard", "loggers", "continual", "compare")

#: Fields added after the first runs: at these defaults they stay out of the fingerprint, so the
#: records made before them are still ``done``.
DEFAULT_UNTIL_SET = {"label_noise": 0.0, "eval_train": False}

#: The states of :func:`scan_units`, in the order :func:`format_plan` counts them.
STATES = ("done", "stale", "broken", "missing")


@dataclass(frozen=True)
class Unit:
    """One training run of an experiment (see the module's docstring)."""

    label: str
    seed: int
    strategy: Optional[str] = None
    order: Optional[tuple] = None
    order_name: Optional[str] = None

    @property
    def id(self) -> str:
        """``<label>_seed<s>`` or ``<label>_<strategy>_<order>_seed<s>`` (the run file's name)."""
        parts = [self.label] + [p for p in (self.strategy, self.order_name) if p]
        return "_".join(parts) + f"_seed{self.seed}"


def plan_units(config: ExperimentConfig, sequence=None) -> list[Unit]:
    """Every unit of ``config``, seed-major (methods interleave in time, so a partial run has every
    method at its first seeds), then task order, strategy and method. A continual config needs its
    task ``sequence`` (the order names come from its tasks)."""
    labels = list(config.expanded_methods())
    if config.continual is None:
        return [Unit(label, seed) for seed in config.seeds for label in labels]

    orders = config.continual.get("orders") or [list(range(len(sequence.tasks)))]
    units = []
    for seed in config.seeds:
        for order in orders:
            name = order_name(sequence, order)
            for strategy in config.continual["strategies"]:
                units += [Unit(label, seed, strategy, tuple(order), name) for label in labels]
    return units


def unit_settings(config: ExperimentConfig, unit: Unit) -> dict[str, Any]:
    """The resolved settings that shape ``unit``'s result: every config field but
    :data:`NOT_IN_FINGERPRINT`, the ``"interpolation"`` diagnostic left out (it is computed across
    units), the unit's method as trained (:func:`~flatminima.experiment.provenance.resolved_method`),
    its label, seed, and for a continual unit its strategy's settings and task order."""
    values = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_FINGERPRINT
              and not (k in DEFAULT_UNTIL_SET and v == DEFAULT_UNTIL_SET[k])}
    values["diagnostics"] = sorted(d for d in config.diagnostics if d != "interpolation")
    values.update(label=unit.label, seed=unit.seed, method=resolved_method(config, unit.label))
    if config.continual is not None:
        continual = {k: v for k, v in config.continual.items() if k not in ("strategies", "orders", "strategy_options")}
        lifecycle, baselines = split_strategy(unit.strategy)
        options = config.continual.get("strategy_options", {})
        continual["strategy_options"] = {n: options[n] for n in (lifecycle, *baselines) if n in options}
        values.update(continual=continual, strategy=unit.strategy, order=list(unit.order))
    return values


def fingerprint(config: ExperimentConfig, unit: Unit) -> str:
    """SHA-256 of :func:`unit_settings` (canonical JSON): equal exactly when the unit would train the same."""
    return sha256_json(unit_settings(config, unit))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def changed_settings(old: Any, new: dict[str, Any], limit: int = 3) -> str:
    """What differs between two :func:`unit_settings` (``old`` from a record): ``"epochs 3 → 5,
    method.rho 0.05 → 0.1"``, at most ``limit`` named."""
    if not isinstance(old, dict):
        return "made by an earlier version of the runner (no settings recorded)"
    a, b = _flatten(old), _flatten(new)
    diffs = [f"{k} {a.get(k, '(unset)')} → {b.get(k, '(unset)')}" for k in [*b, *[k for k in a if k not in b]]
             if a.get(k, "(unset)") != b.get(k, "(unset)")]
    if not diffs:
        return "made with other settings"
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more


@dataclass
class UnitState:
    """A unit and what its output folder holds for it: ``status`` (one of :data:`STATES`), the
    trusted ``record`` when done, and ``reason`` for a stale or broken one."""

    unit: Unit
    status: str
    record: Optional[dict] = None
    reason: str = ""


def scan_units(config: ExperimentConfig, units: Sequence[Unit], runs: Path,
               checkpoint: Callable[[Unit], Optional[Path]] = lambda unit: None,
               model_shapes: Callable[[], dict[str, tuple]] = dict) -> list[UnitState]:
    """The state of every unit in the folder ``runs`` (reads only). A record is trusted (``done``)
    when it parses, holds the unit's fingerprint and passes
    :func:`~flatminima.experiment.records.record_problem`, and the unit's checkpoint
    (``checkpoint(unit)``, where one is needed) loads and fits the model (``model_shapes()``, called
    once)."""
    states, shapes = [], None
    for unit in units:
        path = runs / f"{unit.id}.json"
        if not path.exists():
            states.append(UnitState(unit, "missing"))
            continue
        try:
            record = read_record(path)
        except ValueError as exc:
            states.append(UnitState(unit, "broken", reason=str(exc)))
            continue
        if record.get("fingerprint") != fingerprint(config, unit):
            old = (record.get("provenance") or {}).get("unit_settings") if isinstance(record.get("provenance"), dict) \
                else None
            states.append(UnitState(unit, "stale", reason=changed_settings(old, unit_settings(config, unit))))
            continue
        problem = record_problem(record, unit)
        pt = checkpoint(unit)
        if problem is None and pt is not None:
            try:
                state = load_state_dict(pt)
                shapes = model_shapes() if shapes is None else shapes
                check("checkpoint", {k: tuple(v.shape) for k, v in state.items()} == shapes, str(pt),
                      "the state dict of this config's model")
            except ValueError as exc:
                problem = str(exc)
        states.append(UnitState(unit, "broken", reason=problem) if problem else UnitState(unit, "done", record))
    return states


def name_some(ids: Sequence[str], limit: int = 4) -> str:
    """``"a, b, c, d and 3 more"``."""
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def state_lines(states: Sequence[UnitState], retrain: bool = True) -> list[str]:
    """What a run says about units it cannot trust: one ``redoing <unit>: <reason>`` per broken
    unit and one line per group of stale units with the same changed settings. ``retrain`` False
    (a report of the finished units only) says they are left out instead."""
    lines = [f"{'redoing' if retrain else 'not reported'} {s.unit.id}: {s.reason}"
             for s in states if s.status == "broken"]
    stale: dict[str, list[str]] = {}
    for s in states:
        if s.status == "stale":
            stale.setdefault(s.reason, []).append(s.unit.id)
    verb = "retraining" if retrain else "not reported (stale)"
    for reason, ids in stale.items():
        lines.append(f"{verb} {name_some(ids)}: {'its record was' if len(ids) == 1 else 'their records were'} "
                     f"made with other settings ({reason})")
    return lines


def plan_rows(states: Sequence[UnitState]) -> list[dict[str, Any]]:
    """One row per unit for ``flatminima show``: ``{"unit", "method", "seed", "strategy", "order",
    "status", "note"}`` (strategy and order None outside continual runs; note: why a unit is
    stale or broken, the test accuracy of a done one)."""
    rows = []
    for s in states:
        note = s.reason if s.status in ("stale", "broken") else ""
        if s.status == "done":
            note = f"test acc {s.record['final']['test_acc']:.4f}"
        rows.append({"unit": s.unit.id, "method": s.unit.label, "seed": s.unit.seed, "strategy": s.unit.strategy,
                     "order": s.unit.order_name, "status": s.status, "note": note})
    return rows


def format_plan(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """:func:`plan_rows` as aligned text: a count per state, then one line per unit."""
    counts = {state: sum(r["status"] == state for r in rows) for state in STATES}
    summary = f"{len(rows)} units: " + ", ".join(
        f"{n} {'to train' if state == 'missing' else state}" for state, n in counts.items() if n or state == "done")
    keys = ["unit", "method", "seed"] + (["strategy", "order"] if any(r["strategy"] for r in rows) else []) + \
        ["status", "note"]
    table = [keys] + [["" if r[k] is None else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    return "\n".join(([title] if title else []) + [summary, ""] + lines)
