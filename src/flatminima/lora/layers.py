"""LoRA layers read from PEFT's structure: factors, merged weights and their row-wise noise scales.

The LoRA layers are found from PEFT's own structure (``peft.tuners.lora.LoraLayer`` modules, their
``base_layer``, ``lora_A``/``lora_B`` (``lora_embedding_A``/``_B``) per active adapter and
``scaling``), not from parameter names. Base layers may be ``nn.Linear``, ``nn.Conv1d/2d/3d`` (a
row is an output channel) or ``nn.Embedding`` (a row is a token's vector).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import triton as _triton
from ..core.kernels import is_sharded
from ..core.validation import check, check_choice

#: Base layers whose weight the functional noise can replace.
NOISY_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The PEFT LoRA layers of ``model`` whose base layer is an ``nn.Linear``, ``nn.Conv{1,2,3}d``
    or ``nn.Embedding``."""
    check("model", isinstance(model, nn.Module), type(model).__name__, "a torch.nn.Module (a PEFT model with LoRA layers)")
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("LoRA scopes and merged-weight perturbations need PEFT: pip install 'flatminima[hf]'") from exc
    return [m for m in model.modules()
            if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), NOISY_LAYER_TYPES)]


def _adapters(layer: nn.Module, adapter: Optional[str]) -> list[str]:
    names = list(layer.active_adapters) if adapter is None else [adapter]
    return [n for n in names if n in layer.lora_A or n in layer.lora_embedding_A]


def _whole(t: Tensor) -> Tensor:
    """``t``, or the full tensor of an FSDP2 (DTensor) shard (an all-gather: LoRA factors are small)."""
    return t.full_tensor() if is_sharded(t) else t


