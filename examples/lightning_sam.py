"""SAM (or any method) in a Lightning Trainer, on real data (scikit-learn digits).

    python examples/lightning_sam.py [--method sam] [--accumulate 2] [--precision bf16-mixed]
    python examples/lightning_sam.py --strategy ddp --devices 2      # 2 CPU processes, gloo

The module subclasses ``FlatMinimaModule``: it writes ``compute_loss`` and builds the method with
``self.flat_optimizer(base)``; the Trainer runs every pass, accumulation, DDP sync and scheduling.
LPF-SGD draws one noise per micro-batch of the window (``samples = --accumulate``); the LoRA
methods (``flatlora``, ``samlora``) train PEFT LoRA adapters (r 8) on the MLP, its base frozen.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn

import flatminima as fm
from flatminima.data import load_task
from flatminima.integrations.lightning import FlatMinimaModule
from flatminima.methods import needs_model
from flatminima.models import MLP


class DigitsClassifier(FlatMinimaModule):
    def __init__(self, method: str = "sam", accumulate: int = 2, **hyperparameters):
        if "samples" in fm.hyperparameters(method):  # LPF-SGD: one noise draw per micro-batch
            hyperparameters.setdefault("samples", accumulate)
        super().__init__(method, accumulate=accumulate, max_grad_norm=5.0, **hyperparameters)
        self.data = load_task("digits")
        self.net = MLP(self.data.x_train[0].numel(), self.data.num_classes, hidden=64)
        if needs_model(method):  # the LoRA methods perturb the adapters of a LoRA model
            from peft import LoraConfig, get_peft_model  # the hf extra

            targets = [name for name, m in self.net.named_modules() if isinstance(m, nn.Linear)]
            self.net = get_peft_model(self.net, LoraConfig(r=8, lora_alpha=16, target_modules=targets))

    def compute_loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        opt = self.flat_optimizer(torch.optim.SGD(trainable, lr=0.05, momentum=0.9))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": sched}  # interval "epoch": stepped at each epoch's end

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(self.data.x_train, self.data.y_train)
        # Each epoch a fresh random draw of whole windows: a shorter last window would not split
        # into LPF-SGD's per-micro-batch chunks.
        window = 32 * self.accumulate
        sampler = torch.utils.data.RandomSampler(data, num_samples=len(data) // window * window)
        return torch.utils.data.DataLoader(data, batch_size=32, sampler=sampler)

    def accuracy(self) -> float:
        with torch.no_grad():
            return (self.net(self.data.x_test).argmax(1) == self.data.y_test).float().mean().item()


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="sam", choices=fm.available())
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precision", default="32-true", help="32-true, 64-true or bf16-mixed")
    parser.add_argument("--strategy", default="auto", help="auto, ddp or ddp_spawn")
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = DigitsClassifier(args.method, args.accumulate)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy=args.strategy, precision=args.precision,
                         max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model)
    acc = model.accuracy()
    if trainer.global_rank == 0:
        print(f"{args.method}: {trainer.global_step} optimizer steps, test accuracy {acc:.3f}")
    return acc


if __name__ == "__main__":
    main()
