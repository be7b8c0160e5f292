"""A Vision Transformer with timm's layout, and :func:`vit_lora`: a (pretrained) ViT with LoRA on Q and V.

:class:`VisionTransformer` has the modules and state-dict keys of timm's ``VisionTransformer`` in
its standard configuration (class token, learned position embedding, pre-norm blocks, GELU,
LayerNorm with ``eps = 1e-6``, the class token's output classified), so a timm checkpoint
(``model.safetensors`` or ``pytorch_model.bin`` of ``vit_base_patch16_224``, say) loads into it with
``load_state_dict(strict=True)`` and computes the same function, without timm installed. For tokens
``x`` (``N × d``, ``h`` heads of width ``d_h = d/h``) a block computes

    ``x ← x + proj(softmax(Q Kᵀ/√d_h) V)``  with  ``[Q; K; V] = qkv(LN₁(x))`` (one fused ``d → 3d`` linear),
    ``x ← x + fc2(GELU(fc1(LN₂(x))))``,

and the model ``head(LN(blocks([cls; patches(x)] + pos))[class token])``.

:func:`vit_lora` builds timm's model (when timm is installed) or this one, loads a local checkpoint
(a file, or the Hugging Face hub cache, offline), freezes the backbone and puts
:class:`~flatminima.lora.QKVLoRA` on the fused ``qkv`` of every block: the LoRA factors and the
classification head train.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._extras import require
from .core.validation import (
    check,
    check_choice,
    check_described,
    check_int,
    is_int,
    is_real,
)
from .lora import QKVLoRA, add_qkv_lora

#: Sizes of timm's standard ViTs (``qkv`` with bias, class token, ``mlp_ratio = 4``, 3 channels).
ARCHS: dict[str, dict[str, int]] = {
    "vit_tiny_patch16_224": {"image_size": 224, "patch_size": 16, "dim": 192, "depth": 12, "heads": 3},
    "vit_small_patch32_224": {"image_size": 224, "patch_size": 32, "dim": 384, "depth": 12, "heads": 6},
    "vit_small_patch16_224": {"image_size": 224, "patch_size": 16, "dim": 384, "depth": 12, "heads": 6},
    "vit_base_patch32_224": {"image_size": 224, "patch_size": 32, "dim": 768, "depth": 12, "heads": 12},
    "vit_base_patch16_224": {"image_size": 224, "patch_size": 16, "dim": 768, "depth": 12, "heads": 12},
    "vit_base_patch16_384": {"image_size": 384, "patch_size": 16, "dim": 768, "depth": 12, "heads": 12},
    "vit_large_patch16_224": {"image_size": 224, "patch_size": 16, "dim": 1024, "depth": 24, "heads": 16},
}
#: The sizes an ``arch`` dict may give, with their defaults (ViT-B/16).
SIZES = {"image_size": 224, "patch_size": 16, "dim": 768, "depth": 12, "heads": 12, "mlp_ratio": 4.0, "in_channels": 3}
BACKENDS = ("auto", "timm", "flatminima")
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
#: The files of a timm model repository looked for in the hub cache, in this order.
HF_FILES = ("model.safetensors", "pytorch_model.bin")


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches of an ``image_size²`` image, each projected to ``dim``."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.grid_size = (image_size // patch_size,) * 2
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        check_described("x", x.dim() == 4 and tuple(x.shape[-2:]) == (self.image_size,) * 2,
                        f"a tensor of shape {tuple(x.shape)}",
                        f"images of shape (batch, channels, {self.image_size}, {self.image_size})")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (``d → 3d``, rows ``[Q; K; V]``)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(b, n, d))))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias)
        self.ls1, self.drop_path1 = nn.Identity(), nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2, self.drop_path2 = nn.Identity(), nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021) with timm's module names and state-dict keys: ``patch_embed.proj``,
    ``cls_token``, ``pos_embed``, ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv`` (fused, with bias),
    ``blocks.{i}.attn.proj``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``/``fc2``, ``norm``,
    ``head`` (an ``nn.Identity`` for ``num_classes=0``). Initialized as timm does: linear weights
    ``N(0, 0.02²)`` truncated at ±2, biases 0, ``pos_embed`` like them, ``cls_token ~ N(0, 10⁻¹²)``."""

    def __init__(self, image_size: int = 224, patch_size: int = 16, num_classes: int = 1000, dim: int = 768,
                 depth: int = 12, heads: int = 12, mlp_ratio: float = 4.0, in_channels: int = 3,
                 qkv_bias: bool = True):
        super().__init__()
        _check_sizes({"image_size": image_size, "patch_size": patch_size, "dim": dim, "depth": depth, "heads": heads,
                          "mlp_ratio": mlp_ratio, "in_channels": in_channels})
        check_int("num_classes", num_classes, 0)
        self.num_classes, self.embed_dim = num_classes, dim
        self.num_features, self.num_prefix_tokens = dim, 1
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, self.patch_embed.num_patches + 1, dim))
        self.pos_drop, self.patch_drop, self.norm_pre = nn.Dropout(0.0), nn.Identity(), nn.Identity()
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc_norm, self.head_drop = nn.Identity(), nn.Dropout(0.0)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        with torch.no_grad():
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm_pre(self.patch_drop(self.pos_drop(x)))
        return self.norm(self.blocks(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.fc_norm(x[:, 0]))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _check_sizes(sizes: dict[str, Any]) -> None:
    for key in ("image_size", "patch_size", "dim", "depth", "heads", "in_channels"):
        check_int(key, sizes[key], 1)
    check("mlp_ratio", is_real(sizes["mlp_ratio"]) and sizes["mlp_ratio"] > 0, sizes["mlp_ratio"], "a number > 0")
    check("patch_size", sizes["patch_size"] <= sizes["image_size"], sizes["patch_size"],
          f"an int in [1, image_size = {sizes['image_size']}]")
    check("heads", sizes["dim"] % sizes["heads"] == 0, sizes["heads"], f"a divisor of dim = {sizes['dim']}")


def vit_sizes(arch: str | dict[str, Any]) -> dict[str, Any]:
    """The sizes (``image_size``, ``patch_size``, ``dim``, ``depth``, ``heads``, ``mlp_ratio``,
    ``in_channels``) of ``arch``: a name of :data:`ARCHS` (a timm pretrained tag after a dot is
    ignored: ``"vit_base_patch16_224.augreg2_in21k_ft_in1k"``) or a dict of some of them (the
    rest: ViT-B/16's)."""
    if isinstance(arch, dict):
        unknown = sorted(set(arch) - set(SIZES), key=str)
        check("arch", not unknown, unknown[0] if unknown else None, f"a dict with keys among {', '.join(SIZES)}")
        sizes = {**SIZES, **arch}
    else:
        name = arch.split(".")[0] if isinstance(arch, str) else arch
        check("arch", name in ARCHS, arch, f"a dict of sizes or one of {', '.join(ARCHS)}")
        sizes = {**SIZES, **ARCHS[name]}
    _check_sizes(sizes)
    return sizes


# --------------------------------------------------------------------------------------------
# checkpoints: files and the Hugging Face hub cache (never downloaded)


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    env = os.environ
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return Path(hub).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _snapshot_file(repo: Path) -> Path | None:
    """The weights of the cached revision of ``repo`` (``refs/main``, else the newest snapshot)."""
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    order = [snapshots / ref.read_text().strip()] if ref.is_file() else []
    order += sorted((p for p in snapshots.glob("*") if p.is_dir()), key=lambda p: (p.stat().st_mtime, p.name),
                    reverse=True)
    for snapshot in order:
        for name in HF_FILES:
            if (snapshot / name).is_file():
                return snapshot / name
    return None


def find_hf_checkpoint(arch: str) -> Path:
    """The cached weights of the timm model ``arch`` in the hub cache (:func:`hf_hub_cache`):
    ``models--timm--<arch>[.<tag>]/snapshots/<revision>/model.safetensors`` (or
    ``pytorch_model.bin``). ``arch`` with a tag names one repository; without one, the only cached
    ``arch.*`` repository is taken (several: name the tag). Nothing is downloaded."""
    check("arch", isinstance(arch, str) and arch != "" and "/" not in arch, arch,
          "a timm model name (checkpoint='hf-cache' looks up models--timm--<arch> in the hub cache)")
    hub = hf_hub_cache()
    repos = [hub / f"models--timm--{arch}"]
    if "." not in arch:
        repos += sorted(hub.glob(f"models--timm--{glob.escape(arch)}.*"))
    found = {repo.name[len("models--timm--"):]: f for repo in repos if (f := _snapshot_file(repo)) is not None}
    check("arch", len(found) <= 1, arch,
          f"one cached checkpoint (found {', '.join(sorted(found))}: pass arch='<name>.<tag>' or checkpoint=<file>)")
    if not found:
        pattern = f"models--timm--{arch}" + ("" if "." in arch else "[.<tag>]")
        raise FileNotFoundError(
            f"No cached timm checkpoint of {arch!r}: looked for {hub / pattern}/snapshots/*/"
            f"{' or '.join(HF_FILES)} (the hub cache is $HF_HUB_CACHE, else $HF_HOME/hub, else "
            f"~/.cache/huggingface/hub). Nothing is downloaded: fetch it once where there is a network "
            f"(`hf download timm/<name>`, or timm.create_model(name, pretrained=True)), or pass checkpoint=<file>.")
    return next(iter(found.values()))


def _checkpoint_path(checkpoint: Any, arch: Any) -> Path | None:
    """The file ``checkpoint`` names (None: none), checked to exist."""
    if checkpoint is None:
        return None
    if isinstance(checkpoint, str) and checkpoint == "hf-cache":
        check("arch", isinstance(arch, str), type(arch).__name__, "a timm model name with checkpoint='hf-cache'")
        return find_hf_checkpoint(arch)
    check("checkpoint", isinstance(checkpoint, (str, os.PathLike)), type(checkpoint).__name__,
          "None, 'hf-cache' or the path of a checkpoint file")
    path = Path(checkpoint).expanduser()
    check("checkpoint", path.suffix in CHECKPOINT_SUFFIXES, str(path),
          f"a file ending in {', '.join(CHECKPOINT_SUFFIXES)}, or 'hf-cache'")
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a checkpoint file: ``.safetensors`` (the ``safetensors`` package) or a
    ``torch.save`` file (``.bin``, ``.pth``, ``.pt``; read with ``weights_only=True``; a dict under
    ``"state_dict"`` or ``"model"`` is taken), on the CPU."""
    path = _checkpoint_path(path, None)
    if path.suffix == ".safetensors":
        return require("safetensors.torch", "experiments", "reading a .safetensors checkpoint").load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    check("checkpoint", isinstance(state, dict) and all(isinstance(v, Tensor) for v in state.values()),
          str(path), "a state dict (a mapping of names to tensors)")
    return state


def load_vit_weights(model: nn.Module, state: dict[str, Tensor], source: str = "the checkpoint") -> list[str]:
    """Load ``state`` into ``model`` (a ViT before LoRA): every key must match in name and shape,
    except the head's, which are dropped when their shapes differ from the model's (a new head,
    with a warning); returns the dropped keys."""
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith("head.")}
    problems = [f"{k}: {tuple(v.shape)} for {tuple(own[k].shape)}" for k, v in body.items()
                if k in own and v.shape != own[k].shape]
    problems += [f"missing {k}" for k in own if k not in body and not k.startswith("head.")]
    problems += [f"unexpected {k}" for k in body if k not in own]
    check_described("checkpoint", not problems, f"{source} ({'; '.join(problems[:5])}"
                    f"{f'; {len(problems) - 5} more' if len(problems) > 5 else ''})",
                    "the weights of the model's architecture (the same keys and shapes)")
    head = sorted(k for k in state if k.startswith("head."))
    dropped = head if any(k not in own or own[k].shape != state[k].shape for k in head) else []
    kept = {k: v for k, v in state.items() if k not in dropped}
    if any(k.startswith("head.") and k not in kept for k in own):
        held = ", ".join(f"{k} {tuple(state[k].shape)}" for k in dropped) or "none"
        warnings.warn(f"{source}: its head ({held}) does not fit the model's; the new head is randomly initialized",
                      stacklevel=3)
    model.load_state_dict(kept, strict=False)  # every key checked above
    return dropped


# --------------------------------------------------------------------------------------------
# the builder


def _timm(backend: str) -> Any | None:
    """timm, or None where the ``auto`` backend falls back to ours."""
    if backend == "flatminima":
        return None
    if backend == "timm":
        return require("timm", "timm", "vit_lora(backend='timm')")
    if importlib.util.find_spec("timm") is None:
        return None
    try:
        return require("timm", "timm")
    except (ImportError, RuntimeError, OSError, AttributeError) as error:  # installed, broken (say, a torchvision of another torch)
        warnings.warn(f"timm is installed but cannot be imported ({error}); vit_lora uses "
                      f"flatminima.vit.VisionTransformer (backend='timm' raises instead)", stacklevel=3)
        return None


def build_vit(num_classes: int, arch: str | dict[str, Any] = "vit_base_patch16_224",
              backend: str = "auto") -> nn.Module:
    """A randomly initialized ViT: timm's (``timm.create_model(arch, pretrained=False)``, or its
    ``VisionTransformer`` for a dict of sizes) when ``backend`` is ``"timm"``, or ``"auto"`` with
    timm installed; :class:`VisionTransformer` otherwise. An ``arch`` name outside :data:`ARCHS`
    needs timm."""
    check_choice("backend", backend, BACKENDS)
    check_int("num_classes", num_classes, 0)
    timm = _timm(backend)
    if timm is not None and isinstance(arch, str):
        check("arch", arch != "", arch, "a timm model name or a dict of sizes")
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    sizes = vit_sizes(arch)
    if timm is None:
        return VisionTransformer(num_classes=num_classes, **sizes)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=sizes["image_size"], patch_size=sizes["patch_size"], in_chans=sizes["in_channels"],
        num_classes=num_classes, embed_dim=sizes["dim"], depth=sizes["depth"], num_heads=sizes["heads"],
        mlp_ratio=sizes["mlp_ratio"])


def vit_lora(num_classes: int, arch: str | dict[str, Any] = "vit_base_patch16_224", r: int = 16,
             alpha: float = 16.0, targets: str = "qv", blocks: Sequence[int] | None = None,
             checkpoint: None | str | os.PathLike = None, backend: str = "auto",
             dropout: float = 0.0) -> nn.Module:
    """A ViT classifier of ``num_classes`` classes for LoRA fine-tuning: :func:`build_vit`, its weights
    from ``checkpoint``, every parameter frozen, then :class:`~flatminima.lora.QKVLoRA` of rank ``r``
    on the parts ``targets`` of the fused ``qkv`` of every block (or of ``blocks``)::

        qkv(x) + (alpha/r)·[B_q A_q x ; 0 ; B_v A_v x]

    Only the LoRA factors and the head train (``requires_grad``); ``B = 0``, so the model starts as
    the checkpoint's backbone.

    ``checkpoint``: None (random initialization), a local ``.safetensors``, ``.bin``, ``.pth`` or
    ``.pt`` file of the model's state dict, or ``"hf-cache"``: timm's weights of ``arch`` in your
    Hugging Face hub cache (:func:`find_hf_checkpoint`). A checkpoint head of another number of
    classes is dropped (with a warning) and the head initialized anew. Nothing is ever downloaded.
    ``arch``: a timm model name (our backend knows :data:`ARCHS`) or a dict of sizes
    (:func:`vit_sizes`). ``backend``: ``"auto"`` (timm's model when timm is installed),
    ``"timm"`` or ``"flatminima"`` (:class:`VisionTransformer`; same keys, same function)."""
    check_choice("backend", backend, BACKENDS)
    check_int("num_classes", num_classes, 1)
    QKVLoRA(nn.Linear(1, 3, device="meta"), r, alpha, targets, dropout)  # checks r, alpha, targets, dropout
    path = _checkpoint_path(checkpoint, arch)
    model = build_vit(num_classes, arch, backend)
    depth = len(getattr(model, "blocks", ()))
    check("blocks", blocks is None or not depth or (isinstance(blocks, (list, tuple)) and len(blocks) > 0 and all(
        is_int(i) and -depth <= i < depth for i in blocks) and len({i % depth for i in blocks}) == len(blocks)),
          blocks, f"None (every block) or distinct block indices in [0, {depth})")
    if path is not None:
        load_vit_weights(model, read_state_dict(path), str(path))
    model.requires_grad_(False)
    add_qkv_lora(model, r, alpha, targets, blocks, dropout)
    model.head.requires_grad_(True)
    return model

