"""Robustness to parameter corruption: the evaluations of GA-SAM Table 4 and m-RWP Fig. A1.

* :func:`corruption_robustness` (GA-SAM, Zhang et al., EMNLP 2022, §5.3, Table 4; Sun et al.
  2021; Zhang et al. 2021): a metric (accuracy, or the loss) of ``w + a`` after a **random** corruption ``a`` and
  after a **multi-step adversarial** one (projected gradient ascent on the loss, GA-SAM eqs. 16–18
  with ``T = 1``), for each budget ``ε`` of an L2 or L∞ ball ``‖a‖_p ≤ ε``. Budgets are absolute
  (GA-SAM's convention: ``ε`` bounds the whole parameter vector); ``relative=True`` reads them as
  fractions of ``‖w‖_p`` (same norm, same parameters), so ``ε = 0.01`` means 1% of the weights' norm.
  A random corruption lies on the boundary: ``a = ε·z/‖z‖₂`` (uniform on the sphere) or
  ``a = ε·sign(z)`` (a uniform vertex of the cube), ``z ~ N(0, I)``; so ``‖a‖_p = ε`` exactly. The
  adversarial one is the highest-loss point of the ascent path (inside the ball).
* :func:`perturbation_curve` (m-RWP, Li et al., TMLR 2024, Fig. A1): the perturbed loss
  ``L(w + ε)`` against the radius ``‖ε‖₂`` (log-spaced radii), random (mean over samples, with its standard error)
  against adversarial (AWP: the ascent's best point).

``metric_fn(model, batch)`` returns either the batch's mean (a float or 0-dim tensor, weighted by
the batch size) or ``(sum, count)``; :func:`accuracy` is one. Everything is evaluated through
functional substitution (:class:`~.objective.Objective`): the model is never written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..core.kernels import global_norm
from ..core.validation import check, check_int
from .objective import LossFn, Objective, ParamSpec, batch_size
from ..core.validation import check_nonnegative, check_positive
from .sharpness import Result, ascend, check_ball_norm, generator, norm_label, random_in_ball, shifted, stderr

MetricFn = Callable[[nn.Module, Any], Any]
KINDS = ("random", "adversarial")


def accuracy(model: nn.Module, batch: Any) -> tuple[Tensor, int]:
    """Top-1 accuracy as ``(correct, count)`` for a batch ``(x, y)`` (``model(x)`` gives logits or
    an object with ``.logits``) or a dict batch with ``labels`` (``model(**inputs).logits``)."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out, y = model(**inputs), batch["labels"]
    else:
        out, y = model(batch[0]), batch[1]
    logits = getattr(out, "logits", out)
    return (logits.argmax(-1) == y).sum(), y.numel()


def evaluate(objective: Objective, values: Optional[Sequence[Tensor]] = None, metric_fn: Optional[MetricFn] = None,
             buffers: Optional[dict[str, Tensor]] = None) -> tuple[float, Optional[float]]:
    """``(L(values), metric(values))`` over all of the objective's data in one pass (metric None
    without ``metric_fn``; both over every rank's data when the objective is distributed);
    ``buffers`` substitutes buffers too (:meth:`Objective.evaluate`)."""
    values = objective.point() if values is None else values
    loss, count, total, total_count = 0.0, 0, 0.0, 0.0
    with objective.session(), torch.no_grad():
        for batch in objective.batches():
            n = batch_size(batch)
            loss += float(objective.evaluate(objective.loss_fn, values, batch, buffers)) * n
            count += n
            if metric_fn is not None:
                out = objective.evaluate(metric_fn, values, batch, buffers)
                if isinstance(out, (tuple, list)):
                    total, total_count = total + float(out[0]), total_count + float(out[1])
                else:
                    total, total_count = total + float(out) * n, total_count + n
    loss, count, total, total_count = objective.sum_floats(loss, count, total, total_count)
    return loss / count, None if metric_fn is None else total / total_count


def _check_metric(metric_fn: Any) -> None:
    check("metric_fn", metric_fn is None or callable(metric_fn), metric_fn,
          "None or a callable metric_fn(model, batch) -> mean or (sum, count)")


# -- GA-SAM Table 4 --------------------------------------------------------------------------


