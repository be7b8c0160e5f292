"""Random perturbation of the merged LoRA weight without touching the frozen base (Flat-LoRA).

Flat-LoRA (Li et al., 2024) perturbs the *merged* weight ``W' = W0 + Σ_active s·P(BA)`` of every
LoRA layer (read through the LoRA protocol, :mod:`flatminima.lora.protocol`): ``ε = σ·Z ⊙ S`` with
``S_i = ‖W'_{i,:}‖₂/√n_in`` per output row. Adding ε to ``W0`` in
place and subtracting it afterwards drifts a bf16 base weight step after step, and keeping a copy
doubles the model. Here the base weight is never written: while the perturbed pass runs, the base
layer computes with a *noisy weight* ``W0 + ε`` built from a per-step seed in its forward, and built
again from the same seed in the backward. Memory stays at one layer's noisy weight
at a time, the restore is exact by construction, and the global RNG is never used. On CUDA the
noisy weight comes from one fused Triton kernel (Philox noise scaled by the row norm, added to
``W0``: :mod:`flatminima.lora.triton`); elsewhere from ``torch.randn`` with a seeded generator.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from . import triton as _triton
from ..core.passes import Pass
from ..core.perturb import Perturbation, PerturbationContext, Point
from ..core.validation import check, check_bool, check_choice
from .functional import PatchedForward, forward_with_weight
from .layers import ROW_SCALES, base_module, frozen_layers, refreshed, require_plain, resolved_row_scale
from .protocol import LoRALayer, require_lora_layers


def layer_noise(seed: int, row_scale: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``ε = Z ⊙ row_scale`` (one scale per row, ``shape[0]`` rows) with ``Z`` from a
    ``torch.Generator`` seeded by ``seed`` on ``row_scale``'s device: the torch-ops path."""
    gen = torch.Generator(device=row_scale.device).manual_seed(seed)
    z = torch.randn(shape, generator=gen, device=row_scale.device, dtype=row_scale.dtype)
    return z.mul_(row_scale.reshape(-1, *[1] * (len(shape) - 1))).to(dtype)


KERNELS = ("auto", "triton", "torch")


def noisy_weight(weight: Tensor, row_scale: Tensor, seed: int, dtype: Optional[torch.dtype] = None,
                 kernel: str = "auto") -> Tensor:
    """``W + Z ⊙ S`` in ``dtype`` (default ``W``'s), ``S`` one value per row, ``Z ~ N(0, 1)`` keyed by
    ``seed``: the fused Triton kernel on CUDA (``kernel="auto"`` or ``"triton"``), else
    :func:`layer_noise` added in the scale's precision. Same seed, same device, same kernel → the
    same tensor, bit for bit."""
    dtype = weight.dtype if dtype is None else dtype
    if kernel != "torch" and _triton.supported(weight):
        return _triton.noisy_weight(weight, row_scale, seed, dtype)
    check("kernel", kernel != "triton", kernel, "'auto' or 'torch' where Triton or CUDA is not available")
    return layer_noise(seed, row_scale, tuple(weight.shape), row_scale.dtype).add_(weight).to(dtype)


class _NoisyForward:
    """A base layer's forward during the perturbed pass: the layer class's own forward (a
    subclass's too: EfficientNet's static same-padding convolution pads before its conv) with
    ``W + ε`` in the weight's slot for this call only, built from ``seed`` in the forward and again
    in the backward (:class:`~flatminima.lora.functional.RebuiltWeight`); ``W`` is never written.

    ``W`` is read when the forward runs and the row scale is computed at the pass's first forward
    (then held for its other micro-batches): under FSDP2 that is when the layer's weight is whole
    (unsharded for the forward, and again for the backward). Everything else is resolved when the
    pass starts, so a forward adds the noisy weight's kernel (and, the first time, the row scale's)
    and little Python: the perturbed pass runs this once per frozen layer and micro-batch."""

    __slots__ = ("layer", "base", "sigma", "noise", "seed", "kernel", "scale", "class_forward", "embedding")

    def __init__(self, layer: nn.Module, base: nn.Module, sigma: float, noise: str, seed: int, kernel: str):
        self.layer, self.base, self.sigma, self.noise, self.seed, self.kernel = layer, base, sigma, noise, seed, kernel
        self.scale: Optional[Tensor] = None
        self.class_forward = type(base).forward
        self.embedding = isinstance(base, nn.Embedding)

    def __call__(self, x: Tensor) -> Tensor:
        base = self.base
        weight, device = base.weight, x.device.type
        autocast = torch.is_autocast_enabled(device)
        if self.scale is None:  # in full precision, as specified; the autocast switch only where it is on
            with torch.no_grad(), (torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext()):
                self.scale = resolved_row_scale(self.layer, base, self.sigma, self.noise).reshape(-1)
        dtype = torch.get_autocast_dtype(device) if autocast and not self.embedding else weight.dtype
        scale, seed, kernel = self.scale, self.seed, self.kernel
        noisy = noisy_weight(weight, scale, seed, dtype, kernel)
        return forward_with_weight(base, self.class_forward, noisy,
                                   lambda dt: noisy_weight(weight, scale, seed, dt, kernel), x)


