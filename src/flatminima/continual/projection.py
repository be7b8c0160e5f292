"""Gradient-projection baselines: GPM and OGD, and the input-subspace memory GPM and InfLoRA share.

**GPM** (Saha, Garg & Roy, ICLR 2021, *Gradient Projection Memory for Continual Learning*). For a
layer ``y = W x`` the step ``ΔW`` changes the output on an old input ``x`` by ``ΔW x``, which is 0
for ``x ∈ span(M)`` if every row of ``ΔW`` is orthogonal to ``span(M)``. After each task the layer's
*representation matrix* ``R = [x_1 … x_n]`` (``n_in × n``: every token, every convolution patch) is
summarised by an orthonormal basis ``M`` (``n_in × k``), chosen by GPM's energy criterion
(:func:`extend_basis`), and every later gradient is projected::

    g_W ← g_W − (g_W M) Mᵀ            (a plain nn.Linear / nn.Conv2d, W flattened to rows × n_in)

With SGD, and momentum (a sum of projected gradients), ``W' x = W x`` exactly for ``x ∈ span(M)``.
A trained bias is handled as a column of ``W`` on the constant input 1 (``x̃ = [x; 1]``,
``[g_W g_b] ← [g_W g_b](I − M̃ M̃ᵀ)``), so ``W'x + b' = W x + b`` exactly too. Adam (its
elementwise scaling leaves the subspace) and weight decay (it shrinks ``W M``) break exactness.

On a LoRA layer (``W = W0 + s·B A``, ``W0`` frozen) the projection acts on the factor that meets the
input, ``A`` (``r × n_in``): ``g_A ← g_A − (g_A M) Mᵀ``. What is preserved is ``A x`` for
``x ∈ span(M)`` (exactly, under SGD/momentum): after a step the layer gives
``W0 x + s·(B + ΔB) A x`` on an old input, so its output moves by ``s·ΔB·(A x)``: with ``B``
free (the default) old outputs are protected through the ``A`` path alone, not fully (nor to first
order: ``ΔB A x`` is itself first order). ``lora_b=True`` closes the gap: since ``g_A M = 0``,
``A M`` stays fixed through the task, and ``g_B ← g_B − (g_B Q) Qᵀ`` with ``Q`` an orthonormal
basis of ``range(A M) ⊂ R^r`` makes ``ΔB A x = 0``, so ``W' x = W x`` exactly on ``span(M)``;
``B`` is then frozen wherever ``A M`` has rank ``r`` (e.g. after a reset, ``B = 0`` stays 0).
InfLoRA (:mod:`.inflora`) instead designs ``A ⟂ M`` (``A x = 0`` on old inputs, ``B`` free).
The factors' own ``nn.Linear`` modules (PEFT's ``lora_A``/``lora_B``) are never read as plain
layers. Parameters of other layer types (norms, embeddings, grouped or ``padding='same'``
convolutions), and ``B`` without ``lora_b``, are not projected; ``state()["unprotected"]`` counts them.

**OGD** (Farajtabar, Azizan, Mott & Li, AISTATS 2020, *Orthogonal Gradient Descent for Continual
Learning*), the OGD-GTL variant: after each task the gradients ``∇_θ f_y(x)`` of the ground-truth
logit of ``per_task`` training examples are orthonormalised (Gram–Schmidt) against the stored
directions ``u_1 … u_K`` and stored; later gradients are projected ``g ← g − Σ_k (g·u_k) u_k``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.schedules import derive_seed
from ..core.validation import check, check_bool, check_choice, check_int, check_optional_int, check_range
from ..lora import lora_layers, reduction_dtype
from .strategy import Baseline, TaskContext, register_baseline

#: Which layers GPM protects: plain nn.Linear/nn.Conv2d whose weight trains, LoRA factors ``A``, or both.
LAYER_KINDS = ("all", "linear", "lora")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (dropout off, batch norm on running statistics); every module's own
    mode restored after (``Module.train(flag)`` would set a whole subtree to one mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def forward(model: nn.Module, x: Any) -> Tensor:
    """The logits of ``model`` on inputs ``x`` (a tensor, or a mapping of keyword tensors)."""
    out = model(**x) if isinstance(x, Mapping) else model(x)
    return getattr(out, "logits", out)


def energy_threshold(threshold: float, increment: float, task: int) -> float:
    """GPM's threshold of task ``task``: ``min(1, ε_th + task·increment)`` (the paper's code raises
    it by 0.003 per task on CIFAR-100)."""
    return min(1.0, threshold + task * increment)


@torch.no_grad()
def extend_basis(cov: Tensor, basis: Optional[Tensor], threshold: float) -> Tensor:
    """GPM's memory update from ``C = R Rᵀ`` (``R``: the layer's inputs of the task, ``n_in × n``),
    in float64. With ``P = I − M Mᵀ``, ``R̂ = P R`` (``R`` itself for the first task), the
    eigenpairs ``(σ̂_i², u_i)`` of ``R̂ R̂ᵀ = P C P`` (the SVD of ``R̂``) in decreasing order, the
    new basis is ``[M, u_1 … u_k]`` for the smallest ``k`` with

        ``‖M Mᵀ R‖²_F + Σ_{i≤k} σ̂_i²  ≥  ε·‖R‖²_F``       (``‖R‖²_F = tr C``, ``‖MMᵀR‖²_F = tr(Mᵀ C M)``),

    Saha et al.'s criterion (Eqs. 5 and 9): ``k = 0`` when the memory already holds ``ε`` of the
    energy; only directions of non-zero energy are taken. Returns ``n_in × k_total`` (orthonormal)."""
    c = cov.to(torch.float64)
    n = c.shape[0]
    m = torch.zeros(n, 0, dtype=torch.float64, device=c.device) if basis is None else basis.to(torch.float64)
    total = c.trace()
    kept = (m * (c @ m)).sum()
    p = torch.eye(n, dtype=torch.float64, device=c.device) - m @ m.T
    resid = p @ c @ p
    values, vectors = torch.linalg.eigh((resid + resid.T) / 2)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    need = float(threshold * total - kept)
    scale = float(values[0]) if n else 0.0
    positive = int((values > n * torch.finfo(torch.float64).eps * scale).sum()) if scale > 0 else 0
    k = min(int((values.cumsum(0) < need).sum()) + 1, positive) if need > 0 else 0
    new = vectors[:, :k]
    new = new - m @ (m.T @ new)  # one re-orthogonalisation against M: rounding of the eigenvectors
    new = torch.linalg.qr(new).Q if k else new
    return torch.cat([m, new], 1)


def supports_inputs(module: nn.Module) -> bool:
    """Whether the inputs of ``module`` can be read as rows of its flattened weight's columns: an
    ``nn.Linear``, or an ``nn.Conv2d`` (groups 1, zero or numeric padding) through its patches."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's inputs as rows ``N × n_in`` (a token per row; a convolution's patches, ``im2col``)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def input_covariances(model: nn.Module, modules: Mapping[str, tuple[nn.Module, bool]],
                      batches: Iterable[tuple[Any, Tensor]]) -> dict[str, Tensor]:
    """``C = Σ x xᵀ`` over every input row ``x`` of each module (``[x; 1]`` where its flag is set),
    through forward hooks (removed after) on ``batches``, in eval mode; accumulated in float32
    (float64 for float64 inputs) on the inputs' device, returned in float64."""
    covs: dict[str, Tensor] = {}

    def hook(key: str, bias: bool):
        def record(module, args, output):
            rows = _input_rows(module, args[0].detach())
            rows = rows.to(reduction_dtype(rows))
            if bias:
                rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
            if key not in covs:
                covs[key] = rows.new_zeros(rows.shape[1], rows.shape[1])
            covs[key].addmm_(rows.T, rows)
        return record

    handles = [m.register_forward_hook(hook(key, bias)) for key, (m, bias) in modules.items()]
    try:
        with evaluating(model):
            for x, _ in batches:
                forward(model, x)
    finally:
        for h in handles:
            h.remove()
    return {key: c.to(torch.float64) for key, c in covs.items()}


