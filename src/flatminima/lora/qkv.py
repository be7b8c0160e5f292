"""LoRA on a fused ``qkv`` projection (timm's ``Attention.qkv``): Q and V (or any of Q, K, V) only.

:class:`QKVLoRA` is the adapter users of timm ViTs write by hand, with the same attribute names
(``qkv``, ``linear_a_q``, ``linear_b_q``, ``linear_a_v``, ``linear_b_v``): for ``x`` of width ``d``,

    ``qkv(x) + s·[B_q A_q x ; B_k A_k x ; B_v A_v x]``    (``s = alpha / r``; untargeted parts 0),

so the fused weight is ``W0 + s·[B_q A_q ; 0 ; B_v A_v]``: each adapter covers a slice of the output
rows. :func:`add_qkv_lora` puts it on the attention of every (or the chosen) block of a timm-style
vision transformer (``model.blocks[i].attn.qkv``).
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from ..core.validation import check, check_int
from .protocol import LoRALayer, LowRankAdapter, register_lora_layer

TARGETS = "qkv"


class QKVLoRA(nn.Module):
    """Rank-``r`` LoRA on the parts ``targets`` (a string of ``"q"``, ``"k"``, ``"v"``; default Q and V)
    of the frozen fused projection ``qkv`` (an ``nn.Linear`` from ``d`` to ``3d``), scaling
    ``s = alpha / r``. ``A`` is initialized as ``nn.Linear`` does (Kaiming-uniform), ``B`` at 0, so
    the module starts as ``qkv`` itself."""

    def __init__(self, qkv: nn.Linear, r: int = 16, alpha: float = 16.0, targets: str = "qv", dropout: float = 0.0):
        super().__init__()
        check("qkv", isinstance(qkv, nn.Linear) and qkv.out_features == 3 * qkv.in_features, qkv,
              "an nn.Linear from d to 3d features (a fused q, k, v projection)")
        check_int("r", r, 1)
        check("alpha", isinstance(alpha, (int, float)) and alpha > 0, alpha, "a number > 0")
        check("targets", isinstance(targets, str) and bool(targets) and set(targets) <= set(TARGETS)
              and len(set(targets)) == len(targets), targets, "distinct letters of 'qkv', e.g. 'qv'")
        check("dropout", isinstance(dropout, (int, float)) and 0 <= dropout < 1, dropout, "a number in [0, 1)")
        self.qkv, self.dim, self.r, self.scaling = qkv, qkv.in_features, int(r), float(alpha) / int(r)
        self.targets = "".join(t for t in TARGETS if t in targets)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        w = qkv.weight
        for t in self.targets:
            a = nn.Linear(self.dim, self.r, bias=False, device=w.device, dtype=w.dtype)
            b = nn.Linear(self.r, self.dim, bias=False, device=w.device, dtype=w.dtype)
            nn.init.zeros_(b.weight)
            setattr(self, f"linear_a_{t}", a)
            setattr(self, f"linear_b_{t}", b)

    def part(self, target: str) -> tuple[nn.Linear, nn.Linear]:
        """``(linear_a, linear_b)`` of ``target`` (``"q"``, ``"k"`` or ``"v"``)."""
        return getattr(self, f"linear_a_{target}"), getattr(self, f"linear_b_{target}")

    def forward(self, x: Tensor) -> Tensor:
        out = self.qkv(x)
        h = self.dropout(x)
        for t in self.targets:
            a, b = self.part(t)
            i = TARGETS.index(t)
            out[..., i * self.dim:(i + 1) * self.dim] += self.scaling * b(a(h))
        return out

    def extra_repr(self) -> str:
        return f"targets={self.targets!r}, r={self.r}, scaling={self.scaling:g}"


def read_qkv_lora(module: QKVLoRA) -> LoRALayer:
    """:class:`QKVLoRA` as a :class:`~flatminima.lora.LoRALayer`: one adapter per targeted part,
    on its slice of the fused output rows."""
    d = module.dim
    adapters = []
    for t in module.targets:
        a, b = module.part(t)
        i = TARGETS.index(t)
        adapters.append(LowRankAdapter(a.weight, b.weight, module.scaling, rows=slice(i * d, (i + 1) * d)))
    return LoRALayer(module, module.qkv, adapters)


register_lora_layer(QKVLoRA, read_qkv_lora)


def add_qkv_lora(model: nn.Module, r: int = 16, alpha: float = 16.0, targets: str = "qv",
                 blocks: Optional[Sequence[int]] = None, dropout: float = 0.0) -> nn.Module:
    """Put a :class:`QKVLoRA` on ``model.blocks[i].attn.qkv`` for every block ``i`` (or those in
    ``blocks``), in place; returns ``model``. Freezing is the caller's (the builder
    :func:`flatminima.vit.vit_lora` freezes the backbone and keeps the head trainable). The new
    factors are drawn from the default generator, as ``nn.Linear`` draws its init."""
    chain = getattr(model, "blocks", None)
    check("model", isinstance(chain, (nn.Sequential, nn.ModuleList)) and len(chain) > 0
          and all(isinstance(getattr(getattr(b, "attn", None), "qkv", None), nn.Linear) for b in chain),
          type(model).__name__, "a timm-style vision transformer (model.blocks[i].attn.qkv is an nn.Linear)")
    chosen = range(len(chain)) if blocks is None else list(blocks)
    check("blocks", all(isinstance(i, int) and -len(chain) <= i < len(chain) for i in chosen)
          and len({i % len(chain) for i in chosen}) == len(chosen), blocks,
          f"distinct block indices in [0, {len(chain)})")
    for i in chosen:
        attn = chain[i].attn
        check("model", not isinstance(attn.qkv, QKVLoRA), f"block {i % len(chain)} already has a QKVLoRA",
              "blocks without LoRA")
        attn.qkv = QKVLoRA(attn.qkv, r, alpha, targets, dropout)
    return model
