"""LoRA: scopes on the factors, the merged weight and its functional noise, and the LoRA methods.

* :mod:`.layers`: LoRA layers read from PEFT's structure (factors, merged weights, row scales);
* :mod:`.noise`: noise on the merged weight without writing the frozen base (:class:`MergedWeightNoise`),
  with the fused Triton kernel of :mod:`.triton` on CUDA;
* :mod:`.methods`: :class:`FlatLoRA` and :class:`SAMLoRA`.
"""

from .layers import (NOISY_LAYER_TYPES, ROW_SCALES, adapter_factors, balancedness, base_layer, flat_lora_row_scale,
                     frozen_layers, lora_layers, lora_parameters, merged_weight, reduction_dtype, row_scale)
from .methods import FlatLoRA, SAMLoRA
from .noise import KERNELS, MergedWeightNoise, layer_noise, noisy_weight

__all__ = [
    "FlatLoRA", "KERNELS", "MergedWeightNoise", "NOISY_LAYER_TYPES", "ROW_SCALES", "SAMLoRA", "adapter_factors",
    "balancedness", "base_layer", "flat_lora_row_scale", "frozen_layers", "layer_noise", "lora_layers", "lora_parameters", "merged_weight",
    "noisy_weight", "reduction_dtype", "row_scale",
]
