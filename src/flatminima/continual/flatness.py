r"""Flatness of every task's loss over a continual run, and its link to forgetting.

After training task ``j`` (:meth:`PerTaskFlatness.after_task`), for every task ``i <= j`` seen so
far and its loss ``L_i`` (the caller's first ``batches`` test batches of task ``i``):

* ``lambda_max/<space>``: the top eigenvalue of ``∇²L_i`` at the current weights ``θ_j`` (Lanczos,
  :func:`flatminima.diagnostics.top_eigenvalues`, ``k = 1``, at most ``iterations`` products);
* ``trace/<space>``: ``tr ∇²L_i(θ_j)`` by Hutchinson's estimator (Hutchinson 1989;
  :func:`flatminima.diagnostics.hessian_trace`) with exactly ``iterations`` Rademacher probes;
* ``line``: ``L_i`` along ``θ(t) = (1 − t)·θ_i + t·θ_j``, ``t ∈ linspace(0, 1, line_points)``, from
  the weights after task ``i`` to the current ones, for every ``i < j`` (linear mode connectivity,
  Mirzadeh et al. 2021, "Linear Mode Connectivity in Multitask and Continual Learning"), and its
  barrier ``max_t L_i(θ(t)) − max(L_i(θ(0)), L_i(θ(1)))``: how far the path rises above the
  higher endpoint (0 for a convex path, > 0 when a ridge separates the two minima; Frankle et al.
  2020 measure it against the mean of the endpoints, which counts a monotone path as a barrier).

``space`` is a parameter choice of the diagnostics: ``"lora"`` (the active adapters' factors;
``None`` in a model without adapters), ``"all"`` (every floating-point weight, the frozen base
included) or ``"trainable"``. Every call uses the same ``seed`` (the same Lanczos start vector and
Hutchinson probes for every entry: common random numbers, so differences between entries are not
probe noise). Nothing is written to the model: the diagnostics substitute parameter values, and
modes, ``requires_grad`` flags and the global RNG are as they were.

**Checkpoints.** After task ``j`` the tensors that can differ from the model as built are saved:
every state-dict entry that is new or re-allocated since :meth:`PerTaskFlatness.start`, written in
place since (torch's version counter), a parameter that required grad at the start or now, every
floating-point buffer (BatchNorm statistics), and whatever an earlier checkpoint held. The rest is
bit-identical to a model built the same way (same seed, same adapters), so
:func:`restore_checkpoint` puts the weights after task ``j`` back exactly. Without ``start()`` the
first checkpoint holds the whole state dict. The file ``task{j}.pt`` is ``{"task": j, "names":
[every state-dict name], "state": {name: tensor}}`` (``torch.load(weights_only=True)`` reads it);
without ``checkpoint_dir`` the checkpoints stay in host memory.

A tensor of the current model that did not exist after task ``i`` (a later task's adapter) is
taken as zeros in ``θ_i``, and one that grew (O-LoRA's folded adapter, concatenated along the rank)
as ``θ_i``'s tensor zero-padded: zero LoRA factors add nothing, so ``θ(0)`` computes ``θ_i``'s function.

**Cost** after task ``j``, with ``b = batches``, ``m = iterations``, ``S`` spaces, ``P = line_points``:
``(j + 1)·S`` eigenvalue runs and ``(j + 1)·S`` trace runs of at most ``m`` Hessian-vector products
over ``b`` batches each, and ``j·P·b`` forward passes for the lines; over ``T`` tasks
``T(T + 1)·S·m·b`` batch HVPs (about 2–3 backward passes each) and ``T(T − 1)/2·P·b`` forwards.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..core.validation import check, check_int
from ..diagnostics import hessian_trace, interpolate, top_eigenvalues
from ..lora import lora_layers
from .metrics import forgetting_per_task

__all__ = ["QUANTITIES", "SPACES", "PerTaskFlatness", "direct_flatness", "embed_state",
           "flatness_forgetting_correlation", "flatness_forgetting_points",
           "line_barrier", "line_losses", "load_checkpoint", "restore_checkpoint"]

QUANTITIES = ("lambda_max", "trace", "line")
SPACES = ("lora", "all", "trainable")
LossFn = Callable[[nn.Module, Any], Tensor]


def _measure(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], space: str, quantity: str,
             iterations: int, seed: int, tol: float) -> tuple[Optional[float], int]:
    """``(value, Hessian-vector products)``; ``(None, 0)`` for ``"lora"`` in a model without adapters."""
    if space == "lora" and not any(a for layer in lora_layers(model) for a in layer.named(None)):
        return None, 0  # no active adapter (finetune, a plain model): no LoRA subspace
    if quantity == "lambda_max":
        try:
            result = top_eigenvalues(model, loss_fn, list(batches), k=1, max_iter=iterations, tol=tol, params=space,
                                     seed=seed)
        except np.linalg.LinAlgError:  # non-finite Hessian-vector products: a run that diverged
            return float("nan"), 0
        return float(result.values[0]), int(result.hvps)
    result = hessian_trace(model, loss_fn, list(batches), probes=iterations, min_probes=iterations, rtol=0.0,
                           params=space, seed=seed)
    return float(result.trace), int(result.hvps)


def direct_flatness(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], space: str, quantity: str, *,
                    iterations: int = 20, seed: int = 0, tol: float = 1e-3) -> Optional[float]:
    """One entry of :class:`PerTaskFlatness`'s matrices, computed directly: ``quantity``
    ``"lambda_max"`` (``top_eigenvalues(k=1, max_iter=iterations, tol=tol)``) or ``"trace"``
    (``hessian_trace`` with exactly ``iterations`` probes) of ``loss_fn`` on ``batches`` in
    parameter ``space``, seeded with ``seed``; None for ``"lora"`` without adapters."""
    check("space", space in SPACES, space, f"one of {', '.join(SPACES)}")
    check("quantity", quantity in ("lambda_max", "trace"), quantity, "'lambda_max' or 'trace'")
    check_int("iterations", iterations, 1)
    return _measure(model, loss_fn, batches, space, quantity, iterations, seed, tol)[0]


# ------------------------------------------------------------------------------ checkpoints


def load_checkpoint(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """A checkpoint file written by :class:`PerTaskFlatness` (``{"task", "names", "state"}``)."""
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    check("path", isinstance(checkpoint, dict) and {"task", "names", "state"} <= set(checkpoint), str(path),
          "a per-task checkpoint (a dict with task, names and state)")
    return checkpoint


def restore_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, Any]]) -> None:
    """Copy a checkpoint's tensors into ``model`` (in place, bit-exact). ``model`` must be built
    the same way as the one saved (same state-dict names; same shapes and dtypes of the saved
    tensors); checked before anything is written."""
    if not isinstance(checkpoint, Mapping):
        checkpoint = load_checkpoint(checkpoint)
    own = model.state_dict(keep_vars=True)
    missing = sorted(set(checkpoint["names"]) ^ set(own))
    check("model", not missing, f"names differing from the checkpoint's: {missing[:4]}",
          "a model built the same way as the one saved (same state-dict names)")
    for name, value in checkpoint["state"].items():
        check("model", own[name].shape == value.shape and own[name].dtype == value.dtype,
              f"{name}: {tuple(own[name].shape)} {own[name].dtype}", f"{tuple(value.shape)} {value.dtype}")
    with torch.no_grad():
        for name, value in checkpoint["state"].items():
            own[name].copy_(value)


def embed_state(model: nn.Module, checkpoint: Mapping[str, Any], names: Sequence[str]) -> dict[str, Tensor]:
    """The checkpoint's values of the current model's tensors ``names``, shaped like them (module
    docstring): a tensor absent then is zeros; a smaller one is zero-padded (its block first)."""
    own = model.state_dict(keep_vars=True)
    state, existed = checkpoint["state"], set(checkpoint["names"])
    out = {}
    for name in names:
        like = own[name].detach()
        if name not in state:
            check("checkpoint", name not in existed, name, "the tensor saved whenever it existed and later changed")
            out[name] = torch.zeros_like(like)
            continue
        value = state[name].to(device=like.device, dtype=like.dtype)
        if value.shape == like.shape:
            out[name] = value
            continue
        fits = value.dim() == like.dim() and all(a <= b for a, b in zip(value.shape, like.shape))
        check("checkpoint", fits, f"{name}: {tuple(value.shape)}", f"a shape within {tuple(like.shape)}")
        padded = torch.zeros_like(like)
        padded[tuple(slice(0, s) for s in value.shape)] = value
        out[name] = padded
    return out


def line_losses(model: nn.Module, start: Mapping[str, Any], loss_fn: LossFn, batches: Sequence[Any],
                t: Sequence[float], names: Optional[Sequence[str]] = None) -> np.ndarray:
    """``L(θ(t))`` along ``θ(t) = (1 − t)·θ_start + t·θ_model`` for the state-dict tensors ``names``
    (default: every tensor the checkpoint ``start`` saved that the model has, and every floating
    buffer); other tensors are the model's. Evaluated by :func:`flatminima.diagnostics.interpolate`
    from the model's weights at ``s = 1 − t`` (exact at both ends; eval mode), writing nothing."""
    own = model.state_dict(keep_vars=True)
    params = {n for n, _ in model.named_parameters()}
    buffers = [n for n, b in model.named_buffers() if b.is_floating_point() and n in own]
    chosen = list(names) if names is not None else [n for n in own if n in start["state"] or n not in start["names"]]
    chosen = [n for n in chosen if n in params] or [n for n in own if n in params and own[n].is_floating_point()]
    pick = set(chosen)
    other = embed_state(model, start, chosen + buffers)
    result = interpolate(model, other, loss_fn, list(batches), ts=[1.0 - float(x) for x in t],
                         params=lambda n, p: n in pick, buffers="interpolate" if buffers else "a")
    return np.asarray(result.loss, dtype=np.float64)


