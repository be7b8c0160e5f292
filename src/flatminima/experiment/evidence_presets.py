"""Presets sized to the regime a paper's claim is about, at CPU size, each with its GPU-size twin.

* ``label_noise_{0,40,60}`` (the suite ``label_noise``): SAM's robustness to label noise (Foret et
  al., ICLR 2021, §3.3; Andriushchenko & Flammarion, ICML 2022, §4) appears once plain SGD has
  memorized the wrong labels, so the model must be able to: a small CNN with a hidden layer in its
  head on a fixed 2,000 Fashion-MNIST images, trained 40 epochs, where SGD fits more than 95 % of
  the noisy labels.
* ``long_schedule``: the m-RWP comparison (Li et al., TMLR 2024, Table 1 and Table A1: SGD, SAM,
  RWP, m-RWP and the two-batch variants) at the papers' 200 epochs, on a model small enough for a
  CPU.

Flat-LoRA is absent from both: it perturbs the merged weight of a frozen pretrained model with a
LoRA adapter, and no LoRA setting fits a CNN trained from scratch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from .config import ExperimentConfig

#: The label-noise comparison: SGD, SAM at three radii, m-RWP, RWP, GA-SAM on the whole model.
LABEL_NOISE_METHODS: dict[str, dict[str, Any]] = {
    "sgd": {},
    "sam": {"rho": 0.05},
    "sam-rho0.1": {"method": "sam", "rho": 0.1},
    "sam-rho0.2": {"method": "sam", "rho": 0.2},
    "mrwp": {"sigma": 0.015, "noisy_weight": 0.5},
    "rwp": {"sigma": 0.01},
    "gasam": {"epsilon": 0.01, "steps": 1, "granularity": "model"},
}

#: m-RWP's Table 1 / A1 methods and hyperparameters (``-2b``: the two-step methods on two batches).
LONG_SCHEDULE_METHODS: dict[str, dict[str, Any]] = {
    "sgd": {},
    "sam": {"rho": 0.05},
    "rwp": {"sigma": 0.01},
    "mrwp": {"sigma": 0.015, "noisy_weight": 0.5},
    "sam-2b": {"method": "sam", "rho": 0.05, "different_batches": True},
    "mrwp-2b": {"method": "mrwp", "sigma": 0.015, "noisy_weight": 0.5, "different_batches": True},
}


#: The paper's claims between methods: m-RWP against SAM and RWP (Table 1), each two-batch variant
#: against its one-batch method (Table A1).
LONG_SCHEDULE_PAIRS = (("mrwp", "sam"), ("mrwp", "rwp"), ("sam-2b", "sam"), ("mrwp-2b", "mrwp"))
#: SAM at the larger radii against SAM at ρ = 0.05 and against m-RWP under noise.
LABEL_NOISE_PAIRS = (("sam-rho0.1", "sam"), ("sam-rho0.2", "sam"), ("sam-rho0.1", "mrwp"))


def _label_noise(noise: float) -> ExperimentConfig:
    """Fashion-MNIST, a fixed 2,000 training images with ``noise`` of their labels replaced by
    another class (symmetric noise; the 10,000 test images clean), SmallCNN of width 8 with a
    hidden layer of 256 in its head, 40 epochs of 15 steps (batch 128, SGD lr 0.05, momentum 0.9,
    weight decay 5e-4, cosine decay), 5 seeds; test and training-label accuracy every 5 epochs,
    λ_max and the Hessian trace at the end on 512 test images."""
    level = round(100 * noise)
    return ExperimentConfig(
        name=f"label_noise_{level}", task="fashion_mnist", model="cnn", model_options={"width": 8, "head_hidden": 256},
        methods={k: dict(v) for k, v in LABEL_NOISE_METHODS.items()}, seeds=[0, 1, 2, 3, 4], epochs=40, batch_size=128,
        lr=0.05, momentum=0.9, weight_decay=5e-4, lr_schedule="cosine", train_subset=2000, label_noise=noise,
        eval_train=True, eval_every=75, eval_batch_size=2000, out_dir=f"results/label_noise/label_noise_{level}",
        diagnostics=["hessian", "trace"], diagnostics_samples=512, compare=[list(p) for p in LABEL_NOISE_PAIRS])


def _label_noise_gpu(noise: float) -> ExperimentConfig:
    """The label-noise comparison for a GPU, ``noise`` of the labels wrong: all 60,000 training
    images, SmallCNN of width 32 with a hidden layer of 512, 100 epochs of 468 steps, λ_max and
    trace on 2,048 test images."""
    level = round(100 * noise)
    return replace(_label_noise(noise), name=f"label_noise_gpu_{level}", model_options={"width": 32,
                                                                                         "head_hidden": 512},
                   epochs=100, train_subset=None, eval_every=4680, eval_batch_size=5000, device="cuda",
                   out_dir=f"results/label_noise_gpu/label_noise_gpu_{level}", diagnostics_samples=2048)


def _preset_long_schedule() -> ExperimentConfig:
    """m-RWP's Table 1 / A1 comparison at its 200 epochs: Fashion-MNIST, a fixed 2,000 training
    images (all 10,000 test ones), SmallCNN of width 8 with a hidden layer of 128 in its head,
    200 epochs of 15 steps (batch 128, SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine decay),
    SAM ρ 0.05, RWP σ 0.01, m-RWP σ 0.015 λ 0.5, and SAM / m-RWP on two batches, 3 seeds; λ_max and
    the trace at the end on 512 test images."""
    return ExperimentConfig(
        name="long_schedule", task="fashion_mnist", model="cnn", model_options={"width": 8, "head_hidden": 128},
        methods={k: dict(v) for k, v in LONG_SCHEDULE_METHODS.items()}, seeds=[0, 1, 2], epochs=200,
        batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, lr_schedule="cosine", train_subset=2000,
        eval_train=True, eval_every=300, eval_batch_size=2000, out_dir="results/long_schedule",
        diagnostics=["hessian", "trace"], diagnostics_samples=512, compare=[list(p) for p in LONG_SCHEDULE_PAIRS])


def _preset_long_schedule_gpu() -> ExperimentConfig:
    """m-RWP's comparison at the paper's length on a GPU: ResNet-18 (CIFAR-style, width 32) over
    all of Fashion-MNIST, 200 epochs of 234 steps (batch 256, lr 0.1, weight decay 1e-3), the
    paper's hyperparameters, 3 seeds, diagnostics on 2,048 test images."""
    return replace(_preset_long_schedule(), name="long_schedule_gpu", model="resnet18", model_options={"width": 32},
                   batch_size=256, lr=0.1, weight_decay=1e-3, train_subset=None, eval_every=2340,
                   eval_batch_size=2000, device="cuda", out_dir="results/long_schedule_gpu",
                   diagnostics_samples=2048)


