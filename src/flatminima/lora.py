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

from .methods import register
from .optim import FlatOptimizer, Pass, Perturbation, check
from .schedules import Cosine


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The PEFT LoRA layers of ``model`` whose base layer is an ``nn.Linear``."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("merged-weight LoRA perturbations need PEFT: pip install 'flatminima[hf]'") from exc
    return [m for m in model.modules() if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), nn.Linear)]


@torch.no_grad()
def merged_weight(layer: nn.Module) -> Tensor:
    """``W' = W0 + Σ_a s_a·B_a A_a`` over the active adapters, ``out × in``, in float32 (or float64)."""
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


@torch.no_grad()
def flat_lora_row_scale(layer: nn.Module, sigma: float) -> Tensor:
    """``σ·‖W'_{i,:}‖₂/√n_in`` per output row (``out × 1``): the Flat-LoRA noise scale."""
    w = merged_weight(layer)
    return (sigma / math.sqrt(w.shape[1])) * torch.linalg.vector_norm(w, dim=1, keepdim=True)


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
    """Flat-LoRA's perturbation: noise on the merged weight of every LoRA layer of ``model``,
    applied functionally (see the module docstring); one draw per optimizer step, held over all
    micro-batches of the step, seeded by (seed, step, rank, layer index)."""

    needs_clean_pass = False
    needs_clean_grad = False

    def __init__(self, model: nn.Module):
        self.layers = lora_layers(model)
        check("model", bool(self.layers), type(model).__name__, "a PEFT model with LoRA layers on nn.Linear modules")
        for layer in self.layers:
            check("model", not layer.get_base_layer().weight.requires_grad, "a trainable base weight",
                  "frozen base weights (the noise is applied functionally to frozen weights only)")

    def __repr__(self) -> str:
        return f"MergedWeightNoise({len(self.layers)} LoRA layers)"

    def run(self, opt: FlatOptimizer, clean_loss: Any):
        sigma = opt.strengths()[0]
        combination, every = opt.combination, opt.all_params_with_grad()
        state = combination.start(opt, every)
        handles = []
        try:
            for i, layer in enumerate(self.layers):
                row_scale = flat_lora_row_scale(layer, sigma)
                seed = opt.rng_seed(stream=i)

                def hook(module, args, output, row_scale=row_scale, seed=seed):
                    return output + _NoisyDelta.apply(args[0], row_scale, seed).to(output.dtype)

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
    """

    def __init__(self, base, model: nn.Module, rho: float = 0.05, schedule=None, total_steps=None, **common):
        perturbation = MergedWeightNoise(model)
        super().__init__(base, perturbation=perturbation, strength=rho, schedule=_ramp(total_steps, schedule),
                         total_steps=total_steps, **common)


register("flatlora", "flat-lora")(FlatLoRA)
