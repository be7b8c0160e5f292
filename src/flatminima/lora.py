"""Random perturbation of the merged LoRA weight without touching the frozen base (Flat-LoRA).

Flat-LoRA (Li et al., 2024; seed 000) perturbs the *merged* weight ``W' = W0 + s·BA`` of every
LoRA layer: ``ε = σ·Z ⊙ S`` with ``S_i = ‖W'_{i,:}‖₂/√n_in`` per output row. Adding ε to ``W0`` in
place and subtracting it afterwards drifts a bf16 base weight step after step, and keeping a copy
doubles the model. Here the base weight is never written: while the perturbed pass runs, a forward
hook on each LoRA layer adds ``x·εᵀ`` to its output, where ε is generated from a per-step seed
inside a custom autograd function and generated *again* from the same seed in the backward. Memory
stays at one layer's noise at a time, the restore is exact by construction, and the global RNG is
never used.

The LoRA layers are found from PEFT's own structure (``peft.tuners.lora.LoraLayer`` modules, their
``base_layer``, ``lora_A``/``lora_B`` per active adapter and ``scaling``), not from parameter
names. Linear LoRA layers (``nn.Linear`` bases, ``fan_in_fan_out`` included) are supported.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .methods import SAM, register
from .optim import FlatOptimizer, MixGradient, Pass, Perturbation, check
from .schedules import Cosine


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The PEFT LoRA layers of ``model`` whose base layer is an ``nn.Linear``."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("merged-weight LoRA perturbations need PEFT: pip install 'flatminima[hf]'") from exc
    return [m for m in model.modules() if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), nn.Linear)]


def _adapters(layer: nn.Module, adapter: Optional[str]) -> list[str]:
    names = list(layer.active_adapters) if adapter is None else [adapter]
    return [n for n in names if n in layer.lora_A]


def lora_parameters(model: nn.Module, adapter: Optional[str] = None, factors: str = "AB") -> list[Tensor]:
    """The LoRA factors of ``model`` from PEFT's structure: ``A`` and/or ``B`` (``factors``) of
    ``adapter`` (default: the active adapters) in every LoRA layer. A scope for SAM-LoRA, RWP on
    A/B, or any method: ``fm.SAM(base, scope=lora_parameters(model))``."""
    check("factors", factors in ("A", "B", "AB"), factors, "'A', 'B' or 'AB'")
    layers = lora_layers(model)
    if adapter is not None:
        known = sorted({n for layer in layers for n in layer.lora_A})
        check("adapter", adapter in known, adapter, f"one of {', '.join(known)}")
    params = []
    for layer in layers:
        for name in _adapters(layer, adapter):
            if "A" in factors:
                params.append(layer.lora_A[name].weight)
            if "B" in factors:
                params.append(layer.lora_B[name].weight)
    check("model", bool(params), type(model).__name__, "a PEFT model with LoRA layers")
    return params


def balancedness(model: nn.Module, adapter: Optional[str] = None) -> Tensor:
    """BAR's regularizer ``Σ_layers |‖A‖_F² − ‖B‖_F²|`` (Li et al., 2024; seed 001): add
    ``α_t·balancedness(model)`` to the loss, with any optimizer or method."""
    terms = [(layer.lora_A[n].weight.square().sum() - layer.lora_B[n].weight.square().sum()).abs()
             for layer in lora_layers(model) for n in _adapters(layer, adapter)]
    check("model", bool(terms), type(model).__name__, "a PEFT model with LoRA layers")
    return torch.stack(terms).sum()


@torch.no_grad()
def merged_weight(layer: nn.Module) -> Tensor:
    """``W' = W0 + Σ_a s_a·B_a A_a`` over the active adapters (a plain ``nn.Linear``: its weight),
    ``out × in``, in float32 (or float64)."""
    if not hasattr(layer, "get_base_layer"):
        w = layer.weight
        return w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    base = layer.get_base_layer().weight
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    w = base.to(dtype)
    if getattr(layer, "fan_in_fan_out", False):
        w = w.T
    w = w.clone()
    if not getattr(layer, "merged", False):
        for name in layer.active_adapters:
            if name in layer.lora_A:
                a, b = layer.lora_A[name].weight.to(dtype), layer.lora_B[name].weight.to(dtype)
                w.add_(b @ a, alpha=float(layer.scaling[name]))
    return w


#: Row-wise noise scales ``S`` of the merged weight (seed 000): one value per output row.
ROW_SCALES = ("flatlora", "filter", "matrix", "uniform")


@torch.no_grad()
def row_scale(layer: nn.Module, sigma: float, noise: str = "flatlora") -> Tensor:
    """``σ·S`` per output row (``out × 1``) of the merged weight ``W'``: ``‖W'_{i,:}‖₂/√n_in``
    (Flat-LoRA), ``‖W'_{i,:}‖₂`` (filter), ``‖W'‖_F`` (matrix) or 1 (uniform)."""
    w = merged_weight(layer)
    if noise == "uniform":
        return torch.full((w.shape[0], 1), float(sigma), dtype=w.dtype, device=w.device)
    if noise == "matrix":
        return (sigma * torch.linalg.vector_norm(w)).expand(w.shape[0], 1).clone()
    rows = torch.linalg.vector_norm(w, dim=1, keepdim=True)
    return rows * (sigma / math.sqrt(w.shape[1]) if noise == "flatlora" else sigma)


def flat_lora_row_scale(layer: nn.Module, sigma: float) -> Tensor:
    """``σ·‖W'_{i,:}‖₂/√n_in`` per output row: the Flat-LoRA noise scale."""
    return row_scale(layer, sigma, "flatlora")


