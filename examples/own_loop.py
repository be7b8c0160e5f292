"""SAM in your own training loop, on real data (scikit-learn digits), in both forms.

    python examples/own_loop.py [--method sam] [--epochs 5] [--explicit]

The closure form lets the method run its passes; the explicit form is for loops that own their
passes (the pattern the HF Trainer and Accelerate integrations use). The LoRA methods (``flatlora``,
``samlora``) perturb a model's LoRA adapters: for them the MLP gets PEFT LoRA (r 8) on its linear
layers, the base weights frozen, and the method is given the model (``model=``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import flatminima as fm
from flatminima.data import load_task
from flatminima.methods import needs_model
from flatminima.models import MLP


def with_lora(model: nn.Module) -> nn.Module:
    """``model`` with PEFT LoRA (r 8, alpha 16) on every linear layer, the base frozen."""
    from peft import LoraConfig, get_peft_model  # the hf extra: only the LoRA methods need it

    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="sam", choices=fm.available())
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--explicit", action="store_true", help="use `opt.perturbations()` instead of a closure")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = load_task("digits")
    model = MLP(data.x_train[0].numel(), data.num_classes, hidden=64)
    extra = {}
    if needs_model(args.method):
        model = with_lora(model)
        extra["model"] = model
    base = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    opt = fm.create(args.method, base, **extra)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)

    for epoch in range(args.epochs):
        for idx in torch.randperm(len(data.x_train), generator=gen).split(64):
            x, y = data.x_train[idx], data.y_train[idx]
            if args.explicit:
                opt.zero_grad()
                loss_fn(model(x), y).backward()                          # clean pass
                for _ in opt.perturbations(forward=lambda: loss_fn(model(x), y)):
                    loss_fn(model(x), y).backward()                      # passes at w + ε
                opt.step()
            else:
                def closure(backward: bool = True):
                    loss = loss_fn(model(x), y)
                    if backward:
                        loss.backward()
                    return loss
                opt.step(closure)
        with torch.no_grad():
            acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
        print(f"epoch {epoch + 1}: test accuracy {acc:.3f}")
    return acc


if __name__ == "__main__":
    main()
