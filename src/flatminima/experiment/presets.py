"""The named experiments (``--preset``) and suites of them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from ..core.validation import check
from .config import DEFAULT_METHODS, ExperimentConfig
from .continual_presets import CONTINUAL_PRESETS
from .evidence_presets import EVIDENCE_PRESETS, EVIDENCE_SUITES


#: The main job's diagnostics section.
MAIN_DIAGNOSTICS = ("hessian", "trace", "sharpness", "average_sharpness", "interpolation")


#: The LoRA text task's methods (AdamW base): SAM on the LoRA parameters, m-RWP, Flat-LoRA.
TEXT_METHODS: dict[str, dict[str, Any]] = {
    "adamw": {"method": "base"},
    "sam": {"rho": 0.05},
    "mrwp": {"sigma": 0.015, "noisy_weight": 0.5},
    "flatlora": {"rho": 0.05},
}


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
    """The claims of m-RWP's paper (Li et al., TMLR 2024) on a ResNet-18 (CIFAR-style, width 32) over
    all of Fashion-MNIST, its schedule except the length (batch 256, SGD lr 0.1 with momentum 0.9
    and cosine decay, weight decay 1e-3, SAM ρ 0.05, RWP σ 0.01, m-RWP σ 0.015 and λ 0.5), and each
    two-step method on one batch and on two (Table A1; ``different_batches`` splits the batch of 256
    into two of 128): for a GPU. 7 epochs (1,638 steps) is what our GPU budget allowed (the paper:
    200); no augmentation."""
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
    """GA-SAM's comparison (Zhang et al., EMNLP 2022) on text classification, with LoRA: AdamW, SAM,
    multi-step SAM (K = 2, the defense of Zhang et al. 2021), GA-SAM (K = 1 and 2) on
    all-MiniLM-L6-v2 + LoRA over all VADER movie snippets (8,455 training, 2,113 test), 3 epochs:
    for a GPU."""
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
    "repro_fashion": _preset_repro_fashion, "repro_text": _preset_repro_text, **CONTINUAL_PRESETS,
    **EVIDENCE_PRESETS}

#: Presets that run several experiments in turn, each into ``<out>/<its name>``.
SUITES: dict[str, tuple[str, ...]] = {"default": ("fashion", "continual"), **EVIDENCE_SUITES}


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
