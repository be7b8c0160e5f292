"""LoRA on a ViT's fused qkv, trained with SGD, SAM and Flat-LoRA, on real images (scikit-learn digits).

    python examples/vit_lora_sam.py [--method all] [--epochs 15] [--seed 0] [--backend auto] [--rank 4] [--lr 0.03]

The fine-tuning recipe of a pretrained timm ViT, at a size a CPU trains in seconds:

1. a tiny ViT in timm's layout (8×8 grayscale digits, 2×2 patches, 32 wide, 2 blocks) is trained
   in full on the digits 0-4 and its state dict saved: the "pretrained checkpoint";
2. ``vit_lora(10, arch, checkpoint=...)`` builds the ViT again (timm's when timm is installed, or
   ``--backend flatminima``: ours, same keys and function), loads the checkpoint (its 5-class
   head does not fit 10 classes: a new head), freezes the backbone and puts rank-``r`` LoRA on the
   Q and V rows of every block's fused ``qkv``: ``qkv(x) + (α/r)·[B_q A_q x ; 0 ; B_v A_v x]``;
3. the LoRA factors and the head train on all ten digits with each method; test accuracy is printed.

SAM perturbs what trains: ``fm.SAM(base, rho)`` on the base optimizer's parameters, the LoRA
factors and the head, ``ε = ρ·g/‖g‖`` over all of them (the head is trained in full, so its
sharpness is part of the fine-tuned model's; ``scope=fm.lora.lora_parameters(model)`` would leave
the head out, which is ``fm.SAMLoRA``). Flat-LoRA perturbs the merged weight
``W0 + s·[B_q A_q ; 0 ; B_v A_v]`` of each fused ``qkv`` with row-scaled Gaussian noise, its
strength ramped up over ``total_steps``, without writing ``W0``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import flatminima as fm
from flatminima.data import load_task
from flatminima.vit import BACKENDS, build_vit, vit_lora

METHODS = ("sgd", "sam", "flatlora")
ARCH = {"image_size": 8, "patch_size": 2, "dim": 32, "depth": 2, "heads": 4, "mlp_ratio": 2.0, "in_channels": 1}


def batches(n: int, size: int, gen: torch.Generator):
    return torch.randperm(n, generator=gen).split(size)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def pretrain(data, path: Path, epochs: int, backend: str, seed: int) -> float:
    """Train the whole ViT on the digits 0-4 and save its state dict to ``path``; its test accuracy there."""
    torch.manual_seed(seed)
    model = build_vit(5, ARCH, backend)
    first = data.y_train < 5
    x, y = data.x_train[first], data.y_train[first]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in batches(len(y), 32, gen):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    torch.save(model.state_dict(), path)
    test = data.y_test < 5
    return accuracy(model, data.x_test[test], data.y_test[test])


def closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The closure a flatminima method calls for each pass: forward, and backward unless told not to."""

    def loss(backward: bool = True) -> torch.Tensor:
        value = nn.functional.cross_entropy(model(x), y)
        if backward:
            value.backward()
        return value

    return loss


def fine_tune(data, checkpoint: Path, method: str, epochs: int, backend: str, seed: int, r: int,
              lr: float = 0.03) -> float:
    """LoRA on Q and V + a new head, trained on all ten digits with ``method``; the test accuracy."""
    torch.manual_seed(seed)
    model = vit_lora(10, ARCH, r=r, alpha=2 * r, checkpoint=checkpoint, backend=backend)
    base = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    steps = epochs * -(-len(data.y_train) // 32)
    if method == "sam":
        opt = fm.SAM(base, rho=0.05)
    elif method == "flatlora":
        opt = fm.FlatLoRA(base, model=model, rho=0.05, total_steps=steps, seed=seed)
    else:
        opt = fm.create("base", base)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in batches(len(data.y_train), 32, gen):
            opt.step(closure(model, data.x_train[idx], data.y_train[idx]))
    return accuracy(model, data.x_test, data.y_test)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="all", choices=(*METHODS, "all"))
    parser.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs (all ten digits)")
    parser.add_argument("--pretrain-epochs", type=int, default=20, help="full training on the digits 0-4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank r (alpha = 2r)")
    parser.add_argument("--lr", type=float, default=0.03, help="fine-tuning learning rate (SGD, momentum 0.9)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="timm's ViT (auto: when timm is installed) or flatminima's")
    args = parser.parse_args(argv)

    data = load_task("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small: one thread is the fastest, and unslowed by a busy machine
    try:
        return _run(args, data)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, data) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "vit_digits04.pth"
        start = time.perf_counter()
        acc = pretrain(data, checkpoint, args.pretrain_epochs, args.backend, args.seed)
        print(f"pretrained on digits 0-4: test accuracy {acc:.3f} ({time.perf_counter() - start:.1f} s)")
        results = {}
        for method in METHODS if args.method == "all" else (args.method,):
            start = time.perf_counter()
            results[method] = fine_tune(data, checkpoint, method, args.epochs, args.backend, args.seed, args.rank,
                                        args.lr)
            print(f"{method:>8}: LoRA (Q, V) + head on all ten digits, test accuracy {results[method]:.3f} "
                  f"({time.perf_counter() - start:.1f} s)")
    return results


if __name__ == "__main__":
    main()