def frozen_linear_layers(model: nn.Module, whole_model: bool = False) -> list[nn.Module]:
    """The layers whose (merged) weight the functional noise perturbs: every LoRA layer and, with
    ``whole_model``, every other ``nn.Linear`` whose weight is frozen (embeddings and norms are
    left out: their weights are not matrices acting on an input)."""
    layers = lora_layers(model)
    if whole_model:
        inside = {id(m) for layer in layers for m in layer.modules()}
        layers += [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in inside
                   and not m.weight.requires_grad]
    return layers


def layer_noise(seed: int, row_scale: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """``ε = Z ⊙ row_scale`` with ``Z`` from a generator seeded by ``seed`` on ``row_scale``'s device."""
    gen = torch.Generator(device=row_scale.device).manual_seed(seed)
    z = torch.randn(shape, generator=gen, device=row_scale.device, dtype=row_scale.dtype)
    return z.mul_(row_scale).to(dtype)


class _NoisyDelta(torch.autograd.Function):
    """``x ↦ x·εᵀ`` with ε rebuilt from its seed in the backward instead of being saved."""

    @staticmethod
    def forward(ctx, x: Tensor, row_scale: Tensor, seed: int) -> Tensor:
        shape = (row_scale.shape[0], x.shape[-1])
        ctx.save_for_backward(row_scale)
        ctx.seed, ctx.shape, ctx.dtype = seed, shape, x.dtype
        return nn.functional.linear(x, layer_noise(seed, row_scale, shape, x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (row_scale,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ layer_noise(ctx.seed, row_scale, ctx.shape, grad.dtype)
        return grad_x, None, None


class MergedWeightNoise(Perturbation):
    """Noise on the merged weight of every LoRA layer of ``model`` (and, with ``whole_model``, on
    every other frozen ``nn.Linear``), applied functionally (see the module docstring) with a
    row-wise scale ``noise`` (:data:`ROW_SCALES`); one draw per optimizer step, held over all
    micro-batches of the step, seeded by (seed, step, rank, layer index)."""

    needs_clean_pass = False
    needs_clean_grad = False

    def __init__(self, model: nn.Module, noise: str = "flatlora", whole_model: bool = False):
        check("noise", noise in ROW_SCALES, noise, f"one of {', '.join(ROW_SCALES)}")
        check("whole_model", isinstance(whole_model, bool), whole_model, "True or False")
        self.noise, self.whole_model = noise, whole_model
        self.layers = frozen_linear_layers(model, whole_model)
        check("model", bool(lora_layers(model)), type(model).__name__,
              "a PEFT model with LoRA layers on nn.Linear modules")
        for layer in self.layers:
            weight = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
            check("model", not weight.requires_grad, "a trainable base weight",
                  "frozen base weights (the noise is applied functionally to frozen weights only)")

    def __repr__(self) -> str:
        return f"MergedWeightNoise({len(self.layers)} layers, noise={self.noise!r}, whole_model={self.whole_model})"

    def run(self, opt: FlatOptimizer, clean_loss: Any):
        sigma = opt.strengths()[0]
        combination, every = opt.combination, opt.all_params_with_grad()
        state = combination.start(opt, every)
        handles = []
        try:
            for i, layer in enumerate(self.layers):
                scale = row_scale(layer, sigma, self.noise)
                seed = opt.rng_seed(stream=i)

                def hook(module, args, output, scale=scale, seed=seed):
                    return output + _NoisyDelta.apply(args[0], scale, seed).to(output.dtype)

                handles.append(layer.register_forward_hook(hook))
            yield Pass("perturbed", backward=True, sync=True, full_window=not combination.uses_clean)
        finally:
            for handle in handles:
                handle.remove()
        every = opt.all_params_with_grad()
        combination.after_pass(state, every)
        return [combination.finish(opt, state, every, 1)]


def _ramp(total_steps: Optional[int], schedule):
    """Flat-LoRA's ``½(1 − cos(πt/T))`` ramp from 0 to 1 unless a schedule is given."""
    if schedule is None and total_steps is not None:
        return Cosine(total_steps, 0.0, 1.0)
    return schedule


class FlatLoRA(FlatOptimizer):
    """Flat-LoRA (Li et al., 2024; seed 000): the Bayes objective ``E_ε L(W0 + s·BA + ε)`` on the merged
    weight, ``ε_{ij} ~ N(0, ρ_t²‖W'_{i,:}‖²/n_in)``, ``ρ_t = ρ·½(1 − cos(πt/T))`` over
    ``total_steps = T`` (constant ρ without T). ``model`` is the PEFT model whose LoRA parameters
    the base optimizer trains. The frozen base weights are never written (bit-identical after any
    number of steps, bf16 included) and no weight-sized buffer is kept. Cost: 1 fb (+ the noise,
    made twice per layer: forward and backward).

    Seed 000's variants are options: ``noise`` (``"flatlora"``, ``"filter"``, ``"matrix"``,
    ``"uniform"`` scales of the merged weight), ``whole_model=True`` (every frozen linear layer too)
    and ``noisy_weight = λ < 1`` (the m-RWP mix ``λ·g_noisy + (1 − λ)·g_clean``, 2 fb).
    Noise on the LoRA factors only is ``fm.RWP``/``fm.MRWP`` with ``scope=lora_parameters(model)``.
    """

    def __init__(self, base, model: nn.Module, rho: float = 0.05, noise: str = "flatlora",
                 whole_model: bool = False, noisy_weight: float = 1.0, schedule=None, total_steps=None, **common):
        check("noisy_weight", isinstance(noisy_weight, (int, float)) and 0.0 <= noisy_weight <= 1.0, noisy_weight,
              "a float in [0, 1]")
        perturbation = MergedWeightNoise(model, noise, whole_model)
        combination = MixGradient(float(noisy_weight)) if noisy_weight < 1.0 else None
        super().__init__(base, perturbation=perturbation, combination=combination, strength=rho,
                         schedule=_ramp(total_steps, schedule), total_steps=total_steps, **common)


class SAMLoRA(SAM):
    """SAM on the LoRA factors (seed 000): ``ε_A = ρ·g_A/‖g_A‖``, ``ε_B = ρ·g_B/‖g_B‖`` for every
    A and B (``normalization="per_tensor"``; ``"global"`` normalizes them together), of ``adapter``
    (default: the active adapters). Cost: 2 fb."""

    def __init__(self, base, model: nn.Module, rho: float = 0.05, norm=2, normalization: str = "per_tensor",
                 adapter: Optional[str] = None, **common):
        check("scope", "scope" not in common, "scope", "no scope: SAM-LoRA's scope is the LoRA factors")
        super().__init__(base, rho=rho, norm=norm, normalization=normalization,
                         scope=lora_parameters(model, adapter), **common)


register("flatlora", "flat-lora")(FlatLoRA)
register("samlora", "sam-lora")(SAMLoRA)