def _check_names(name: str, value: Any) -> tuple[str, ...]:
    check(name, isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value), value,
          "a list or tuple of module names (exact, or a dotted suffix)")
    return tuple(value)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


@register_baseline("gpm")
class GPM(Baseline):
    """Gradient Projection Memory (module docstring): per protected layer an orthonormal basis
    ``M`` of its past inputs, and ``g ← g − (g M) Mᵀ`` on its gradient every step.

    ``threshold`` (ε_th in ``(0, 1]``, default 0.97) and ``threshold_increment`` (added per task,
    ``[0, 1]``; the threshold is capped at 1): the energy criterion of :func:`extend_basis`.
    ``n_batches``: training batches of the task whose inputs form ``R`` (None: one epoch).
    ``layers``: ``"all"``, ``"linear"`` (plain ``nn.Linear``/``nn.Conv2d`` whose weight trains)
    or ``"lora"`` (the ``A`` factors of the LoRA adapters that train). ``exclude``: module names
    (exact or a dotted suffix) left unprotected, e.g. a classification head that must learn new classes.
    ``lora_b``: also project each LoRA ``B`` (module docstring): old outputs then exactly kept,
    at the price of freezing ``B`` wherever ``A M`` has rank ``r``.
    """

    has_projection = True

    def __init__(self, threshold: float = 0.97, threshold_increment: float = 0.0, n_batches: Optional[int] = 10,
                 layers: str = "all", exclude: Sequence[str] = (), lora_b: bool = False):
        self.threshold = check_range("threshold", threshold, 0.0, 1.0, low_open=True)
        self.threshold_increment = check_range("threshold_increment", threshold_increment, 0.0, 1.0)
        self.n_batches = check_optional_int("n_batches", n_batches, 1)
        self.layers = check_choice("layers", layers, LAYER_KINDS)
        self.exclude = _check_names("exclude", exclude)
        self.lora_b = check_bool("lora_b", lora_b)
        #: float64 bases by layer key (``"linear:<name>"``, ``"lora:<name>"``), ``n_in (+1) × k``
        self.memory: dict[str, Tensor] = {}
        self.unprotected = 0
        self._plan: list[tuple[list[Tensor], Optional[Tensor], Tensor, Optional[Tensor]]] = []

    def _targets(self, model: nn.Module, parameters: Sequence[Tensor]):
        """``key → (module read, tensors projected, trained bias or None, LoRA adapters or None)``."""
        trained = {id(p) for p in parameters}
        out: dict[str, tuple[nn.Module, list[Tensor], Optional[Tensor], Optional[list]]] = {}
        layers = lora_layers(model)
        if self.layers != "linear":
            for layer in layers:
                adapters = [a for a in layer.active() if id(a.a) in trained and a.layout != "embedding"]
                if adapters and supports_inputs(layer.base) and not _matches(layer.name, self.exclude):
                    out["lora:" + layer.name] = (layer.base, [a.a for a in adapters], None, adapters)
        if self.layers != "lora":
            # the factors' own modules (PEFT's lora_A/lora_B, QKVLoRA's linear_a/b) are not plain layers
            factors = {id(m) for layer in layers for m in layer.module.modules()} - {id(layer.base) for layer in layers}
            for name, m in model.named_modules():
                if (supports_inputs(m) and id(m) not in factors and id(m.weight) in trained
                        and not _matches(name, self.exclude)):
                    bias = m.bias if m.bias is not None and id(m.bias) in trained else None
                    out["linear:" + name] = (m, [m.weight], bias, None)
        covered = {id(t) for _, ts, b, _ in out.values() for t in [*ts, *([b] if b is not None else [])]}
        if self.lora_b:
            covered |= {id(a.b) for *_, adapters in out.values() for a in adapters or ()}
        self.unprotected = sum(p.numel() for p in parameters if id(p) not in covered)
        return out

    def start_task(self, context: TaskContext) -> None:
        """Project this task's gradients against the memory of the layers that train now (``lora_b``:
        ``B`` against ``range(A M)``, fixed through the task since ``g_A M = 0``)."""
        self._plan = []
        for key, (_, tensors, bias, adapters) in self._targets(context.model, context.parameters).items():
            if key not in self.memory or self.memory[key].shape[1] == 0:
                continue
            basis = self.memory[key]
            check("model", basis.shape[0] == tensors[0][0].numel() + (bias is not None), f"layer {key}",
                  "layers with the input width (and trained bias) of the earlier tasks")
            dtype = reduction_dtype(tensors[0])
            m = basis.to(device=tensors[0].device, dtype=dtype)
            inputs = tensors[0][0].numel()
            self._plan.append((tensors, bias, m[:inputs], m[inputs] if bias is not None else None))
            for adapter in adapters if self.lora_b else ():
                u, s, _ = torch.linalg.svd(adapter.matrices(dtype=torch.float64)[1] @ basis.to(adapter.a.device),
                                           full_matrices=False)
                q = u[:, s > s.shape[0] * torch.finfo(torch.float64).eps * s.max()] if s.numel() else u[:, :0]
                if q.shape[1]:
                    self._plan.append(([adapter.b], None, q.to(dtype), None))

    def end_task(self, context: TaskContext) -> None:
        """Extend each protected layer's basis with the task's inputs (:func:`extend_basis`)."""
        targets = self._targets(context.model, context.parameters)
        covs = input_covariances(context.model, {k: (m, b is not None) for k, (m, _, b, _) in targets.items()},
                                 context.batches(self.n_batches))
        eps = energy_threshold(self.threshold, self.threshold_increment, context.index)
        for key, cov in covs.items():
            old = self.memory.get(key)
            check("model", old is None or old.shape[0] == cov.shape[0], f"layer {key}",
                  "layers with the input width (and trained bias) of the earlier tasks")
            self.memory[key] = extend_basis(cov, old, eps)
        self._plan = []

    @torch.no_grad()
    def project(self, model: nn.Module) -> None:
        """``[g_W g_b] ← [g_W g_b] − ([g_W g_b] M̃) M̃ᵀ`` in place, per protected layer (no host sync)."""
        for tensors, bias, m, m1 in self._plan:
            gb = None if bias is None else bias.grad
            for w in tensors:
                g = w.grad
                if g is None:
                    continue
                g2 = g.reshape(g.shape[0], -1)
                gc = g2.to(m.dtype)
                c = gc @ m
                if gb is not None:
                    c.addr_(gb.to(m.dtype), m1)
                if g.is_contiguous() and gc is g2:  # a view of .grad: one fused update in place
                    g2.addmm_(c, m.T, alpha=-1)
                else:
                    g.sub_((c @ m.T).view(g.shape).to(g.dtype))
                if gb is not None:
                    gb.sub_((c @ m1).to(gb.dtype))

    def state(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "threshold_increment": self.threshold_increment,
                "dims": {k: int(v.shape[1]) for k, v in self.memory.items()},
                "inputs": {k: int(v.shape[0]) for k, v in self.memory.items()}, "unprotected": self.unprotected}


