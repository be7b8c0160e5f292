"""What each command of :mod:`flatminima.cli` does, once its arguments are parsed: ``run``, ``show``,
``diagnose`` and ``list`` (``<name>_command(args)``, returning the exit status).

A command's config is resolved in one order: the preset (or suite), the config file, then the
overrides: first the flags that set a field (``--methods``, ``--seeds``, ``--epochs``,
``--device``, ``--out``, ``--save-models``; ``diagnose``'s ``--samples``, ``--out``,
``--device``), then the ``KEY=VALUE`` items left to right (:mod:`flatminima.experiment.overrides`),
a later one of the same key winning. Every step is validated as a config file is.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import experiment
from . import lora  # noqa: F401  (registers flatlora and samlora for `list` and --methods)
from . import methods as _methods
from ._files import load_state_dict
from .continual.tasks import available_sequences
from .data import available_tasks, load_task
from .diagnostics.report import DEFAULT_DIAGNOSTICS, DIAGNOSTICS, report
from .experiment import (DEFAULT_METHODS, PRESETS, SUITES, TEXT_METHODS, ExperimentConfig, accuracy_counts,
                         available_models, build_model, cross_entropy, diagnostic_batches, preset, resolve_device,
                         suite)
from .experiment.overrides import Override, apply_overrides, is_override, parse_override
from .experiment.report import diagnose_facts, write_diagnose_report
from .experiment.run import format_show, show_plan


def split_items(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: Sequence[str]) -> None:
    """Sort the positional items (with those argparse left over after options) into
    ``args.config_path`` (the config file: the first item, or ``--config``) and ``args.items`` (the
    ``KEY=VALUE`` overrides, parsed); anything else is refused as argparse refuses it."""
    options = [item for item in extra if item.startswith("-")]
    if args.command == "list" and extra or options:
        parser.error(f"unrecognized arguments: {' '.join(options or extra)}")
    if args.command == "list":
        return
    items = [i for i in (args.config_file, *args.overrides) if i is not None] + list(extra)
    path = args.config
    for position, item in enumerate(items):
        if is_override(item):
            continue
        both = path is not None and path != item
        if position > 0 or both:
            raise ValueError(f"Invalid config: {item!r} (expected one config file, before the KEY=VALUE overrides"
                             + (f"; --config is {path!r})" if both else ")"))
        path = item
    args.config_path = path
    args.items = [parse_override(item) for item in items if is_override(item)]


def _select_methods(config: ExperimentConfig, labels: list[str]) -> dict:
    """Settings for ``labels``: from the config, else the tuned defaults, else the method's own defaults."""
    selected = {}
    for label in labels:
        if label in config.methods:
            selected[label] = config.methods[label]
        elif label in DEFAULT_METHODS:
            selected[label] = dict(DEFAULT_METHODS[label])
        elif label in TEXT_METHODS:
            selected[label] = dict(TEXT_METHODS[label])
        else:
            _methods.get(label)  # raises ValueError listing the accepted names
            selected[label] = {}
    return selected


def _flag(key: str, value: Any, source: str) -> list[Override]:
    return [] if value is None else [Override(key, value, source)]


def experiment_overrides(args: argparse.Namespace, config: ExperimentConfig) -> list[Override]:
    """The overrides of ``run``/``show``: the field flags, then the ``KEY=VALUE`` items."""
    flags = []
    if args.methods:
        selected = _select_methods(config, args.methods)
        flags += _flag("methods", selected, f"--methods {','.join(args.methods)}")
        # the config's extra comparisons among the methods kept (a pair with one left out compares nothing)
        kept = set(replace(config, methods=selected, compare=[]).expanded_methods())
        if config.compare:
            flags += _flag("compare", [p for p in config.compare if set(p) <= kept],
                           f"--methods {','.join(args.methods)}")
    flags += _flag("seeds", args.seeds, f"--seeds {','.join(map(str, args.seeds or []))}")
    flags += _flag("epochs", args.epochs, f"--epochs {args.epochs}")
    flags += _flag("device", args.device, f"--device {args.device}")
    flags += _flag("out_dir", args.out, f"--out {args.out}")
    flags += _flag("save_models", args.save_models, "--save-models")
    flags += _flag("task_options.root", getattr(args, "data_root", None), f"--data-root {getattr(args, 'data_root', '')}")
    return flags + list(args.items)


