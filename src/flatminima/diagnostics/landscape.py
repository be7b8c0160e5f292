"""Loss landscapes: slices along filter-normalized random directions, and linear interpolation.

* **Filter-normalized directions** (Li et al. 2018, "Visualizing the loss landscape of neural
  nets", §4, and their ``net_plotter.py``): ``d ~ N(0, I)``; for every filter ``i`` (output row of
  a ≥2-D tensor, output channel of a convolution) ``d_i ← d_i·‖w_i‖/‖d_i‖``, so each filter of
  ``d`` has the norm of the weight's filter. ``center=True`` (not Li et al.'s) first centres each
  filter, ``d_i ← (d_i − mean(d_i))·‖w_i‖/‖d_i − mean(d_i)‖`` (one-element filters are not
  centred, or they would vanish). 1-D tensors (biases, norms) follow ``one_d``: ``"ignore"`` (zero
  direction: the code's ``ignore='biasbn'``), ``"weight"`` (``d = w``: the code without it) or
  ``"filter"`` (the whole vector is one filter).
* **Slices** ``L(w + α·d₁)`` and ``L(w + α·d₁ + β·d₂)`` on a grid (:func:`loss_landscape`), with
  ``d₂`` optionally orthogonalized against ``d₁`` filter by filter (Gram–Schmidt per filter, then
  normalized again: the pair is exactly orthogonal and both stay filter-normalized); the metric
  (accuracy) on the same grid optionally.
* **Spaces**: any parameter choice of :class:`~.objective.Objective` (``params``:
  trainable, ``"lora"`` for the LoRA factors only, ``"all"``, ...), or ``merged=True``: the merged
  weight ``W' = W0 + Σ_active s·P(BA)`` of every LoRA layer (any layer
  :func:`flatminima.lora.lora_layers` reads: PEFT's, a fused ``qkv``'s :class:`~flatminima.lora.QKVLoRA`,
  registered classes), the direction normalized on the filters of ``W'`` and applied as ``W0 + α·d``
  by functional substitution of the frozen base weight ``W0`` (``W0 + α·d + ΔW = W' + α·d``): the
  model is never written. A factor whose filters are all
  zero (PEFT initialises ``B = 0``) gets a zero direction: filter normalization gives it nothing to
  scale by, so at initialisation look at the merged space or use explicit ``directions``.
* **Interpolation** (Goodfellow et al. 2015): ``θ(t) = (1 − t)·θ_a + t·θ_b`` between two models or a
  model and a state dict, ``t`` over a range such as ``[−0.5, 1.5]``; the endpoints are exact.

Results save to ``.npz`` with :func:`save_npz`; :mod:`flatminima.diagnostics.plots` draws them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..core.kernels import TINY, global_norm, reduction_dtype
from ..core.validation import check, check_bool
from ..lora import merged_weight, require_lora_layers
from ..lora.layers import require_plain
from .objective import LossFn, Objective, ParamSpec, select_params
from .robustness import MetricFn, _check_metric, evaluate
from .sharpness import Result, _plain, gaussian, generator, shifted

ONE_D = ("ignore", "weight", "filter")
BUFFERS = ("a", "interpolate")
Direction = list[Tensor]


# -- directions ------------------------------------------------------------------------------


def _rows(t: Tensor, one_d: str) -> Optional[Tensor]:
    """``t`` viewed as ``filters × elements`` (None: a 1-D tensor that ``one_d`` does not normalize)."""
    if t.dim() >= 2:
        return t.reshape(t.shape[0], -1)
    return t.reshape(1, -1) if one_d == "filter" else None


def _check_direction_options(one_d: Any, center: Any) -> None:
    check("one_d", one_d in ONE_D, one_d, f"one of {', '.join(ONE_D)}")
    check_bool("center", center)


def filter_normalize(direction: Sequence[Tensor], weights: Sequence[Tensor], one_d: str = "ignore",
                     center: bool = False) -> Direction:
    """Li et al. (2018): each filter of ``direction`` rescaled to the norm of the same filter of
    ``weights``, ``d_i·‖w_i‖/‖d_i‖`` (centred to zero mean first with ``center=True``; module
    docstring); 1-D tensors per ``one_d``. New tensors in ``direction``'s dtype."""
    _check_direction_options(one_d, center)
    out = []
    # A loop over tensors: per-filter statistics of differently shaped tensors, once per direction.
    for d, w in zip(direction, weights):
        rows = _rows(d, one_d)
        if rows is None:  # a 1-D tensor: zero (ignore) or the weight itself (Li et al.'s code)
            out.append(torch.zeros_like(d) if one_d == "ignore" else w.detach().to(d.dtype, copy=True))
            continue
        if center and rows.shape[1] > 1:
            rows = rows - rows.mean(1, keepdim=True)
        target = torch.linalg.vector_norm(_rows(w, one_d).to(rows.dtype), dim=1, keepdim=True)
        out.append((rows * (target / torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(TINY)))
                   .reshape(d.shape))
    return out


