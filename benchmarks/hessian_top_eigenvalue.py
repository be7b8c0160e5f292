"""Top Hessian eigenvalue: flatminima's Lanczos against PyHessian-style power iteration.

    python benchmarks/hessian_top_eigenvalue.py                    # CPU: SmallCNN(width=16) 1x28x28, batch 64
    python benchmarks/hessian_top_eigenvalue.py --device cuda      # ResNet-18 (CIFAR geometry), batch 128
    python benchmarks/hessian_top_eigenvalue.py --quick            # seconds-long CPU smoke run
    python benchmarks/hessian_top_eigenvalue.py --model resnet18 --batch-size 32 --json out.json

Same model (eval mode, float32), same batch, cross-entropy. Every candidate estimates the largest
Hessian eigenvalue ``λ₁`` of the batch loss to a relative tolerance ``--tol`` (default 1e-3):

* ``pyhessian-power``: PyHessian's ``hessian.eigenvalues`` (Yao et al. 2020) re-implemented here:
  the gradient graph built once with ``create_graph=True``, each product
  ``torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)``, normalized power
  iteration, stopped when the relative change of the eigenvalue is below ``tol`` (at most 100
  products, PyHessian's default). Its stopping rule measures progress, not error, and can stop early.
* ``power-to-tol``: the same iteration stopped by an oracle, as soon as its estimate is within
  ``tol`` of the reference: what power iteration really needs for that accuracy (up to 1000
  products per eigenvalue).
* ``lanczos``: ``fm.diagnostics.hessian.top_eigenvalues(k, which="LM", tol=tol)`` with default settings:
  Lanczos with full reorthogonalization, stopped by the eigenvalue bound ``min(r, r²/γ̂) ≤ tol·|θ|``
  (``r = |β_m s_m|`` the residual, ``γ̂`` the gap to the next Ritz value, trusted once the Ritz
  value moves by less than ``tol`` per step), products by ``method="auto"``: on one batch, double backward through
  a gradient graph built once, i.e. the same product as PyHessian's, so the difference is the
  number of products and what surrounds them.
* ``lanczos-to-tol``: the same Lanczos run stopped by the oracle (Ritz values within ``tol`` of the
  reference), the counterpart of ``power-to-tol``: the fewest products Lanczos can stop at.

``--k`` > 1 compares the top-k eigenvalues (PyHessian's ``top_n``, with deflation). The reference
eigenvalues come from a Lanczos run to a residual bound of 1e-7 (untimed). Each candidate is
warmed up once, then timed ``--repeats`` times with start vectors from seeds 0, 1, …; the table
shows medians (wall time; CUDA synchronized), products per run, and the worst relative error, and
the Lanczos speedup with each method's own stopping rule and at equal accuracy (the oracle rows).
A last line gives the cost of one product by each method (``fb``: one forward + backward).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn

import flatminima as fm
from flatminima import models
from flatminima.diagnostics import Objective
from flatminima.diagnostics.hessian import (CurvatureOperator, _Basis, _Flat, _lanczos, _tridiagonal, _unit, _wanted,
                                            top_eigenvalues)


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    batch: int
    note: str


def model_specs() -> dict[str, ModelSpec]:
    return {
        "smallcnn": ModelSpec("smallcnn", lambda: models.SmallCNN(1, 10, width=16, side=28), (1, 28, 28), 10, 64,
                              "SmallCNN(width=16) with BatchNorm, 1x28x28"),
        "resnet18": ModelSpec("resnet18", lambda: models.resnet18_cifar(10), (3, 32, 32), 10, 128,
                              "ResNet-18 (CIFAR geometry), 3x32x32"),
        "resnet18-narrow": ModelSpec("resnet18-narrow", lambda: models.resnet18_cifar(10, width=16), (3, 32, 32), 10,
                                     32, "ResNet-18 (CIFAR geometry, width 16), 3x32x32"),
        "quick": ModelSpec("quick", lambda: models.SmallCNN(1, 10, width=8, side=16), (1, 16, 16), 10, 32,
                           "SmallCNN(width=8) with BatchNorm, 1x16x16 (quick)"),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(spec: ModelSpec, device: torch.device, batch: int, train_steps: int, noise: float = 2.0, seed: int = 0):
    """The model after ``train_steps`` of SGD on a fixed synthetic task (class prototypes plus
    Gaussian noise of scale ``noise``: learnable, not separable), so that the spectrum is a trained
    network's, in eval mode, and one held-out evaluation batch."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = spec.build().to(device)
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # the same model in every run of the script
    prototypes = torch.randn((spec.num_classes, *spec.input_shape), generator=gen)
    y = torch.randint(0, spec.num_classes, (8 * batch,), generator=gen)
    x = prototypes[y] + noise * torch.randn((8 * batch, *spec.input_shape), generator=gen)
    x, y = x.to(device), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(train_steps):
        i = (step % 7) * batch
        opt.zero_grad(set_to_none=True)
        nnf.cross_entropy(model(x[i:i + batch]), y[i:i + batch]).backward()
        opt.step()
    torch.backends.cudnn.deterministic = deterministic
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, (x[7 * batch:], y[7 * batch:])


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return nnf.cross_entropy(model(batch[0]), batch[1])