def resolve_experiments(args: argparse.Namespace) -> dict[str, ExperimentConfig]:
    """The configs ``run``/``show`` run: one per suite member (a preset alone is a suite of one),
    each with the config file and the overrides applied, in its own output folder."""
    path = args.config_path
    if path is None or args.preset is not None:
        configs = suite(args.preset or "default")
    else:
        configs = {"custom": ExperimentConfig()}
    if path:
        configs = {member: ExperimentConfig.load(path, base=c) for member, c in configs.items()}
    configs = {member: apply_overrides(c, experiment_overrides(args, c)) for member, c in configs.items()}
    # A suite member writes into a folder named after its preset (a safe, distinct name), never
    # after the config's ``name``, which is a label; members whose out_dir the file or an override
    # made equal get one sub-folder each.
    if len({c.out_dir for c in configs.values()}) < len(configs):
        configs = {m: ExperimentConfig.from_dict({"out_dir": str(Path(c.out_dir) / m)}, base=c)
                   for m, c in configs.items()}
    return configs


def _title(config: ExperimentConfig) -> str:
    return f"== {config.name}: {config.task} / {config.model} -> {config.out_dir}"


def show_command(args: argparse.Namespace) -> int:
    """``flatminima show``: every unit and its state in the output folder (reads only)."""
    for config in resolve_experiments(args).values():
        print(format_show(config, show_plan(config)))
    return 0


def run_command(args: argparse.Namespace) -> int:
    """``flatminima run``: train (or resume) every member; ``--dry-run`` prints the plan instead."""
    configs = resolve_experiments(args)
    if args.dry_run:
        for config in configs.values():
            print(format_show(config, show_plan(config)))
        print("dry run: nothing trained or written")
        return 0
    for config in configs.values():
        print(_title(config))
        experiment.run_experiment(config, progress=args.progress, train=not args.report_only)
    return 0


def diagnostic_names() -> tuple[Sequence[str], Sequence[str]]:
    """``(every diagnostic diagnose accepts, the default ones)`` (for its help text)."""
    return DIAGNOSTICS, DEFAULT_DIAGNOSTICS


def diagnose_command(args: argparse.Namespace) -> int:
    """``flatminima diagnose``: the flatness diagnostics of one model, written as a report."""
    config = preset(args.preset)
    if args.config_path:
        config = ExperimentConfig.load(args.config_path, base=config)
    flags = [Override("diagnostics_samples", args.samples, f"--samples {args.samples}"),
             Override("out_dir", args.out, f"--out {args.out}"), *_flag("device", args.device, f"--device {args.device}")]
    config = apply_overrides(config, flags + list(args.items))
    names = args.diagnostics if args.diagnostics is not None else list(DEFAULT_DIAGNOSTICS)
    device = resolve_device(config.device)
    data = load_task(config.task, **config.task_options).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seeds[0])
        model = build_model(config.model, data, **config.model_options).to(device)
    if args.checkpoint:
        state = load_state_dict(args.checkpoint, map_location=device)
        check_checkpoint_fits(args.checkpoint, state, model, args.preset, config)
        model.load_state_dict(state)
    result = report(model, cross_entropy, diagnostic_batches(config, data), config.out_dir, names,
                    params=args.params, metric_fn=accuracy_counts, mode=args.mode, seed=args.seed, log=print)
    print(json.dumps(result["summary"], indent=1))
    facts = diagnose_facts(config, device, args.preset, names, args.params, args.mode, args.seed, args.checkpoint,
                           args.config_path, [o.source for o in args.items])
    page = write_diagnose_report(config.out_dir, result, f"diagnose: {config.task} / {config.model}", facts)
    print(f"report in {page} (the numbers also in {config.out_dir}/report.json)")
    return 0


