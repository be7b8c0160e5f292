"""A method on a DeepSpeed ZeRO-1/2 engine in your own loop (real data: scikit-learn digits), checked
against the engine under DDP.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_zero.py --method sam --zero 2 --check

``deepspeed.initialize`` gets the model and a plain optimizer; :class:`DeepSpeedStep` runs every pass
of the method on ``engine.module`` and hands the descent gradient to DeepSpeed's backward and step
(reduction, fp32 master partitions, clipping). Every rank takes its share of each global batch; with
``--check`` the same micro-batches are replayed with ``fm.TrainStep`` on a DDP-wrapped copy (the
semantics ZeRO-1/2 follow here) and the largest weight difference is printed (exit status 1 above
``--tolerance``). Every method runs: LPF-SGD draws one noise per micro-batch of the window
(``samples = --accumulation``), WSAM is coupled (``decouple=False``: a decoupled update written after
DeepSpeed's step would be undone by its master weights), and the LoRA methods (``flatlora``,
``samlora``) train PEFT LoRA adapters (r 4) on the MLP, its base frozen; ``--hyper`` overrides these.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

import flatminima as fm
from flatminima.data import load_task
from flatminima.integrations.deepspeed import DeepSpeedStep
from flatminima.methods import needs_model
from flatminima.models import MLP


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def main(argv: list[str] | None = None) -> int:
    import deepspeed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="sam", choices=fm.available())
    parser.add_argument("--hyper", type=json.loads, default={}, help='hyperparameters as JSON, e.g. \'{"rho": 0.1}\'')
    parser.add_argument("--zero", type=int, default=2, help="ZeRO stage (1 or 2; others are refused)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--accumulation", type=int, default=3)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args(argv)

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = load_task("digits")

    hyper = dict(args.hyper)
    accepted = fm.hyperparameters(args.method)
    if "samples" in accepted:
        hyper.setdefault("samples", args.accumulation)
    if "decouple" in accepted:
        hyper.setdefault("decouple", False)

    def model() -> nn.Module:
        torch.manual_seed(0)
        net = MLP(data.x_train[0].numel(), data.num_classes, hidden=32)
        if needs_model(args.method):
            from peft import LoraConfig, get_peft_model  # the hf extra

            targets = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
            net = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        return net

    def trainable(net: nn.Module) -> list[nn.Parameter]:
        return [p for p in net.parameters() if p.requires_grad]

    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.accumulation,
              "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": args.zero}}
    net = model()
    engine, *_ = deepspeed.initialize(model=net, config=config,
                                      optimizer=torch.optim.AdamW(trainable(net), lr=1e-2, weight_decay=0.01))
    step = DeepSpeedStep(engine, args.method, loss_fn, total_steps=args.steps, **hyper)

    def windows():  # rank r takes rows r, r + W, ... of each global micro-batch
        rows = args.micro_batch * world
        for k in range(args.steps):
            yield [(data.x_train[start + rank:start + rows:world], data.y_train[start + rank:start + rows:world])
                   for start in ((k * args.accumulation + j) * rows % (len(data.y_train) - rows)
                                 for j in range(args.accumulation))]

    for window in windows():
        loss = step(window)
    if rank == 0:
        print(f"ZeRO-{args.zero} {args.method}: {step.optimizer.step_count} steps, last loss {float(loss):.4f}")
    if not args.check:
        return 0
    ref = model()
    ddp = nn.parallel.DistributedDataParallel(ref, gradient_as_bucket_view=False)
    extra = {"model": ref} if needs_model(args.method) else {}
    opt = fm.create(args.method, torch.optim.AdamW(trainable(ref), lr=1e-2, weight_decay=0.01),
                    total_steps=args.steps, **extra, **hyper)
    engine_step = fm.TrainStep(ddp, opt, loss_fn, max_grad_norm=1.0)
    for window in windows():
        engine_step(window)
    diff = max((a - b).abs().max().item() for a, b in zip(engine.module.parameters(), ref.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(model().parameters(), ref.parameters()))
    if rank == 0:
        print(f"max |w_deepspeed - w_engine| = {diff:.3g} (the weights moved by up to {moved:.3g})")
    return 0 if diff <= args.tolerance and moved > 100 * args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