def line_barrier(loss: Sequence[float]) -> float:
    """``max_t L(θ(t)) − max(L(θ(0)), L(θ(1)))`` of a loss path (module docstring)."""
    loss = np.asarray(loss, dtype=np.float64)
    return float(loss.max() - max(loss[0], loss[-1]))


# ------------------------------------------------------------------------------ the recorder


class PerTaskFlatness:
    """Flatness of each seen task's loss after each task (module docstring). Call :meth:`start`
    once before task 0, :meth:`after_task` after each task (after its ``end_task``), then
    :meth:`record` for the JSON-ready result."""

    def __init__(self, quantities: Sequence[str] = ("lambda_max", "trace", "line"),
                 spaces: Sequence[str] = ("lora", "all"), batches: int = 2, iterations: int = 20,
                 line_points: int = 11, seed: int = 0, checkpoint_dir: Union[None, str, os.PathLike] = None,
                 tol: float = 1e-3):
        quantities, spaces = tuple(quantities), tuple(spaces)
        check("quantities", bool(quantities) and set(quantities) <= set(QUANTITIES) and len(set(quantities))
              == len(quantities), quantities, f"distinct names among {', '.join(QUANTITIES)}")
        check("spaces", bool(spaces) and set(spaces) <= set(SPACES) and len(set(spaces)) == len(spaces), spaces,
              f"distinct names among {', '.join(SPACES)}")
        check_int("batches", batches, 1)
        check_int("iterations", iterations, 1)
        check_int("line_points", line_points, 2)
        check("seed", isinstance(seed, int) and not isinstance(seed, bool), seed, "an int")
        self.quantities, self.spaces, self.batches, self.iterations = quantities, spaces, batches, iterations
        self.line_points, self.seed, self.tol = line_points, seed, float(tol)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.t = np.linspace(0.0, 1.0, line_points)
        self._start: Optional[dict[str, tuple]] = None
        self._saved: set[str] = set()
        self._checkpoints: list[Union[Path, dict[str, Any]]] = []
        self._values: dict[str, dict[tuple[int, int], Optional[float]]] = {}
        self._lines: dict[str, list[float]] = {}
        self._hvps, self._forwards, self._seconds = 0, 0, 0.0

    @staticmethod
    def _stamp(t: Tensor) -> tuple:
        return (t.data_ptr(), tuple(t.shape), t._version, bool(getattr(t, "requires_grad", False)))

    def start(self, model: nn.Module) -> None:
        """Note the model as built (pointers, shapes, version counters, requires_grad; no copies)."""
        check("start", not self._checkpoints, "a call after after_task()", "one call before the first task")
        self._start = {n: self._stamp(t) for n, t in model.state_dict(keep_vars=True).items()}

    def _checkpoint(self, j: int, model: nn.Module) -> dict[str, Any]:
        own = model.state_dict(keep_vars=True)
        params = {n for n, _ in model.named_parameters()}
        for name, t in own.items():
            then = None if self._start is None else self._start.get(name)
            now = self._stamp(t)
            buffer = name not in params and t.is_floating_point()  # BatchNorm statistics: updated without a trace
            if then is None or then[:3] != now[:3] or then[3] or now[3] or buffer:
                self._saved.add(name)
        checkpoint = {"task": j, "names": list(own),
                      "state": {n: t.detach().to("cpu", copy=True) for n, t in own.items() if n in self._saved}}
        if self.checkpoint_dir is None:
            self._checkpoints.append(checkpoint)
        else:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            path = self.checkpoint_dir / f"task{j}.pt"
            torch.save(checkpoint, path)
            self._checkpoints.append(path)
        return checkpoint

    def after_task(self, j: int, model: nn.Module, evaluations: Sequence[tuple[LossFn, Sequence[Any]]]) -> None:
        """Measure after task ``j`` (0, 1, … in order): ``evaluations[i] = (loss_fn, batches)`` of
        every task ``i <= j`` (batches on the model's device; the first ``batches`` are used)."""
        check("j", isinstance(j, int) and j == len(self._checkpoints), j, f"{len(self._checkpoints)} (tasks in order)")
        ok = isinstance(evaluations, (list, tuple)) and len(evaluations) == j + 1 and all(
            isinstance(e, (list, tuple)) and len(e) == 2 and callable(e[0]) and isinstance(e[1], (list, tuple))
            and len(e[1]) >= 1 for e in evaluations)
        check("evaluations", ok, type(evaluations).__name__,
              f"a list of {j + 1} (loss_fn, non-empty list of batches) pairs, one per task seen")
        began = time.perf_counter()
        self._checkpoint(j, model)
        for i, (loss_fn, batches) in enumerate(evaluations):
            batches = list(batches[:self.batches])
            for quantity in (q for q in self.quantities if q != "line"):
                for space in self.spaces:
                    value, hvps = _measure(model, loss_fn, batches, space, quantity, self.iterations, self.seed,
                                           self.tol)
                    self._values.setdefault(f"{quantity}/{space}", {})[(j, i)] = value
                    self._hvps += hvps * len(batches)  # products over the data, one per batch each
            if "line" in self.quantities and i < j:
                start = self._checkpoints[i]
                start = load_checkpoint(start) if isinstance(start, Path) else start
                names = [n for n in model.state_dict(keep_vars=True) if n in self._saved]
                loss = line_losses(model, start, loss_fn, batches, self.t, names)
                self._lines[f"{i}>{j}"] = [float(v) for v in loss]
                self._values.setdefault("line/barrier", {})[(j, i)] = line_barrier(loss)
                self._forwards += len(self.t) * len(batches)
        self._seconds += time.perf_counter() - began

    def record(self) -> dict[str, Any]:
        """``{"quantities": {"<quantity>/<space>": T×T, "line/barrier": T×T}, "line": {"t", "loss":
        {"i>j": [...]}} or None, "checkpoints": [file names], "budget": {...}}``; entry ``[j][i]``
        is task ``i``'s value after task ``j``, None where ``i > j`` (the barrier also on the diagonal)."""
        T = len(self._checkpoints)

        def finite(v: Optional[float]) -> Optional[float]:
            return None if v is None or not math.isfinite(v) else v

        keys = [f"{q}/{s}" for q in self.quantities if q != "line" for s in self.spaces]
        keys += ["line/barrier"] if "line" in self.quantities else []
        quantities = {k: [[finite(self._values.get(k, {}).get((j, i))) for i in range(T)] for j in range(T)]
                      for k in keys}
        line = {"t": [float(x) for x in self.t], "loss": dict(self._lines)} if "line" in self.quantities else None
        return {"quantities": quantities, "line": line,
                "checkpoints": [p.name for p in self._checkpoints if isinstance(p, Path)],
                "budget": {"batches": self.batches, "iterations": self.iterations, "line_points": self.line_points,
                           "spaces": list(self.spaces), "seed": self.seed, "batch_hvps": self._hvps,
                           "line_forwards": self._forwards, "seconds": self._seconds}}


