"""What every diagnostic shares: the objective ``L(w) = Σ_B |B|·loss(model_w, B) / Σ_B |B|`` of a
model, a loss and data, evaluated at *substituted* parameter values, so that no diagnostic ever
writes the user's model.

* ``loss_fn(model, batch) -> scalar`` is the engine's convention (``fm.TrainStep``): the batch may
  be a tensor, a tuple/list of tensors, or a dict (HF models: ``lambda m, b: m(**b).loss``).
* ``data`` is one batch or an iterable of batches (a ``DataLoader``, a list of batches); batches
  are weighted by their size (the leading dimension of their first tensor).
* ``params`` chooses the subspace: ``None``/``"trainable"`` (the parameters that require grad),
  ``"all"`` (every floating-point parameter, frozen ones included), ``"lora"`` (A and B of the active
  adapters of every LoRA layer :func:`flatminima.lora.lora_layers` reads: PEFT's,
  :class:`~flatminima.lora.QKVLoRA`, registered classes; :func:`flatminima.lora.lora_parameters`), a
  submodule, an iterable of parameters, a predicate ``(name, param) -> bool``, or any other string
  as a regular expression on the parameters' qualified names.
* ``mode``: ``"eval"`` (default: dropout off, BatchNorm on running statistics), ``"train"``
  (BatchNorm on batch statistics, dropout with a fixed seed, so the objective is one deterministic
  function), or ``"as_is"``. The modules' own ``training`` flags are put back afterwards, and in
  train mode the running statistics are updated on clones only.

Parameter values are substituted with :func:`torch.func.functional_call`, so the model's
``state_dict``, ``requires_grad`` flags and modes, and the global RNG state, are as they were.

**Distributed data** (``distributed``, every diagnostic): with ``None`` (default) and an
initialized ``torch.distributed`` process group of more than one rank, each rank holds its share of
the data and every loss, gradient and curvature-vector product is summed over the ranks with the
batch sizes (``Σ_r Σ_B |B|·x_B / Σ_r Σ_B |B|``, one all-reduce per evaluation), so every rank gets
what one process computes on all the data; ``False``: this rank's data only; ``True``: reduce, and
refuse to run without a process group. The group is a DDP model's own (``model.process_group``),
otherwise the default one. A ``DistributedDataParallel`` model is evaluated through its
``.module`` (DDP's forward would sync buffers and wait for a backward that never comes). Random
vectors come from generators seeded alike on every rank, so all ranks run the same algorithm on
the same reduced numbers; every rank must call the diagnostic (it is a collective).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..core.validation import check
from ..lora import lora_parameters

LossFn = Callable[[nn.Module, Any], Tensor]
ParamSpec = Union[None, str, nn.Module, Iterable[Tensor], Callable[[str, Tensor], bool]]
MODES = ("eval", "train", "as_is")


def _process_group(model: nn.Module, distributed: Optional[bool]) -> tuple[nn.Module, bool, Any]:
    """``(module to evaluate, reduce over ranks?, process group)`` for ``distributed`` (module docstring)."""
    check("distributed", distributed is None or isinstance(distributed, bool), distributed, "None, True or False")
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    group = model.process_group if ddp else None
    inner = model.module if ddp else model
    if distributed is False:
        return inner, False, None
    live = torch.distributed.is_available() and torch.distributed.is_initialized()
    check("distributed", live or distributed is None, distributed,
          "None or False without an initialized torch.distributed process group")
    return inner, live and torch.distributed.get_world_size(group) > 1, group


def is_batch(data: Any) -> bool:
    """True for one batch: a tensor, a dict, a tuple/list whose first element is a tensor, or a
    tuple ``(inputs_dict, labels, ...)`` (a dict first, not only dicts); False for an iterable of
    batches (a ``DataLoader``, a list of batches, a list of dicts)."""
    if torch.is_tensor(data) or isinstance(data, dict):
        return True
    if not isinstance(data, (tuple, list)) or not data:
        return False
    if torch.is_tensor(data[0]):
        return True
    return isinstance(data, tuple) and isinstance(data[0], dict) and not all(isinstance(d, dict) for d in data)


def batch_size(batch: Any) -> int:
    """The leading dimension of the batch's first tensor."""
    if torch.is_tensor(batch):
        return batch.shape[0] if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch
    first = next((v for v in values if torch.is_tensor(v) or isinstance(v, dict)), None)
    check("batch", first is not None, type(batch).__name__, "a tensor, a dict or a tuple holding tensors")
    return batch_size(first)


