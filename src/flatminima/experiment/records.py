"""A finished unit's record (``runs/<unit>.json``): reading it, checking it, and grouping records into rows.

A record is reused only when its fingerprint matches *and* it passes :func:`record_problem`: the
keys the tables, figures and report read, of the right types, accuracies in ``[0, 1]``, losses
``>= 0`` (NaN/inf allowed: a diverged run is a result, and would diverge again), finite times
``>= 0``, curves of consistent lengths, the unit it names. Anything else (an edited, truncated or
foreign file) is reported and the unit is trained again. Nothing here trains or writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from ..core.validation import is_int, is_real

#: Headline diagnostics a record may carry under ``diagnostics.summary`` (the flatness table's columns).
DIAGNOSTIC_KEYS = ("lambda_max", "trace", "sharpness", "average_sharpness", "lambda_max_batch_median")

#: Continual metrics a record must carry per scenario (:func:`flatminima.continual.metrics.continual_metrics`).
CONTINUAL_METRICS = ("average_accuracy", "learning_accuracy", "backward_transfer", "forgetting", "forward_transfer")


def record_group(record: dict[str, Any]) -> str:
    """The row a run is averaged into: its method, and its strategy in a continual run
    (``"sam / o-lora"``)."""
    return record["method"] if record.get("strategy") is None else f"{record['method']} / {record['strategy']}"


def group_records(records: Sequence[dict]) -> dict[str, list[dict]]:
    """Records by :func:`record_group`, groups and runs in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(record_group(r), []).append(r)
    return groups


def read_record(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``ValueError`` saying why when it does not read as one."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{Path(path).name} does not read as JSON ({type(exc).__name__})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{Path(path).name} holds a JSON {type(record).__name__}, not an object")
    return record


class _Bad(Exception):
    pass


def _need(ok: bool, where: str, value: Any, expected: str) -> None:
    if not ok:
        shown = repr(value)
        raise _Bad(f"{where} is {shown if len(shown) <= 40 else shown[:37] + '...'} (expected {expected})")


def _get(mapping: Any, key: str, where: str) -> Any:
    _need(isinstance(mapping, dict), where, type(mapping).__name__, "a mapping")
    if key not in mapping:
        raise _Bad(f"{where}.{key} is missing" if where != "record" else f"{key} is missing")
    return mapping[key]


def _fraction(x: Any) -> bool:
    return is_real(x) and 0 <= x <= 1


def _nonnegative(x: Any) -> bool:
    return is_real(x) and x >= 0


