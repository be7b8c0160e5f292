"""The experiment config (:class:`ExperimentConfig`): fields, loading from YAML/JSON, validation."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch

from .. import methods as _methods
from .._extras import require
from ..core.validation import (check, check_choice, check_int, check_nonnegative, check_positive, check_range,
                               is_int)
from ..continual.tasks import SEQUENCES
from ..data import available_tasks, task_loader
from ..lora import support_from_spec
from .continual_settings import ContinualSettings
from .models import MODEL_OPTION_CHECKS, MODELS, dummy_lora_model, available_models


#: Keys of a method entry that configure the base optimizer rather than the method.
BASE_KEYS = ("optimizer", "lr", "momentum", "weight_decay")
OPTIMIZERS = ("sgd", "adamw")
#: The loggers the field ``loggers`` accepts (:mod:`flatminima.experiment.loggers`).
LOGGERS = ("tensorboard", "mlflow", "wandb")
LR_SCHEDULES = ("cosine", "constant")


#: Method settings of the presets, also used when ``--methods`` names a method the config lacks.
#: SAM's ρ is the paper's; ASAM's ρ = 0.5 trained better than 1.0 and 2.0 on digits and
#: Fashion-MNIST; GA-SAM's ε = 0.01 (the paper's) trained like SGD, where 0.03–0.3 fell behind
#: (its perturbation grows as the layer gradients shrink). Random perturbations (filter-scaled
#: noise; 8 epochs of the default task, 1 seed): RWP σ = 0.005 trained like SGD, 0.01 and 0.05
#: fell behind; m-RWP σ = 0.015 (the paper's) beat 0.03; LPF-SGD σ = 0.001 beat 0.005, with 4
#: chunks of the batch (the paper's 8 make 16-image chunks of a 128 batch).
DEFAULT_METHODS: dict[str, dict[str, Any]] = {
    "sgd": {},
    "sam": {"rho": 0.05},
    "asam": {"rho": 0.5, "eta": 0.01},
    "gasam": {"epsilon": 0.01, "steps": 1, "granularity": "layer"},
    "rwp": {"sigma": 0.005},
    "mrwp": {"sigma": 0.015, "noisy_weight": 0.5},
    "lpfsgd": {"sigma": 0.001, "samples": 4},
}


#: Per-run diagnostics the experiment can compute (:mod:`flatminima.diagnostics.report`), and
#: ``"interpolation"`` between the reference method's model and each other method's.
RUN_DIAGNOSTICS = ("hessian", "trace", "density", "batch_hessian", "sharpness", "average_sharpness", "robustness",
                   "curve", "landscape_1d", "landscape_2d", "interpolation")
#: Settings for the per-run diagnostics: cheap enough to run after every unit.
RUN_DIAGNOSTIC_OPTIONS = {"hessian": {"k": 1, "tol": 1e-3}, "trace": {"probes": 20, "rtol": 0.05, "min_probes": 10},
                          "sharpness": {"rho": 0.05, "steps": 5}, "average_sharpness": {"sigma": 0.01, "samples": 8}}


#: Seeds go to ``torch.manual_seed`` and into derived seeds (``seed · 1000 + task``): 32 bits keep
#: every derived seed far inside the 64 bits torch accepts.
MAX_SEED = 2**32 - 1

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class ExperimentConfig:
    """Everything one experiment needs; JSON round-trips through :meth:`to_dict` / :meth:`from_dict`.

    ``methods`` maps a label to its settings: the registry name (``"method"``, default: the label),
    base-optimizer overrides (``optimizer``, ``lr``, ``momentum`` (β₁ for ``adamw``), ``weight_decay``) and the
    method's own hyperparameters (``rho``, ``epsilon``, ...). ``batch_size`` is the number of
    examples per optimizer step, split into ``accumulation_steps`` micro-batches (``accumulation``:
    the engine's ``"last"`` or ``"full"``). ``eval_every`` is in optimizer steps; evaluation also
    runs at step 0 and at the end. ``train_subset`` keeps a fixed random part of the training set;
    ``label_noise`` replaces that share of its labels by other classes (symmetric noise, the same
    examples in every unit: :meth:`~flatminima.data.Dataset.with_label_noise`); ``eval_train`` also
    evaluates on the training set (the labels trained on, and with noise the share of corrupted
    labels the model reproduces) at every evaluation.
    A method entry may hold ``"grid": {"rho": [0.02, 0.05]}``: one method per combination, labelled
    ``sam-rho0.02``, ... (:meth:`expanded_methods`). ``continual`` (a
    :class:`~flatminima.experiment.continual_settings.ContinualSettings` mapping) makes ``task`` a task *sequence*
    trained task after task, per strategy and task order. ``tensorboard``: write scalars (None: when
    ``tensorboard`` is installed); ``loggers``: where else they go (:mod:`~flatminima.experiment.loggers`:
    ``tensorboard``, ``mlflow``, ``wandb``). ``compare``: pairs ``[label, other]`` of method labels
    compared on common seeds in the report, beside every method against the base optimizer
    (:mod:`~flatminima.experiment.comparisons`). Every field is described in ``docs/configuration.md``.
    """

    name: str = "custom"
    task: str = "digits"
    task_options: dict[str, Any] = field(default_factory=dict)
    model: str = "mlp"
    model_options: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_METHODS.items()})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 10
    batch_size: int = 64
    accumulation_steps: int = 1
    accumulation: str = "last"
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    train_subset: Optional[int] = None
    label_noise: float = 0.0
    eval_train: bool = False
    eval_every: int = 50
    eval_batch_size: int = 1000
    device: str = "auto"
    out_dir: str = "results/custom"
    diagnostics: list[str] = field(default_factory=list)
    diagnostics_samples: int = 512
    save_models: bool = False
    continual: Optional[dict[str, Any]] = None
    tensorboard: Optional[bool] = None
    loggers: list[str] = field(default_factory=list)
    compare: list[list[str]] = field(default_factory=list)

    # -- (de)serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: Optional["ExperimentConfig"] = None) -> "ExperimentConfig":
        """A validated config from ``values`` (unknown keys are an error), on top of ``base``."""
        check("config", isinstance(values, dict), type(values).__name__, "a mapping of fields (a YAML or JSON object)")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known), key=str)
        check("config field", not unknown, unknown[0] if unknown else None, f"one of {', '.join(known)}")
        merged = {**(base or cls()).to_dict(), **values}
        if isinstance(merged.get("seeds"), tuple):
            merged["seeds"] = list(merged["seeds"])
        return cls(**merged).validate()

    @classmethod
    def load(cls, path: os.PathLike | str, base: Optional["ExperimentConfig"] = None) -> "ExperimentConfig":
        """A config file: YAML (``.yaml``/``.yml``, needs PyYAML) or JSON (``.json``), UTF-8, on top
        of ``base``. ``ValueError`` naming the file for any other suffix, a folder, an unreadable
        or binary file, or a parse error."""
        formats = "a YAML (.yaml, .yml) or JSON (.json) file"
        suffix = Path(path).suffix.lower()
        check("config", suffix in (".yaml", ".yml", ".json"), str(path), formats)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"Invalid config: {str(path)!r} (expected {formats}: it is not UTF-8 text)") from None
        except OSError as exc:
            raise ValueError(f"Invalid config: {str(path)!r} (expected {formats} that can be read: "
                             f"{exc.strerror or exc})") from None
        if suffix == ".json":
            try:
                values = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON: {exc}") from None
        else:
            yaml = require("yaml", "experiments", f"reading the YAML config {path} (or write it as JSON)")
            try:
                values = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_dict(values, base)

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> "ExperimentConfig":
        """Raise ``ValueError`` naming the first bad field and its accepted values; return self."""
        # ``name`` is a label (titles, tables); it never becomes a path (suite members write into
        # folders named after their preset), so any one-line text is accepted.
        check("name", isinstance(self.name, str) and self.name.strip() != "" and self.name.isprintable(),
              self.name, "a non-empty one-line string")
        if self.continual is not None:
            self.continual = ContinualSettings.from_dict(self.continual).to_dict()
            check("task", self.task in SEQUENCES, self.task,
                  f"a task sequence (continual is set): one of {', '.join(SEQUENCES.names())}")
            loader = SEQUENCES.get(self.task)
        else:
            check("task", self.task in available_tasks(), self.task, f"one of {', '.join(available_tasks())}")
            loader = task_loader(self.task)
        check("model", self.model in available_models(), self.model, f"one of {', '.join(available_models())}")
        for key, fn in (("task_options", loader), ("model_options", MODELS.get(self.model))):
            options = getattr(self, key)
            check(key, isinstance(options, dict), options, "a mapping of keyword arguments")
            params = [p for p in inspect.signature(fn).parameters if p != "data"]
            unknown = sorted(set(options) - set(params), key=str)
            check(f"{key} key", not unknown, unknown[0] if unknown else None, f"one of {', '.join(params)}")
        for option, value in self.model_options.items():
            if option in MODEL_OPTION_CHECKS:
                MODEL_OPTION_CHECKS[option](f"model_options.{option}", value)
        check("seeds", isinstance(self.seeds, list) and len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds)
              and all(is_int(s) and 0 <= s <= MAX_SEED for s in self.seeds), self.seeds,
              f"a non-empty list of distinct ints in [0, {MAX_SEED}]")
        for key in ("epochs", "batch_size", "accumulation_steps", "eval_every", "eval_batch_size"):
            check_int(key, getattr(self, key), 1)
        check("accumulation_steps", self.batch_size % self.accumulation_steps == 0, self.accumulation_steps,
              f"a divisor of batch_size ({self.batch_size})")
        check_choice("accumulation", self.accumulation, ("last", "full"))
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check("train_subset", self.train_subset is None or (is_int(self.train_subset)
                                                            and self.train_subset >= self.batch_size),
              self.train_subset, f"None or an int >= batch_size ({self.batch_size})")
        check_range("label_noise", self.label_noise, 0.0, 1.0, high_open=True)
        check("eval_train", isinstance(self.eval_train, bool), self.eval_train, "true or false")
        for key in ("label_noise", "eval_train"):
            check(key, self.continual is None or not getattr(self, key), getattr(self, key),
                  "its default in a continual experiment (it applies to a single task)")
        check("device", isinstance(self.device, str) and _DEVICE.fullmatch(self.device) is not None, self.device,
              "'auto', 'cpu', 'cuda' or 'cuda:N' with N >= 0")
        check("out_dir", isinstance(self.out_dir, str) and self.out_dir != "", self.out_dir, "a folder path")
        _check_base_settings(self.base_settings())
        check("diagnostics", isinstance(self.diagnostics, list) and all(d in RUN_DIAGNOSTICS for d in self.diagnostics),
              self.diagnostics, f"a list of: {', '.join(RUN_DIAGNOSTICS)}")
        check_int("diagnostics_samples", self.diagnostics_samples, 1)
        check("save_models", isinstance(self.save_models, bool), self.save_models, "true or false")
        check("tensorboard", self.tensorboard is None or isinstance(self.tensorboard, bool), self.tensorboard,
              "null (when installed), true or false")
        check("loggers", isinstance(self.loggers, list) and all(isinstance(n, str) and n in LOGGERS
                                                                for n in self.loggers)
              and len(set(self.loggers)) == len(self.loggers), self.loggers,
              f"a list of distinct names from: {', '.join(LOGGERS)}")
        check("loggers", not (self.tensorboard is False and "tensorboard" in self.loggers), self.loggers,
              "no tensorboard while the field tensorboard is false")
        check("methods", isinstance(self.methods, dict) and len(self.methods) > 0, self.methods,
              "a non-empty mapping of method label to settings")
        for label in self.expanded_methods():
            check("method label", isinstance(label, str) and re.fullmatch(r"[\w.+-]+", label) is not None, label,
                  "letters, digits and _ . + - (it names the run files)")
            name, _, hyper = self.method_spec(label)
            groups = batch_groups(name, hyper)
            check(f"methods.{label}: batch_size", self.batch_size % (self.accumulation_steps * groups) == 0,
                  self.batch_size, f"a multiple of accumulation_steps × the method's {groups} batch groups "
                  f"({self.accumulation_steps * groups})")
        labels = list(self.expanded_methods())
        check("compare", isinstance(self.compare, list) and all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) and x in labels for x in pair)
            and pair[0] != pair[1] for pair in self.compare), self.compare,
            f"a list of [label, other label] pairs of the config's methods ({', '.join(labels)})")
        return self

    def base_settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in BASE_KEYS}

    def expanded_methods(self) -> dict[str, dict[str, Any]]:
        """``methods`` with every ``"grid"`` entry expanded: one label per combination of the grid's
        values, ``<label>-<name><value>...`` (in the grid's order), the other settings shared."""
        expanded: dict[str, dict[str, Any]] = {}
        for label, settings in self.methods.items():
            grid = settings.get("grid") if isinstance(settings, dict) else None
            if grid is None:
                expanded[label] = settings
                continue
            check(f"methods.{label}.grid", isinstance(grid, dict) and len(grid) > 0
                  and all(isinstance(v, list) and v for v in grid.values()), grid,
                  "a mapping of hyperparameter name to a non-empty list of values")
            fixed = {"method": label, **{k: v for k, v in settings.items() if k != "grid"}}
            for values in itertools.product(*grid.values()):
                name = "-".join([label] + [f"{k}{v}" for k, v in zip(grid, values)])
                check(f"methods.{label}.grid", name not in expanded, grid,
                      f"values that give distinct labels ({name} twice)")
                expanded[name] = {**fixed, **dict(zip(grid, values))}
        return expanded

    def method_spec(self, label: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """``(registry name, base-optimizer settings, method hyperparameters)`` of method ``label``,
        validated by building the method on a dummy parameter."""
        settings = self.expanded_methods()[label]
        check(f"methods.{label}", isinstance(settings, dict), settings, "a mapping of settings")
        hyper = {k: v for k, v in settings.items() if k not in BASE_KEYS and k != "method"}
        base = {**self.base_settings(), **{k: v for k, v in settings.items() if k in BASE_KEYS}}
        prefix = f"methods.{label}: "
        try:
            name = _methods.get(settings.get("method", label)).method_name  # canonical: "sgd" -> "base"
            _check_base_settings(base)
            checked = {k: v for k, v in hyper.items() if k != "support"}
            if _methods.needs_model(name) or "support" in hyper:  # validate on a one-layer LoRA model
                dummy_model = dummy_lora_model()
                dummy = torch.optim.SGD([p for p in dummy_model.parameters() if p.requires_grad], lr=0.1)
                extra = {"model": dummy_model} if _methods.needs_model(name) else {}
                if "support" in hyper:
                    extra["scope"] = support_from_spec(dummy_model, hyper["support"])
                _methods.create(name, dummy, **{"total_steps": 1, **extra, **checked})
            else:
                dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
                _methods.create(name, dummy, **{"total_steps": 1, **hyper})
        except (ValueError, TypeError) as exc:
            raise ValueError(prefix + str(exc)) from None
        return name, base, hyper


def batch_groups(name: str, hyper: dict[str, Any]) -> int:
    """How many groups of micro-batches a step of method ``name`` needs: LPF-SGD's ``samples`` (one
    chunk of the batch per noise draw), 2 for m-RWP with ``different_batches``, else 1."""
    if "samples" in _methods.hyperparameters(name):
        default = inspect.signature(_methods.get(name).__init__).parameters["samples"].default
        return int(hyper.get("samples", default))
    return 2 if hyper.get("different_batches") else 1


def _check_base_settings(base: dict[str, Any]) -> None:
    """The base optimizer's settings: ``optimizer``, ``lr`` > 0, ``momentum`` in [0, 1), ``weight_decay`` >= 0."""
    check_choice("optimizer", base["optimizer"], OPTIMIZERS)
    check_positive("lr", base["lr"])
    check_range("momentum", base["momentum"], 0.0, 1.0, high_open=True)
    check_nonnegative("weight_decay", base["weight_decay"])
