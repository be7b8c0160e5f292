"""InfLoRA (Liang & Li, CVPR 2024, *InfLoRA: Interference-Free Low-Rank Adaptation for Continual
Learning*): each task's adapter has a *designed*, frozen down-projection orthogonal to the inputs of
the earlier tasks, so training it cannot change the layer's output on them.

A LoRA layer computes ``W0 x + s·B A x`` (the paper writes the branch ``A_t B_t`` with ``B_t`` the
``r × d_in`` matrix that meets the input: our ``A``, the protocol's ``a``). Before task ``t``, with
``H_t`` the layer's inputs of the task (``n_in × n``, every token; a convolution's patches), ``M``
the orthonormal basis of the earlier tasks' inputs (GPM's memory, ``n_in × k``) and
``P = I − M Mᵀ``, the rows of ``A_t`` are the top-``r`` eigenvectors of the projected covariance

    ``Ĥ_t Ĥ_tᵀ = P H_t H_tᵀ P``     (``Ĥ_t = P H_t``: the paper's "remove" projection; the top-r left
                                       singular vectors of ``Ĥ_t``),

taken inside ``span(M)^⊥`` (:func:`design_down_projection`), times ``a_scale``. ``A_t`` is frozen,
``B_t`` starts at 0 and trains (with the head). Since ``A_t M = 0``, for every ``x ∈ span(M)``
``s·B_t A_t x = 0`` whatever ``B_t`` becomes, under any optimizer: the task adds nothing to the
layer's output on old inputs (in the first LoRA layer exactly; deeper layers see inputs that moved
only through the layers before them, which the same argument protects on ``span(M)``), and its
update ``s·B_t A_t`` lies in the task's own input subspace. After the task ``M`` is extended with the
task's inputs by GPM's energy criterion (:func:`~flatminima.continual.projection.extend_basis`;
threshold ``ε_th`` and its per-task increment as in GPM).

Choices where the sources differ (see the semantics notes): the paper's memory is DualGPM (a basis
of ``span(M)`` or of its complement, whichever is smaller, and the "retain" projection ``MMᵀH``
once the complement is the one stored); this implementation keeps the plain GPM memory of
``span(M)`` (the same subspace, stored the long way for late tasks). The official code takes the
left singular vectors of ``P·(H Hᵀ/n)`` (projected on one side only), which are the eigenvectors of
``P C² P`` rather than of ``P C P``; we follow the paper's ``Ĥ = P H``. ``a_scale`` defaults to the
official code's ``1/√3``, the expected row norm of PEFT's Kaiming-uniform ``A`` (``n_in·bound²/3``
with ``bound = 1/√n_in``), so ``B`` trains at the step sizes of plain LoRA. Where ``span(M)^⊥`` has
fewer than ``r`` dimensions the missing rows of ``A`` are 0 (``state()["zero_rows"]``).

Lifecycle: every task must train a fresh adapter: ``inc-lora`` (a new PEFT adapter per task) or
``seq-lora`` with ``reset=True`` (merge-then-reset). ``finetune`` (no adapter; base weights train),
``seq-lora`` without reset (the designed ``A`` would be reused), ``o-lora``/``n-lora`` (their
penalties act on ``A``, which InfLoRA freezes) are refused.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from ..core.validation import check, check_optional_int, check_range
from ..lora import LoRALayer, LowRankAdapter, lora_layers
from .adapters import PAST, ContinualLoRA
from .projection import energy_threshold, extend_basis, input_covariances, supports_inputs
from .strategy import Baseline, TaskContext, register_baseline

_LIFECYCLES = "inc-lora, or seq-lora with reset=True (each task trains a fresh adapter)"


@torch.no_grad()
def design_down_projection(cov: Tensor, basis: Optional[Tensor], r: int) -> Tensor:
    """InfLoRA's ``A`` (``r × n_in``, orthonormal rows, float64) from ``C = H Hᵀ`` and the memory
    ``M``: with ``Q`` an orthonormal basis of ``span(M)^⊥`` (the eigenvectors of ``I − MMᵀ`` of
    eigenvalue 1), the top-``r`` eigenvectors ``V`` of ``Qᵀ C Q`` give ``A = (Q V)ᵀ``: the top-``r``
    eigenvectors of ``P C P`` whenever its ``r``-th eigenvalue is positive, and orthogonal to
    ``M`` even where it is not. Rows beyond ``dim span(M)^⊥`` are 0."""
    c = cov.to(torch.float64)
    n = c.shape[0]
    eye = torch.eye(n, dtype=torch.float64, device=c.device)
    if basis is None or basis.shape[1] == 0:
        q = eye
    else:
        m = basis.to(torch.float64)
        values, vectors = torch.linalg.eigh(eye - m @ m.T)
        q = vectors[:, values > 0.5]
    inner = q.T @ c @ q
    _, vectors = torch.linalg.eigh((inner + inner.T) / 2)
    top = (q @ vectors.flip(1)[:, :r]).T
    out = torch.zeros(r, n, dtype=torch.float64, device=c.device)
    out[:top.shape[0]] = top
    return out


@register_baseline("inflora")
class InfLoRA(Baseline):
    """InfLoRA (module docstring) on every LoRA layer whose adapter trains in the task.

    ``threshold`` (ε_th in ``(0, 1]``) and ``threshold_increment`` (per task, ``[0, 1]``): GPM's
    energy criterion for the input memory. ``n_batches``: training batches whose inputs form ``H``
    (None: one epoch). ``a_scale`` (> 0): the norm of ``A``'s rows. ``lifecycle``: the run's
    :class:`~flatminima.continual.ContinualLoRA`, checked at once (``inc-lora``, or ``seq-lora``
    with ``reset=True``); without it the same is checked from the model at each task start.

    :meth:`start_task` writes ``A`` and zeroes ``B`` of the adapters that train, and sets
    ``A.requires_grad = False`` (restored by :meth:`end_task`): the task trains ``B`` (and the
    head) only, so build the optimizer after it, or over tensors whose gradient stays None.
    """

    def __init__(self, threshold: float = 0.97, threshold_increment: float = 0.0, n_batches: Optional[int] = 10,
                 a_scale: float = 1.0 / math.sqrt(3.0), lifecycle: Optional[ContinualLoRA] = None):
        self.threshold = check_range("threshold", threshold, 0.0, 1.0, low_open=True)
        self.threshold_increment = check_range("threshold_increment", threshold_increment, 0.0, 1.0)
        self.n_batches = check_optional_int("n_batches", n_batches, 1)
        self.a_scale = check_range("a_scale", a_scale, 0.0, math.inf, low_open=True, high_open=True)
        if lifecycle is not None:
            check("lifecycle", isinstance(lifecycle, ContinualLoRA), type(lifecycle).__name__,
                  "None or the run's flatminima.continual.ContinualLoRA")
            ok = lifecycle.strategy == "inc-lora" or (lifecycle.strategy == "seq-lora" and lifecycle.reset)
            check("lifecycle", ok, f"{lifecycle.strategy}" + (" (reset=False)" if lifecycle.strategy == "seq-lora" else ""),
                  _LIFECYCLES)
        #: float64 input bases by LoRA layer name, ``n_in × k``
        self.memory: dict[str, Tensor] = {}
        self.zero_rows = 0
        self._frozen: list[tuple[Tensor, bool]] = []
        self._designed: list[tuple[Tensor, Tensor]] = []
        self._layers: list[LoRALayer] = []

    def _trained_adapters(self, context: TaskContext) -> list[tuple[LoRALayer, list[LowRankAdapter]]]:
        """The layers and adapters that train in the task, or ValueError (nothing changed yet)."""
        trained = {id(p) for p in context.parameters}
        pairs = []
        for layer in lora_layers(context.model):
            check("lifecycle", not any(a.name == PAST for a in layer.adapters), "o-lora or n-lora (a folded adapter)",
                  _LIFECYCLES)
            check("lifecycle", id(layer.weight) not in trained, "finetune (the base weights train)", _LIFECYCLES)
            adapters = [a for a in layer.active() if id(a.a) in trained and id(a.b) in trained]
            if not adapters:
                continue
            check("model", all(a.layout != "embedding" and a.variant is None for a in adapters)
                  and supports_inputs(layer.base), f"layer {layer.name!r}",
                  "plain LoRA adapters on nn.Linear or nn.Conv2d (groups 1, numeric padding) layers")
            pairs.append((layer, adapters))
        check("lifecycle", bool(pairs), "no LoRA adapter trains in this task", _LIFECYCLES)
        for a, designed in self._designed:
            reused = any(a is x.a for _, adapters in pairs for x in adapters)
            check("lifecycle", not (reused and torch.equal(a, designed)),
                  "seq-lora without reset (the adapter of the last task trains again)", _LIFECYCLES)
        return pairs

    def start_task(self, context: TaskContext) -> None:
        """Design and freeze ``A``, zero ``B``, for each adapter that trains (module docstring)."""
        pairs = self._trained_adapters(context)
        covs = input_covariances(context.model, {layer.name: (layer.base, False) for layer, _ in pairs},
                                 context.batches(self.n_batches))
        self._frozen, self._designed, self._layers, self.zero_rows = [], [], [layer for layer, _ in pairs], 0
        for layer, adapters in pairs:
            n = adapters[0].shape()[2]
            cov = covs.get(layer.name, torch.zeros(n, n, dtype=torch.float64, device=layer.weight.device))
            rows = design_down_projection(cov, self.memory.get(layer.name), max(a.rank() for a in adapters))
            with torch.no_grad():
                for adapter in adapters:
                    a = rows[:adapter.rank()]
                    self.zero_rows += int((a.abs().sum(1) == 0).sum())
                    adapter.a.copy_((self.a_scale * a).view(adapter.a.shape).to(adapter.a.dtype))
                    adapter.b.zero_()
            for adapter in adapters:
                self._frozen.append((adapter.a, adapter.a.requires_grad))
                adapter.a.requires_grad_(False)
                self._designed.append((adapter.a, adapter.a.detach().clone()))

    def end_task(self, context: TaskContext) -> None:
        """Unfreeze ``A`` and extend each layer's input memory with the task's inputs."""
        for a, flag in self._frozen:
            a.requires_grad_(flag)
        self._frozen = []
        covs = input_covariances(context.model, {layer.name: (layer.base, False) for layer in self._layers},
                                 context.batches(self.n_batches))
        eps = energy_threshold(self.threshold, self.threshold_increment, context.index)
        for name, cov in covs.items():
            self.memory[name] = extend_basis(cov, self.memory.get(name), eps)

    def state(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "threshold_increment": self.threshold_increment,
                "a_scale": self.a_scale, "dims": {k: int(v.shape[1]) for k, v in self.memory.items()},
                "zero_rows": self.zero_rows}


__all__ = ["InfLoRA", "design_down_projection"]