def _take(x: Any, i: int) -> Any:
    """Example ``i`` of a batch (a tensor, or a mapping of tensors), keeping a batch dimension of 1."""
    if isinstance(x, Mapping):
        return {k: _take(v, i) for k, v in x.items()}
    return x[i:i + 1]


@register_baseline("ogd")
class OGD(Baseline):
    """Orthogonal Gradient Descent, OGD-GTL (module docstring).

    After task ``t``: ``per_task`` examples (drawn with a generator seeded by the task's seed from
    its first ``n_batches`` batches; None: one epoch), each giving ``v = ∇_θ f_y(x)`` over the
    trained parameters (eval mode), orthonormalised by classical Gram–Schmidt run twice
    ("twice is enough": orthogonal to working precision) against the stored directions and kept
    when ``‖v⊥‖ > √eps·‖v‖``. Per step: ``g ← g − Uᵀ(U g)`` with ``U`` the ``K × P`` stored
    directions (``K`` matrix–vector products over the parameters; no host sync).

    Memory: ``K × P`` numbers, ``K ≤ max_directions`` (``P`` trained parameters; float32, float64
    for float64 parameters: float64 would double a cost that dominates, and two Gram–Schmidt passes
    make float32 directions orthonormal to ~1e-7): e.g. a ViT-B/16 with rank-16 LoRA on Q and V
    (P ≈ 0.6 M with a 100-class head) stores 2.4 MB per direction, 2.4 GB at ``K = 1000``. Once
    ``K = max_directions`` later examples are dropped (``state()["dropped"]``). The trained
    parameters must be the same tensors in every task (``finetune``, ``seq-lora`` with or without
    reset): directions over one task's adapter say nothing about another's.
    """

    has_projection = True

    def __init__(self, per_task: int = 100, max_directions: int = 1000, n_batches: Optional[int] = 4):
        self.per_task = check_int("per_task", per_task, 1)
        self.max_directions = check_int("max_directions", max_directions, 1)
        self.n_batches = check_optional_int("n_batches", n_batches, 1)
        self._params: Optional[list[Tensor]] = None
        self.basis: list[Tensor] = []  # per parameter, K × numel
        self.k = self.dropped = self.dependent = 0

    def _trained(self, context: TaskContext) -> list[Tensor]:
        params = [p for p in context.parameters if p.requires_grad]
        check("parameters", bool(params), "no trained parameters", "the tensors trained in the task")
        if self._params is not None:
            check("parameters", [id(p) for p in params] == [id(p) for p in self._params],
                  "other trained tensors than in the first task",
                  "the same trained parameters in every task (finetune or seq-lora; inc-lora, o-lora and n-lora "
                  "train a new adapter per task)")
        return params

    def start_task(self, context: TaskContext) -> None:
        self._trained(context)

    def _examples(self, context: TaskContext) -> list[tuple[Any, int]]:
        batches = [(x, y) for x, y in context.batches(self.n_batches)]
        index = [(b, i) for b, (_, y) in enumerate(batches) for i in range(y.shape[0])]
        g = torch.Generator().manual_seed(derive_seed(context.seed, 0x06D))
        chosen = sorted(torch.randperm(len(index), generator=g)[:self.per_task].tolist())
        return [(_take(batches[index[j][0]][0], index[j][1]), int(batches[index[j][0]][1][index[j][1]]))
                for j in chosen]

    def end_task(self, context: TaskContext) -> None:
        """Store the orthonormalised ground-truth-logit gradients of the task's examples."""
        params = self._trained(context)
        examples = self._examples(context)
        if self._params is None:
            self._params = params
            dtype = reduction_dtype(params[0])
            self.basis = [torch.zeros(0, p.numel(), dtype=dtype, device=p.device) for p in params]
        room = min(self.max_directions - self.k, len(examples))
        self.dropped += len(examples) - room
        if room == 0:
            return
        grown = [torch.cat([u, u.new_zeros(room, u.shape[1])]) for u in self.basis]
        tol = torch.finfo(grown[0].dtype).eps ** 0.5
        with evaluating(context.model), torch.enable_grad():
            for x, y in examples[:room]:
                logit = forward(context.model, x)[0, y]
                grads = torch.autograd.grad(logit, params, allow_unused=True)
                v = [torch.zeros(p.numel(), dtype=u.dtype, device=u.device) if g is None else
                     g.detach().reshape(-1).to(u.dtype) for p, g, u in zip(params, grads, grown)]
                before = torch.sqrt(sum((t * t).sum() for t in v))
                for _ in range(2):
                    c = sum(u[:self.k] @ t for u, t in zip(grown, v))
                    v = [t - u[:self.k].T @ c for u, t in zip(grown, v)]
                norm = torch.sqrt(sum((t * t).sum() for t in v))
                if float(norm) <= tol * float(before) or float(before) == 0.0:
                    self.dependent += 1
                    continue
                for u, t in zip(grown, v):
                    u[self.k].copy_(t / norm)
                self.k += 1
        self.basis = [u[:self.k].clone() for u in grown]

    @torch.no_grad()
    def project(self, model: nn.Module) -> None:
        """``g ← g − Σ_k (g·u_k) u_k`` over the trained parameters, in place (a missing ``.grad`` is 0)."""
        if not self.k:
            return
        c = None
        for p, u in zip(self._params, self.basis):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            flat = p.grad.reshape(-1).to(u.dtype)
            c = u @ flat if c is None else c.addmv_(u, flat)
        for p, u in zip(self._params, self.basis):
            g = p.grad
            if g.is_contiguous() and g.dtype == u.dtype:
                g.view(-1).addmv_(u.T, c, alpha=-1)
            else:
                g.sub_((u.T @ c).view(g.shape).to(g.dtype))

    def state(self) -> dict[str, Any]:
        return {"directions": self.k, "max_directions": self.max_directions, "dropped": self.dropped,
                "dependent": self.dependent,
                "parameters": sum(p.numel() for p in self._params) if self._params is not None else 0}


__all__ = ["GPM", "LAYER_KINDS", "OGD", "energy_threshold", "evaluating", "extend_basis", "forward",
           "input_covariances", "supports_inputs"]