# --------------------------------------------------------------------------------------------
# PyHessian-style power iteration (the baseline)


def _dot(xs, ys) -> torch.Tensor:
    return sum(torch.sum(x * y) for x, y in zip(xs, ys))


def _normalize(v):
    norm = torch.sqrt(_dot(v, v))
    return [t / (norm + 1e-6) for t in v]


def pyhessian_power(model: nn.Module, batch, tol: float, max_iter: int, seed: int, top_n: int = 1,
                    stop: Optional[Callable[[int, float], bool]] = None) -> tuple[list[float], int]:
    """PyHessian's ``hessian.eigenvalues(maxIter, tol, top_n)`` on one batch: ``(eigenvalues,
    products)``; each eigenvector is orthonormalized against those found before (deflation).
    ``stop(i, λ)`` replaces the relative-change rule (the oracle row)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    eigenvalues: list[float] = []
    eigenvectors: list[list[torch.Tensor]] = []
    products = 0
    for i in range(top_n):
        v = _normalize([torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for p in params])
        eigenvalue: Optional[float] = None
        for _ in range(max_iter):
            for u in eigenvectors:  # PyHessian's orthnormal(v, eigenvectors)
                c = _dot(v, u)
                v = [a - c * b for a, b in zip(v, u)]
            v = _normalize(v)
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            products += 1
            estimate = float(_dot(hv, v))
            v = _normalize(hv)
            if stop is not None:
                eigenvalue = estimate
                if stop(i, estimate):
                    break
                continue
            if eigenvalue is not None and abs(eigenvalue - estimate) / (abs(eigenvalue) + 1e-6) < tol:
                eigenvalue = estimate
                break
            eigenvalue = estimate
        eigenvalues.append(float(eigenvalue))
        eigenvectors.append(v)
    return eigenvalues, products


# --------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Candidate:
    label: str
    rule: str
    run: Callable[[int], tuple[list[float], int]]  # seed -> (eigenvalues, products)


def candidates(model: nn.Module, batch, tol: float, reference: list[float]) -> list[Candidate]:
    k = len(reference)

    def lanczos(seed: int):
        r = top_eigenvalues(model, loss_fn, batch, k=k, which="LM", tol=tol, seed=seed)
        return [float(x) for x in r.values], r.hvps

    def power(seed: int):
        return pyhessian_power(model, batch, tol, 100, seed, top_n=k)

    def power_to_tol(seed: int):
        return pyhessian_power(model, batch, tol, 1000, seed, top_n=k,
                               stop=lambda i, lam: abs(lam - reference[i]) <= tol * abs(reference[i]))

    def lanczos_to_tol(seed: int):
        return lanczos_oracle(model, batch, tol, reference, seed)

    return [
        Candidate("pyhessian-power", "relative change < tol", power),
        Candidate("power-to-tol", "error < tol (oracle)", power_to_tol),
        Candidate("lanczos", "eigenvalue bound < tol", lanczos),
        Candidate("lanczos-to-tol", "error < tol (oracle)", lanczos_to_tol),
    ]


def lanczos_oracle(model: nn.Module, batch, tol: float, reference: list[float], seed: int) -> tuple[list[float], int]:
    """The same Lanczos iteration as ``top_eigenvalues`` (same products, same start vector), stopped
    as soon as its Ritz values are within ``tol`` of the reference: how many products Lanczos needs
    for that accuracy, against ``power-to-tol``."""
    k = len(reference)
    objective = Objective(model, loss_fn, batch, seed=seed)
    op = CurvatureOperator(objective)
    flat = _Flat(objective.params)

    def ritz(alphas, betas) -> np.ndarray:
        theta = np.linalg.eigvalsh(_tridiagonal(alphas, betas))
        return theta[_wanted(theta, k, "LM")]

    def done(alphas, betas, beta) -> bool:
        return len(alphas) >= k and all(abs(t - r) <= tol * abs(r) for t, r in zip(ritz(alphas, betas), reference))

    with objective.session():
        try:
            gen = torch.Generator(device=flat.device).manual_seed(seed)
            alphas, betas, _ = _lanczos(flat.operator(op), _unit(flat.gaussian(gen)), 300, _Basis(None), done)
        finally:
            op.release()
    return [float(x) for x in ritz(alphas, betas)], op.products


def measure(cands: list[Candidate], device: torch.device, repeats: int, reference: list[float],
            log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for c in cands:
        c.run(100)  # warm-up: lazy initialization, autotuning, torch.func's decompositions
        times, products, errors = [], [], []
        for seed in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            values, n = c.run(seed)
            synchronize(device)
            times.append(time.perf_counter() - t0)
            products.append(n)
            errors.append(max(abs(v - r) / abs(r) for v, r in zip(values, reference)))
        out[c.label] = {"rule": c.rule, "seconds": statistics.median(times), "all_seconds": times,
                        "hvps": statistics.median(products), "all_hvps": products, "max_rel_error": max(errors),
                        "ms_per_hvp": 1e3 * statistics.median(t / max(n, 1) for t, n in zip(times, products))}
        log(f"  {c.label}: {out[c.label]['seconds']:.3f} s, {out[c.label]['hvps']} products, "
            f"error {max(errors):.1e}")
    return out


def speedups(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Lanczos against PyHessian as each is used (its own stopping rule), and at equal accuracy (both
    stopped by the oracle), in wall time and in products."""
    def ratio(a: str, b: str, key: str) -> float:
        return rows[a][key] / rows[b][key]

    return {"time_rules": ratio("pyhessian-power", "lanczos", "seconds"),
            "time_equal_accuracy": ratio("power-to-tol", "lanczos-to-tol", "seconds"),
            "hvps_rules": ratio("pyhessian-power", "lanczos", "hvps"),
            "hvps_equal_accuracy": ratio("power-to-tol", "lanczos-to-tol", "hvps")}