def _number(x: Any) -> bool:
    """A float or int (NaN and inf included: a diverged run is a result, and rerunning it diverges again)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _loss(x: Any) -> bool:
    """A cross-entropy: >= 0, or NaN/inf from a diverged run."""
    return _number(x) and (math.isnan(x) or x >= 0)


def _list_of(value: Any, ok, where: str, expected: str, length: Optional[int] = None) -> list:
    _need(isinstance(value, list) and (length is None or len(value) == length), where,
          value if not isinstance(value, list) else f"a list of {len(value)}",
          f"a list{'' if length is None else f' of {length}'} of {expected}")
    for i, v in enumerate(value):
        _need(ok(v), f"{where}[{i}]", v, expected)
    return value


def _check_training(part: Any, where: str) -> None:
    """``curves`` and ``final`` of one training run (a unit, or one task of a continual unit)."""
    prefix = "" if where == "record" else f"{where}."
    curves, final = _get(part, "curves", where), _get(part, "final", where)
    w, f = f"{prefix}curves", f"{prefix}final"
    steps = _get(final, "steps", f)
    _need(is_int(steps) and steps >= 1, f"{f}.steps", steps, "an int >= 1")
    _list_of(_get(curves, "train_loss", w), _number, f"{w}.train_loss", "numbers", steps)
    evals = _list_of(_get(curves, "eval_step", w), lambda s: is_int(s) and 0 <= s <= steps, f"{w}.eval_step",
                     f"ints in [0, {steps}]")
    _need(len(evals) >= 1, f"{w}.eval_step", evals, "at least one evaluation")
    _list_of(_get(curves, "test_acc", w), _fraction, f"{w}.test_acc", "accuracies in [0, 1]", len(evals))
    _list_of(_get(curves, "test_loss", w), _loss, f"{w}.test_loss", "losses >= 0", len(evals))
    for key in ("train_acc", "memorized"):  # with eval_train: in both curves and final, or in neither
        if key in curves or key in final:
            _list_of(_get(curves, key, w), _fraction, f"{w}.{key}", "accuracies in [0, 1]", len(evals))
            _need(_fraction(_get(final, key, f)), f"{f}.{key}", final[key], "an accuracy in [0, 1]")
    _check_final(final, f)


def _check_final(final: Any, where: str) -> None:
    for key, ok, expected in (("test_acc", _fraction, "an accuracy in [0, 1]"),
                              ("test_loss", _loss, "a loss >= 0"),
                              ("train_loss", _number, "a number"),
                              ("train_time_s", _nonnegative, "a finite time >= 0"),
                              ("time_per_step_s", _nonnegative, "a finite time >= 0")):
        value = _get(final, key, where)
        _need(ok(value), f"{where}.{key}", value, expected)


def _check_continual(record: dict, unit) -> None:
    _need(record.get("strategy") == unit.strategy, "strategy", record.get("strategy"), repr(unit.strategy))
    tasks = _list_of(_get(record, "tasks", "record"), lambda t: isinstance(t, str), "tasks", "task names")
    T = len(tasks)
    _need(T >= 1, "tasks", tasks, "at least one task")
    _list_of(_get(record, "order", "record"), lambda t: isinstance(t, str), "order", "task names", T)
    per_task = _list_of(_get(record, "per_task", "record"), lambda p: isinstance(p, dict), "per_task",
                        "training records", T)
    for j, part in enumerate(per_task):
        _check_training(part, f"per_task[{j}]")
    accuracy = _get(record, "accuracy", "record")
    _need(isinstance(accuracy, dict) and accuracy, "accuracy", accuracy, "a mapping scenario -> matrix")
    scenario = _get(record, "scenario", "record")
    _need(scenario in accuracy, "scenario", scenario, f"one of {', '.join(accuracy)}")
    metrics = _get(record, "metrics", "record")
    for s, matrix in accuracy.items():
        rows = _list_of(matrix, lambda r: isinstance(r, list), f"accuracy.{s}", "rows", T)
        for j, row in enumerate(rows):
            _list_of(row, _fraction, f"accuracy.{s}[{j}]", "accuracies in [0, 1]", T)
        values = _get(metrics, s, "metrics")
        for key in CONTINUAL_METRICS:  # what the tables read; undefined ones are null
            value = _get(values, key, f"metrics.{s}")
            _need(value is None or _number(value), f"metrics.{s}.{key}", value, "a number or null")
    lambda_max = _get(record, "lambda_max", "record")
    _need(isinstance(lambda_max, dict), "lambda_max", lambda_max, "a mapping space -> values")
    for space, values in lambda_max.items():
        _list_of(values, _number, f"lambda_max.{space}", "numbers", T)
    _check_final(_get(record, "final", "record"), "final")


def _check_diagnostics(record: dict) -> None:
    if "diagnostics" not in record:
        return
    summary = _get(_get(record, "diagnostics", "record"), "summary", "diagnostics")
    _need(isinstance(summary, dict), "diagnostics.summary", summary, "a mapping")
    for key in DIAGNOSTIC_KEYS:
        value = summary.get(key)
        # NaN is a result a diagnostic can report (it shows as nan in the tables); a string is not.
        _need(value is None or _number(value),
              f"diagnostics.summary.{key}", value, "a number or null")


def record_problem(record: dict, unit) -> Optional[str]:
    """Why ``record`` (a unit file whose fingerprint matched) cannot stand for ``unit``, None
    when it can: a short reason naming the key."""
    try:
        for key, want in (("unit", unit.id), ("method", unit.label), ("seed", unit.seed)):
            value = _get(record, key, "record")
            _need(value == want and type(value) is type(want), key, value, repr(want))
        for key in ("registry_name",):
            _need(isinstance(_get(record, key, "record"), str), key, record[key], "a string")
        for key in ("hyperparameters", "base_optimizer"):
            _need(isinstance(_get(record, key, "record"), dict), key, record[key], "a mapping")
        if unit.strategy is None:
            _check_training(record, "record")
        else:
            _check_continual(record, unit)
        _check_diagnostics(record)
        if "provenance" in record:
            provenance = _get(record, "provenance", "record")
            _need(isinstance(provenance, dict), "provenance", provenance, "a mapping")
            wall = provenance.get("wall_time_s")
            _need(wall is None or _nonnegative(wall), "provenance.wall_time_s", wall, "a finite time >= 0")
    except _Bad as bad:
        return str(bad)
    return None