def iter_batches(data: Any) -> Iterator[Any]:
    """The batches of ``data`` (one batch, or an iterable of batches, re-iterated on every call)."""
    if is_batch(data):
        yield data
        return
    empty = True
    for batch in data:
        empty = False
        yield batch
    check("data", not empty, type(data).__name__, "a batch or a non-empty iterable of batches")


def select_params(model: nn.Module, params: ParamSpec = None) -> tuple[list[str], list[Tensor]]:
    """``(names, parameters)`` of ``model`` chosen by ``params`` (see the module docstring), in
    ``named_parameters`` order."""
    named = list(model.named_parameters())
    if params is None or params == "trainable":
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif params == "all":
        chosen = [(n, p) for n, p in named if p.is_floating_point()]
    elif params == "lora":
        ids = {id(p) for p in lora_parameters(model)}
        chosen = [(n, p) for n, p in named if id(p) in ids]
    elif isinstance(params, str):
        try:
            pattern = re.compile(params)
        except re.error as exc:
            raise ValueError(f"Invalid params: {params!r} (expected 'trainable', 'all', 'lora' or a regular "
                             f"expression: {exc})") from None
        chosen = [(n, p) for n, p in named if pattern.search(n)]
    elif isinstance(params, nn.Module):
        ids = {id(p) for p in params.parameters()}
        chosen = [(n, p) for n, p in named if id(p) in ids]
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        ids = {id(p) for p in params}
        chosen = [(n, p) for n, p in named if id(p) in ids]
    check("params", bool(chosen), params if isinstance(params, str) or params is None else type(params).__name__,
          "a choice that selects at least one parameter of the model")
    return [n for n, _ in chosen], [p for _, p in chosen]


