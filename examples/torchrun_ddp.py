"""A method under DDP with ``torchrun`` (real data: scikit-learn digits), through the engine.

    torchrun --nproc_per_node 2 examples/torchrun_ddp.py --method sam --steps 50
    python examples/torchrun_ddp.py --method sam --steps 50        # one process, the same steps

Every rank takes its share of each global batch (rank r: rows r, r + W, ...) and runs
``fm.TrainStep`` on the DDP-wrapped model: passes that only feed a per-rank ε run without gradient
sync, the descent pass syncs once. With ``--sync-perturbation`` the ranks share one ε from the
all-reduced gradient, and ``W`` processes take the same steps as one process on the whole batch
(float64, ``tests/test_examples_torchrun.py``). Gloo on the CPU, NCCL on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn

import flatminima as fm
from flatminima.data import load_task
from flatminima.methods import needs_model
from flatminima.models import MLP


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="sam", choices=fm.available())
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (all ranks together)")
    parser.add_argument("--sync-perturbation", action="store_true", help="one ε for all ranks")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    parser.add_argument("--lora", action="store_true",
                        help="LoRA (PEFT, r 4) on the linear layers, the base frozen (always for the LoRA methods, "
                        "flatlora and samlora)")
    parser.add_argument("--hyper", type=json.loads, default={}, help='hyperparameters as JSON, e.g. \'{"rho": 0.1}\'')
    parser.add_argument("--out", help="save the final state dict here (rank 0)")
    args = parser.parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if distributed and torch.cuda.is_available() else \
        torch.device("cpu")

    data = load_task("digits")
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = MLP(data.x_train[0].numel(), data.num_classes, hidden=32).double().to(device)
    if args.lora or needs_model(args.method):
        from peft import LoraConfig, get_peft_model

        targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    if distributed and args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.modules():
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    elif distributed:
        model = nn.parallel.DistributedDataParallel(model)
    extra = {"model": model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model} \
        if needs_model(args.method) else {}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.create(args.method, torch.optim.SGD(params, lr=0.05, momentum=0.9),
                    sync_perturbation=args.sync_perturbation, **extra, **args.hyper)
    step = fm.TrainStep(model, opt, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    # Methods whose passes take different batches (LPF-SGD's chunks, m-RWP with different_batches)
    # get that many micro-batches; the others one.
    groups = opt.perturbation.batch_count or 1
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        idx = torch.randint(0, len(data.y_train), (args.batch_size,), generator=gen)[rank::world]
        step([(data.x_train[i].double().to(device), data.y_train[i].to(device)) for i in idx.chunk(groups)])
    if args.out:
        module = model.module if distributed and not args.fsdp else model
        # FSDP2 holds DTensor shards: gather every full tensor (a collective: all ranks take part)
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu() for k, v in module.state_dict().items()}
        if rank == 0:
            torch.save(state, args.out)
    if distributed:
        # Every rank waits for rank 0's save: a rank that tears down its gloo connections while rank 0
        # is still in flight makes rank 0's transport thread abort the process at exit.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