def orthogonalize_filters(d2: Sequence[Tensor], d1: Sequence[Tensor], weights: Sequence[Tensor],
                          one_d: str = "ignore", center: bool = False) -> Direction:
    """``d₂`` made orthogonal to ``d₁`` filter by filter (``d₂ᵢ − (d₂ᵢ·d₁ᵢ/‖d₁ᵢ‖²)·d₁ᵢ``) and
    filter-normalized again: orthogonal as whole vectors (except ``one_d="weight"``, whose 1-D parts
    are ``w`` in both), each filter with ``‖w_i‖`` (and zero mean with ``center=True``: centring
    keeps a difference of zero-mean filters zero-mean)."""
    _check_direction_options(one_d, center)
    out = []
    for a, b in zip(d2, d1):
        ra, rb = _rows(a, one_d), _rows(b, one_d)
        if ra is None:
            out.append(torch.zeros_like(a))
            continue
        coef = (ra * rb).sum(1, keepdim=True) / (rb * rb).sum(1, keepdim=True).clamp_min(TINY)
        out.append((ra - coef * rb).reshape(a.shape))
    return filter_normalize(out, weights, one_d, center)


def filter_normalized_direction(weights: Sequence[Tensor], seed: Union[int, torch.Generator] = 0,
                                one_d: str = "ignore", center: bool = False) -> Direction:
    """A random Gaussian direction shaped like ``weights``, filter-normalized (Li et al. 2018), in
    the reduction dtype (float32 for low-precision weights). ``seed``: an int or a generator."""
    _check_direction_options(one_d, center)
    gen = seed if isinstance(seed, torch.Generator) else generator(weights[0].device, seed)
    return filter_normalize(gaussian(weights, gen), weights, one_d, center)


def _space(model: nn.Module, params: ParamSpec, merged: bool) -> tuple[list[Tensor], list[Tensor], str]:
    """``(parameters to substitute, reference weights for the filters, label)``."""
    check("merged", isinstance(merged, bool), merged, "True or False")
    if not merged:
        _, tensors = select_params(model, params)
        label = params if isinstance(params, str) else "trainable" if params is None else "custom"
        return tensors, [t.detach() for t in tensors], label
    check("params", params is None, params, "None with merged=True (the space is the LoRA layers' merged weights)")

    layers = require_lora_layers(model, "merged=True")
    require_plain(layers, "model", "merged=True")
    by_id = {id(layer.weight): layer for layer in layers}
    _, tensors = select_params(model, lambda name, p: id(p) in by_id)
    return tensors, [merged_weight(by_id[id(p)]) for p in tensors], "merged"


def landscape_directions(model: nn.Module, count: int = 2, params: ParamSpec = None, merged: bool = False,
                         one_d: str = "ignore", orthogonalize: bool = False, seed: int = 0,
                         center: bool = False) -> list[Direction]:
    """The ``count`` (1 or 2) filter-normalized directions :func:`loss_landscape` draws for these
    arguments: each a list of tensors shaped like the substituted parameters (for ``merged=True``
    the LoRA layers' base weights, normalized on the merged weights' filters)."""
    check("count", count in (1, 2), count, "1 or 2")
    _check_direction_options(one_d, center)
    check_bool("orthogonalize", orthogonalize)
    _, references, _ = _space(model, params, merged)
    return _draw(references, count, one_d, orthogonalize, seed, center)


