"""Class-incremental presets on image folders: the users' settings at GPU size (``imagenet_r_20``,
``cifar100_10``, ``cub_20``, ``domainnet_5``: their data from ``--data-root``) and a CPU-size one
on data installed offline (``continual_images``)."""

from __future__ import annotations

from typing import Any

from .config import ExperimentConfig

#: The flat methods compared in every task (the base optimizer's settings are the preset's).
CI_METHODS: dict[str, dict[str, Any]] = {
    "sgd": {}, "sam": {"rho": 0.05}, "rwp": {"sigma": 0.005}, "flatlora": {"rho": 0.05}, "gam": {"rho": 0.05},
    "cflat": {"rho": 0.05}}
#: The continual strategies at GPU size: sequential LoRA and its baselines, the PEFT lifecycles
#: (a new adapter per task: incremental, O-LoRA, N-LoRA, InfLoRA).
CI_STRATEGIES = ["seq-lora", "seq-lora+ewc", "seq-lora+lwf", "seq-lora+replay", "seq-lora+agem", "seq-lora+gpm",
                 "inc-lora", "o-lora", "n-lora", "inc-lora+inflora"]
CI_OPTIONS: dict[str, dict[str, Any]] = {
    "o-lora": {"orth_weight": 0.5, "l2_weight": 0.0}, "n-lora": {"l1_weight": 1e-4}, "ewc": {"weight": 100.0},
    "replay": {"size": 2000}, "agem": {"per_task": 256, "batch_size": 128},
    "gpm": {"exclude": ["head"]}}  # the shared head must learn each task's new classes
#: Per-task flatness at GPU size: λ_max and trace in the LoRA subspace and the full model, the line.
GPU_FLATNESS = {"quantities": ["lambda_max", "trace", "line"], "spaces": ["lora", "all"], "batches": 4,
                "iterations": 20, "line_points": 11}


def _vit_b16(dataset: str, init_cls: int, increment: int, epochs: int, **task_options: Any) -> ExperimentConfig:
    """A pretrained ViT-B/16 (timm's weights from the Hugging Face cache) with PEFT LoRA (r 8) on every
    block's qkv, the head trained, 224 × 224 inputs with random-resized-crop and flip; Adam (lr 5e-4,
    batch 128, cosine per task, as InfLoRA, Liang & Li, CVPR 2024), 5 seeds, every flat method ×
    every strategy, task-aware, class-incremental and NME evaluation, per-task flatness."""
    return ExperimentConfig(
        name=f"{dataset}_{init_cls}x{increment}", task=dataset,
        task_options={"init_cls": init_cls, "increment": increment, "image_size": 224, "workers": 8,
                      "class_order_seed": 1993, **task_options},
        model="vit_peft_lora", model_options={"arch": "vit_base_patch16_224", "checkpoint": "hf-cache", "r": 8,
                                              "alpha": 16},
        methods={k: dict(v) for k, v in CI_METHODS.items()}, seeds=[0, 1, 2, 3, 4], epochs=epochs, batch_size=128,
        optimizer="adamw", lr=5e-4, momentum=0.9, weight_decay=0.0, eval_every=10_000, eval_batch_size=256,
        device="cuda", diagnostics_samples=256,
        out_dir=f"results/{dataset}", continual={
            "strategies": list(CI_STRATEGIES), "strategy_options": {k: dict(v) for k, v in CI_OPTIONS.items()},
            "scenario": "class", "evaluation": ["class", "task", "nme"], "flatness": dict(GPU_FLATNESS)})


def _preset_imagenet_r_20() -> ExperimentConfig:
    """ImageNet-R (200 classes, a seeded 80/20 split of its 30,000 images) in 20 tasks of 10 classes, 50 epochs per task."""
    return _vit_b16("imagenet_r", 10, 10, 50)


def _preset_cifar100_10() -> ExperimentConfig:
    """CIFAR-100 (the python pickles) in 10 tasks of 10 classes, 20 epochs per task."""
    return _vit_b16("cifar100", 10, 10, 20)


def _preset_cub_20() -> ExperimentConfig:
    """CUB-200-2011 (its train/test split files) in 20 tasks of 10 classes, 20 epochs per task."""
    return _vit_b16("cub", 10, 10, 20)


def _preset_domainnet_5() -> ExperimentConfig:
    """DomainNet (345 classes over the six domains, its split files) in 5 tasks of 69 classes, 5 epochs per task."""
    return _vit_b16("domainnet", 69, 69, 5)


def _preset_continual_images() -> ExperimentConfig:
    """The class-incremental pipeline at CPU size, on real data installed offline: Fashion-MNIST
    written once as PNG files (200 training and 100 test images per class) and streamed from disk,
    5 tasks of 2 classes (seeded class order), a LoRA ResNet (width 8, two stages, r 4, the head
    trained), SGD, SAM, Flat-LoRA and C-Flat × sequential LoRA, O-LoRA, sequential LoRA + EWC and
    + replay, 2 epochs per task, 1 seed; task-aware, class-incremental and NME accuracy matrices and
    the per-task flatness (λ_max and trace in the LoRA subspace and the full model, the line
    between checkpoints) on 50 test images per task, 8 Lanczos steps and Hutchinson probes: under 10
    minutes on 2 CPU cores."""
    return ExperimentConfig(
        name="continual_images", task="fashion_folder",
        task_options={"init_cls": 2, "increment": 2, "image_size": 28, "train_per_class": 200, "test_per_class": 100,
                      "class_order_seed": 0},
        model="resnet_lora", model_options={"width": 8, "blocks": [1, 1], "r": 4},
        methods={"sgd": {}, "sam": {"rho": 0.05}, "flatlora": {"rho": 0.05}, "cflat": {"rho": 0.05}}, seeds=[0],
        epochs=2, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4, eval_every=25, eval_batch_size=100,
        diagnostics_samples=50, out_dir="results/continual_images", continual={
            "strategies": ["seq-lora", "o-lora", "seq-lora+ewc", "seq-lora+replay"],
            "strategy_options": {"o-lora": {"orth_weight": 0.5}, "ewc": {"weight": 1.0}, "replay": {"size": 200}},
            "scenario": "class", "evaluation": ["class", "task", "nme"],
            "flatness": {"quantities": ["lambda_max", "trace", "line"], "spaces": ["lora", "all"], "batches": 1,
                         "iterations": 8, "line_points": 5}})


CONTINUAL_PRESETS = {"imagenet_r_20": _preset_imagenet_r_20, "cifar100_10": _preset_cifar100_10,
                     "cub_20": _preset_cub_20, "domainnet_5": _preset_domainnet_5,
                     "continual_images": _preset_continual_images}