#: The noise levels of the label-noise suites.
NOISE_LEVELS = (0.0, 0.4, 0.6)


def _member(make: Callable[[float], ExperimentConfig], noise: float) -> Callable[[], ExperimentConfig]:
    """The preset of one noise level, its docstring (what ``flatminima list`` prints) saying which."""
    def build() -> ExperimentConfig:
        return make(noise)

    build.__doc__ = (make.__doc__ or "").replace("``noise``", f"{round(100 * noise)} %")
    return build


EVIDENCE_PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
    **{f"label_noise_{round(100 * p)}": _member(_label_noise, p) for p in NOISE_LEVELS},
    **{f"label_noise_gpu_{round(100 * p)}": _member(_label_noise_gpu, p) for p in NOISE_LEVELS},
    "long_schedule": _preset_long_schedule, "long_schedule_gpu": _preset_long_schedule_gpu}

#: ``label_noise`` runs the three noise levels in turn, each into ``<out>/label_noise_<level>``.
EVIDENCE_SUITES: dict[str, tuple[str, ...]] = {
    "label_noise": tuple(f"label_noise_{round(100 * p)}" for p in NOISE_LEVELS),
    "label_noise_gpu": tuple(f"label_noise_gpu_{round(100 * p)}" for p in NOISE_LEVELS)}
