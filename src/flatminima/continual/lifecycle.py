"""The adapter operations behind :class:`~flatminima.continual.ContinualLoRA`: PEFT's adapters
(add, fold), the merge of a finished task into the base weights and the re-initialisation of its
adapter (the ``reset`` lifecycle), and a seeded fork of the global RNG for PEFT's own init.

Merge-then-reset (``seq-lora`` with ``reset=True``), for each LoRA layer and each adapter
``(A, B, s, rows)`` that trained in task ``t``::

    W0[rows] ← W0[rows] + s·B A        (in float64, cast once to W0's dtype)
    A ← Kaiming-uniform(a = √5)        (PEFT's and nn.Linear's init, from a generator seeded by (seed, t))
    B ← 0

The layer computes ``W0 + s·B A`` before and ``(W0 + s·B A) + s·0·A`` after: the model's function is
unchanged (exactly so up to the one rounding of the cast; bit for bit in float64 up to the order of
the sums), and the next task trains a fresh adapter on top of everything learnt so far. For a
bf16 (or float16) base the sum is formed in float64 and rounded once, so tasks do not accumulate a
rounding of each partial product. PEFT's embedding adapters (``A`` of ``r × num_embeddings``) are
re-initialised as PEFT does (``A ← 0``, ``B ← N(0, 1)``): the update ``s·(B A)ᵀ`` is 0 either way.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ..core.schedules import derive_seed
from ..lora import LoRALayer, LowRankAdapter, lora_layers

#: Stream of :func:`derive_seed` keys for the re-initialisation of a reset adapter.
RESET_STREAM = 2


@contextlib.contextmanager
def seeded(*keys: int) -> Iterator[None]:
    """A forked CPU RNG seeded from ``keys``: PEFT draws new adapters' init (on CPU, before moving
    them to the base layer's device) from the global generator, which must not move."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(derive_seed(*keys))  # not torch.manual_seed: it seeds CUDA too
        yield


def adapter_named(layer: LoRALayer, name: str) -> Optional[LowRankAdapter]:
    """The adapter ``name`` of ``layer`` (active or not), or None."""
    return next(iter(layer.named(name)), None)


def peft_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """The PEFT LoRA layers of a ``PeftModel`` (where the task adapters live) read through the LoRA
    protocol, by the key PEFT targets them with (a name inside ``base_model.model``)."""
    from peft.tuners.lora import LoraLayer

    return {layer.name: layer for layer in lora_layers(model.base_model.model) if isinstance(layer.module, LoraLayer)}


def named_peft_modules(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's LoRA modules by the key PEFT targets them with (a name inside ``base_model.model``)."""
    from peft.tuners.lora import LoraLayer

    return {k: m for k, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (without importing PEFT: a PEFT model means it is)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def add_peft_adapter(model: nn.Module, name: str, config) -> None:
    """Add adapter ``name`` with ``config`` to the ``PeftModel`` ``model``, its modules in the mode of their layer."""
    from peft import PeftModel

    # PeftModel's add_adapter, not a task subclass's: PeftModelForSequenceClassification would add
    # the classifier to modules_to_save, which PEFT refuses with several active adapters.
    PeftModel.add_adapter(model, name, config)
    for layer in named_peft_modules(model).values():
        layer.train(layer.training)  # new adapter modules are built in training mode


@torch.no_grad()
def fold_peft_adapters(model: nn.Module, names: Sequence[str], folded_name: str, dropout: float,
                       fan_in_fan_out: bool) -> None:
    """Replace the adapters ``names`` of ``model`` by one adapter ``folded_name``, their
    concatenation along the rank: ``A' = [A_1; A_2; …]``, ``B' = [s_1·B_1, s_2·B_2, …]``, ``s' = 1``
    (so ``s'·B' A' = Σ s_i·B_i A_i``: the function is unchanged)."""
    from peft import LoraConfig

    folded = {}
    for key, layer in peft_layers(model).items():
        parts = [a for a in (adapter_named(layer, n) for n in names) if a is not None]
        if parts:  # the tensors as stored (a convolution's kernels, an embedding's parameters)
            folded[key] = (torch.cat([p.a for p in parts], 0), torch.cat([p.b * float(p.scaling) for p in parts], 1))
    for n in names:
        model.delete_adapter(n)
    # One rank per layer (rank_pattern) and α = r (scaling 1); escaped full keys, longest first, so a
    # key never takes the rank of a key it ends with.
    keys = sorted(folded, key=len, reverse=True)
    ranks = {re.escape(k): folded[k][0].shape[0] for k in keys}
    top = max(ranks.values())
    config = LoraConfig(r=top, lora_alpha=top, rank_pattern=ranks, alpha_pattern=dict(ranks),
                        target_modules="^(?:" + "|".join(ranks) + ")$", lora_dropout=dropout,
                        fan_in_fan_out=fan_in_fan_out)
    add_peft_adapter(model, folded_name, config)
    layers = peft_layers(model)
    for key, (a, b) in folded.items():
        past = adapter_named(layers[key], folded_name)
        past.a.copy_(a)
        past.b.copy_(b)


@torch.no_grad()
def merge_into_base_(layer: LoRALayer, adapters: Sequence[LowRankAdapter]) -> None:
    """``W0 ← W0 + Σ_adapters s·P(B A)`` in place (rows respected), formed in float64 and cast once."""
    weight = layer.weight
    w = weight.detach().to(torch.float64, copy=True)
    layer.add_delta_(w.view(layer.rows, -1), list(adapters))
    weight.copy_(w)


@torch.no_grad()
def reinit_adapter_(adapter: LowRankAdapter, generator: torch.Generator) -> None:
    """``A`` Kaiming-uniform (``a = √5``, bound ``1/√fan_in``: PEFT's and ``nn.Linear``'s init) and
    ``B = 0``; an embedding adapter as PEFT inits it (``A = 0``, ``B ~ N(0, 1)``). Drawn on CPU in
    float32 from ``generator`` and copied, so the values do not depend on the device or dtype."""
    if adapter.layout == "embedding":
        adapter.a.zero_()
        adapter.b.copy_(torch.randn(adapter.b.shape, generator=generator))
        return
    fan_in = math.prod(adapter.a.shape[1:])
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=√5): gain √(2/(1+5)) · √(3/fan_in) = 1/√fan_in
    a = torch.empty(adapter.a.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    adapter.a.copy_(a)
    adapter.b.zero_()


def merge_and_reset_(pairs: Sequence[tuple[LoRALayer, Sequence[LowRankAdapter]]], seed: int, task: int) -> None:
    """Merge each layer's ``adapters`` into its base weight, then re-initialise them (module
    docstring), from one generator seeded by ``(seed, task, RESET_STREAM)`` drawn in layer order."""
    generator = torch.Generator().manual_seed(derive_seed(seed, task, RESET_STREAM))
    for layer, adapters in pairs:
        merge_into_base_(layer, adapters)
    for _, adapters in pairs:
        for adapter in adapters:
            reinit_adapter_(adapter, generator)


__all__ = ["RESET_STREAM", "add_peft_adapter", "adapter_named", "fold_peft_adapters", "is_peft_model",
           "merge_and_reset_", "merge_into_base_", "named_peft_modules", "peft_layers", "reinit_adapter_", "seeded"]
