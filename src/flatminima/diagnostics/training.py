"""Training-time logging: per-layer gradient norms over training (GA-SAM, Zhang et al., EMNLP 2022, Figs. 4–5)
and the step statistics a method records (``opt.track_statistics()``: ‖g‖, ‖ε‖,
``L(w+ε) − L(w)``, the cosine between the clean and the perturbed gradient).

    log = fm.diagnostics.TrainingLog(model, every=10)
    opt.track_statistics()
    for step, batch in enumerate(loader):
        fm.TrainStep(model, opt, loss_fn)([batch])
        log.record(step, opt)             # the descent gradient is still in .grad
    log.save("log.json"); fm.diagnostics.plots.plot_training_log(log, "log.png")

Recording reads the norms to the host once per recorded step (one sync on CUDA): ``every``
thins it out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..core.kernels import tensor_norms
from ..core.validation import check


def _layers(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """Modules that own parameters directly, with those parameters (a "layer")."""
    out = []
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False)]
        if params:
            out.append((name or type(model).__name__, params))
    return out


class TrainingLog:
    """Per-layer gradient norms ``‖∇_{W_l} L‖₂`` (every parameter a layer owns directly) of the
    gradient in ``.grad`` when :meth:`record` is called, plus ``opt.statistics`` when the optimizer
    tracks them. ``every``: record one step in ``every``."""

    def __init__(self, model: nn.Module, every: int = 1):
        check("every", isinstance(every, int) and not isinstance(every, bool) and every >= 1, every, "an int ≥ 1")
        self.every = every
        self._layers = _layers(model)
        check("model", bool(self._layers), type(model).__name__, "a model with parameters")
        self.layer_names = [name for name, _ in self._layers]
        self.steps: list[int] = []
        self.grad_norms: list[list[float]] = []  # [recorded step][layer]
        self.statistics: dict[str, list[Optional[float]]] = {}

    def record(self, step: int, opt: Any = None) -> bool:
        """Record the step if ``step % every == 0``; return whether it did. Layers without a
        gradient get NaN."""
        if step % self.every:
            return False
        grads, owners = [], []
        for i, (_, params) in enumerate(self._layers):
            for p in params:
                if p.grad is not None:
                    grads.append(p.grad)
                    owners.append(i)
        squares = torch.zeros(len(self._layers), dtype=torch.float64)
        seen = torch.zeros(len(self._layers), dtype=torch.bool)
        if grads:
            norms = torch.stack([n.to(torch.float64) for n in tensor_norms(grads)]).cpu()  # one host read
            index = torch.tensor(owners)
            squares.index_add_(0, index, norms.square())
            seen[index] = True
        norms = torch.where(seen, squares.sqrt(), torch.full_like(squares, float("nan")))
        self.steps.append(int(step))
        self.grad_norms.append(norms.tolist())
        stats = getattr(opt, "statistics", None) or {}
        for key in set(self.statistics) | {k for k in stats if k != "step"}:
            column = self.statistics.setdefault(key, [None] * (len(self.steps) - 1))
            value = stats.get(key)
            column.append(None if value is None else float(value))
        return True

    def to_dict(self) -> dict:
        return {"every": self.every, "layers": self.layer_names, "steps": self.steps,
                "grad_norms": [[None if v != v else v for v in row] for row in self.grad_norms],
                "statistics": self.statistics}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path
