"""A whole experiment: every unit of a config trained (or resumed), then the interpolation and the results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .._files import OutputLock, load_state_dict, prepare_out, remove_temporaries, save_torch, write_json
from ..core.validation import check
from ..data import Dataset, load_task
from .config import ExperimentConfig
from .models import build_model
from .results import reference_method, summarize, write_results
from .training import _cross_entropy, diagnostic_batches, resolve_device, run_one, steps_per_epoch


def run_experiment(config: ExperimentConfig, progress: Optional[bool] = None,
                   log: Callable[[str], None] = print, train: bool = True) -> dict[str, Any]:
    """Run every unit of ``config`` (:func:`flatminima.runner.plan_units`) and write the results;
    returns ``{"summary", "table", "records", "out_dir"}``.

    Resumable: a unit whose ``runs/<id>.json`` already holds its fingerprint and passes the record
    checks is loaded, not trained again (:mod:`flatminima.runner`). ``train=False`` trains nothing
    and reports the finished units only (a killed or partial run). The run holds the output
    folder's lock (:class:`flatminima._files.OutputLock`) throughout, also with ``train=False``: a
    report written beside a live run could land after that run's final one and replace it.
    ``progress``: a tqdm bar over all steps (``None``: only when stderr is a terminal).
    """
    config.validate()
    device = resolve_device(config.device)
    out = prepare_out(config.out_dir)
    with OutputLock(out):
        for stale in remove_temporaries(out):
            log(f"removed {stale}, left by a run that was killed while writing")
        return _run_units(config, device, out, progress, log, train)


def _run_units(config: ExperimentConfig, device: torch.device, out: Path, progress: Optional[bool],
               log: Callable[[str], None], train: bool) -> dict[str, Any]:
    from .. import runner

    if config.continual is None:
        data = load_task(config.task, **config.task_options).subset(config.train_subset).to(device)
        sequence = None
    else:
        from ..continual.tasks import load_sequence

        sequence = load_sequence(config.task, **config.task_options).to(device)
        data = None
    units = runner.plan_units(config, sequence)
    tensorboard = runner.TensorBoard(out, config.tensorboard)
    interpolate = "interpolation" in config.diagnostics and sequence is None

    def checkpoint(unit: runner.Unit) -> Optional[Path]:
        """Where ``unit``'s model must be on disk: kept, or needed for the interpolation (also after a restart)."""
        keep = sequence is None and (config.save_models or (interpolate and unit.seed == config.seeds[0]))
        return out / "runs" / f"{unit.id}.pt" if keep else None

    finished = runner.load_finished(config, units, out / "runs", checkpoint,
                                    lambda: _model_shapes(config, data), log)
    todo = [u for u in units if finished[u] is None]
    if len(todo) < len(units):
        log(f"resuming: {len(units) - len(todo)} of {len(units)} units already finished in {out / 'runs'}")
    if not train:
        check("out_dir", len(todo) < len(units), str(out), "a folder holding finished units of this config to report")
        log(f"reporting the finished units only; not trained: {', '.join(u.id for u in todo) or 'none'}")
        units, todo = [u for u in units if finished[u] is not None], []
    if sequence is None:
        per_unit = steps_per_epoch(config, data) * config.epochs
    else:
        from ..continual.train import continual_steps

        per_unit = continual_steps(config, sequence)
    bar = _progress_bar(len(todo) * per_unit, progress)
    write = bar.write if bar is not None else log
    started = time.perf_counter()
    try:
        for unit in todo:
            if bar is not None:
                bar.set_description(unit.id)

            def on_step(info: dict) -> None:
                if bar is not None:
                    bar.update(1)
                    if "test_acc" in info:
                        bar.set_postfix(loss=f"{info['train_loss']:.3f}", acc=f"{info['test_acc']:.3f}")

            def on_model(model: nn.Module, unit=unit) -> None:
                if checkpoint(unit) is not None:
                    save_torch(model.state_dict(), checkpoint(unit))

            if sequence is None:
                record = run_one(config, data, unit.label, unit.seed, device, on_step, on_model)
            else:
                from ..continual.train import train_continual

                record = train_continual(config, sequence, unit.label, unit.seed, unit.strategy, list(unit.order),
                                         device, on_step)
            record["unit"] = unit.id
            record["fingerprint"] = runner.fingerprint(config, unit)
            write_json(out / "runs" / f"{unit.id}.json", record)
            tensorboard.write(unit, record)
            finished[unit] = record
            final = record["final"]
            write(f"{unit.id}: test acc {final['test_acc']:.4f}, train loss {final['train_loss']:.4f}, "
                  f"{1000 * final['time_per_step_s']:.1f} ms/step")
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - started
    records = [finished[u] for u in units]
    interpolation = {}
    if interpolate:
        models = {u.label: load_state_dict(checkpoint(u), map_location=device)
                  for u in units if u.seed == config.seeds[0]}
        interpolation = interpolate_methods(config, data, models, reference_method(records), device)
    table = write_results(out, config, records, wall, device, log, interpolation)
    log(f"\n{table}\n\n{len(units)} runs ({len(todo)} trained now) in {wall:.1f} s; results in {out} "
        f"(report: {out / 'report.html'})")
    return {"summary": summarize(records), "table": table, "records": records, "out_dir": str(out)}


def _model_shapes(config: ExperimentConfig, data: Dataset) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of the config's model: what a unit's checkpoint must hold."""
    with torch.random.fork_rng(devices=[]):
        model = build_model(config.model, data, **config.model_options)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def interpolate_methods(config: ExperimentConfig, data: Dataset, models: dict[str, dict[str, torch.Tensor]],
                        reference: Optional[str], device: torch.device) -> dict[str, Any]:
    """Loss along ``(1 − t)·θ_ref + t·θ_method`` for every method against the reference one (the
    first seed's models, which share their initialization), on the diagnostics data."""
    if not models or reference not in models:
        return {}
    from ..diagnostics import interpolate

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        anchor = build_model(config.model, data, **config.model_options).to(device)
    anchor.load_state_dict(models[reference])
    batches = diagnostic_batches(config, data)
    return {label: interpolate(anchor, state, _cross_entropy, batches, buffers="interpolate")
            for label, state in models.items() if label != reference}


def _progress_bar(total: int, progress: Optional[bool]):
    if progress is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    import sys

    if progress is None and not sys.stderr.isatty():
        return None
    return tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)
