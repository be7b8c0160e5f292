"""The reader of PEFT's ``LoraLayer`` (current PEFT: Linear, Conv1d/2d/3d, Embedding; several adapters).

Registered for ``peft.tuners.lora.LoraLayer`` once PEFT is imported (a PEFT model means it is): the
reader reads the layer's attributes and imports nothing from PEFT.
An adapter is *active* when it is in ``active_adapters``, not merged into the base weight and the
layer's adapters are not disabled. A DoRA adapter or one with a LoRA bias is read with its
``variant`` set: its factors are LoRA parameters, but its function is not ``W0 + s·BA``.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .protocol import BASE_LAYER_TYPES, LoRALayer, LowRankAdapter, register_lora_layer_by_name


def _variant(layer: nn.Module, name: str, base: nn.Module) -> Optional[str]:
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None:
        return type(variant).__name__.replace("Variant", "").replace("Linear", "") or "a LoRA variant"
    if getattr(layer, "lora_bias", {}).get(name):
        return "lora_bias"
    if getattr(base, "groups", 1) != 1:
        return "a grouped convolution"
    return None


def read_peft_layer(layer: nn.Module) -> Optional[LoRALayer]:
    """PEFT's ``LoraLayer`` as a :class:`~flatminima.lora.LoRALayer` (None on another base layer type)."""
    base = layer.get_base_layer()
    if not isinstance(base, BASE_LAYER_TYPES):
        return None
    # PEFT's forward: adapters disabled, or any merged into the base weight → the base layer alone.
    active = set() if layer.disable_adapters or layer.merged else set(layer.active_adapters)
    adapters = []
    for name in layer.lora_A:
        layout = "linear" if isinstance(base, nn.Linear) else "conv"
        adapters.append(LowRankAdapter(layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name]),
                                       name=name, layout=layout, active=name in active,
                                       variant=_variant(layer, name, base)))
    for name in layer.lora_embedding_A:
        adapters.append(LowRankAdapter(layer.lora_embedding_A[name], layer.lora_embedding_B[name],
                                       float(layer.scaling[name]), name=name, layout="embedding",
                                       active=name in active, variant=_variant(layer, name, base)))
    return LoRALayer(layer, base, adapters)


register_lora_layer_by_name("peft.tuners.lora", "LoraLayer", read_peft_layer)
