"""The HF Trainer with a flatminima method under DDP or DeepSpeed ZeRO-1/2, launched by ``torchrun``
(MiniLM + LoRA on the VADER movie-review sentences), checked step for step against the library's own
engine.

    torchrun --nproc_per_node 2 examples/hf_trainer_distributed.py --backend ddp --methods sam,mrwp,flatlora
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/hf_trainer_distributed.py --backend deepspeed --zero 2

Each rank records the micro-batches the Trainer gave it and the trainable weights after every
optimizer step. ``--check`` then replays the same micro-batches with ``fm.TrainStep`` on a
DDP-wrapped copy of the model (AdamW, the Trainer's linear schedule, clipping at 1) and reports the
largest weight difference over the run; it exits with status 1 above ``--tolerance``. DDP is the
reference for DeepSpeed too: ZeRO-1/2 run the engine's passes with DDP's semantics (per-rank ε, one
average of the descent gradient), only the update happens on DeepSpeed's partitions. Gloo on the
CPU (DeepSpeed's CPU accelerator: ``DS_ACCELERATOR=cpu``), NCCL on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
from torch import nn

import flatminima as fm
from flatminima import data
from flatminima.experiment import MODELS
from flatminima.methods import needs_model

HYPER = {"sam": {"rho": 0.05}, "mrwp": {"sigma": 0.01}, "flatlora": {"rho": 0.05}, "looksam": {"rho": 0.05, "k": 2},
         "gasam": {"steps": 2}}


def build_model() -> nn.Module:
    """MiniLM + LoRA (r 8 on the attention projections) with a 2-class head; dropout off, so that the
    Trainer's and the engine's passes are the same functions."""
    shape = data.Dataset("two", {}, torch.zeros(0, dtype=torch.long), {}, torch.zeros(0, dtype=torch.long), 2, (32,))
    torch.manual_seed(0)
    model = MODELS.get("minilm_lora")(shape)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def examples(count: int) -> list[dict]:
    task = data.load_vader("movies", max_length=32)
    return [{"input_ids": task.x_train["input_ids"][i], "attention_mask": task.x_train["attention_mask"][i],
             "labels": task.y_train[i]} for i in range(count)]


def training_arguments(args, out: str, **extra):
    import transformers

    return transformers.TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.accumulation, learning_rate=1e-3, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=0, report_to=[], save_strategy="no",
        logging_steps=5, seed=0, dataloader_drop_last=True, disable_tqdm=True, bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(), **extra)


def run_trainer(args, method: str, train: list[dict]):
    """The Trainer run; returns (the micro-batches this rank saw, per window; the trainable weights
    after every step; the gradient norm DeepSpeed clipped with at every step, empty under DDP; the
    Trainer)."""
    import transformers

    from flatminima.integrations.hf import FlatMinimaTrainer

    windows: list[list[dict]] = [[]]
    norms: list[float] = []

    class Recording(FlatMinimaTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            windows[-1].append({k: v.detach().clone() for k, v in inputs.items()})
            last = self.accelerator.sync_gradients
            if last:
                windows.append([])
            loss = super().training_step(model, inputs, num_items_in_batch)
            if last and self.is_deepspeed_enabled:  # the window's DeepSpeed step has run
                norms.append(float(self.model_wrapped.get_global_grad_norm()))
            return loss

    weights: list[list[torch.Tensor]] = []

    class Weights(transformers.TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kwargs):
            module = model.module if hasattr(model, "module") else model
            weights.append([p.detach().float().clone() for p in module.parameters() if p.requires_grad])

    extra = {}
    if args.backend == "deepspeed":
        extra["deepspeed"] = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                              "zero_optimization": {"stage": args.zero}}
    else:
        extra["ddp_backend"] = "nccl" if torch.cuda.is_available() else "gloo"
    with tempfile.TemporaryDirectory() as out:
        trainer = Recording(model=build_model(), args=training_arguments(args, out, **extra), train_dataset=train,
                            callbacks=[Weights()], flat_method=method, flat_hyperparameters=HYPER[method])
        trainer.train()
    return windows[:-1], weights, norms, trainer


def clip_as_deepspeed(grads: list[torch.Tensor], norm: float, max_norm: float) -> None:
    """ZeRO-1/2's clipping (``unscale_and_clip_grads``): ``g ← g / max(1, (‖g‖ + 1e-6) / max_norm)``
    in float32, with the norm DeepSpeed computed. Its norm (per-tensor norms in float64, squared and
    summed per rank's partition, the partial sums added over the ranks in float32) and
    ``clip_grad_norm_``'s (float32 norms of float32 gradients) differ in their last bits; under bf16
    that shifts the fp32 master weights by ~1e-10, enough for a bf16 weight near a rounding midpoint
    to round the other way (one bf16 ulp). So the bf16 reference clips with DeepSpeed's norm, and the
    norms themselves are compared to float32 rounding."""
    scale = torch.clamp((torch.tensor(norm, dtype=torch.float32, device=grads[0].device) + 1e-6) / max_norm, min=1.0)
    torch._foreach_mul_(grads, 1.0 / scale)


def replay(args, method: str, windows: list[list[dict]], norms: list[float]) -> tuple[list[list[torch.Tensor]], float]:
    """The library's engine on the same micro-batches: DDP, AdamW, linear decay, clipping at 1.
    Returns the trainable weights after every step and the largest relative difference between the
    descent gradient's norm and the norm DeepSpeed clipped with (0 where the reference clips with
    its own norm: DDP, and DeepSpeed in fp32).

    For DeepSpeed under bf16 the weights are bf16 and the update runs on an fp32 master copy, cast
    back after every step (what ZeRO does on its partitions), clipped as DeepSpeed clips
    (:func:`clip_as_deepspeed`); under DDP, bf16 is autocast."""
    import transformers

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model().to(device)
    master_weights = args.bf16 and args.backend == "deepspeed"
    if master_weights:
        model = model.to(torch.bfloat16)
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=False)
    params = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().clone() for p in params] if master_weights else params
    base = torch.optim.AdamW(master, lr=1e-3, weight_decay=0.0)
    extra = {"model": model} if needs_model(method) else {}
    # With master weights the method only perturbs the bf16 weights: its own base never steps.
    opt = fm.create(method, torch.optim.SGD(params, lr=1e-3) if master_weights else base, total_steps=args.steps,
                    **extra, **HYPER[method])
    sched = transformers.get_linear_schedule_with_warmup(base, 0, args.steps)
    autocast = torch.bfloat16 if args.bf16 and not master_weights else None
    step = fm.TrainStep(ddp, opt, lambda m, b: m(**b).loss, max_grad_norm=1.0, autocast_dtype=autocast)
    weights, norm_diff = [], 0.0
    for index, window in enumerate(windows):
        batches = [{k: v.to(device) for k, v in b.items()} for b in window]
        if master_weights:
            step.passes(batches)
            for w, p in zip(master, params):
                w.grad = p.grad.float()
            grads = [w.grad for w in master]
            own = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()
            norm_diff = max(norm_diff, abs(own - norms[index]) / own)
            clip_as_deepspeed(grads, norms[index], 1.0)
            base.step()
            opt.finish_step()
            with torch.no_grad():
                torch._foreach_copy_(params, master)
        else:
            step(batches)
        sched.step()
        weights.append([p.detach().float().clone() for p in params])
    return weights, norm_diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("ddp", "deepspeed"), default="ddp")
    parser.add_argument("--zero", type=int, choices=(1, 2), default=2, help="DeepSpeed ZeRO stage")
    parser.add_argument("--methods", default="sam,mrwp,flatlora", help="comma-separated, from: " + ", ".join(HYPER))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--check", action="store_true", help="replay with the engine and compare")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--out", help="write the per-method results here as JSON (rank 0)")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(HYPER))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {sorted(HYPER)}")

    if "WORLD_SIZE" not in os.environ:
        parser.error("launch with torchrun (e.g. torchrun --nproc_per_node 2 ...; 1 process works too)")
    rank = int(os.environ["RANK"])
    train = examples(args.micro_batch * args.accumulation * int(os.environ["WORLD_SIZE"]) * 3)
    results, ok = {}, True
    for method in methods:
        windows, weights, norms, trainer = run_trainer(args, method, train)
        flat = trainer.flat_optimizer
        result = {"steps": len(weights), "method_steps": flat.step_count,
                  "loss": trainer.state.log_history[-1].get("train_loss"),
                  "flat_logs": sum("flat/strength" in log for log in trainer.state.log_history)}
        if args.check:
            want, norm_diff = replay(args, method, windows, norms)
            diffs = [max((a - b).abs().max().item() for a, b in zip(got, ref)) for got, ref in zip(weights, want)]
            moved = max((a - b).abs().max().item() for a, b in zip(want[-1], want[0]))
            result.update(max_diff=max(diffs), moved=moved, windows=len(windows), norm_diff=norm_diff)
            ok &= len(weights) == len(want) == args.steps and max(diffs) <= args.tolerance
        results[method] = result
        if rank == 0:
            print(f"{args.backend}{args.zero if args.backend == 'deepspeed' else ''} {method}: "
                  + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()),
                  flush=True)
    if args.out and rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
