"""Flat-LoRA's step against the plain LoRA step, and against the two public ways of adding noise.

    python benchmarks/flat_lora_step.py --device cuda            # Llama-style 0.4B, bf16, LoRA r16 q/v, 8×512
    python benchmarks/flat_lora_step.py --quick                  # CPU smoke run (tiny Llama), seconds
    python benchmarks/flat_lora_step.py --quick --layers 24 --hidden 32 --batch 1 --seq 8 --rounds 9 --block 10
                                                                 # host-bound: the host work per noisy layer

DESIGN.md §9: full-model random perturbation ≤ 1.05 × the plain LoRA step, with no weight-sized
buffer. Candidates, all on the same model, the same batch and the same AdamW on the LoRA factors:

* ``lora``: the plain step ``zero_grad(); loss.backward(); opt.step()``;
* ``flatlora``: ``fm.FlatLoRA`` (the noisy weight built per layer in the forward and rebuilt in the
  backward; on CUDA the fused Triton/Philox kernel), and ``flatlora[torch]`` with the noise drawn
  by ``torch.randn`` from a seeded generator instead (same functional scheme);
* ``ref:store``: the noise drawn once, kept between ``W.add_(ε)`` before the forward and
  ``W.sub_(ε)`` after the backward (one extra copy of the perturbed weights);
* ``ref:randn``: the public Flat-LoRA code's scheme: the noise generated with ``torch.randn`` from a
  reseeded generator, added before the forward, generated again and subtracted after the backward.

The two references write the frozen weights (bf16 drift) and are here for time and memory only.
``--whole-model`` adds the same four on every frozen linear/embedding layer (seed 000's variant).
Every candidate is timed in blocks of steps, round-robin; ratios are paired by round against the
``lora`` block of the same round, and the table reports medians. Peak memory is
``max_memory_allocated`` over a window of steps, one candidate at a time (CUDA only). The column
"+µs/layer" is the step time a candidate adds over the plain LoRA step per noisy layer: on a model
small enough for the step to be host-bound (``--quick --layers 24 --hidden 32 --batch 1 --seq 8``)
it is the host work (Python, dispatch, launches) a candidate spends per layer.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import flatminima as fm  # noqa: E402
from flatminima.lora import frozen_layers, lora_parameters, row_scale  # noqa: E402

MiB = 2.0**20


def build(args, device: torch.device):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.quick:
        hidden = args.hidden or 64
        config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                             num_hidden_layers=args.layers or 2, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=128)
    else:
        config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden or 1024, intermediate_size=3072,
                             num_hidden_layers=args.layers or 24,
                             num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=args.seq,
                             tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    return model, ids, n_params


def candidates(model, ids, whole: bool) -> dict[str, Callable[[], None]]:
    """name → one training step; each candidate has its own AdamW over the LoRA factors."""
    params = lora_parameters(model)
    layers = frozen_layers(model, whole_model=whole)
    suffix = "+whole" if whole else ""

    def adamw():
        return torch.optim.AdamW(params, lr=1e-5, foreach=True)

    def forward_backward():
        model(input_ids=ids, labels=ids).loss.backward()

    plain = adamw()

    def lora_step():
        plain.zero_grad(set_to_none=True)
        forward_backward()
        plain.step()

    def flat(kernel):
        opt = fm.FlatLoRA(adamw(), model=model, rho=0.05, whole_model=whole, kernel=kernel)

        def step():
            opt.zero_grad(set_to_none=True)
            opt.step(lambda: forward_backward())
        return step

    def weights():
        return [layer.weight for layer in layers]  # W0 of a LoRA layer, or a plain layer's weight

    gen = torch.Generator(device=ids.device)

    def noises(step_seed):
        gen.manual_seed(step_seed)
        out = []
        for layer, w in zip(layers, weights()):
            scale = row_scale(layer, 0.05).reshape(-1, *[1] * (w.dim() - 1))
            out.append(torch.randn(w.shape, generator=gen, device=w.device, dtype=torch.float32).mul_(scale).to(w.dtype))
        return out

    def ref_store():
        opt, counter = adamw(), [0]

        def step():
            opt.zero_grad(set_to_none=True)
            counter[0] += 1
            eps = noises(counter[0])
            with torch.no_grad():
                torch._foreach_add_(weights(), eps)
            forward_backward()
            with torch.no_grad():
                torch._foreach_sub_(weights(), eps)
            del eps
            opt.step()
        return step

    def ref_randn():
        opt, counter = adamw(), [0]

        def step():
            opt.zero_grad(set_to_none=True)
            counter[0] += 1
            with torch.no_grad():
                for w, e in zip(weights(), noises(counter[0])):
                    w.add_(e)
            forward_backward()
            with torch.no_grad():
                for w, e in zip(weights(), noises(counter[0])):
                    w.sub_(e)
            opt.step()
        return step

    out = {} if whole else {"lora": lora_step}
    out[f"flatlora{suffix}"] = flat("auto")
    out[f"flatlora[torch]{suffix}"] = flat("torch")
    out[f"ref:store{suffix}"] = ref_store()
    out[f"ref:randn{suffix}"] = ref_randn()
    return out


def timed_block(step: Callable[[], None], n: int, device: torch.device) -> float:
    """Mean ms per step over ``n`` consecutive steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) * 1e3 / n


