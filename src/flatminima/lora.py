"""Random perturbation of the merged LoRA weight without touching the frozen base (Flat-LoRA).

Flat-LoRA (Li et al., 2024; seed 000) perturbs the *merged* weight ``W' = W0 + s·BA`` of every
LoRA layer: ``ε = σ·Z ⊙ S`` with ``S_i = ‖W'_{i,:}‖₂/√n_in`` per output row. Adding ε to ``W0`` in
place and subtracting it afterwards drifts a bf16 base weight step after step, and keeping a copy
doubles the model. Here the base weight is never written: while the perturbed pass runs, the base
layer computes with a *noisy weight* ``W0 + ε`` built from a per-step seed in its forward, and built
again from the same seed in the backward (DESIGN.md §4). Memory stays at one layer's noisy weight
at a time, the restore is exact by construction, and the global RNG is never used. On CUDA the
noisy weight comes from one fused Triton kernel (Philox noise scaled by the row norm, added to
``W0``: :mod:`flatminima._triton`); elsewhere from ``torch.randn`` with a seeded generator.

The LoRA layers are found from PEFT's own structure (``peft.tuners.lora.LoraLayer`` modules, their
``base_layer``, ``lora_A``/``lora_B`` (``lora_embedding_A``/``_B``) per active adapter and
``scaling``), not from parameter names. Base layers may be ``nn.Linear``, ``nn.Conv1d/2d/3d`` (a
row is an output channel) or ``nn.Embedding`` (a row is a token's vector).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from . import _triton
from ._functional import is_sharded
from .methods import SAM, register
from .optim import FlatOptimizer, MixGradient, Pass, Perturbation
from .validation import check, check_bool, check_choice, check_fraction
from .schedules import Cosine

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


def _factors(layer: nn.Module, name: str) -> tuple[Tensor, Tensor]:
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
            a, b = _factors(layer, name)
            params += ([a] if "A" in factors else []) + ([b] if "B" in factors else [])
    check("model", bool(params), type(model).__name__, "a PEFT model with LoRA layers")
    return params


def balancedness(model: nn.Module, adapter: Optional[str] = None) -> Tensor:
    """BAR's regularizer ``Σ_layers |‖A‖_F² − ‖B‖_F²|`` (Li et al., 2024; seed 001): add
    ``α_t·balancedness(model)`` to the loss, with any optimizer or method."""
    terms = []
    for layer in lora_layers(model):
        for name in _adapters(layer, adapter):
            a, b = _factors(layer, name)
            terms.append((a.square().sum() - b.square().sum()).abs())
    check("model", bool(terms), type(model).__name__, "a PEFT model with LoRA layers")
    return torch.stack(terms).sum()


def _base(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def _reduction_dtype(weight: Tensor) -> torch.dtype:
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
        a, b = map(_whole, _factors(layer, name))
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
    base = _base(layer)
    return _merged(layer, base, _unmerged(layer, base), _reduction_dtype(base.weight))


#: Row-wise noise scales ``S`` of the merged weight (seed 000): one value per output row.
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


def _row_scale(layer: nn.Module, base: nn.Module, sigma: float, noise: str) -> Tensor:
    """:func:`row_scale` for a layer whose base module is resolved (call under ``no_grad``)."""
    weight = base.weight
    rows, dtype = weight.shape[0], _reduction_dtype(weight)
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
    return _row_scale(layer, _base(layer), sigma, noise)


def flat_lora_row_scale(layer: nn.Module, sigma: float) -> Tensor:
    """``σ·‖W'_{i,:}‖₂/√n_in`` per output row: the Flat-LoRA noise scale."""
    return row_scale(layer, sigma, "flatlora")


def frozen_layers(model: nn.Module, whole_model: bool = False) -> list[nn.Module]:
    """The layers whose (merged) weight the functional noise perturbs: every LoRA layer and, with
    ``whole_model``, every other ``nn.Linear``, ``nn.Conv{1,2,3}d`` and ``nn.Embedding`` whose weight
    is frozen. Frozen 1-D tensors (norms, biases) are left out: perturbing them would mean writing
    them (DESIGN.md §3 lets the scope exclude them)."""
    layers = lora_layers(model)
    if whole_model:
        inside = {id(m) for layer in layers for m in layer.modules()}
        layers += [m for m in model.modules() if isinstance(m, NOISY_LAYER_TYPES) and id(m) not in inside
                   and not m.weight.requires_grad]
    return layers


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