def product_costs(model: nn.Module, batch, device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per Hessian-vector product on the batch, by method: forward + backward alone
    (``fb``, the unit), forward-over-reverse, double backward rebuilding the graph each time (as
    over several batches), double backward through the kept graph (PyHessian's product and the one
    ``auto`` ends up with on one batch), finite differences."""
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device=device).manual_seed(0)
    v = [torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) for p in params]

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        return 1e3 * (time.perf_counter() - t0) / repeats

    def fb():
        leaves = [p.detach().requires_grad_(True) for p in params]
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        out = torch.func.functional_call(model, dict(zip(names, leaves)), (batch[0],))
        torch.autograd.grad(nnf.cross_entropy(out, batch[1]), leaves)

    out = {"fb": timed(fb)}
    for label, method, data in (("forward_over_reverse", "forward_over_reverse", [batch, batch]),
                                ("double_backward", "double_backward", [batch, batch]),
                                ("double_backward, kept graph", "double_backward", batch),
                                ("finite_difference", "finite_difference", [batch, batch])):
        # two copies of the batch = a "loader": no graph is kept; halve to get one product
        objective = Objective(model, loss_fn, data)
        op = CurvatureOperator(objective, method=method)
        with objective.session():
            ms = timed(lambda op=op: op(v))
            op.release()
        out[label] = ms / (1 if is_one(data) else 2)
    return out


def is_one(data) -> bool:
    return isinstance(data, tuple) and torch.is_tensor(data[0])


def markdown(info: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"**{info['model']}** ({info['note']}), batch {info['batch']}, {info['numel']:,} parameters, "
             f"{info['device_name']}; top-{len(info['reference'])} λ = "
             f"{', '.join(f'{x:.5g}' for x in info['reference'])}, tol = {info['tol']:g}, "
             f"median of {info['repeats']} runs",
             "",
             "| method | stopping rule | HVPs | time (s) | ms / HVP | max rel. error |",
             "|---|---|---:|---:|---:|---:|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['rule']} | {r['hvps']:g} | {r['seconds']:.3f} | {r['ms_per_hvp']:.1f} | "
                     f"{r['max_rel_error']:.1e} |")
    sp = speedups(rows)
    lines += ["", f"Lanczos speedup: {sp['time_rules']:.2f}× over PyHessian with each one's stopping rule "
                  f"({sp['hvps_rules']:.2f}× fewer products); {sp['time_equal_accuracy']:.2f}× at equal accuracy "
                  f"(both stopped at error < tol; {sp['hvps_equal_accuracy']:.2f}× fewer products)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    ap.add_argument("--model", choices=sorted(model_specs()), default=None,
                    help="default: smallcnn on CPU, resnet18 on CUDA, quick with --quick")
    ap.add_argument("--batch-size", type=int, default=None, help="override the model's batch size")
    ap.add_argument("--tol", type=float, default=1e-3, help="relative tolerance every candidate runs to")
    ap.add_argument("--k", type=int, default=1, help="number of top eigenvalues (PyHessian's top_n; default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per candidate (default 3, 2 with --quick)")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="SGD steps on the synthetic task before measuring (default 100, 20 with --quick)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads on CPU (default 1; 0 keeps torch's default)")
    ap.add_argument("--quick", action="store_true", help="seconds-long CPU smoke run")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return ap


def main(argv: Optional[list[str]] = None) -> dict:
    threads = torch.get_num_threads()
    try:
        return _main(build_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> dict:
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads and not cuda:
        torch.set_num_threads(args.threads)
    name = args.model or ("quick" if args.quick else "resnet18" if cuda else "smallcnn")
    spec = model_specs()[name]
    batch = args.batch_size or spec.batch
    repeats = args.repeats or (2 if args.quick else 3)
    train_steps = args.train_steps if args.train_steps is not None else (20 if args.quick else 100)
    device_name = torch.cuda.get_device_name(device) if cuda else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    log(f"[{name}] batch {batch} on {device_name}: {train_steps} training steps")
    model, data = build(spec, device, batch, train_steps)
    t0 = time.perf_counter()
    ref = top_eigenvalues(model, loss_fn, data, k=args.k, which="LM", tol=1e-7, bound="residual", max_iter=300)
    reference = [float(x) for x in ref.values]
    log(f"  reference {reference} ({ref.hvps} products, {time.perf_counter() - t0:.1f} s)")
    rows = measure(candidates(model, data, args.tol, reference), device, repeats, reference, log)
    info = {"model": name, "note": spec.note, "batch": batch, "numel": sum(p.numel() for p in model.parameters()),
            "device_name": device_name, "reference": reference, "reference_converged": bool(ref.converged.all()),
            "tol": args.tol, "repeats": repeats, "train_steps": train_steps, "torch": torch.__version__,
            "flatminima": fm.__version__}
    table = markdown(info, rows)
    costs = product_costs(model, data, device)
    table += "\n\nms per product: " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items())
    print(table + "\n", flush=True)
    results = {**info, "rows": rows, "speedups": speedups(rows), "product_ms": costs}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=lambda x: None if isinstance(x, float)
                                              and not math.isfinite(x) else x))
    results["table"] = table
    return results


if __name__ == "__main__":
    main()
