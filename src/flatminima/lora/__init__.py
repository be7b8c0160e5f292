"""LoRA: scopes on the factors, the merged weight and its functional noise, and the LoRA methods.

* :mod:`.protocol`: how a LoRA layer is read, whatever module holds it (PEFT's, :class:`QKVLoRA`, yours);
* :mod:`.layers`: factors, merged weights and row scales of the layers the protocol reads;
* :mod:`.noise`: noise on the merged weight without writing the frozen base (:class:`MergedWeightNoise`),
  with the fused Triton kernel of :mod:`.triton` on CUDA;
* :mod:`.methods`: :class:`FlatLoRA` and :class:`SAMLoRA`;
* :mod:`.supports`: where any method's perturbation lives (:func:`support`: the factors, ``ΔW``, the
  merged weight, the frozen base, or all), through :mod:`.functional` for the frozen weights;
* :mod:`.qkv`: :class:`QKVLoRA`, LoRA on the Q and V slices of a fused ``qkv`` projection.
"""

from . import peft_reader  # noqa: F401  (PEFT's LoraLayer reader, registered once PEFT is imported)
from .protocol import (BASE_LAYER_TYPES, LoRALayer, LowRankAdapter, lora_layers, register_lora_layer,
                       register_lora_layer_by_name, require_lora_layers, unregister_lora_layer)
from .qkv import QKVLoRA, add_qkv_lora
from .supports import KINDS as SUPPORT_KINDS
from .supports import LoRASupport, support, support_from_spec
from .layers import (NOISY_LAYER_TYPES, ROW_SCALES, as_lora_layer, balancedness, flat_lora_row_scale, frozen_layers,
                     lora_parameters, merged_weight, reduction_dtype, row_scale)
from .methods import FlatLoRA, SAMLoRA
from .noise import KERNELS, MergedWeightNoise, layer_noise, noisy_weight

__all__ = [
    "BASE_LAYER_TYPES", "LoRALayer", "LoRASupport", "LowRankAdapter", "QKVLoRA", "SUPPORT_KINDS", "add_qkv_lora",
    "register_lora_layer", "support", "support_from_spec",
    "register_lora_layer_by_name", "require_lora_layers", "unregister_lora_layer",
    "FlatLoRA", "KERNELS", "MergedWeightNoise", "NOISY_LAYER_TYPES", "ROW_SCALES", "SAMLoRA", "as_lora_layer",
    "balancedness", "flat_lora_row_scale", "frozen_layers", "layer_noise", "lora_layers", "lora_parameters", "merged_weight",
    "noisy_weight", "reduction_dtype", "row_scale",
]
