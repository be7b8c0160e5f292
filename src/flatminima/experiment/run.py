"""A whole experiment: every unit of a config trained (or resumed), then the interpolation and the
results; and :func:`show_plan`, the same plan without training."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..continual.tasks import load_sequence
from .._files import OutputLock, load_state_dict, prepare_out, remove_temporaries, save_torch, write_json
from ..core.validation import check
from ..diagnostics import interpolate
from ..data import Dataset, load_task
from .config import ExperimentConfig
from .continual import continual_steps, train_continual
from .loggers import RunLoggers
from .models import build_model
from .progress import Progress, clock_text
from .provenance import run_provenance, unit_provenance
from .results import unfinished_note, write_results
from .tables import reference_method, summarize
from .training import diagnostic_batches, logits, resolve_device, run_one, steps_per_epoch
from .units import Unit, fingerprint, format_plan, plan_rows, plan_units, scan_units, state_lines, unit_settings


def run_experiment(config: ExperimentConfig, progress: Optional[bool] = None,
                   log: Callable[[str], None] = print, train: bool = True) -> dict[str, Any]:
    """Run every unit of ``config`` (:func:`~flatminima.experiment.units.plan_units`) and write the
    results; returns ``{"summary", "table", "records", "out_dir", "states"}``.

    Resumable: a unit whose ``runs/<id>.json`` holds its fingerprint and passes the record checks is
    loaded, not trained again; a unit whose record was made with other settings (a changed field)
    is trained again, saying which settings changed (:mod:`flatminima.experiment.units`).
    ``train=False`` trains nothing and reports the finished units only (a killed or partial run),
    warning ``N of M units are missing`` and naming them; a stale unit is never tabulated. The
    run holds the output folder's lock (:class:`flatminima._files.OutputLock`) throughout, also
    with ``train=False``: a report written beside a live run could land after that run's final one
    and replace it. ``progress``: a tqdm bar over all steps (``None``: only when stderr is a
    terminal; otherwise progress lines, :class:`~flatminima.experiment.progress.Progress`).
    """
    config.validate()
    device = resolve_device(config.device)
    loaded = load_data(config)  # data that is missing fails here, before the output folder exists
    out = prepare_out(config.out_dir)
    with OutputLock(out):
        for stale in remove_temporaries(out):
            log(f"removed {stale}, left by a run that was killed while writing")
        return _run_units(config, device, out, progress, log, train, loaded)


def load_data(config: ExperimentConfig) -> tuple[Optional[Dataset], Any]:
    """``(dataset, None)`` for a config (its ``train_subset``, then its ``label_noise``), ``(None,
    task sequence)`` for a continual one, on the CPU."""
    if config.continual is None:
        data = load_task(config.task, **config.task_options).subset(config.train_subset)
        return data.with_label_noise(config.label_noise), None
    return None, load_sequence(config.task, **config.task_options)


def _checkpoints(config: ExperimentConfig, out: Path, continual: bool) -> Callable[[Unit], Optional[Path]]:
    interpolating = "interpolation" in config.diagnostics and not continual

    def checkpoint(unit: Unit) -> Optional[Path]:
        """Where ``unit``'s model must be on disk: kept, or needed for the interpolation (also after a restart)."""
        keep = not continual and (config.save_models or (interpolating and unit.seed == config.seeds[0]))
        return out / "runs" / f"{unit.id}.pt" if keep else None

    return checkpoint


