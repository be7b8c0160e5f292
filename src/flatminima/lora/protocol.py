"""The LoRA protocol: how the library reads a low-rank adapter, whatever module holds it.

For the library a LoRA layer is a frozen *base layer* (``nn.Linear``, ``nn.Conv1d/2d/3d`` or
``nn.Embedding``, weight ``W0`` viewed as ``rows × n_in``) and a list of low-rank adapters
``(A_a, B_a, s_a, rows_a)``. The layer computes what its base layer computes with the weight

    ``W = W0 + Σ_{a active} s_a · P_a(B_a A_a)``

where ``P_a`` places the ``|rows_a| × n_in`` product in the output rows ``rows_a`` (all rows for an
ordinary layer; the Q rows or the V rows of a fused ``qkv`` projection). Several adapters per layer
are allowed (past and current tasks, or Q and V of one adapter). Everything LoRA-aware in the
library (Flat-LoRA, SAM-LoRA, BAR, the perturbation supports, landscapes with ``merged=True``, the
LoRA-subspace Hessians, continual penalties) reads layers through :func:`lora_layers`.

Readers for PEFT's ``LoraLayer`` (Linear, Conv, Embedding; several adapters) and for the fused-qkv
module :class:`flatminima.lora.QKVLoRA` ship with the library. A module class of your own is one
call away::

    class MyLoRA(nn.Module):                     # y = base(x) + s·B(A(x))
        def __init__(self, base: nn.Linear, r: int, alpha: float):
            super().__init__()
            self.base, self.scale = base, alpha / r
            self.A = nn.Parameter(torch.randn(r, base.in_features) / r)
            self.B = nn.Parameter(torch.zeros(base.out_features, r))

        def forward(self, x):
            return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T

    fm.lora.register_lora_layer(MyLoRA, lambda m: fm.lora.LoRALayer(
        m, m.base, [fm.lora.LowRankAdapter(m.A, m.B, m.scale)]))

The reader is called on every instance of the class (subclasses included) each time a model is
read; it returns the layer as it computes now (an adapter that is merged or disabled is left out
of ``adapters`` or marked inactive), so it never goes stale.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..core.validation import check

#: Base layers the protocol knows: their weight is what the adapters add to.
BASE_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
#: How an adapter's tensors form its ``rows × n_in`` product ``B A``.
LAYOUTS = ("linear", "conv", "embedding")


@dataclass(eq=False)
class LowRankAdapter:
    """One low-rank adapter of a layer: ``s·B A`` added to the output rows ``rows`` of the base weight.

    ``a``, ``b``: the parameters. ``layout`` says how they form the matrices ``B`` (``|rows| × r``)
    and ``A`` (``r × n_in``): ``"linear"`` (``A`` is ``r × n_in``, ``B`` is ``|rows| × r``),
    ``"conv"`` (``A`` is a convolution kernel ``r × c_in × k…``, flattened; ``B`` a ``1×…×1``
    kernel ``c_out × r × 1…``, squeezed) or ``"embedding"`` (PEFT's ``lora_embedding_A`` is
    ``r × num_embeddings``, ``B`` is ``dim × r``; ``ΔW = s·(BA)ᵀ``). ``name``: the adapter's name
    (parts of one adapter, Q and V, share it). ``active``: whether the layer's output includes it
    now. ``variant``: a reason the layer's function is not ``W0 + s·BA`` in this adapter (PEFT's
    DoRA), or None."""

    a: Tensor
    b: Tensor
    scaling: float
    rows: slice = field(default_factory=lambda: slice(None))
    name: str = "default"
    layout: str = "linear"
    active: bool = True
    variant: Optional[str] = None

    def __post_init__(self):  # read at every noisy pass: only failing checks cost a call
        if self.layout not in LAYOUTS:
            check("layout", False, self.layout, f"one of {', '.join(LAYOUTS)}")
        if not (isinstance(self.rows, slice) and self.rows.step in (None, 1)):
            check("rows", False, self.rows, "a slice of consecutive output rows")
        for side, t in (("a", self.a), ("b", self.b)):
            if not (isinstance(t, Tensor) and t.is_floating_point()):
                check(side, False, type(t).__name__, "a floating-point tensor")

    def shape(self) -> tuple[int, int, int]:
        """``(|rows|, r, n_in)`` of the matrices ``B`` and ``A``, from the tensors' shapes."""
        a, b = self.a.shape, self.b.shape
        if self.layout == "embedding":
            return a[1], a[0], b[0]
        return b[0], a[0], math.prod(a[1:])

    def matrices(self, a: Optional[Tensor] = None, b: Optional[Tensor] = None,
                 dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        """``(B, A)`` as ``|rows| × r`` and ``r × n_in`` matrices (views where the layout allows),
        of the adapter's tensors or of ``a``/``b`` shaped like them (a perturbation, a gradient)."""
        a = self.a if a is None else a
        b = self.b if b is None else b
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        if self.layout == "embedding":
            return a.T, b.T
        return b.flatten(1), a.flatten(1)

    def rank(self) -> int:
        return self.shape()[1]


@dataclass(eq=False)
class LoRALayer:
    """A layer as the library reads it: ``module`` (the module the reader was given), its frozen
    ``base`` layer (whose ``weight`` is ``W0``) and its ``adapters``; ``name`` is the module's
    qualified name in the model (set by :func:`lora_layers`)."""

    module: nn.Module
    base: nn.Module
    adapters: list[LowRankAdapter]
    name: str = ""

    def __post_init__(self):
        if not isinstance(self.base, BASE_LAYER_TYPES):
            check("base", False, type(self.base).__name__,
                  "an nn.Linear, nn.Conv1d/2d/3d or nn.Embedding whose weight the adapters add to")
        self.adapters = list(self.adapters)
        shape = self.base.weight.shape
        rows = shape[0]
        n_in = math.prod(shape[1:])
        for adapter in self.adapters:
            start, stop, _ = adapter.rows.indices(rows)
            b_rows, _, a_cols = adapter.shape()
            if b_rows != stop - start or a_cols != n_in:
                check("adapters", False, f"B with {b_rows} rows, A with {a_cols} columns on rows {start}:{stop} of a "
                      f"{tuple(shape)} weight", f"B with {stop - start} rows and A with {n_in} columns")

    @property
    def weight(self) -> Tensor:
        """``W0``, the base layer's weight (never written by the library)."""
        return self.base.weight

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    def active(self) -> list[LowRankAdapter]:
        """The adapters in the layer's output now."""
        return [a for a in self.adapters if a.active]

    def named(self, name: Optional[str]) -> list[LowRankAdapter]:
        """The adapters called ``name`` (None: the active ones)."""
        return self.active() if name is None else [a for a in self.adapters if a.name == name]

    def variant(self) -> Optional[str]:
        """Why the layer's function is not ``W0 + Σ s·BA`` (an active adapter's variant), or None."""
        return next((a.variant for a in self.active() if a.variant), None)

    def add_delta_(self, w: Tensor, adapters: Optional[list[LowRankAdapter]] = None, alpha: float = 1.0) -> Tensor:
        """``w += alpha·Σ s_a·P_a(B_a A_a)`` over ``adapters`` (default: the active ones), for ``w``
        a ``rows × n_in`` matrix (the weight flattened); returns ``w``."""
        for adapter in self.active() if adapters is None else adapters:
            b, a = adapter.matrices(dtype=w.dtype)
            w[adapter.rows].addmm_(b, a, alpha=alpha * float(adapter.scaling))
        return w

    @torch.no_grad()
    def delta(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``ΔW = Σ_active s·P(BA)``, shaped like ``W0`` (a new tensor; ``dtype``: ``W0``'s by default)."""
        w = torch.zeros(self.weight.shape, dtype=dtype or self.weight.dtype, device=self.weight.device)
        self.add_delta_(w.view(self.rows, -1))
        return w

    @torch.no_grad()
    def merged(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``W0 + ΔW``, shaped like ``W0`` (a new tensor; ``dtype``: ``W0``'s by default)."""
        w = self.weight.detach().to(dtype or self.weight.dtype, copy=True)
        self.add_delta_(w.view(self.rows, -1))
        return w


Reader = Callable[[nn.Module], Optional[LoRALayer]]
_READERS: dict[type, Reader] = {}


def register_lora_layer(cls: type, reader: Reader) -> None:
    """Teach the library a LoRA module class: ``reader(module)`` returns its :class:`LoRALayer`
    (or None for an instance that holds no adapter). Registering a class again replaces its reader."""
    check("cls", isinstance(cls, type), cls, "a class (an nn.Module subclass, or a mixin of them such as PEFT's LoraLayer)")
    check("reader", callable(reader), type(reader).__name__, "a callable module -> LoRALayer or None")
    _READERS[cls] = reader


def unregister_lora_layer(cls: type) -> None:
    """Forget the reader of ``cls`` (registered with :func:`register_lora_layer`)."""
    check("cls", cls in _READERS, cls, f"a registered class: {', '.join(c.__name__ for c in _READERS)}")
    del _READERS[cls]


def reader_for(module: nn.Module) -> Optional[Reader]:
    """The reader registered for ``module``'s class (the most specific one), or None."""
    for cls in type(module).__mro__:  # the most specific registered class
        if cls in _READERS:
            return _READERS[cls]
    return None


_LAZY: list[tuple[str, str, Reader]] = []


def register_lora_layer_by_name(module: str, qualname: str, reader: Reader) -> None:
    """Register ``reader`` for the class ``qualname`` of the module ``module`` once that module is
    imported (an optional extra such as PEFT: a PEFT model means PEFT is imported; nothing is
    imported here)."""
    _LAZY.append((module, qualname, reader))


def _resolve_lazy() -> None:
    for entry in list(_LAZY):
        module, qualname, reader = entry
        if module in sys.modules:
            register_lora_layer(getattr(sys.modules[module], qualname), reader)
            _LAZY.remove(entry)


def lora_layers(model: nn.Module) -> list[LoRALayer]:
    """The LoRA layers of ``model``, in module order, read through the registered readers
    (PEFT's ``LoraLayer``, :class:`~flatminima.lora.QKVLoRA`, and the classes you registered).
    A LoRA module inside another one's base is read once (the outer one)."""
    check("model", isinstance(model, nn.Module), type(model).__name__, "a torch.nn.Module with LoRA layers")
    _resolve_lazy()
    out: list[LoRALayer] = []
    inside: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        reader = reader_for(module)
        layer = reader(module) if reader is not None else None
        if layer is not None:
            layer.name = name
            out.append(layer)
            inside.update(id(m) for m in module.modules())
    return out


def require_lora_layers(model: nn.Module, what: str = "") -> list[LoRALayer]:
    """:func:`lora_layers`, refusing a model without any (``what``: who needs them)."""
    layers = lora_layers(model)
    check("model", bool(layers), type(model).__name__,
          "a model with LoRA layers (PEFT's LoraLayer, flatminima.lora.QKVLoRA, or a class registered with "
          f"flatminima.lora.register_lora_layer){' for ' + what if what else ''}")
    return layers