class _LossModule(nn.Module):
    """``batch ↦ loss_fn(model, batch)`` as a module, so :func:`functional_call` can substitute the
    model's parameters while the user's loss function calls the model as usual."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


@contextlib.contextmanager
def modes(model: nn.Module, mode: str) -> Iterator[None]:
    """Put ``model`` in ``mode`` (``"eval"``/``"train"``/``"as_is"``) and give every submodule its
    own ``training`` flag back afterwards."""
    check("mode", mode in MODES, mode, f"one of {', '.join(MODES)}")
    saved = [(m, m.training) for m in model.modules()]
    try:
        if mode != "as_is":
            model.train(mode == "train")
        yield
    finally:
        for m, flag in saved:
            m.training = flag


class Objective:
    """The loss of ``model`` on ``data`` as a function of the chosen parameters (module docstring).

    ``values`` arguments are lists of tensors shaped like :attr:`params` (the current values are
    :meth:`point`). Every evaluation runs through :func:`torch.func.functional_call`, so it composes
    with ``torch.func`` transforms (``grad``, ``jvp``, ``vmap``) and never writes the model.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, params: ParamSpec = None,
                 mode: str = "eval", seed: int = 0, distributed: Optional[bool] = None):
        check("loss_fn", callable(loss_fn), loss_fn, "a callable loss_fn(model, batch) -> scalar tensor")
        check("mode", mode in MODES, mode, f"one of {', '.join(MODES)}")
        check("seed", isinstance(seed, int) and not isinstance(seed, bool), seed, "an int")
        model, self.distributed, self.group = _process_group(model, distributed)
        self.model, self.loss_fn, self.data, self.mode, self.seed = model, loss_fn, data, mode, seed
        self.names, self.params = select_params(model, params)
        self._wrapper = _LossModule(model, loss_fn)
        self._buffers = {f"model.{n}": b for n, b in model.named_buffers()}

    # -- the point and its shape --------------------------------------------------------------
    def point(self) -> list[Tensor]:
        """The current parameter values, detached (views of the model's own tensors: read only)."""
        return [p.detach() for p in self.params]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def batches(self) -> Iterator[Any]:
        return iter_batches(self.data)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Everything a diagnostic runs inside: the chosen mode (flags restored after) and a forked
        global RNG (state restored after)."""
        devices = [self.device] if self.device.type == "cuda" else []
        with modes(self.model, self.mode), torch.random.fork_rng(devices=devices):
            yield

    # -- reduction over ranks -----------------------------------------------------------------
    def all_sum(self, tensors: Sequence[Tensor]) -> None:
        """Sum ``tensors`` in place over the ranks (nothing without :attr:`distributed`)."""
        if self.distributed:
            works = [torch.distributed.all_reduce(t, group=self.group, async_op=True) for t in tensors]
            for work in works:
                work.wait()

    def sum_floats(self, *values: float) -> list[float]:
        """``values`` summed over the ranks (float64, one all-reduce; as given without :attr:`distributed`)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.all_sum([t])
        return t.tolist()

    def gather(self, values: list) -> list:
        """The lists of every rank concatenated in rank order (``values`` without :attr:`distributed`)."""
        if not self.distributed:
            return values
        parts: list = [None] * torch.distributed.get_world_size(self.group)
        torch.distributed.all_gather_object(parts, values, group=self.group)
        return [v for part in parts for v in part]

    # -- evaluation ---------------------------------------------------------------------------
    def loss(self, values: Sequence[Tensor], batch: Any) -> Tensor:
        """``loss_fn(model_w, batch)`` with the chosen parameters set to ``values``. Call it inside
        :meth:`session` (mode and RNG); in train mode dropout is reseeded with ``seed`` on every
        call so the objective is deterministic, and running statistics go to clones."""
        return self.evaluate(self.loss_fn, values, batch)

    def evaluate(self, fn: Callable[[nn.Module, Any], Any], values: Sequence[Tensor], batch: Any,
                 buffers: Optional[dict[str, Tensor]] = None) -> Any:
        """``fn(model_w, batch)`` for any function of the model (a metric such as accuracy), with the
        same substitution as :meth:`loss`; ``buffers`` (qualified name → tensor) substitutes buffers
        too (interpolated BatchNorm statistics, say)."""
        check("values", len(values) == len(self.params), len(values), f"{len(self.params)} tensors (one per parameter)")
        substituted = {f"model.{n}": v for n, v in zip(self.names, values)}
        wrapper = self._wrapper if fn is self.loss_fn else _LossModule(self.model, fn)
        if not self.model.training:
            substituted.update({f"model.{n}": b for n, b in (buffers or {}).items()})
            return functional_call(wrapper, substituted, (batch,))
        substituted.update({k: b.clone() for k, b in self._buffers.items()})
        substituted.update({f"model.{n}": b.clone() for n, b in (buffers or {}).items()})
        # the same dropout masks at every evaluation, and the caller's RNG state untouched even
        # outside session()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return functional_call(wrapper, substituted, (batch,))

    def value(self, values: Optional[Sequence[Tensor]] = None) -> float:
        """``L(values)`` over all of ``data`` (batch-size weighted mean; over every rank's data when
        :attr:`distributed`), no gradient."""
        values = self.point() if values is None else values
        total, count = 0.0, 0
        with self.session(), torch.no_grad():
            for batch in self.batches():
                n = batch_size(batch)
                total += float(self.loss(values, batch)) * n
                count += n
        total, count = self.sum_floats(total, count)
        return total / count

    def gradient(self, values: Optional[Sequence[Tensor]] = None) -> tuple[float, list[Tensor]]:
        """``(L, ∇L)`` at ``values`` over all of ``data`` (batch-size weighted; over every rank's data
        when :attr:`distributed`), the gradient as a list shaped like :attr:`params`."""
        values = self.point() if values is None else values
        total_loss, count = 0.0, 0
        total = [torch.zeros_like(v) for v in values]
        with self.session():
            for batch in self.batches():
                n = batch_size(batch)
                leaves = [v.detach().requires_grad_(True) for v in values]
                loss = self.loss(leaves, batch)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, values)]
                torch._foreach_add_(total, grads, alpha=n)
                total_loss += float(loss.detach()) * n
                count += n
        self.all_sum(total)
        total_loss, count = self.sum_floats(total_loss, count)
        torch._foreach_div_(total, count)
        return total_loss / count, total