def _draw(references: Sequence[Tensor], count: int, one_d: str, orthogonalize: bool, seed: int,
          center: bool) -> list[Direction]:
    gen = generator(references[0].device, seed)
    directions = [filter_normalized_direction(references, gen, one_d, center) for _ in range(count)]
    if orthogonalize and count == 2:
        directions[1] = orthogonalize_filters(directions[1], directions[0], references, one_d, center)
    return directions


# -- slices ----------------------------------------------------------------------------------


@dataclass
class Landscape(Result):
    """``loss[i] = L(w + α_i·d₁)`` (1-D) or ``loss[i, j] = L(w + α_i·d₁ + β_j·d₂)`` (2-D)."""

    alphas: np.ndarray
    betas: Optional[np.ndarray]        #: None for a 1-D slice
    loss: np.ndarray
    metric: Optional[np.ndarray]       #: ``metric_fn`` on the same grid, when given
    clean_loss: float
    clean_metric: Optional[float]
    space: str                         #: ``"trainable"``, ``"lora"``, ``"all"``, ``"merged"``, ...
    one_d: str
    orthogonalized: bool
    direction_norms: np.ndarray        #: ``‖d_k‖₂``
    cosine: Optional[float]            #: ``cos(d₁, d₂)`` for a 2-D slice
    seed: int
    centered: bool = False             #: filters centred before rescaling (``center=True``)

    @property
    def dims(self) -> int:
        return 1 if self.betas is None else 2


def _grid(name: str, values: Any) -> np.ndarray:
    try:
        arr = np.asarray(list(values), dtype=float)
    except (TypeError, ValueError):  # not a sequence of numbers: refused below
        arr = np.empty(0)
    check(name, arr.ndim == 1 and len(arr) > 0 and bool(np.all(np.isfinite(arr))), values,
          "a non-empty sequence of finite floats")
    return arr


def _check_directions(directions: Any, count: int, params: Sequence[Tensor]) -> list[Direction]:
    ok = isinstance(directions, (list, tuple)) and len(directions) == count and all(
        isinstance(d, (list, tuple)) and len(d) == len(params)
        and all(torch.is_tensor(t) and t.shape == p.shape for t, p in zip(d, params)) for d in directions)
    check("directions", ok, f"{type(directions).__name__}",
          f"{count} direction(s), each a list of {len(params)} tensors shaped like the chosen parameters")
    return [[t.detach().to(p.device, reduction_dtype(p)) for t, p in zip(d, params)] for d in directions]


def loss_landscape(model: nn.Module, loss_fn: LossFn, data: Any, alphas: Optional[Sequence[float]] = None,
                   betas: Optional[Sequence[float]] = None, directions: Optional[Sequence[Direction]] = None,
                   params: ParamSpec = None, merged: bool = False, one_d: str = "ignore",
                   orthogonalize: bool = False, metric_fn: Optional[MetricFn] = None, mode: str = "eval",
                   seed: int = 0, center: bool = False, distributed: Optional[bool] = None) -> Landscape:
    """A 1-D slice ``L(w + α·d₁)`` over ``alphas`` (default ``np.linspace(-1, 1, 21)``) or, with
    ``betas``, the 2-D slice ``L(w + α·d₁ + β·d₂)`` on the grid ``alphas × betas`` (module docstring).

    ``directions``: explicit directions (a list of one or two lists of tensors shaped like the
    chosen parameters); by default filter-normalized Gaussian ones drawn from ``seed``
    (:func:`landscape_directions` returns the same ones; ``center=True`` centres their filters). ``params``/``merged`` choose the space
    (``params="lora"``: the LoRA factors; ``merged=True``: the merged weights of the LoRA layers).
    ``metric_fn`` (e.g. :func:`~.robustness.accuracy`) is evaluated on the grid too.
    ``distributed``: losses over every rank's data (None: when a process group is initialized;
    :mod:`.objective`). Cost: one forward pass over ``data`` per grid point (two with a metric).
    """
    alphas = _grid("alphas", np.linspace(-1.0, 1.0, 21) if alphas is None else alphas)
    betas = None if betas is None else _grid("betas", betas)
    _check_direction_options(one_d, center)
    check_bool("orthogonalize", orthogonalize)
    _check_metric(metric_fn)
    tensors, references, label = _space(model, params, merged)
    count = 1 if betas is None else 2
    directions_drawn = directions is None
    if directions is None:
        directions = _draw(references, count, one_d, orthogonalize, seed, center)
    else:
        directions = _check_directions(directions, count, tensors)
    objective = Objective(model, loss_fn, data, tensors, mode, seed, distributed)
    w = objective.point()
    clean_loss, clean_metric = evaluate(objective, metric_fn=metric_fn)
    shape = (len(alphas),) if betas is None else (len(alphas), len(betas))
    loss = np.empty(shape)
    metric = None if metric_fn is None else np.empty(shape)
    for index in np.ndindex(*shape):
        terms = [(float(alphas[index[0]]), directions[0])]
        if betas is not None:
            terms.append((float(betas[index[1]]), directions[1]))
        loss[index], m = evaluate(objective, shifted(w, *terms), metric_fn)
        if metric is not None:
            metric[index] = m
    norms = np.asarray([float(global_norm(d)) for d in directions])
    cosine = None
    if betas is not None:
        dot = sum(float((a * b).sum()) for a, b in zip(*directions))
        cosine = dot / max(norms[0] * norms[1], TINY)
    return Landscape(alphas=alphas, betas=betas, loss=loss, metric=metric, clean_loss=clean_loss,
                     clean_metric=clean_metric, space=label, one_d=one_d, orthogonalized=orthogonalize and count == 2,
                     direction_norms=norms, cosine=cosine, seed=seed, centered=center and directions_drawn)