def _run_units(config: ExperimentConfig, device: torch.device, out: Path, progress: Optional[bool],
               log: Callable[[str], None], train: bool, loaded: tuple[Optional[Dataset], Any]) -> dict[str, Any]:
    data, sequence = loaded
    shared = run_provenance(config, device, data if sequence is None else sequence)
    data = data.to(device) if data is not None else None
    sequence = sequence.to(device) if sequence is not None else None
    units = plan_units(config, sequence)
    loggers = RunLoggers(config, out)
    interpolating = "interpolation" in config.diagnostics and sequence is None
    checkpoint = _checkpoints(config, out, sequence is not None)
    states = scan_units(config, units, out / "runs", checkpoint, lambda: _model_shapes(config, data))
    finished = {s.unit: s.record for s in states}
    todo = [s.unit for s in states if s.status != "done"]
    for line in state_lines(states, retrain=train):
        log(line)
    if len(todo) < len(units):
        log(f"resuming: {len(units) - len(todo)} of {len(units)} units already finished in {out / 'runs'}")
    unfinished = []
    if not train:
        stale = sum(s.status == "stale" for s in states)
        check("out_dir", len(todo) < len(units), str(out), "a folder holding finished units of this config to report"
              + (f" ({stale} of its units were trained with other settings)" if stale else ""))
        unfinished = [r for r in plan_rows(states) if r["status"] != "done"]
        if unfinished:
            log(f"warning: {unfinished_note(unfinished, len(units))}")
        units, todo = [u for u in units if finished[u] is not None], []
    if sequence is None:
        per_unit = steps_per_epoch(config, data) * config.epochs
    else:

        per_unit = continual_steps(config, sequence)
    shown = Progress(len(todo), per_unit, progress, log)
    started = time.perf_counter()
    try:
        for unit in todo:
            shown.start(unit.id)

            def on_model(model: nn.Module, unit=unit) -> None:
                if checkpoint(unit) is not None:
                    save_torch(model.state_dict(), checkpoint(unit))

            unit_started = time.perf_counter()
            if sequence is None:
                record = run_one(config, data, unit.label, unit.seed, device, shown.step, on_model)
            else:

                record = train_continual(config, sequence, unit.label, unit.seed, unit.strategy, list(unit.order),
                                         device, shown.step, unit_dir=out / "runs" / unit.id)
            record["unit"] = unit.id
            record["fingerprint"] = fingerprint(config, unit)
            record["provenance"] = unit_provenance(shared, config, unit.seed, unit_settings(config, unit),
                                                   record["fingerprint"], time.perf_counter() - unit_started)
            write_json(out / "runs" / f"{unit.id}.json", record)
            loggers.write(unit, record)
            finished[unit] = record
            shown.finish(unit.id, record["final"])
    finally:
        shown.close()
        loggers.close()
    wall = time.perf_counter() - started
    records = [finished[u] for u in units]
    interpolation = {}
    if interpolating:
        models = {u.label: load_state_dict(checkpoint(u), map_location=device)
                  for u in units if u.seed == config.seeds[0]}
        interpolation = interpolate_methods(config, data, models, reference_method(records), device)
    table = write_results(out, config, records, wall, device, log, interpolation, unfinished)
    total = sum(r["provenance"]["wall_time_s"] if isinstance(r.get("provenance"), dict) else r["final"]["train_time_s"]
                for r in records)
    log(f"\n{table}\n\n{len(units)} runs ({len(todo)} trained now) in {wall:.1f} s; all units took "
        f"{clock_text(total)} of wall time; results in {out} (report: {out / 'report.html'})")
    return {"summary": summarize(records), "table": table, "records": records, "out_dir": str(out), "states": states}


def _model_shapes(config: ExperimentConfig, data: Dataset) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of the config's model: what a unit's checkpoint must hold."""
    with torch.random.fork_rng(devices=[]):
        model = build_model(config.model, data, **config.model_options)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def show_plan(config: ExperimentConfig) -> list[dict[str, Any]]:
    """The job matrix of ``config`` in its output folder, without training or writing anything:
    one row per unit, ``{"unit", "method", "seed", "strategy", "order", "status", "note"}``, status
    ``done`` (a trusted record with the unit's fingerprint), ``stale`` (made with other settings,
    named in the note), ``broken`` (the note says why) or ``missing`` (to train), in training order.
    A continual config loads its task sequence (the task orders are named after its tasks); a
    checkpoint the run needs is checked as a run would (which builds the model once)."""
    config.validate()
    data: Optional[Dataset] = None
    sequence = load_data(config)[1] if config.continual is not None else None

    def shapes() -> dict[str, tuple[int, ...]]:
        return _model_shapes(config, data if data is not None else load_data(config)[0])

    out = Path(config.out_dir)
    states = scan_units(config, plan_units(config, sequence), out / "runs",
                        _checkpoints(config, out, sequence is not None), shapes)
    return plan_rows(states)


def format_show(config: ExperimentConfig, rows: list[dict[str, Any]]) -> str:
    """:func:`show_plan`'s rows as the text of ``flatminima show``: a title line, the counts, the units."""
    title = f"{config.name}: {config.task} / {config.model} -> {config.out_dir}"
    return format_plan(rows, title)


def interpolate_methods(config: ExperimentConfig, data: Dataset, models: dict[str, dict[str, torch.Tensor]],
                        reference: Optional[str], device: torch.device) -> dict[str, Any]:
    """Loss along ``(1 − t)·θ_ref + t·θ_method`` for every method against the reference one (the
    first seed's models, which share their initialization), on the diagnostics data."""
    if not models or reference not in models:
        return {}

    def loss(model: nn.Module, batch: tuple) -> torch.Tensor:
        return F.cross_entropy(logits(model, batch[0]), batch[1])

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        anchor = build_model(config.model, data, **config.model_options).to(device)
    anchor.load_state_dict(models[reference])
    batches = diagnostic_batches(config, data)
    return {label: interpolate(anchor, state, loss, batches, buffers="interpolate")
            for label, state in models.items() if label != reference}
