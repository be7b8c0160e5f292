"""The argument checks the public functions share, and running an algorithm on the whole choice or per block."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

from torch import Tensor, nn

from ...core.validation import check
from ..objective import LossFn, Objective, ParamSpec, select_params
from .operator import CURVATURES, METHODS, CurvatureOperator

BlockSpec = Union[None, str, Mapping[str, ParamSpec]]


def _check_setup(loss_fn: Optional[LossFn], curvature: str, method: str, outputs_fn, criterion,
                 blocks: BlockSpec) -> Optional[LossFn]:
    """Validates the arguments every public function shares; returns the loss function (from the
    GGN split when ``loss_fn`` is None)."""
    check("curvature", curvature in CURVATURES, curvature, f"one of {', '.join(CURVATURES)}")
    check("method", method in METHODS, method, f"one of {', '.join(METHODS)}")
    check("blocks", blocks is None or blocks == "layer" or isinstance(blocks, Mapping), blocks,
          "None, 'layer' or a dict name -> parameter choice")
    if loss_fn is None and callable(outputs_fn) and callable(criterion):
        def loss_fn(model, batch):
            return criterion(outputs_fn(model, batch), batch)
    check("loss_fn", callable(loss_fn), loss_fn,
          "a callable loss_fn(model, batch) -> scalar tensor (or None with outputs_fn and criterion)")
    return loss_fn


def _blocks(model: nn.Module, chosen: list[Tensor], blocks: BlockSpec) -> list[tuple[Optional[str], list[Tensor]]]:
    """``[(name, parameters)]``: one entry for the whole choice, or one per block, each block cut
    down to the chosen parameters."""
    if blocks is None:
        return [(None, chosen)]
    ids = {id(p) for p in chosen}
    if blocks == "layer":
        out = [(name or "(root)", [p for p in m.parameters(recurse=False) if id(p) in ids])
               for name, m in model.named_modules()]
        return [(n, ps) for n, ps in out if ps]
    out = []
    for name, spec in blocks.items():
        try:
            ps = [p for p in select_params(model, spec)[1] if id(p) in ids]
        except ValueError:
            ps = []
        check("blocks", bool(ps), name, "blocks that each select at least one of the chosen parameters")
        out.append((str(name), ps))
    return out


def _run(model: nn.Module, loss_fn: Optional[LossFn], data: Any, params: ParamSpec, blocks: BlockSpec, mode: str,
         seed: int, curvature: str, method: str, outputs_fn, criterion,
         algorithm: Callable[[CurvatureOperator], Any], distributed: Optional[bool] = None) -> Any:
    loss_fn = _check_setup(loss_fn, curvature, method, outputs_fn, criterion, blocks)
    chosen = Objective(model, loss_fn, data, params, mode, seed, distributed).params
    results = {}
    for name, ps in _blocks(model, chosen, blocks):
        objective = Objective(model, loss_fn, data, ps, mode, seed, distributed)
        op = CurvatureOperator(objective, curvature, method, outputs_fn, criterion)
        with objective.session():
            try:
                results[name] = algorithm(op)
            finally:
                op.release()
    return results[None] if blocks is None else results