# -- interpolation ---------------------------------------------------------------------------


Endpoint = Union[nn.Module, Mapping[str, Tensor]]


class Line:
    """``θ(t) = (1 − t)·θ_a + t·θ_b`` for the parameters of ``model_a`` chosen by ``params`` (and, with
    ``buffers="interpolate"``, the floating-point buffers; otherwise model ``a``'s buffers are used
    all along). ``model_b`` is a module or a state dict with the same names."""

    def __init__(self, model_a: nn.Module, params: ParamSpec, model_b: Endpoint, buffers: str = "a"):
        check("buffers", buffers in BUFFERS, buffers, f"one of {', '.join(BUFFERS)}")
        check("model_b", isinstance(model_b, (nn.Module, Mapping)), type(model_b).__name__,
              "a module or a state dict")
        if isinstance(model_b, nn.Module):
            other = {**dict(model_b.named_parameters()), **dict(model_b.named_buffers())}
        else:
            other = dict(model_b)
        names, tensors = select_params(model_a, params)
        self.a = [t.detach() for t in tensors]
        self.b = self._match(names, self.a, other)
        self.buffer_names: list[str] = []
        self.buffers_a: list[Tensor] = []
        self.buffers_b: list[Tensor] = []
        if buffers == "interpolate":
            own = [(n, b) for n, b in model_a.named_buffers() if b.is_floating_point()]
            self.buffer_names = [n for n, _ in own]
            self.buffers_a = [b.detach() for _, b in own]
            self.buffers_b = self._match(self.buffer_names, self.buffers_a, other)

    @staticmethod
    def _match(names: Sequence[str], like: Sequence[Tensor], other: Mapping[str, Tensor]) -> list[Tensor]:
        out = []
        for name, t in zip(names, like):
            ok = name in other and torch.is_tensor(other[name]) and other[name].shape == t.shape
            check("model_b", ok, name, "a module or state dict with the same names and shapes as model_a")
            out.append(other[name].detach().to(t.device))
        return out

    @staticmethod
    def _mix(a: Sequence[Tensor], b: Sequence[Tensor], t: float) -> list[Tensor]:
        # (1 − t)·a + t·b rather than a + t·(b − a): the endpoints t = 0 and t = 1 are then exact.
        ra = [x.to(reduction_dtype(x)) for x in a]
        out = list(torch._foreach_mul(ra, 1.0 - t))
        torch._foreach_add_(out, [y.to(x.dtype) for y, x in zip(b, ra)], alpha=t)
        return [o if o.dtype == x.dtype else o.to(x.dtype) for o, x in zip(out, a)]

    def at(self, t: float) -> tuple[list[Tensor], Optional[dict[str, Tensor]]]:
        """``(parameter values, buffers or None)`` at ``θ(t)``."""
        values = self._mix(self.a, self.b, t)
        if not self.buffer_names:
            return values, None
        return values, dict(zip(self.buffer_names, self._mix(self.buffers_a, self.buffers_b, t)))

    def distance(self) -> float:
        """``‖θ_b − θ_a‖₂`` over the parameters."""
        wide = [[x.to(reduction_dtype(x)) for x in side] for side in (self.b, self.a)]
        diff = torch._foreach_sub(*wide)
        return float(global_norm(diff))


