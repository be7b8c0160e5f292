"""LoRA layers read through the LoRA protocol: factors, merged weights and their row-wise noise scales.

Every function here works on the layers :func:`lora_layers` reads (PEFT's ``LoraLayer``,
:class:`~flatminima.lora.QKVLoRA` and the classes registered with
:func:`~flatminima.lora.register_lora_layer`), each computing with the weight

    ``W' = W0 + Σ_{a active} s_a · P_a(B_a A_a)``

(``P_a`` places the product in the output rows of the adapter). A row is an output feature of a
linear layer, an output channel of a convolution or a token's vector of an embedding. The functions
that take one layer accept a :class:`~flatminima.lora.LoRALayer`, a module of a registered LoRA
class (read on the spot) or a plain layer (its own weight).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import triton as _triton
from ..core.kernels import is_sharded
from ..core.validation import check, check_choice
from .protocol import BASE_LAYER_TYPES, LoRALayer, LowRankAdapter, lora_layers, reader_for

#: Base layers whose weight the functional noise can replace.
NOISY_LAYER_TYPES = BASE_LAYER_TYPES
#: A LoRA layer as read by :func:`lora_layers`, or a plain layer (its weight alone).
Layer = Union[LoRALayer, nn.Module]

_NO_LORA = ("a model with LoRA layers (PEFT's LoraLayer, flatminima.lora.QKVLoRA, or a class registered with "
            "flatminima.lora.register_lora_layer)")


def _whole(t: Tensor) -> Tensor:
    """``t``, or the full tensor of an FSDP2 (DTensor) shard (an all-gather: LoRA factors are small)."""
    return t.full_tensor() if is_sharded(t) else t


def as_lora_layer(layer: Layer) -> Layer:
    """``layer`` as the library reads it: a :class:`LoRALayer` as given; a module of a registered
    LoRA class read now (its base alone while it holds no adapter); any other module as is."""
    if isinstance(layer, LoRALayer):
        return layer
    check("layer", isinstance(layer, nn.Module), type(layer).__name__, "a LoRALayer or an nn.Module with a weight")
    read = lora_layers(layer)
    if read and read[0].module is layer:
        return read[0]
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    check("layer", isinstance(getattr(base, "weight", None), Tensor), type(layer).__name__,
          "a LoRALayer or an nn.Module with a weight")
    return base


def refreshed(layer: Layer) -> Layer:
    """A :class:`LoRALayer` read again through its module's reader, as the module computes now
    (adapters merged, disabled or added since are seen; its base alone once it holds no adapter);
    a plain layer, or a layer built by hand for a module no reader knows, as given."""
    reader = reader_for(layer.module) if isinstance(layer, LoRALayer) else None
    if reader is None:
        return layer
    fresh = reader(layer.module)
    if fresh is None:
        return layer.base
    fresh.name = layer.name
    return fresh


def base_module(layer: Layer) -> nn.Module:
    """The module whose ``weight`` is ``W0``: a LoRA layer's base, a plain layer itself."""
    return layer.base if isinstance(layer, LoRALayer) else layer


def _chosen(model: nn.Module, adapter: Optional[str]) -> list[LowRankAdapter]:
    """The adapters called ``adapter`` (default: the active ones) of every LoRA layer of ``model``."""
    check("adapter", adapter is None or isinstance(adapter, str), adapter, "None or an adapter name")
    layers = lora_layers(model)
    if adapter is not None:
        known = sorted({a.name for layer in layers for a in layer.adapters})
        check("adapter", adapter in known, adapter, f"one of {', '.join(known)}" if known else _NO_LORA)
    chosen = [a for layer in layers for a in layer.named(adapter)]
    check("model", bool(chosen), type(model).__name__, _NO_LORA if not layers else
          "a model with active LoRA adapters (all are merged or disabled now: name one with adapter=)")
    return chosen


