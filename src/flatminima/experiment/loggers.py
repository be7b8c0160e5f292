"""Where an experiment's scalars go besides its result files: TensorBoard, MLflow, Weights & Biases.

The config field ``loggers`` names them (``[tensorboard, mlflow, wandb]``; ``tensorboard: true`` /
``null`` / ``false`` keeps working for TensorBoard). After each unit trains, :class:`RunLoggers`
sends every logger the unit's settings (:func:`unit_params`) and its scalars
(:func:`record_scalars`), on one step axis, the optimizer step counted over the whole unit:

* ``train_loss`` at every step, ``test_acc`` and ``test_loss`` at every evaluation (prefixed
  ``task<j>/`` in a continual unit, whose steps run on from task to task);
* for a continual unit, ``<scenario>_accuracy/on_<task>`` at the last step of every task;
* ``final/<key>`` at the unit's last step: every finite number of the record's ``final`` part.

Each logger is one :class:`RunLogger`. :class:`TensorBoardLogger` writes
``<out>/tensorboard/<unit id>``; :class:`MLflowLogger` makes one MLflow run per unit in the
experiment named after the config (``$MLFLOW_EXPERIMENT_NAME`` wins) at ``$MLFLOW_TRACKING_URI``, by
default the SQLite store ``<out>/mlflow.db``; :class:`WandbLogger` makes one W&B run per unit in
the project named after the config (``$WANDB_PROJECT`` wins), grouped by the config's name, its
files under ``<out>/wandb`` (``WANDB_MODE=offline`` logs without an account; ``wandb sync``
uploads later). A logger whose package is missing is refused when the run starts, before anything
trains, naming the ``pip install`` that brings it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .._extras import install_hint, require
from ..core.validation import check, is_real
from .units import unit_settings

#: The extra that installs each logger's package.
EXTRAS = {"tensorboard": "tensorboard", "mlflow": "loggers", "wandb": "loggers"}


class RunLogger:
    """One destination of an experiment's scalars: a unit's settings, then its scalars by step, then
    :meth:`end_unit`; :meth:`close` at the end of the run. Subclass it for another tracker."""

    name = ""

    def log_params(self, params: Mapping[str, str], unit: str) -> None:
        """The settings of ``unit`` (its id), flat ``name → text``: called once, before its scalars."""

    def log_scalars(self, step: int, values: Mapping[str, float], unit: str) -> None:
        """``values`` (``tag → number``) of ``unit`` at optimizer ``step``; steps never decrease."""

    def end_unit(self, unit: str) -> None:
        """Everything of ``unit`` has been logged: flush and close what it holds."""

    def close(self) -> None:
        """The run is over."""


class TensorBoardLogger(RunLogger):
    """Scalars under ``<out>/tensorboard/<unit id>`` (``torch.utils.tensorboard``, which needs the
    ``tensorboard`` package), and the unit's settings as the text summary ``params``."""

    name = "tensorboard"

    def __init__(self, out: Path):
        self.out = Path(out)
        self.writer_class = require("torch.utils.tensorboard", "tensorboard", "the tensorboard logger").SummaryWriter
        self.writers: dict[str, Any] = {}

    def _writer(self, unit: str):
        if unit not in self.writers:
            self.writers[unit] = self.writer_class(str(self.out / "tensorboard" / unit))
        return self.writers[unit]

    def log_params(self, params: Mapping[str, str], unit: str) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self._writer(unit).add_text("params", "| setting | value |\n|---|---|\n" + rows, 0)

    def log_scalars(self, step: int, values: Mapping[str, float], unit: str) -> None:
        writer = self._writer(unit)
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)

    def end_unit(self, unit: str) -> None:
        writer = self.writers.pop(unit, None)
        if writer is not None:
            writer.close()

    def close(self) -> None:
        for unit in list(self.writers):
            self.end_unit(unit)