class MergedWeightNoise(Perturbation):
    """Noise on the merged weight ``W' = W0 + Σ_active s·P(BA)`` of every LoRA layer of ``model``
    (any layer :func:`~flatminima.lora.lora_layers` reads: PEFT, :class:`~flatminima.lora.QKVLoRA`,
    registered classes) and, with ``whole_model``, on every other frozen linear, convolution and
    embedding layer, applied functionally (see the module docstring) with a row-wise scale ``noise``
    (:data:`ROW_SCALES`) of ``W'``; one draw per optimizer step, held over all micro-batches of the
    step, seeded by (seed, step, rank, layer index). Each pass reads the LoRA layers again, so
    adapters added, merged or disabled between steps are followed. ``kernel``: ``"auto"`` (the
    fused Triton kernel on CUDA), ``"triton"`` or ``"torch"``. Refused: a LoRA variant (DoRA, a LoRA
    bias, a grouped convolution) and a base weight that requires grad."""

    needs_clean_pass = False
    needs_clean_grad = False
    # FSDP2: the noisy weight is built from the whole weight inside the layer's forward (and again in
    # its backward), when FSDP2 has gathered it; the row scale's factors are gathered whole.
    supports_sharded = True

    def __init__(self, model: nn.Module, noise: str = "flatlora", whole_model: bool = False, kernel: str = "auto"):
        check_choice("noise", noise, ROW_SCALES)
        check_bool("whole_model", whole_model)
        check_choice("kernel", kernel, KERNELS)
        require_lora_layers(model, "the merged-weight noise")
        self.noise, self.whole_model, self.kernel = noise, whole_model, kernel
        self.layers = frozen_layers(model, whole_model)
        self.bases = [base_module(layer) for layer in self.layers]
        require_plain(self.layers, "model", "the merged-weight noise")
        for layer, base in zip(self.layers, self.bases):
            where = f" ({layer.name})" if isinstance(layer, LoRALayer) and layer.name else ""
            check("model", not base.weight.requires_grad, f"a trainable base weight{where}",
                  "frozen base weights (the noise is applied functionally to frozen weights only)")

    def __repr__(self) -> str:
        return (f"MergedWeightNoise({len(self.layers)} layers, noise={self.noise!r}, whole_model={self.whole_model}, "
                f"kernel={self.kernel!r})")

    def points(self, ctx: PerturbationContext):
        opt = ctx.opt
        sigma = opt.strengths()[0]
        # σ = 0 (the ramp's first step) is the base optimizer's step, bit for bit: no noisy layers.
        apply = (lambda: self._noisy_layers(opt, sigma)) if sigma != 0.0 else None
        yield Point(Pass("perturbed", backward=True, sync=True, full_window=not opt.combination.uses_clean), apply=apply)

    @contextlib.contextmanager
    def _noisy_layers(self, opt, sigma: float) -> Iterator[None]:
        patches = []
        try:
            for i, (layer, base) in enumerate(zip(self.layers, self.bases)):
                layer = refreshed(layer)  # the adapters as the layer computes now
                forward = _NoisyForward(layer, base, sigma, self.noise, opt.rng_seed(stream=i), self.kernel)
                patches.append(PatchedForward(base, forward))
            yield
        finally:
            for patch in reversed(patches):
                patch.undo()