def lora_parameters(model: nn.Module, adapter: Optional[str] = None, factors: str = "AB") -> list[Tensor]:
    """The LoRA factors of ``model``: ``A`` and/or ``B`` (``factors``) of the adapters called
    ``adapter`` (default: the active ones) in every LoRA layer, in module order. A scope for
    SAM-LoRA, RWP on A/B, or any method: ``fm.SAM(base, scope=lora_parameters(model))``."""
    check_choice("factors", factors, ("A", "B", "AB"))
    params: list[Tensor] = []
    seen: set[int] = set()
    for a in _chosen(model, adapter):
        for t in ([a.a] if "A" in factors else []) + ([a.b] if "B" in factors else []):
            if id(t) not in seen:
                seen.add(id(t))
                params.append(t)
    return params


def balancedness(model: nn.Module, adapter: Optional[str] = None) -> Tensor:
    """BAR's regularizer ``Σ_adapters |‖A‖_F² − ‖B‖_F²|`` over the adapters called ``adapter``
    (default: the active ones) of every LoRA layer (Li et al., 2024): add ``α_t·balancedness(model)``
    to the loss, with any optimizer or method."""
    terms = [(a.a.square().sum() - a.b.square().sum()).abs() for a in _chosen(model, adapter)]
    return torch.stack(terms).sum()


