"""Why GA-SAM's layer-wise scale stalls LoRA training: the perturbation radius of each LoRA factor.

    python examples/gasam_lora_radius.py                 # 5 methods × 96 steps, ~11 min on 2 CPU cores
    python examples/gasam_lora_radius.py --steps 24 --methods adamw,gasam-k2

all-MiniLM-L6-v2 + LoRA (r = 8 on query/value, head trained) on 1,024 VADER movie sentences (32
tokens, seed 0), batch 32, AdamW lr 1e-3 with cosine decay, tested on 500 test sentences. Every
pass of every step is recorded through the closure: its loss, how far each group (all LoRA A
factors, all B factors, the head) sits from the clean weights, and its gradient norms. The table
reports, averaged over steps 6.., the last ascent point's ``‖ε_B‖/‖B‖`` and ``‖ε_A‖/‖A‖`` and the
ratio of B's gradient there to B's clean gradient. docs/results.md §2 reads it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from flatminima import methods  # noqa: E402
from flatminima.data import load_task, take  # noqa: E402
from flatminima.experiment import build_model, cross_entropy, evaluate  # noqa: E402

METHODS = {
    "adamw": ("base", {}),
    "gasam-k1": ("gasam", {"epsilon": 0.01, "steps": 1, "granularity": "layer"}),
    "gasam-k2": ("gasam", {"epsilon": 0.01, "steps": 2, "granularity": "layer"}),
    "gasam-k2-model": ("gasam", {"epsilon": 0.01, "steps": 2, "granularity": "model"}),
    "gasam-k2-w/g": ("gasam", {"epsilon": 0.01, "steps": 2, "granularity": "layer", "scale": "w_over_g"}),
}


def group_of(name: str) -> str:
    return "A" if "lora_A" in name else ("B" if "lora_B" in name else "head")


def norms(tensors: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    return {k: math.sqrt(sum(float(t.double().square().sum()) for t in v)) for k, v in tensors.items()}


def run(label: str, data, x_train, y_train, steps: int) -> dict:
    name, hyper = METHODS[label]
    torch.manual_seed(0)
    model = build_model("minilm_lora", data)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = {k: [p for n, p in named if group_of(n) == k] for k in ("A", "B", "head")}
    base = torch.optim.AdamW([p for _, p in named], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    opt = methods.create(name, base, seed=0, total_steps=steps, **hyper)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(base, steps)
    shuffle, log, step = torch.Generator().manual_seed(0), [], 0
    model.train()
    while step < steps:
        order = torch.randperm(len(y_train), generator=shuffle)
        for b in range(len(y_train) // 32):
            if step == steps:
                break
            idx = order[b * 32:(b + 1) * 32]
            batch = (take(x_train, idx), y_train[idx])
            clean = {k: [p.detach().clone() for p in v] for k, v in groups.items()}
            passes = []

            def closure():
                loss = cross_entropy(model, batch)
                loss.backward()
                passes.append({"loss": loss.item(),
                               "shift": norms({k: [p.detach() - c for p, c in zip(groups[k], clean[k])] for k in groups}),
                               "grad": norms({k: [p.grad for p in groups[k] if p.grad is not None] for k in groups})})
                return loss

            opt.zero_grad(set_to_none=True)
            opt.step(closure)
            schedule.step()
            log.append({"passes": passes, "weights": norms({k: [p.detach() for p in v] for k, v in groups.items()})})
            step += 1
    acc, _ = evaluate(model, data.x_test, data.y_test, 250)
    later = log[5:] or log
    row = {"method": label, "test_acc": 100 * acc,
           "clean_loss": statistics.mean(r["passes"][0]["loss"] for r in log[-16:]),
           "B_norm": log[-1]["weights"]["B"]}
    if len(log[0]["passes"]) > 1:
        row["eps_B"] = statistics.mean(r["passes"][-1]["shift"]["B"] / r["weights"]["B"] for r in later)
        row["eps_A"] = statistics.mean(r["passes"][-1]["shift"]["A"] / r["weights"]["A"] for r in later)
        row["grad_B"] = statistics.mean(r["passes"][-1]["grad"]["B"] / r["passes"][0]["grad"]["B"] for r in later)
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    args = parser.parse_args(argv)
    labels = args.methods.split(",")
    for label in labels:
        if label not in METHODS:
            parser.error(f"argument --methods: {label!r} is not one of {', '.join(METHODS)}")
    data = load_task("vader_movies", max_length=32, test_subset=500)
    subset = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))[:1024]
    x_train, y_train = take(data.x_train, subset), data.y_train[subset]
    rows = []
    print("| method | test acc (%) | clean loss, last 16 steps | ‖B‖ at the end | ‖ε_B‖/‖B‖ | ‖ε_A‖/‖A‖ "
          "| ‖g_B(w+ε)‖/‖g_B(w)‖ |\n|---|---|---|---|---|---|---|", flush=True)
    for label in labels:
        row = run(label, data, x_train, y_train, args.steps)
        rows.append(row)
        extra = " | ".join(f"{row[k]:.2f}" if k in row else "–" for k in ("eps_B", "eps_A", "grad_B"))
        print(f"| {label} | {row['test_acc']:.1f} | {row['clean_loss']:.3f} | {row['B_norm']:.2f} | {extra} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