def peak_mib(step: Callable[[], None], n: int, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / MiB


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny Llama on the CPU, a few steps")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--block", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 24; --quick: 2)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 1024; --quick: 64)")
    parser.add_argument("--whole-model", action="store_true", help="also the whole-model variants")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.batch = args.batch or (2 if args.quick else 8)
    args.seq = args.seq or (32 if args.quick else 512)
    rounds, block = args.rounds or (2 if args.quick else 8), args.block or (2 if args.quick else 10)
    torch.backends.cuda.matmul.allow_tf32 = True

    model, ids, n_params = build(args, device)
    steps = candidates(model, ids, whole=False)
    noisy_layers = {name: len(frozen_layers(model)) for name in steps}
    if args.whole_model:
        whole = candidates(model, ids, whole=True)
        steps.update(whole)
        noisy_layers.update({name: len(frozen_layers(model, whole_model=True)) for name in whole})
    for step in steps.values():  # warm-up: compile kernels, create optimizer state
        timed_block(step, 3 if not args.quick else 1, device)
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed_block(steps[name], block, device))
    memory = {name: peak_mib(step, 3, device) for name, step in steps.items()}
    rows = []
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times["lora"])]
        added = [(t - b) * 1e3 / noisy_layers[name] for t, b in zip(times[name], times["lora"])]
        rows.append({"candidate": name, "ms": statistics.median(times[name]), "ratio": statistics.median(ratios),
                     "us_per_layer": statistics.median(added) if name != "lora" else 0.0,
                     "spread_pct": 100 * (max(ratios) - min(ratios)) / 2 / statistics.median(ratios),
                     "peak_mib": memory[name], "mem_ratio": memory[name] / memory["lora"]})
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    header = (f"Flat-LoRA step, Llama ({n_params / 1e6:.1f}M params, {model.config.num_hidden_layers} layers, "
              f"{'bf16' if device.type == 'cuda' else 'fp32'}), LoRA r=16 on q/v, batch {args.batch}×{args.seq}, "
              f"{gpu}, {rounds} rounds × {block} steps")
    lines = [header, "", "| candidate | ms/step | × LoRA step | ±% | +µs/layer | peak MiB | mem × LoRA |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['candidate']} | {row['ms']:.2f} | {row['ratio']:.3f} | {row['spread_pct']:.1f} | "
                     f"{row['us_per_layer']:.0f} | {row['peak_mib']:.0f} | {row['mem_ratio']:.4f} |")
    table = "\n".join(lines)
    print(table)
    result = {"header": header, "rows": rows, "times_ms": times, "table": table}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