# ------------------------------------------------------------------------------ flatness vs forgetting


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (as Spearman's coefficient needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1, dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """``Σ(x − x̄)(y − ȳ) / √(Σ(x − x̄)² Σ(y − ȳ)²)``; None under 3 points or without spread."""
    if len(x) < 3:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return None if den == 0 else float((dx * dy).sum() / den)


def flatness_forgetting_points(record: Mapping[str, Any], space: str, quantity: str = "lambda_max",
                               evaluation: Optional[str] = None) -> tuple[list[float], list[float]]:
    """One unit's ``(flatness of task i right after learning it, forgetting of task i)`` for
    ``i < T − 1`` (forgetting as a fraction, on ``evaluation``, default the training scenario):
    the points :func:`flatness_forgetting_correlation` correlates; empty without flatness."""
    matrix = ((record.get("flatness") or {}).get("quantities") or {}).get(f"{quantity}/{space}")
    evaluation = evaluation or record.get("scenario") or next(iter(record["accuracy"]))
    accuracy = record.get("accuracy", {}).get(evaluation)
    if matrix is None or accuracy is None:
        return [], []
    forgot = forgetting_per_task(accuracy)
    pairs = [(matrix[i][i], forgot[i]) for i in range(len(accuracy) - 1)]
    pairs = [(float(x), float(y)) for x, y in pairs if x is not None and math.isfinite(float(x))]
    return [x for x, _ in pairs], [y for _, y in pairs]


def flatness_forgetting_correlation(records: Sequence[Mapping[str, Any]], space: str, quantity: str = "lambda_max",
                                    evaluation: Optional[str] = None, resamples: int = 1000, level: float = 0.95,
                                    seed: int = 0) -> dict[str, Any]:
    """Pearson's and Spearman's correlation between the flatness of task ``i`` right after it was
    learned (the diagonal ``[i][i]`` of ``record["flatness"]["quantities"]["<quantity>/<space>"]``)
    and its forgetting at the end, ``f_i = max_{i <= l < T−1} a[l][i] − a[T−1][i]``
    (:func:`~flatminima.continual.metrics.forgetting_per_task`, on ``record["accuracy"][evaluation]``,
    default the unit's training scenario), ``i < T − 1``, pooled over the ``records`` of one method ×
    strategy (seeds × orders). Spearman's is Pearson's on the ranks (ties averaged).

    The confidence interval is a percentile bootstrap over units (Efron & Tibshirani 1993): ``resamples``
    draws of ``n_units`` records with replacement (``numpy.random.default_rng(seed)``), their points
    pooled; the ``(1 ± level)/2`` quantiles of the finite coefficients. Records without flatness
    (older runs) are skipped. Returns ``{"n_units", "n_points", "pearson", "spearman",
    "pearson_ci", "spearman_ci", "resamples", "level"}``; a coefficient is None under 3 points or
    without spread, a CI None with fewer than 2 units.
    """
    check("space", space in SPACES, space, f"one of {', '.join(SPACES)}")
    check("quantity", quantity in ("lambda_max", "trace"), quantity, "'lambda_max' or 'trace'")
    check_int("resamples", resamples, 1)
    check("level", isinstance(level, float) and 0 < level < 1, level, "a float in (0, 1)")
    units = [p for p in (flatness_forgetting_points(r, space, quantity, evaluation) for r in records) if p[0]]
    xs = np.asarray([x for u in units for x in u[0]], dtype=np.float64)
    ys = np.asarray([y for u in units for y in u[1]], dtype=np.float64)
    out: dict[str, Any] = {"n_units": len(units), "n_points": int(len(xs)), "pearson": _pearson(xs, ys),
                           "spearman": _pearson(_ranks(xs), _ranks(ys)) if len(xs) else None,
                           "pearson_ci": None, "spearman_ci": None, "resamples": resamples, "level": level}
    if len(units) < 2 or out["pearson"] is None:
        return out
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"pearson": [], "spearman": []}
    for _ in range(resamples):
        pick = rng.integers(0, len(units), size=len(units))
        x = np.concatenate([units[k][0] for k in pick])
        y = np.concatenate([units[k][1] for k in pick])
        for name, value in (("pearson", _pearson(x, y)), ("spearman", _pearson(_ranks(x), _ranks(y)))):
            if value is not None:
                draws[name].append(value)
    for name, values in draws.items():
        if values:
            lo, hi = np.quantile(np.asarray(values), [(1 - level) / 2, (1 + level) / 2])
            out[f"{name}_ci"] = [float(lo), float(hi)]
    return out
