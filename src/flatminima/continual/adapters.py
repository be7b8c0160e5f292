"""LoRA adapters for a sequence of tasks on current PEFT: which adapter trains, which are frozen, the
strategy's penalty, and the fold of a finished task into the frozen past.

Strategies (:data:`STRATEGIES`), for tasks ``t = 0, 1, …``:

* ``finetune``: every parameter of the model trains in every task; no adapters, no penalty.
* ``seq-lora``: the model's one adapter trains through all tasks.
* ``inc-lora``: a new adapter per task; the earlier ones stay active and frozen, so the layer computes
  ``W0 + Σ_{k≤t} s_k·B_k A_k`` (incremental LoRA, the sum of frozen adapters, as in InfLoRA's
  sequence of branches, Liang & Li, CVPR 2024, without its subspace constraint).
* ``o-lora`` (O-LoRA, Wang et al., EMNLP Findings 2023, *Orthogonal Subspace Learning for Language
  Model Continual Learning*): a new adapter per task, trained with
  ``λ₁·Σ_layers Σ_ij |(A_past A_newᵀ)_ij| + λ₂·Σ_{P ∈ new} ‖P‖_F``; the B side compares
  ``B_pastᵀ B_new``; ``squared`` uses ``(·)²`` instead of ``|·|``.
* ``n-lora`` (N-LoRA, Yang et al., COLING 2025, *Is Parameter Collision Hindering Continual Learning
  in LLMs?*): the same adapters, trained with the paper's ``λ·Σ_layers ‖ΔW_new‖₁``, the ℓ1 norm of
  the task's update ``ΔW = s·B A`` (``s`` PEFT's scaling, ``B A`` in PyTorch's ``out × in`` layout):
  sparse updates collide less. Not the official code's ``‖A B‖₁`` (an ``r × r`` product that only
  runs when ``in == out``), nor an ℓ1 on the factors, which is not invariant to ``(A, B) → (cA, B/c)``.

O-LoRA and N-LoRA fold each finished task into one frozen adapter ``past`` by concatenation along
the rank::

    A_past' = [A_past; A_new],   B_past' = [s_past·B_past, s_new·B_new],   s_past' = 1,

so ``s_past'·B_past' A_past' = s_past·B_past A_past + s_new·B_new A_new``: the model's function is
unchanged, the scalings live in ``B`` (the A-side penalty compares unscaled ``A``), and a layer's
past rank is the sum of the ranks of the tasks so far. PEFT's ``add_weighted_adapter(…, "cat")`` is
not used: it puts the scalings into ``A``, sets ``lora_alpha = r`` (a scaling ``√r`` under rsLoRA)
and draws the new adapter's init from the global RNG.

Task 0 of every LoRA strategy trains the model's existing adapter (its name is kept); task ``t > 0``
adds ``task{t}`` with ``config``. Between tasks nothing but the ``trainable`` modules requires
grad. New adapters are initialised from ``(seed, t)`` inside a forked CPU RNG: reproducible, and the
caller's RNG never moves. The classification head is named in ``trainable`` and trained by setting
``requires_grad`` here, never through PEFT's ``modules_to_save`` (which refuses several active
adapters). The adapters' lifecycle (add, delete, activate, merge) is PEFT's, which owns the modules; the
penalty and the fold read factors through the LoRA protocol (:func:`flatminima.lora.lora_layers`).

Saving: every adapter (past and current) is in ``model.peft_config``, hence in ``model.state_dict()``
and ``model.save_pretrained`` (the head is in the state dict only). :meth:`ContinualLoRA.merge`
merges every active adapter, the current one included, into the base weights.

Merge-then-reset (``seq-lora`` with ``reset=True``): at the end of each task the adapter's update is
merged into the base weights, ``W0 ← W0 + s·B A`` (rows respected, formed in float64 and cast once,
so a bf16 base is rounded once per task), and the adapter re-initialised (``A`` Kaiming-uniform
from a generator seeded by ``(seed, task)``, ``B = 0``): the function is unchanged and every task
trains a fresh adapter on top of the merged past (:mod:`.lifecycle`). InfLoRA's designed adapters
need it (or ``inc-lora``).

Models: ``inc-lora``, ``o-lora`` and ``n-lora`` need a ``peft.PeftModel`` (PEFT adds and deletes
their adapters). ``seq-lora`` (with or without ``reset``) takes any model whose LoRA layers the
protocol reads (PEFT's, :class:`~flatminima.lora.QKVLoRA` from :func:`flatminima.vit.vit_lora`, or a
registered class): every active adapter of those layers trains. ``finetune`` takes any model.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.validation import check, check_bool, check_int, check_nonnegative
from ..lora import LoRALayer, LowRankAdapter, lora_layers, reduction_dtype, require_lora_layers
from ..lora.layers import require_plain
from .lifecycle import (add_peft_adapter, adapter_named, fold_peft_adapters, is_peft_model, merge_and_reset_,
                        merge_into_base_, named_peft_modules, peft_layers, seeded)

STRATEGIES = ("finetune", "seq-lora", "inc-lora", "o-lora", "n-lora")
#: Strategies that fold each finished task into the frozen adapter :data:`PAST`.
FOLDING = ("o-lora", "n-lora")
#: Strategies that add an adapter per task: PEFT's adapters only.
PEFT_ONLY = ("inc-lora", "o-lora", "n-lora")
ORTH_SIDES = ("A", "B", "AB")
PAST = "past"
#: ``init_lora_weights`` values that leave the base weights alone (PiSSA, OLoRA, LoftQ, … rewrite
#: ``W0``, under the frozen adapters of earlier tasks).
SAFE_INITS = (True, False, "gaussian")


def _matrices(adapter: LowRankAdapter, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """PEFT's ``(A, B)`` as ``r × n`` and ``m × r`` matrices in ``dtype``: a convolution's A
    ``(r, in, kh, kw)`` flattened, its B ``(out, r, 1, 1)`` squeezed (an embedding's ``B A`` is ``ΔWᵀ``)."""
    return adapter.a.to(dtype).flatten(1), adapter.b.to(dtype).flatten(1)


#: Elements of ``B A`` formed at once by :func:`update_l1` (rows of ``B`` are taken in chunks).
_CHUNK = 1 << 22


class _UpdateL1(torch.autograd.Function):
    """``Σ_ij |(B A)_ij|`` with ``∂/∂A = Bᵀ sign(BA)`` and ``∂/∂B = sign(BA) Aᵀ``: the product is
    formed in row chunks of ``B`` in the forward and again in the backward, so only ``A`` and ``B``
    are kept between them (autograd of ``(B @ A).abs().sum()`` would keep the whole ``out × in``
    product and its sign per layer until the backward)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        rows = max(1, _CHUNK // max(a.shape[1], 1))
        return sum(((bc @ a).abs().sum() for bc in b.split(rows)), torch.zeros((), dtype=a.dtype, device=a.device))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        a, b = ctx.saved_tensors
        rows = max(1, _CHUNK // max(a.shape[1], 1))
        grad_a, grad_b = torch.zeros_like(a), []
        for bc in b.split(rows):
            sign = (bc @ a).sign_()  # sign(0) = 0: the subgradient autograd's abs() uses
            grad_a.addmm_(bc.T, sign)
            grad_b.append(sign @ a.T)
        return grad_a * grad, torch.cat(grad_b) * grad


def update_l1(a: Tensor, b: Tensor, scaling: float = 1.0) -> Tensor:
    """N-LoRA's penalty on one layer: ``‖s·B A‖₁ = |s|·Σ_ij |(B A)_ij|`` for ``A`` (``r × n_in``)
    and ``B`` (``n_out × r``), differentiable w.r.t. both, without keeping ``B A`` for the backward."""
    return abs(scaling) * _UpdateL1.apply(a, b)


def _config_problem(config, plain: bool) -> Optional[str]:
    """Why ``config`` cannot make this strategy's adapters, or None (``plain``: variants refused)."""
    if config.modules_to_save:
        return "modules_to_save (name the head in trainable= instead)"
    if getattr(config, "target_parameters", None):
        return "target_parameters"
    if config.init_lora_weights not in SAFE_INITS:
        return f"init_lora_weights={config.init_lora_weights!r} (it rewrites the base weights)"
    if plain:  # concatenation and merge-then-reset keep the function of plain adapters only
        variants = [f.name for f in dataclasses.fields(config)
                    if f.metadata.get("is_lora_variant") and getattr(config, f.name)]
        variants += ["lora_bias"] if config.lora_bias else []
        if variants:
            return f"a LoRA variant ({', '.join(variants)})"
    return None


class ContinualLoRA:
    """Adapter bookkeeping for continual LoRA (see the module docstring for the strategies).

    ``model``: a ``peft.PeftModel`` with one LoRA adapter; for ``seq-lora`` any model with LoRA
    layers the protocol reads; any ``nn.Module`` for ``finetune``.
    ``trainable``: names (exact, or a dotted suffix) of non-LoRA modules trained in every task.
    ``orth_weight`` (λ₁, O-LoRA only), ``l2_weight`` (λ₂, ``Σ‖P‖_F``) and ``l1_weight`` (λ,
    ``Σ_layers ‖s·B A‖₁``) weigh the penalty terms on the current adapter (O-LoRA: λ₁, λ₂; N-LoRA: λ).
    ``orth_side``: the factors O-LoRA compares (``"A"``, ``"B"`` or ``"AB"``, both summed);
    ``squared``: ``(·)²`` instead of ``|·|``. ``reset`` (``seq-lora`` only): merge the adapter
    into the base weights and re-initialise it at the end of each task. ``config``: the
    ``LoraConfig`` of new adapters (default: a copy of the model's adapter's; PEFT models only).
    ``seed``: new adapters' init, with the task index.

    ``current``: the adapter being trained (None between tasks and for ``finetune``; on a model
    outside PEFT, the names of its active adapters joined by ``+``); ``past``: the frozen active
    adapters (``[PAST]`` once O-LoRA/N-LoRA folded a task; seq-LoRA's one adapter between tasks).
    ``has_penalty``: whether :meth:`penalty` can be non-zero. Call :meth:`start_task` before and
    :meth:`end_task` after each task, add :meth:`penalty` to the loss and optimize
    :meth:`trainable_parameters`.
    """

    def __init__(self, model: nn.Module, strategy: str, *, trainable: Sequence[str] = (), orth_weight: float = 0.5,
                 l2_weight: float = 0.0, orth_side: str = "A", squared: bool = False, l1_weight: float = 0.0,
                 reset: bool = False, config=None, seed: int = 0):
        check("strategy", strategy in STRATEGIES, strategy, f"one of {', '.join(STRATEGIES)}")
        for name, value in (("orth_weight", orth_weight), ("l2_weight", l2_weight), ("l1_weight", l1_weight)):
            check_nonnegative(name, value)
        check("orth_side", orth_side in ORTH_SIDES, orth_side, f"one of {', '.join(ORTH_SIDES)}")
        check("squared", isinstance(squared, bool), squared, "True or False")
        check_bool("reset", reset)
        check("reset", not reset or strategy == "seq-lora", reset,
              f"False for {strategy} (reset=True: merge-then-reset, with strategy 'seq-lora' only)")
        check_int("seed", seed, 0)
        check("trainable", isinstance(trainable, (list, tuple)) and all(isinstance(t, str) for t in trainable),
              trainable, "a list or tuple of module names")
        self.model, self.strategy, self.seed, self.reset = model, strategy, seed, reset
        self.orth_weight, self.l2_weight, self.l1_weight = float(orth_weight), float(l2_weight), float(l1_weight)
        self.orth_side, self.squared = orth_side, squared
        self.current: Optional[str] = None
        self.past: list[str] = []
        self._next_task, self._in_task, self.config = 0, False, None
        self.peft = strategy != "finetune" and is_peft_model(model)
        if strategy != "finetune":
            self.config, self._first = self._check_model(model, config)
        self._head = self._check_trainable(trainable)

    # ------------------------------------------------------------------ validation

    def _check_model(self, model: nn.Module, config):
        """The config of new adapters and the name of the model's adapter, or ValueError."""
        if not self.peft:
            check("model", self.strategy not in PEFT_ONLY, type(model).__name__,
                  f"a peft.PeftModel with one LoRA adapter for {self.strategy} (seq-lora and finetune take any "
                  "model with LoRA layers)")
            layers = require_lora_layers(model, f"strategy {self.strategy!r}")
            check("config", config is None, type(config).__name__,
                  "None (the config of new PEFT adapters; seq-lora on a model outside PEFT adds none)")
            active = [a for layer in layers for a in layer.active()]
            check("model", bool(active), "LoRA layers without an active adapter", "LoRA layers with active adapters")
            if self.reset:
                require_plain(layers, "model", "reset=True")
            return None, "+".join(sorted({a.name for a in active}))
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer

        expected = "a peft.PeftModel with one LoRA adapter"
        ok = len(model.peft_config) == 1
        first = next(iter(model.peft_config)) if ok else None
        check("model", ok and isinstance(model.peft_config[first], LoraConfig) and bool(lora_layers(model)),
              type(model).__name__, expected)
        check("model", first != PAST and not re.fullmatch(r"task\d+", first), f"adapter {first!r}",
              f"an adapter not named {PAST!r} or 'task<t>' (names of the adapters added here)")
        plain = self.strategy in FOLDING or self.reset
        config = copy.deepcopy(model.peft_config[first] if config is None else config)
        check("config", isinstance(config, LoraConfig), type(config).__name__, "a peft.LoraConfig")
        for name, cfg in (("model", model.peft_config[first]), ("config", config)):
            problem = _config_problem(cfg, plain)
            check(name, problem is None, problem, "a plain LoRA adapter")
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        check("model", not any(m.merged for m in layers), "merged adapters", "unmerged adapters")
        if plain:  # the fold, the merge and the penalty read A and B of Linear/Conv/Embedding layers
            supported = {id(layer.module) for layer in lora_layers(model)}
            check("model", all(id(m) in supported for m in layers), "LoRA on another layer type",
                  "LoRA on nn.Linear, nn.Conv1d/2d/3d or nn.Embedding layers only")
            check("model", all(getattr(m.get_base_layer(), "groups", 1) == 1 for m in layers), "grouped convolutions",
                  "convolutions with groups=1 (grouped LoRA factors do not concatenate)")
        return config, first

    def _holds_lora(self, module: nn.Module) -> bool:
        if self.peft:
            from peft.tuners.lora import LoraLayer

            return any(isinstance(s, LoraLayer) for s in module.modules())
        return bool(lora_layers(module))

    def _check_trainable(self, names: Sequence[str]) -> list[nn.Module]:
        """The modules named in ``trainable`` (each name must match one at least)."""
        found: list[nn.Module] = []
        for want in names:
            hits = [m for n, m in self.model.named_modules() if n == want or n.endswith("." + want)]
            check("trainable", bool(hits), want, "names of modules of the model")
            if self.strategy != "finetune":  # their adapters' requires_grad is decided here, per task
                check("trainable", not any(self._holds_lora(m) for m in hits), want, "names of non-LoRA modules")
            found += hits
        return found

    # ------------------------------------------------------------------ task lifecycle

    @property
    def has_penalty(self) -> bool:
        """Whether :meth:`penalty` can be non-zero."""
        orth = self.orth_weight if self.strategy == "o-lora" else 0.0
        return self.strategy != "finetune" and (orth > 0 or self.l2_weight > 0 or self.l1_weight > 0)

    def start_task(self, task: int) -> None:
        """Make task ``task``'s adapter the one that trains (tasks come as 0, 1, 2, …)."""
        check("task", isinstance(task, int) and task == self._next_task and not self._in_task, task,
              f"{self._next_task}, after end_task() of the previous task")
        self._next_task, self._in_task = task + 1, True
        if self.strategy == "finetune":
            self._set_requires_grad()
            return
        if self.strategy == "seq-lora" or task == 0:
            self.current, self.past = self._first, [n for n in self.past if n != self._first]
        else:
            self.current = f"task{task}"
            with seeded(self.seed, task):
                add_peft_adapter(self.model, self.current, copy.deepcopy(self.config))
        self._activate()

    def end_task(self) -> None:
        """Freeze the current adapter (O-LoRA/N-LoRA: fold it into :data:`PAST`; ``reset``: merge it
        into the base weights and re-initialise it); it stays active."""
        check("end_task", self._in_task, "a call without a task in progress", "start_task() first")
        self._in_task = False
        task = self._next_task - 1
        if self.reset:
            merge_and_reset_(self.current_adapters(), self.seed, task)
        if self.strategy in FOLDING:
            names = [n for n in (*self.past, self.current) if n is not None]
            with seeded(self.seed, task, 1):
                fold_peft_adapters(self.model, names, PAST, self.config.lora_dropout, self.config.fan_in_fan_out)
            self.past = [PAST]
        elif self.current is not None:
            self.past.append(self.current)
        self.current = None
        if self.strategy != "finetune":
            self._activate()

    def current_adapters(self) -> list[tuple[LoRALayer, list[LowRankAdapter]]]:
        """``(layer, adapters)`` of every LoRA layer holding the adapters that train now (empty
        between tasks and for ``finetune``)."""
        if self.current is None:
            return []
        if self.peft:
            pairs = [(layer, adapter_named(layer, self.current)) for layer in peft_layers(self.model).values()]
            return [(layer, [a]) for layer, a in pairs if a is not None]
        return [(layer, layer.active()) for layer in lora_layers(self.model) if layer.active()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The current adapter's parameters and the ``trainable`` modules' (``finetune``: all), in
        the model's order: what :meth:`start_task` leaves with ``requires_grad``."""
        if self.strategy == "finetune":
            return list(self.model.parameters())
        keep = {id(p) for m in self._head for p in m.parameters()}
        if self.current is not None and self.peft:
            for layer in named_peft_modules(self.model).values():  # A, B and any variant's tensors (DoRA's magnitude)
                for attr in layer.adapter_layer_names:
                    part = getattr(layer, attr)
                    if self.current in part:
                        item = part[self.current]
                        params = item.parameters() if isinstance(item, nn.Module) else [item]
                        keep.update(id(p) for p in params)
        elif self.current is not None:
            keep.update(id(t) for _, adapters in self.current_adapters() for a in adapters for t in (a.a, a.b))
        return [p for p in self.model.parameters() if id(p) in keep]

    # ------------------------------------------------------------------ penalty

    def penalty(self) -> Tensor:
        """The strategy's penalty on the current adapter, a 0-dim tensor (float32, float64 for a
        float64 adapter) differentiable w.r.t. the current adapter only::

            λ₁·Σ_layers Σ_ij φ((A_past A_newᵀ)_ij) [+ φ((B_pastᵀ B_new)_ij)]    (O-LoRA, φ = |·| or (·)²)
            + λ₂·Σ_{P ∈ {A_new, B_new}} ‖P‖_F + λ·Σ_layers Σ_ij |(s·B_new A_new)_ij|   (O-LoRA: λ₂; N-LoRA: λ)

        Terms with a zero weight are not computed: with every weight 0 it is a constant 0, and
        ``loss + penalty()`` trains exactly as ``loss``. The ℓ1 term never keeps a layer's
        ``out × in`` update for the backward (:func:`update_l1`)."""
        terms: list[Tensor] = []
        if self.has_penalty:
            orth = self.orth_weight if self.strategy == "o-lora" and PAST in self.past else 0.0
            for layer, adapters in self.current_adapters():
                for adapter in adapters:
                    terms += self._layer_terms(layer, adapter, orth)
        if not terms:
            param = next(self.model.parameters())
            return torch.zeros((), dtype=reduction_dtype(param), device=param.device)
        return torch.stack(terms).sum()

    def _layer_terms(self, layer: LoRALayer, current: LowRankAdapter, orth: float) -> list[Tensor]:
        """One adapter's weighted terms of :meth:`penalty`."""
        dtype = reduction_dtype(current.a)
        a, b = _matrices(current, dtype)
        terms = []
        past = adapter_named(layer, PAST) if orth > 0 else None
        if past is not None:
            a_past, b_past = _matrices(past, dtype)
            products = (([a_past @ a.T] if "A" in self.orth_side else [])
                        + ([b_past.T @ b] if "B" in self.orth_side else []))
            terms += [orth * (p.square() if self.squared else p.abs()).sum() for p in products]
        if self.l2_weight > 0:  # ‖·‖ of each tensor, as O-LoRA's torch.norm(param, p=2)
            terms.append(self.l2_weight * (torch.linalg.vector_norm(a) + torch.linalg.vector_norm(b)))
        if self.l1_weight > 0:  # N-LoRA: ℓ1 of the task's update ΔW = s·BA, not of the factors
            terms.append(self.l1_weight * update_l1(a, b, float(current.scaling)))
        return terms

    # ------------------------------------------------------------------ merge

    def merge(self) -> nn.Module:
        """The plain model with every active adapter (past and current) merged into its base weights:
        ``W = W0 + Σ_active s·BA`` (PEFT's ``merge_and_unload``). The PEFT wrapper is consumed: use
        the returned model (``finetune``: the model itself). A model outside PEFT keeps its LoRA
        modules: ``ΔW`` is merged into their base weights (in float64, cast once) and every
        ``B`` set to 0, so they add nothing; the model itself is returned."""
        if self.strategy == "finetune":
            return self.model
        if not self.peft:
            with torch.no_grad():
                for layer in lora_layers(self.model):
                    merge_into_base_(layer, layer.active())
                    for adapter in layer.active():
                        adapter.b.zero_()
            return self.model
        names = self.past + ([self.current] if self.current is not None else [])
        return self.model.merge_and_unload(adapter_names=names or list(self.model.active_adapters))

    # ------------------------------------------------------------------ internals

    def _activate(self) -> None:
        """Past and current adapters active (the forward sums them), only the trainable ones with grad."""
        if self.peft:
            names = self.past + ([self.current] if self.current is not None else [])
            # LoraModel.set_adapter takes a list (PeftModel's takes one name) and turns requires_grad on
            # for every listed adapter: _set_requires_grad freezes the past ones again.
            self.model.base_model.set_adapter(names)
            self.model.active_adapter = names[-1]  # PeftModel's own lookups need one existing adapter name
        self._set_requires_grad()

    def _set_requires_grad(self) -> None:
        keep = {id(p) for p in self.trainable_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in keep)
