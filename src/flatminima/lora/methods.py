"""The LoRA methods: Flat-LoRA (noise on the merged weight) and SAM-LoRA (SAM on the factors)."""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..core.combine import MixGradient
from ..core.schedules import Cosine
from ..core.shell import FlatOptimizer
from ..core.validation import check, check_fraction
from ..methods import SAM, register
from .layers import lora_parameters
from .noise import MergedWeightNoise


def _ramp(total_steps: Optional[int], schedule):
    """Flat-LoRA's ``½(1 − cos(πt/T))`` ramp from 0 to 1 unless a schedule is given."""
    if schedule is None and total_steps is not None:
        return Cosine(total_steps, 0.0, 1.0)
    return schedule


class FlatLoRA(FlatOptimizer):
    """Flat-LoRA (Li et al., 2024): the Bayes objective ``E_ε L(W0 + s·BA + ε)`` on the merged
    weight, ``ε_{ij} ~ N(0, ρ_t²‖W'_{i,:}‖²/n_in)``, ``ρ_t = ρ·½(1 − cos(πt/T))`` over
    ``total_steps = T`` (constant ρ without T), ``W' = W0 + Σ_active s·P(BA)`` the weight a LoRA layer
    computes with. ``model``: the model whose LoRA factors the base optimizer trains; its LoRA layers
    are those :func:`~flatminima.lora.lora_layers` reads (PEFT's ``LoraLayer``,
    :class:`~flatminima.lora.QKVLoRA` with its Q/V slices of a fused ``qkv``, the classes registered with
    :func:`~flatminima.lora.register_lora_layer`). Refused: LoRA variants (DoRA, a LoRA bias, grouped
    convolutions) and base weights that require grad. The frozen base weights are never written (bit-identical after any
    number of steps, bf16 included) and no weight-sized buffer is kept. Cost: 1 fb (+ the noise,
    made twice per layer: forward and backward).

    Variants are options: ``noise`` (``"flatlora"``, ``"filter"``, ``"matrix"``,
    ``"uniform"`` scales of the merged weight), ``whole_model=True`` (every frozen linear, convolution
    and embedding layer too)
    and ``noisy_weight = λ < 1`` (the m-RWP mix ``λ·g_noisy + (1 − λ)·g_clean``, 2 fb).
    Noise on the LoRA factors only is ``fm.RWP``/``fm.MRWP`` with ``scope=lora_parameters(model)``.
    ``kernel`` picks the noisy-weight kernel (:func:`~.noise.noisy_weight`).
    """

    def __init__(self, base, model: nn.Module, rho: float = 0.05, noise: str = "flatlora",
                 whole_model: bool = False, noisy_weight: float = 1.0, schedule=None, total_steps=None,
                 kernel: str = "auto", **common):
        check_fraction("noisy_weight", noisy_weight)
        perturbation = MergedWeightNoise(model, noise, whole_model, kernel)
        combination = MixGradient(float(noisy_weight)) if noisy_weight < 1.0 else None
        super().__init__(base, perturbation=perturbation, combination=combination, strength=rho,
                         schedule=_ramp(total_steps, schedule), total_steps=total_steps, **common)


class SAMLoRA(SAM):
    """SAM on the LoRA factors: ``ε_A = ρ·g_A/‖g_A‖``, ``ε_B = ρ·g_B/‖g_B‖`` for every
    A and B (``normalization="per_tensor"``; ``"global"`` normalizes them together), of the adapters
    called ``adapter`` (default: the active ones) of every LoRA layer of ``model``
    (:func:`~flatminima.lora.lora_parameters`). Cost: 2 fb."""

    def __init__(self, base, model: nn.Module, rho: float = 0.05, norm=2, normalization: str = "per_tensor",
                 adapter: Optional[str] = None, **common):
        check("scope", "scope" not in common, "scope", "no scope: SAM-LoRA's scope is the LoRA factors")
        super().__init__(base, rho=rho, norm=norm, normalization=normalization,
                         scope=lora_parameters(model, adapter), **common)


register("flatlora", "flat-lora")(FlatLoRA)
register("samlora", "sam-lora")(SAMLoRA)