@dataclass
class Interpolation(Result):
    """``loss[k] = L((1 − t_k)·θ_a + t_k·θ_b)``."""

    ts: np.ndarray
    loss: np.ndarray
    metric: Optional[np.ndarray]
    distance: float                  #: ``‖θ_b − θ_a‖₂``
    buffers: str


def interpolate(model_a: nn.Module, model_b: Endpoint, loss_fn: LossFn, data: Any,
                ts: Optional[Sequence[float]] = None, params: ParamSpec = "all", buffers: str = "a",
                metric_fn: Optional[MetricFn] = None, mode: str = "eval", seed: int = 0,
                distributed: Optional[bool] = None) -> Interpolation:
    """The loss (and ``metric_fn``) along ``θ(t) = (1 − t)·θ_a + t·θ_b``, ``t`` in ``ts`` (default
    ``np.linspace(-0.5, 1.5, 21)``), evaluated on ``model_a`` with its parameters (``params``,
    default every floating-point one) substituted; ``model_b`` is a module or state dict with the
    same parameter names. ``buffers``: ``"a"`` (model a's buffers everywhere) or ``"interpolate"``
    (floating buffers, e.g. BatchNorm statistics, interpolated too; or use ``mode="train"`` to
    normalize with batch statistics). ``distributed`` as in :func:`loss_landscape`. Neither model
    is written.
    """
    ts = _grid("ts", np.linspace(-0.5, 1.5, 21) if ts is None else ts)
    _check_metric(metric_fn)
    objective = Objective(model_a, loss_fn, data, params, mode, seed, distributed)
    line = Line(model_a, objective.params, model_b, buffers)
    loss = np.empty(len(ts))
    metric = None if metric_fn is None else np.empty(len(ts))
    for k, t in enumerate(ts):
        values, bufs = line.at(float(t))
        loss[k], m = evaluate(objective, values, metric_fn, bufs)
        if metric is not None:
            metric[k] = m
    return Interpolation(ts=ts, loss=loss, metric=metric, distance=line.distance(), buffers=buffers)


# -- saving ----------------------------------------------------------------------------------


def save_npz(result: Result, path: Union[str, os.PathLike]) -> str:
    """Write a result's fields to ``path`` (``.npz``; no pickle): arrays and scalars as arrays,
    tables (lists, dicts) as JSON strings; None fields are left out. Returns the path written."""
    check("result", dataclasses.is_dataclass(result) and not isinstance(result, type), type(result).__name__,
          "a diagnostics result (a dataclass instance)")
    arrays: dict[str, np.ndarray] = {}
    encoded = []
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if value is None:
            continue
        if isinstance(value, (np.ndarray, np.generic, int, float, str, bool)):
            arrays[f.name] = np.asarray(value)
        else:
            arrays[f.name] = np.asarray(json.dumps(_plain(value)))
            encoded.append(f.name)
    arrays["__json__"] = np.asarray(encoded, dtype=str)
    arrays["__type__"] = np.asarray(type(result).__name__)
    path = os.fspath(path)
    path = path if path.endswith(".npz") else path + ".npz"
    np.savez(path, **arrays)
    return path


def load_npz(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The fields saved by :func:`save_npz`: arrays, Python scalars, decoded tables; the result's
    class name under ``"type"``."""
    with np.load(os.fspath(path), allow_pickle=False) as f:
        encoded = set(f["__json__"].tolist())
        out: dict[str, Any] = {"type": str(f["__type__"])}
        for key in f.files:
            if key.startswith("__"):
                continue
            value = f[key]
            out[key] = json.loads(str(value)) if key in encoded else value.item() if value.ndim == 0 else value
    return out
