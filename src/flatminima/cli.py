"""Command line: ``flatminima run`` (the main experiment) and ``flatminima list`` (what is available).

    flatminima run --preset quick --methods sgd,sam --seeds 0,1 --out /tmp/fm
    flatminima run --config configs/default.json
    flatminima run --preset text
    flatminima list
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Optional, Sequence

from . import methods as _methods


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
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a model with several methods over several seeds and report")
    run.add_argument("--preset", default="default", help="quick (digits, seconds), default (Fashion-MNIST, "
                     "minutes on a CPU), text (LoRA on MiniLM, VADER movie snippets) or full (all of "
                     "Fashion-MNIST, for a GPU); default: %(default)s")
    run.add_argument("--config", help="JSON file of config fields, applied on top of the preset")
    run.add_argument("--out", help="output folder (default: the config's out_dir)")
    run.add_argument("--methods", type=_csv_list, help="comma-separated method labels, e.g. sgd,sam,asam,gasam")
    run.add_argument("--seeds", type=_seed_list, help="comma-separated seeds, e.g. 0,1,2")
    run.add_argument("--epochs", type=int, help="epochs per run")
    run.add_argument("--device", help="auto, cpu or cuda[:N]")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="show a progress bar (default: when stderr is a terminal)")
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
    from .experiment import ExperimentConfig, preset, run_experiment

    config = preset(args.preset)
    if args.config:
        config = ExperimentConfig.load(args.config, base=config)
    overrides = {}
    if args.methods:
        overrides["methods"] = _select_methods(config, args.methods)
    for key in ("seeds", "epochs", "device"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.out:
        overrides["out_dir"] = args.out
    config = ExperimentConfig.from_dict(overrides, base=config)
    run_experiment(config, progress=args.progress)
    return 0


def _list() -> int:
    from .data import available_tasks
    from .experiment import DEFAULT_METHODS, PRESETS, TEXT_METHODS, available_models

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
    print(f"models: {', '.join(available_models())}")
    print(f"presets: {', '.join(PRESETS)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args) if args.command == "run" else _list()
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"flatminima: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