def adapter_factors(layer: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    """The ``(A, B)`` parameters of adapter ``name`` in ``layer``."""
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def lora_parameters(model: nn.Module, adapter: Optional[str] = None, factors: str = "AB") -> list[Tensor]:
    """The LoRA factors of ``model`` from PEFT's structure: ``A`` and/or ``B`` (``factors``) of
    ``adapter`` (default: the active adapters) in every LoRA layer. A scope for SAM-LoRA, RWP on
    A/B, or any method: ``fm.SAM(base, scope=lora_parameters(model))``."""
    check_choice("factors", factors, ("A", "B", "AB"))
    layers = lora_layers(model)
    if adapter is not None:
        known = sorted({n for layer in layers for n in (*layer.lora_A, *layer.lora_embedding_A)})
        check("adapter", adapter in known, adapter, f"one of {', '.join(known)}")
    params = []
    for layer in layers:
        for name in _adapters(layer, adapter):
            a, b = adapter_factors(layer, name)
            params += ([a] if "A" in factors else []) + ([b] if "B" in factors else [])
    check("model", bool(params), type(model).__name__, "a PEFT model with LoRA layers")
    return params


def balancedness(model: nn.Module, adapter: Optional[str] = None) -> Tensor:
    """BAR's regularizer ``Σ_layers |‖A‖_F² − ‖B‖_F²|`` (Li et al., 2024): add
    ``α_t·balancedness(model)`` to the loss, with any optimizer or method."""
    terms = []
    for layer in lora_layers(model):
        for name in _adapters(layer, adapter):
            a, b = adapter_factors(layer, name)
            terms.append((a.square().sum() - b.square().sum()).abs())
    check("model", bool(terms), type(model).__name__, "a PEFT model with LoRA layers")
    return torch.stack(terms).sum()


def base_layer(layer: nn.Module) -> nn.Module:
    """The layer a LoRA layer wraps (a plain module is its own)."""
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def reduction_dtype(weight: Tensor) -> torch.dtype:
    """The dtype sums over ``weight`` are taken in: float64 for float64 weights, float32 otherwise."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _unmerged(layer: nn.Module, base: nn.Module) -> list[str]:
    """The active adapters whose delta is not yet in the base weight: none for a plain module, a
    merged layer or one with its adapters disabled."""
    if layer is base or getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return []
    return _adapters(layer, None)


def _linear_factors(layer: nn.Module, names: list[str]) -> list[tuple[Tensor, Tensor, float]]:
    """``(B, A, s)`` per adapter of a linear LoRA layer, whole (FSDP2 shards gathered)."""
    out = []
    for name in names:
        a, b = map(_whole, adapter_factors(layer, name))
        out.append((b, a, float(layer.scaling[name])))
    return out


def _merged(layer: nn.Module, base: nn.Module, names: list[str], dtype: torch.dtype) -> Tensor:
    """``W0 + Σ_a s_a·ΔW_a`` in ``dtype`` as a new tensor (call under ``no_grad``)."""
    w = _whole(base.weight)
    if not isinstance(base, nn.Linear):
        w = w.to(dtype, copy=True)
        for name in names:
            w.add_(layer.get_delta_weight(name).to(dtype))
        return w
    if not names:
        return w.to(dtype, copy=True)
    w = w.to(dtype)  # not written: the first addmm makes the new tensor
    for b, a, s in _linear_factors(layer, names):  # one addmm per adapter: W + s·B·A
        w = torch.addmm(w, b.to(dtype), a.to(dtype), alpha=s)
    return w


@torch.no_grad()
def merged_weight(layer: nn.Module) -> Tensor:
    """``W' = W0 + Σ_a s_a·ΔW_a`` over the active adapters (``ΔW = BA`` for linear layers, PEFT's
    ``get_delta_weight`` for convolutions and embeddings), shaped like the base weight, in float32
    (float64 for a float64 base). A plain module: its weight."""
    base = base_layer(layer)
    return _merged(layer, base, _unmerged(layer, base), reduction_dtype(base.weight))


#: Row-wise noise scales ``S`` of the merged weight: one value per output row.
ROW_SCALES = ("flatlora", "filter", "matrix", "uniform")


def _fused_factors(layer: nn.Module, base: nn.Module, names: list[str]) -> Optional[tuple[Tensor, Tensor, float]]:
    """``(B, A, s)`` with ``W' = W0 + s·B·A`` for the fused row-norm kernel (CUDA, a linear LoRA
    layer with unmerged adapters ``names``; several adapters are stacked along the rank), else None."""
    weight = base.weight
    if not names or not isinstance(base, nn.Linear) or weight.dtype == torch.float64 or not weight.is_cuda:
        return None
    factors = _linear_factors(layer, names)
    if len(factors) == 1:
        fused = factors[0]
    else:
        fused = (torch.cat([b * s for b, _, s in factors], dim=1), torch.cat([a for _, a, _ in factors], dim=0), 1.0)
    return fused if _triton.row_norm_supported(weight, fused[1].shape[0]) else None


def resolved_row_scale(layer: nn.Module, base: nn.Module, sigma: float, noise: str) -> Tensor:
    """:func:`row_scale` for a layer whose base module ``base`` is resolved (call under ``no_grad``)."""
    weight = base.weight
    rows, dtype = weight.shape[0], reduction_dtype(weight)
    if noise == "uniform":
        return torch.full((rows, 1), float(sigma), dtype=dtype, device=weight.device)
    factor = sigma / math.sqrt(weight.numel() // rows) if noise == "flatlora" else sigma
    names = _unmerged(layer, base)
    if noise != "matrix":
        fused = _fused_factors(layer, base, names)
        if fused is not None:
            return _triton.merged_row_norms(weight, *fused, factor).reshape(rows, 1)
    # A plain module's (or a merged layer's) norms are read from its weight without a copy.
    w = (_merged(layer, base, names, dtype) if names else _whole(weight)).reshape(rows, -1)
    if noise == "matrix":
        return (sigma * torch.linalg.vector_norm(w, dtype=dtype)).expand(rows, 1).clone()
    return torch.linalg.vector_norm(w, dim=1, keepdim=True, dtype=dtype).mul_(factor)


@torch.no_grad()
def row_scale(layer: nn.Module, sigma: float, noise: str = "flatlora") -> Tensor:
    """``σ·S`` per output row (``rows × 1``) of the merged weight ``W'`` viewed as ``rows × n_in``:
    ``‖W'_{i,:}‖₂/√n_in`` (Flat-LoRA), ``‖W'_{i,:}‖₂`` (filter), ``‖W'‖_F`` (matrix) or 1
    (uniform). On CUDA the row norms of a linear LoRA layer come from one fused kernel that never
    forms ``W'`` in memory; a plain module's norms are read from its weight without a copy."""
    return resolved_row_scale(layer, base_layer(layer), sigma, noise)


def flat_lora_row_scale(layer: nn.Module, sigma: float) -> Tensor:
    """``σ·‖W'_{i,:}‖₂/√n_in`` per output row: the Flat-LoRA noise scale."""
    return row_scale(layer, sigma, "flatlora")


def frozen_layers(model: nn.Module, whole_model: bool = False) -> list[nn.Module]:
    """The layers whose (merged) weight the functional noise perturbs: every LoRA layer and, with
    ``whole_model``, every other ``nn.Linear``, ``nn.Conv{1,2,3}d`` and ``nn.Embedding`` whose weight
    is frozen. Frozen 1-D tensors (norms, biases) are left out: perturbing them would mean writing
    them (a scope may exclude them instead)."""
    layers = lora_layers(model)
    if whole_model:
        inside = {id(m) for layer in layers for m in layer.modules()}
        layers += [m for m in model.modules() if isinstance(m, NOISY_LAYER_TYPES) and id(m) not in inside
                   and not m.weight.requires_grad]
    return layers