class _RegeneratedWeight:
    """Saved-tensor hooks around one layer's op: the noisy weight (or a view of it) that autograd
    would keep for the backward is replaced by its recipe (dtype and view geometry) and rebuilt from
    the seed when the backward unpacks it, so no weight-sized tensor lives between the forward and
    the backward; every other saved tensor passes through. The backward itself is PyTorch's own
    (linear, convolution, embedding), so biases, padding modes and autocast behave as usual. Saved
    tensors of this one op bypass saved-tensor hooks a user installs around the model."""

    def __init__(self, weight: Tensor, scale: Tensor, seed: int, kernel: str):
        self.weight, self.scale, self.seed, self.kernel = weight, scale, seed, kernel
        self.noisy: Optional[Tensor] = None

    def pack(self, t: Tensor) -> Any:
        noisy = self.noisy
        if noisy is not None and (t is noisy or t.untyped_storage().data_ptr() == noisy.untyped_storage().data_ptr()):
            return (t.dtype, t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(self, packed: Any) -> Tensor:
        if isinstance(packed, tuple):
            dtype, size, stride, offset = packed
            return noisy_weight(self.weight, self.scale, self.seed, dtype, self.kernel).as_strided(size, stride, offset)
        return packed


class _NoisyForward:
    """A base layer's forward during the perturbed pass: the layer class's own forward (a
    subclass's too: EfficientNet's static same-padding convolution pads before its conv) with
    ``W + ε`` in the weight's slot for this call only, built from ``seed`` in the forward and again
    in the backward (:class:`_RegeneratedWeight`); ``W`` is never written.

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
                self.scale = _row_scale(self.layer, base, self.sigma, self.noise).reshape(-1)
        dtype = torch.get_autocast_dtype(device) if autocast and not self.embedding else weight.dtype
        recipe = _RegeneratedWeight(weight, self.scale, self.seed, self.kernel)
        recipe.noisy = noisy_weight(weight, self.scale, self.seed, dtype, self.kernel)
        params = base._parameters
        try:
            with torch.autograd.graph.saved_tensors_hooks(recipe.pack, recipe.unpack):
                params["weight"] = recipe.noisy
                return self.class_forward(base, x)
        finally:
            params["weight"] = weight
            recipe.noisy = None


class _Patched:
    """Replace ``module.forward`` for the duration of a pass and put back exactly what was there."""

    def __init__(self, module: nn.Module, forward: Callable[..., Tensor]):
        self.module, self.saved = module, module.__dict__.get("forward")
        module.forward = forward

    def undo(self) -> None:
        if self.saved is None:
            del self.module.forward
        else:
            self.module.forward = self.saved


class MergedWeightNoise(Perturbation):
    """Noise on the merged weight of every LoRA layer of ``model`` (and, with ``whole_model``, on
    every other frozen linear, convolution and embedding layer), applied functionally (see the
    module docstring) with a row-wise scale ``noise`` (:data:`ROW_SCALES`); one draw per optimizer
    step, held over all micro-batches of the step, seeded by (seed, step, rank, layer index).
    ``kernel``: ``"auto"`` (the fused Triton kernel on CUDA), ``"triton"`` or ``"torch"``."""

    needs_clean_pass = False
    needs_clean_grad = False
    # FSDP2: the noisy weight is built from the whole weight inside the layer's forward (and again in
    # its backward), when FSDP2 has gathered it; the row scale's factors are gathered whole.
    supports_sharded = True

    def __init__(self, model: nn.Module, noise: str = "flatlora", whole_model: bool = False, kernel: str = "auto"):
        check_choice("noise", noise, ROW_SCALES)
        check_bool("whole_model", whole_model)
        check_choice("kernel", kernel, KERNELS)
        check("model", bool(lora_layers(model)), type(model).__name__,
              "a PEFT model with LoRA layers on nn.Linear, nn.Conv1d/2d/3d or nn.Embedding modules")
        self.noise, self.whole_model, self.kernel = noise, whole_model, kernel
        self.layers = frozen_layers(model, whole_model)
        self.bases = [_base(layer) for layer in self.layers]
        for layer, base in zip(self.layers, self.bases):
            check("model", not base.weight.requires_grad, "a trainable base weight",
                  "frozen base weights (the noise is applied functionally to frozen weights only)")
            check("model", not getattr(layer, "lora_variant", None), "a LoRA variant (DoRA)",
                  "plain LoRA adapters (the merged weight of a variant is not W0 + s·BA)")

    def __repr__(self) -> str:
        return (f"MergedWeightNoise({len(self.layers)} layers, noise={self.noise!r}, whole_model={self.whole_model}, "
                f"kernel={self.kernel!r})")

    def run(self, opt: FlatOptimizer, clean_loss: Any):
        sigma = opt.strengths()[0]
        combination, every = opt.combination, opt.all_params_with_grad()
        state = combination.start(opt, every)
        patches = []
        try:
            if sigma != 0.0:  # σ = 0 (the ramp's first step) is the base optimizer's step, bit for bit
                for i, (layer, base) in enumerate(zip(self.layers, self.bases)):
                    forward = _NoisyForward(layer, base, sigma, self.noise, opt.rng_seed(stream=i), self.kernel)
                    patches.append(_Patched(base, forward))
            yield Pass("perturbed", backward=True, sync=True, full_window=not combination.uses_clean)
        finally:
            for patch in reversed(patches):
                patch.undo()
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
    ``"uniform"`` scales of the merged weight), ``whole_model=True`` (every frozen linear, convolution
    and embedding layer too)
    and ``noisy_weight = λ < 1`` (the m-RWP mix ``λ·g_noisy + (1 − λ)·g_clean``, 2 fb).
    Noise on the LoRA factors only is ``fm.RWP``/``fm.MRWP`` with ``scope=lora_parameters(model)``.
    ``kernel`` picks the noisy-weight kernel (:func:`noisy_weight`).
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