def reduction_dtype(weight: Tensor) -> torch.dtype:
    """The dtype sums over ``weight`` are taken in: float64 for float64 weights, float32 otherwise."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def require_plain(layers: list[Layer], name: str = "model", what: str = "") -> None:
    """Refuse a LoRA layer whose function is not ``W0 + Σ s·BA`` (a variant such as DoRA)."""
    for layer in layers:
        variant = layer.variant() if isinstance(layer, LoRALayer) else None
        if variant is not None:
            check(name, False, f"a LoRA variant ({variant}) in layer {layer.name or type(layer.module).__name__!r}",
                  f"plain LoRA adapters{' for ' + what if what else ''} (the weight of a variant is not W0 + s·BA)")


def _merged(layer: LoRALayer, dtype: torch.dtype) -> Tensor:
    """``W0 + Σ_active s·P(BA)`` in ``dtype`` as a new tensor shaped like ``W0`` (call under ``no_grad``)."""
    w = _whole(layer.weight).to(dtype, copy=True)
    rows = w.view(w.shape[0], -1)
    for adapter in layer.active():  # one addmm per adapter, in place on its rows: W + s·B·A
        b, a = adapter.matrices(_whole(adapter.a), _whole(adapter.b), dtype)
        rows[adapter.rows].addmm_(b, a, alpha=float(adapter.scaling))
    return w


@torch.no_grad()
def merged_weight(layer: Layer) -> Tensor:
    """``W' = W0 + Σ_active s_a·P_a(B_a A_a)``, shaped like ``W0``, in float32 (float64 for a
    float64 base) as a new tensor; a plain layer: a copy of its weight."""
    layer = as_lora_layer(layer)
    if not isinstance(layer, LoRALayer):
        return _whole(layer.weight).to(reduction_dtype(layer.weight), copy=True)
    require_plain([layer], "layer", "merged_weight")
    return _merged(layer, reduction_dtype(layer.weight))


#: Row-wise noise scales ``S`` of the merged weight: one value per output row.
ROW_SCALES = ("flatlora", "filter", "matrix", "uniform")


def stacked_factors(layer: LoRALayer) -> tuple[Tensor, Tensor, float]:
    """``(B, A, s)`` with ``W' = W0 + s·B·A`` over the layer's active adapters (linear layouts). One
    adapter on every row is returned as is; several adapters, or adapters on row slices, are stacked
    along the rank, ``B`` (float32) scaled and zero outside each adapter's rows (``rows × Σr``
    extra), so ``s = 1``. FSDP2 shards are gathered whole."""
    adapters, rows = layer.active(), layer.rows
    pairs = [a.matrices(_whole(a.a), _whole(a.b)) for a in adapters]
    if len(adapters) == 1 and adapters[0].rows.indices(rows) == (0, rows, 1):
        return pairs[0][0], pairs[0][1], float(adapters[0].scaling)
    rank = sum(a.shape[0] for _, a in pairs)
    b_full = torch.zeros(rows, rank, dtype=torch.float32, device=layer.weight.device)
    start = 0
    for adapter, (b, a) in zip(adapters, pairs):
        b_full[adapter.rows, start:start + a.shape[0]] = b.float() * float(adapter.scaling)
        start += a.shape[0]
    return b_full, torch.cat([a.float() for _, a in pairs]), 1.0


def _fused_factors(layer: Layer, weight: Tensor) -> Optional[tuple[Tensor, Tensor, float]]:
    """:func:`stacked_factors` for the fused row-norm kernel (CUDA, a 2-D base weight with active
    linear adapters of total rank the kernel takes), else None."""
    adapters = layer.active() if isinstance(layer, LoRALayer) else []
    if (not adapters or weight.dim() != 2 or weight.dtype == torch.float64 or not weight.is_cuda
            or any(a.layout != "linear" for a in adapters)):
        return None
    if not _triton.row_norm_supported(weight, sum(a.rank() for a in adapters)):
        return None
    return stacked_factors(layer)


def resolved_row_scale(layer: Layer, base: nn.Module, sigma: float, noise: str) -> Tensor:
    """:func:`row_scale` of a layer already read (``layer``: a :class:`LoRALayer` or a plain layer;
    ``base``: the module whose weight is ``W0``); call under ``no_grad``."""
    weight = base.weight
    rows, dtype = weight.shape[0], reduction_dtype(weight)
    if noise == "uniform":
        return torch.full((rows, 1), float(sigma), dtype=dtype, device=weight.device)
    factor = sigma / math.sqrt(weight.numel() // rows) if noise == "flatlora" else sigma
    lora = isinstance(layer, LoRALayer) and bool(layer.active())
    if noise != "matrix":
        fused = _fused_factors(layer, weight) if lora else None
        if fused is not None:
            return _triton.merged_row_norms(weight, *fused, factor).reshape(rows, 1)
    # A plain layer's (or an inactive LoRA layer's) norms are read from its weight without a copy.
    w = (_merged(layer, dtype) if lora else _whole(weight)).reshape(rows, -1)
    if noise == "matrix":
        return (sigma * torch.linalg.vector_norm(w, dtype=dtype)).expand(rows, 1).clone()
    return torch.linalg.vector_norm(w, dim=1, keepdim=True, dtype=dtype).mul_(factor)


@torch.no_grad()
def row_scale(layer: Layer, sigma: float, noise: str = "flatlora") -> Tensor:
    """``σ·S`` per output row (``rows × 1``) of the merged weight ``W'`` viewed as ``rows × n_in``:
    ``‖W'_{i,:}‖₂/√n_in`` (Flat-LoRA), ``‖W'_{i,:}‖₂`` (filter), ``‖W'‖_F`` (matrix) or 1
    (uniform). Rows no adapter covers (K of a Q/V-adapted fused ``qkv``) are rows of ``W0``. On
    CUDA the row norms of a linear LoRA layer come from one fused kernel that never forms ``W'``
    in memory; a plain layer's norms are read from its weight without a copy."""
    check_choice("noise", noise, ROW_SCALES)
    layer = as_lora_layer(layer)
    return resolved_row_scale(layer, base_module(layer), sigma, noise)


def flat_lora_row_scale(layer: Layer, sigma: float) -> Tensor:
    """``σ·‖W'_{i,:}‖₂/√n_in`` per output row: the Flat-LoRA noise scale."""
    return row_scale(layer, sigma, "flatlora")


def frozen_layers(model: nn.Module, whole_model: bool = False) -> list[Layer]:
    """The layers whose (merged) weight the functional noise perturbs: every LoRA layer
    (:class:`LoRALayer`) and, with ``whole_model``, every other ``nn.Linear``, ``nn.Conv{1,2,3}d``
    and ``nn.Embedding`` module whose weight is frozen and that is not part of a LoRA layer. Frozen
    1-D tensors (norms, biases) are left out: perturbing them would mean writing them (a scope may
    exclude them instead)."""
    layers: list[Layer] = list(lora_layers(model))
    if whole_model:
        inside = {id(m) for layer in layers for part in (layer.module, layer.base) for m in part.modules()}
        layers += [m for m in model.modules() if isinstance(m, NOISY_LAYER_TYPES) and id(m) not in inside
                   and not m.weight.requires_grad]
    return layers