@dataclass
class RobustnessTable(Result):
    """Loss and metric after random and adversarial corruption, one row per (norm, budget, kind)."""

    clean_loss: float
    clean_metric: Optional[float]
    relative: bool
    steps: int
    samples: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    COLUMNS = ("norm", "budget", "absolute_budget", "kind", "loss", "loss_stderr", "metric", "metric_stderr",
               "metric_change", "perturbation_norm")

    def to_markdown(self, digits: int = 4) -> str:
        """The rows as a Markdown table (a first row for the clean model)."""
        def fmt(v):
            return "" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)

        clean = {"kind": "clean", "loss": self.clean_loss, "metric": self.clean_metric}
        lines = ["| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * len(self.COLUMNS)]
        for row in [clean, *self.rows]:
            lines.append("| " + " | ".join(fmt(row.get(c)) for c in self.COLUMNS) + " |")
        return "\n".join(lines)


def _budgets(budgets: Any, norm: Any) -> list[tuple[float, list[float]]]:
    """``[(p, [ε...])]`` from a sequence (with ``norm``) or a mapping ``{norm: [ε...]}``."""
    groups = budgets.items() if isinstance(budgets, Mapping) else [(norm, budgets)]
    out = []
    for n, values in groups:
        p = check_ball_norm(n)
        expected = "a non-empty sequence of budgets >= 0 (or {norm: budgets})"
        check("budgets", isinstance(values, (int, float)) or hasattr(values, "__iter__"), budgets, expected)
        values = [values] if isinstance(values, (int, float)) else list(values)
        check("budgets", bool(values), budgets, expected)
        out.append((p, [check_nonnegative("budgets", v) for v in values]))
    check("budgets", bool(out), budgets, "a non-empty sequence of budgets >= 0 (or {norm: budgets})")
    return out


def corruption_robustness(model: nn.Module, loss_fn: LossFn, data: Any, budgets: Union[Sequence[float], Mapping],
                          norm: Any = 2, metric_fn: Optional[MetricFn] = None, kinds: Sequence[str] = KINDS,
                          relative: bool = False, samples: int = 1, steps: int = 10,
                          step_size: Optional[float] = None, params: ParamSpec = None, mode: str = "eval",
                          seed: int = 0, distributed: Optional[bool] = None) -> RobustnessTable:
    """GA-SAM Table 4: loss and ``metric_fn`` of ``w + a`` for random and adversarial corruptions
    ``‖a‖_p ≤ ε`` (module docstring).

    ``budgets``: a sequence of ``ε`` for ``norm`` (2 or ``"inf"``), or ``{norm: [ε, ...]}`` for
    both norms at once (e.g. ``{2: [0.05, 0.1, 0.2], "inf": [1e-4, 2e-4, 5e-4]}``, Table 4's).
    ``samples`` random corruptions per budget (mean and standard error); ``steps`` ascent steps of
    size ``step_size`` (default ``1.5ε/steps``) for the adversarial one. Rows hold ``norm``,
    ``budget`` (as given), ``absolute_budget``, ``kind``, ``loss``, ``loss_stderr``, ``metric``,
    ``metric_stderr``, ``metric_change`` (against the clean metric) and ``perturbation_norm``.
    ``distributed``: reduce over the ranks' data (None: when a process group is initialized).
    """
    groups = _budgets(budgets, norm)
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    check("kinds", bool(kinds) and all(k in KINDS for k in kinds), kinds, f"a non-empty subset of {', '.join(KINDS)}")
    check("relative", isinstance(relative, bool), relative, "True or False")
    check_int("samples", samples, 1)
    check_int("steps", steps, 1)
    if step_size is not None:
        check_positive("step_size", step_size)
    _check_metric(metric_fn)
    objective = Objective(model, loss_fn, data, params, mode, seed, distributed)
    gen = generator(objective.device, seed)
    w = objective.point()
    clean_loss, clean_metric = evaluate(objective, metric_fn=metric_fn)
    rows = []
    for p, values in groups:
        reference = float(global_norm(w, p)) if relative else 1.0
        for eps in values:
            radius = eps * reference
            for kind in kinds:
                if kind == "random":
                    losses, metrics, norms = [], [], []
                    for _ in range(samples):
                        a = random_in_ball(w, [None] * len(w), radius, p, gen, boundary=True)
                        loss, metric = evaluate(objective, shifted(w, (1.0, a)), metric_fn)
                        losses.append(loss)
                        metrics.append(metric)
                        norms.append(float(global_norm(a, p)))
                    loss, metric, size = float(np.mean(losses)), _mean(metrics), float(np.mean(norms))
                    loss_err, metric_err = stderr(losses), None if metric is None else stderr(metrics)
                else:
                    eta = 1.5 * radius / steps if step_size is None else float(step_size)
                    run = ascend(objective, radius, p, steps, eta, [None] * len(w), clean=clean_loss)
                    loss, metric = evaluate(objective, shifted(w, (1.0, run.perturbation)), metric_fn)
                    loss_err, metric_err, size = None, None, run.norm
                rows.append({"norm": norm_label(p), "budget": eps, "absolute_budget": radius, "kind": kind,
                             "loss": loss, "loss_stderr": loss_err, "metric": metric, "metric_stderr": metric_err,
                             "metric_change": None if metric is None else metric - clean_metric,
                             "perturbation_norm": size})
    return RobustnessTable(clean_loss=clean_loss, clean_metric=clean_metric, relative=relative, steps=steps,
                           samples=samples, rows=rows)


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    return None if values[0] is None else float(np.mean(values))


# -- m-RWP Fig. A1 ---------------------------------------------------------------------------


@dataclass
class PerturbationCurve(Result):
    """``L(w + ε)`` against ``‖ε‖₂``: random (mean ± standard error) and adversarial."""

    radii: np.ndarray            #: ``‖ε‖₂`` (absolute)
    random_loss: np.ndarray      #: mean over ``samples`` random directions
    random_stderr: np.ndarray    #: its standard error (NaN for one sample)
    adversarial_loss: np.ndarray #: the ascent's best loss within the radius
    clean_loss: float
    samples: int
    steps: int

    def rows(self) -> list[dict[str, float]]:
        return [{"radius": float(r), "random_loss": float(a), "random_stderr": float(s), "adversarial_loss": float(b)}
                for r, a, s, b in zip(self.radii, self.random_loss, self.random_stderr, self.adversarial_loss)]

    def to_markdown(self, digits: int = 4) -> str:
        lines = ["| radius | random loss | ± stderr | adversarial loss |", "|---|---|---|---|"]
        lines += [f"| {r['radius']:.{digits}g} | {r['random_loss']:.{digits}g} | {r['random_stderr']:.{digits}g} "
                  f"| {r['adversarial_loss']:.{digits}g} |" for r in self.rows()]
        return "\n".join(lines)


def perturbation_curve(model: nn.Module, loss_fn: LossFn, data: Any, radii: Optional[Sequence[float]] = None,
                       samples: int = 8, steps: int = 10, step_size: Optional[float] = None, relative: bool = False,
                       params: ParamSpec = None, mode: str = "eval", seed: int = 0,
                       distributed: Optional[bool] = None) -> PerturbationCurve:
    """m-RWP Fig. A1: ``L(w + ε)`` at ``‖ε‖₂ = r`` for each radius ``r`` (default
    ``np.logspace(-3, 1, 9)``; with ``relative=True`` fractions of ``‖w‖₂``): the mean over
    ``samples`` uniformly random directions (RWP) and the L2 adversarial ascent's best point (AWP,
    ``steps`` steps of ``step_size``, default ``1.5r/steps``). The paper's reading: random
    perturbations need radii about two orders of magnitude larger for the same loss increase.
    ``distributed`` as in :func:`corruption_robustness`.
    """
    given = radii
    try:
        radii = np.logspace(-3, 1, 9) if radii is None else np.asarray(list(radii), dtype=float)
    except (TypeError, ValueError):  # not a sequence of numbers: refused below
        radii = np.empty(0)
    check("radii", radii.ndim == 1 and len(radii) > 0 and bool(np.all(np.isfinite(radii) & (radii >= 0))),
          given, "a non-empty sequence of finite radii >= 0")
    check_int("samples", samples, 1)
    check_int("steps", steps, 1)
    if step_size is not None:
        check_positive("step_size", step_size)
    check("relative", isinstance(relative, bool), relative, "True or False")
    objective = Objective(model, loss_fn, data, params, mode, seed, distributed)
    gen = generator(objective.device, seed)
    w = objective.point()
    clean = objective.value()
    if relative:
        radii = radii * float(global_norm(w, 2.0))
    none = [None] * len(w)
    mean, err, adversarial = [], [], []
    for r in radii:
        losses = [objective.value(shifted(w, (1.0, random_in_ball(w, none, float(r), 2.0, gen, boundary=True))))
                  for _ in range(samples)]
        mean.append(float(np.mean(losses)))
        e = stderr(losses)
        err.append(math.nan if e is None else e)
        eta = 1.5 * float(r) / steps if step_size is None else float(step_size)
        adversarial.append(ascend(objective, float(r), 2.0, steps, eta, none, clean=clean).best_loss)
    return PerturbationCurve(radii=radii, random_loss=np.asarray(mean), random_stderr=np.asarray(err),
                             adversarial_loss=np.asarray(adversarial), clean_loss=clean, samples=samples, steps=steps)