def saved_config(checkpoint: str) -> Optional[dict]:
    """The config of the run that saved ``checkpoint`` (``runs/UNIT.pt`` beside ``runs/UNIT.json``), if readable."""
    try:
        config = json.loads(Path(checkpoint).with_suffix(".json").read_text(encoding="utf-8"))["config"]
        return config if all(isinstance(config.get(k), (str, dict)) for k in ("name", "task", "model")) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_checkpoint_fits(path: str, state: dict, model: torch.nn.Module, preset_name: str,
                          config: ExperimentConfig) -> None:
    """``ValueError`` when ``state`` is not a state dict of ``model``, saying which experiment saved
    it (from its run file) and which ``--preset``/``--config`` diagnoses it."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {k: tuple(v.shape) for k, v in state.items()} == expected:
        return
    built = f"--preset {preset_name} builds {config.task} / {config.model} {config.model_options}"
    saved = saved_config(path)
    if saved is not None:
        config_file = Path(path).parent.parent / "config.yaml"  # OUT/runs/UNIT.pt -> OUT/config.yaml
        use = f"--preset {saved['name']}" if saved["name"] in PRESETS else f"--config {config_file}"
        raise ValueError(f"Invalid checkpoint: {path!r} (it was saved by the experiment {saved['name']!r}, "
                         f"{saved['task']} / {saved['model']} {saved.get('model_options', {})}; {built}: use {use})")
    missing = sorted(set(expected) - set(state))[:3]
    other = sorted(k for k in state if k not in expected or tuple(state[k].shape) != expected[k])[:3]
    raise ValueError(f"Invalid checkpoint: {path!r} (expected a state dict of the model {built}; missing "
                     f"{missing or 'none'}, not fitting {other or 'none'}: pass the --preset or --config it was "
                     "trained with)")


def _fill(text: str, width: int, first: str = "", rest: str = "") -> str:
    return textwrap.fill(text, width, initial_indent=first, subsequent_indent=rest, break_long_words=False,
                         break_on_hyphens=False)


def _entry(name: str, text: str, width: int) -> str:
    """``  name             text`` with ``text`` wrapped to ``width``, continued under itself."""
    head = f"  {name:<16} "
    if len(head) > 19:  # a long name: the text on the next lines
        return head.rstrip() + "\n" + _fill(text, width, " " * 19, " " * 19)
    return _fill(text, width, head, " " * len(head))


def list_command(args: Optional[argparse.Namespace] = None) -> int:
    """``flatminima list``: methods and their hyperparameters, tuned settings, tasks, models,
    presets; every description whole, wrapped to the terminal's width."""
    width = max(60, shutil.get_terminal_size().columns - 1)
    lines = ["methods (flatminima.create(name, base, **hyperparameters)):"]
    for name in _methods.available():
        params = inspect.signature(_methods.get(name).__init__).parameters
        own = [f"{p.name}={p.default!r}" for p in params.values()
               if p.name not in ("self", "base", "common", "model") and p.default is not inspect.Parameter.empty]
        lines.append(_entry(name, ("model (required), " if "model" in params else "") + (", ".join(own) or "-"), width))
    lines.append(_fill(f"common to all: {', '.join(_methods.COMMON)}", width, "  ", "    "))
    lines.append("tuned experiment settings (labels accepted by `run --methods`):")
    lines += [_entry(label, str(settings or "(base optimizer)"), width) for label, settings in DEFAULT_METHODS.items()]
    lines.append("tuned settings of the LoRA text task (preset text):")
    lines += [_entry(label, str(settings), width) for label, settings in TEXT_METHODS.items()]
    for title, names in (("tasks", available_tasks()), ("task sequences (continual)", available_sequences()),
                         ("models", available_models())):
        lines.append(_fill(f"{title}: {', '.join(names)}", width, "", "    "))
    lines.append("presets:")
    lines += [_entry(name, " ".join((make.__doc__ or "").split()), width) for name, make in PRESETS.items()]
    lines += [_entry(name, f"runs {' then '.join(parts)}", width) for name, parts in SUITES.items()]
    print("\n".join(lines))
    return 0