class MLflowLogger(RunLogger):
    """One MLflow run per unit (named by the unit's id, tagged ``flatminima.unit``), through
    ``MlflowClient``: no active run is left behind in the process. ``tracking_uri``: None reads
    ``$MLFLOW_TRACKING_URI``, else the SQLite store ``<out>/mlflow.db`` (artifacts in
    ``<out>/mlartifacts``); ``experiment``: None reads ``$MLFLOW_EXPERIMENT_NAME``, else ``name``."""

    name = "mlflow"

    def __init__(self, out: Path, name: str, tracking_uri: Optional[str] = None, experiment: Optional[str] = None):
        require("mlflow", EXTRAS["mlflow"], "the mlflow logger")
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        out = Path(out).resolve()
        local = tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI")
        uri = f"sqlite:///{out / 'mlflow.db'}" if local else (tracking_uri or os.environ["MLFLOW_TRACKING_URI"])
        self.metric, self.param, self.tracking_uri = Metric, Param, uri
        experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or name
        quiet = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow database tables..."
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found is not None else self.client.create_experiment(
                experiment, artifact_location=(out / "mlartifacts").as_uri() if local else None)
        except MlflowException as exc:
            raise ValueError(f"Invalid loggers: 'mlflow' cannot use the tracking store {uri!r} "
                             f"({str(exc).splitlines()[0]}); set MLFLOW_TRACKING_URI to one that works") from exc
        finally:
            quiet.setLevel(level)
        self.runs: dict[str, str] = {}
        self.pending: dict[str, list] = {}

    def _run(self, unit: str) -> str:
        if unit not in self.runs:
            run = self.client.create_run(self.experiment_id, run_name=unit, tags={"flatminima.unit": unit})
            self.runs[unit], self.pending[unit] = run.info.run_id, []
        return self.runs[unit]

    def log_params(self, params: Mapping[str, str], unit: str) -> None:
        run = self._run(unit)
        items = [self.param(_mlflow_key(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run, params=items[i:i + 100])

    def log_scalars(self, step: int, values: Mapping[str, float], unit: str) -> None:
        self._run(unit)
        stamp = int(time.time() * 1000)
        self.pending[unit] += [self.metric(_mlflow_key(k), float(v), stamp, step) for k, v in values.items()]

    def end_unit(self, unit: str) -> None:
        if unit not in self.runs:
            return
        run, metrics = self.runs.pop(unit), self.pending.pop(unit)
        for i in range(0, len(metrics), 1000):  # and at most 1000 metrics
            self.client.log_batch(run, metrics=metrics[i:i + 1000])
        self.client.set_terminated(run, "FINISHED")

    def close(self) -> None:
        for unit in list(self.runs):
            self.end_unit(unit)


class WandbLogger(RunLogger):
    """One Weights & Biases run per unit (``name``: the unit's id, ``group``: the experiment's
    name, ``config``: its settings), files under ``<out>/wandb``; W&B prints nothing, captures no
    console output and samples no system metrics. ``project``: None reads ``$WANDB_PROJECT``, else
    ``name``. The mode (online, offline) and the account are W&B's own settings (``WANDB_MODE``,
    ``wandb login``); W&B keeps its own logs in its cache folder (``$WANDB_CACHE_DIR``)."""

    name = "wandb"

    def __init__(self, out: Path, name: str, project: Optional[str] = None):
        self.wandb = require("wandb", EXTRAS["wandb"], "the wandb logger")
        self.out, self.group = Path(out), name
        self.project = project or os.environ.get("WANDB_PROJECT") or name
        self.params: dict[str, Mapping[str, str]] = {}
        self.runs: dict[str, Any] = {}

    def _run(self, unit: str):
        if unit not in self.runs:
            wandb = self.wandb
            self.out.mkdir(parents=True, exist_ok=True)
            settings = wandb.Settings(console="off", x_disable_stats=True, silent=True)
            try:
                self.runs[unit] = wandb.init(project=self.project, group=self.group, name=unit, dir=str(self.out),
                                             config=dict(self.params.pop(unit, {})), reinit="create_new",
                                             settings=settings)
            except wandb.errors.Error as exc:
                raise ValueError(f"Invalid loggers: 'wandb' could not start a run ({exc}); log in with "
                                 "`wandb login`, or set WANDB_MODE=offline to log locally") from exc
        return self.runs[unit]

    def log_params(self, params: Mapping[str, str], unit: str) -> None:
        if unit in self.runs:
            self.runs[unit].config.update(dict(params), allow_val_change=True)
        else:
            self.params[unit] = params

    def log_scalars(self, step: int, values: Mapping[str, float], unit: str) -> None:
        self._run(unit).log(dict(values), step=step)

    def end_unit(self, unit: str) -> None:
        run = self.runs.pop(unit, None)
        if run is not None:
            run.finish()

    def close(self) -> None:
        for unit in list(self.runs):
            self.end_unit(unit)


def selected_loggers(config) -> list[str]:
    """The loggers a config asks for: its ``loggers`` in order, with TensorBoard first when
    ``tensorboard`` is true, or null and the package is installed. Raises ``ValueError`` when one
    asked for is not installed, naming its ``pip install``."""
    names = list(config.loggers)
    wanted = config.tensorboard or (config.tensorboard is None and _installed("tensorboard"))
    if wanted and "tensorboard" not in names:
        names.insert(0, "tensorboard")
    for name in names:
        field = "loggers" if name in config.loggers else "tensorboard"
        check(field, _installed(name), getattr(config, field),
              f"loggers whose packages are installed: {name} is not ({install_hint(EXTRAS[name])})")
    return names


def _installed(module: str) -> bool:
    """Whether ``module`` can be found, without importing it."""
    return importlib.util.find_spec(module) is not None


class RunLoggers:
    """The loggers of one experiment run (:func:`selected_loggers`), opened when the run starts, so
    a missing package or an unreachable MLflow store stops it before anything trains: :meth:`write`
    sends each one a finished unit, :meth:`close` ends them."""

    def __init__(self, config, out: Path):
        self.config, self.out = config, Path(out)
        self.names = selected_loggers(config)
        builders = {"tensorboard": lambda: TensorBoardLogger(self.out),
                    "mlflow": lambda: MLflowLogger(self.out, config.name),
                    "wandb": lambda: WandbLogger(self.out, config.name)}
        self.loggers: list[RunLogger] = [builders[name]() for name in self.names]

    def write(self, unit, record: Mapping[str, Any]) -> None:
        """Log ``unit`` (a :class:`~flatminima.experiment.units.Unit`) and its finished ``record``."""
        if not self.loggers:
            return
        params, points = unit_params(self.config, unit), record_scalars(record)
        for logger in self.loggers:
            logger.log_params(params, unit.id)
            for step, values in points:
                logger.log_scalars(step, values, unit.id)
            logger.end_unit(unit.id)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def unit_params(config, unit) -> dict[str, str]:
    """A unit's settings, flat ``name → text``: ``unit`` (its id), then every setting that shapes
    its result (:func:`~flatminima.experiment.units.unit_settings`: ``label``, ``seed``, ``method.<key>``,
    the config's fields; nested mappings as ``field.key``, lists as Python's text of them)."""
    params = {"unit": unit.id, **_flat(unit_settings(config, unit))}
    return {k: str(v) for k, v in params.items()}


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def record_scalars(record: Mapping[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """The scalars of a finished unit's record, ``[(step, {tag: value})]`` in increasing steps (the
    module's docstring lists the tags)."""
    points: dict[int, dict[str, float]] = {}
    parts: Sequence[Mapping[str, Any]] = record.get("per_task") or [record]
    offset, ends = 0, []
    for j, part in enumerate(parts):
        prefix = f"task{j}/" if "per_task" in record else ""
        curves = part["curves"]
        for step, loss in enumerate(curves["train_loss"]):
            points.setdefault(offset + step + 1, {})[f"{prefix}train_loss"] = float(loss)
        for step, acc, loss in zip(curves["eval_step"], curves["test_acc"], curves["test_loss"]):
            points.setdefault(offset + step, {}).update({f"{prefix}test_acc": float(acc),
                                                         f"{prefix}test_loss": float(loss)})
        offset += len(curves["train_loss"])
        ends.append(offset)
    for scenario, matrix in record.get("accuracy", {}).items():
        for j, row in enumerate(matrix):
            for i, acc in enumerate(row):
                points.setdefault(ends[j], {})[f"{scenario}_accuracy/on_{record['tasks'][i]}"] = float(acc)
    for key, value in record["final"].items():
        if is_real(value):
            points.setdefault(offset, {})[f"final/{key}"] = float(value)
    return sorted(points.items())


def _mlflow_key(key: str) -> str:
    """MLflow's names allow letters, digits, ``_ - . /`` and spaces: anything else becomes ``_``."""
    return re.sub(r"[^\w\-. /]", "_", key)
