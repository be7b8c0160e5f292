"""Trajectory losses: flatness from the training trajectory instead of a perturbed pass.

Du et al., "Sharpness-Aware Training for Free" (NeurIPS 2022) replace SAM's second
forward/backward with a *trajectory loss*, a KL term pulling the current outputs towards the
outputs of the same model earlier in training:

* :class:`SAF` — towards each sample's own logits recorded ``E`` epochs ago (one table of ``N × C``
  logits per remembered epoch);
* :class:`MESA` — the memory-efficient variant: towards the logits of an EMA of the weights,
  ``v_t = β·v_{t−1} + (1 − β)·θ_t`` (no per-sample memory, one extra forward without backward).

Both are *loss terms*: add them to the task loss of the same forward pass, with any optimizer or
flatminima method. The term, for a batch ``B`` of logits ``z_i`` and teacher logits ``y_i``, is
(:func:`trajectory_kl`, as in the official code, github.com/AngusDujw/SAF)::

    L_tra = λ·τ²/|B| · Σ_{i∈B} KL( softmax(y_i/τ) ‖ softmax(z_i/τ) )

The paper writes ``λ/|B|·Σ KL(y_i/τ, z_i/τ)``; its code multiplies by ``τ²`` (the
usual distillation scaling, which keeps the gradient's size independent of ``τ``) and takes the
teacher distribution as the first argument of the KL (``F.kl_div(log p_current, p_teacher)``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .core.validation import check, check_int, check_nonnegative, is_real

#: Table dtypes SAF accepts (half-precision ones halve or quarter the memory).
TABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def trajectory_kl(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per-sample ``τ²·KL(softmax(y/τ) ‖ softmax(z/τ))`` (shape ``(B,)``), ``z = logits``,
    ``y = teacher_logits`` (no gradient flows into ``y``).

    Computed in at least float32 (logits from autocast are upcast) from two ``log_softmax`` so
    that it stays finite for any finite logits."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    log_q = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * (temperature * temperature)


def _check_common(temperature: Any, weight: Any, start_epoch: Any, end_epoch: Any) -> None:
    check("temperature", is_real(temperature) and temperature > 0, temperature, "a finite float > 0")
    check_nonnegative("weight", weight)
    check_int("start_epoch", start_epoch, 0)
    if end_epoch is not None:
        check_int("end_epoch", end_epoch, 0)
        check("end_epoch", end_epoch > start_epoch, end_epoch, f"None or an int > start_epoch = {start_epoch}")


def _check_epoch(epoch: Any) -> None:
    check_int("epoch", epoch, 0)


def _check_logits(logits: Any, num_classes: Optional[int] = None) -> None:
    ok = isinstance(logits, Tensor) and logits.dim() == 2 and logits.is_floating_point()
    shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
    check("logits", ok, shape, "a floating-point tensor of shape (batch, classes)")
    if num_classes is not None:
        check("logits", logits.shape[1] == num_classes, shape, f"(batch, {num_classes}) for num_classes={num_classes}")


class IndexedDataset(torch.utils.data.Dataset):
    """``dataset[i] -> (i, dataset[i])``: gives a loader the sample indices :class:`SAF` needs.

    ``DataLoader(IndexedDataset(train_set), shuffle=True, ...)`` yields ``(indices, batch)`` with
    ``indices`` a LongTensor of the samples' positions in ``train_set``."""

    def __init__(self, dataset: Any):
        check("dataset", hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"), type(dataset).__name__,
              "a map-style dataset (with __getitem__ and __len__)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class SAF(nn.Module):
    """Sharpness-Aware training for Free (Du et al., NeurIPS 2022): the trajectory loss towards
    each sample's logits from ``E = epochs_ago`` epochs before.

    ``term = saf(logits, indices, epoch)`` returns, for ``start_epoch ≤ epoch < end_epoch``,
    ``λ·τ²/|B|·Σ_i KL(softmax(y_i^{(epoch−E)}/τ) ‖ softmax(z_i/τ))`` (``λ = weight``,
    ``τ = temperature``, :func:`trajectory_kl`), where ``y_i^{(e)}`` are the logits recorded for
    sample ``indices[i]`` at epoch ``e``; and it records ``z_i`` (detached) for epoch ``epoch``.
    Samples with no record from exactly ``epoch − E`` (the first ``E`` epochs, a sample a
    ``drop_last`` loader skipped) contribute 0 but still count in ``|B|``; outside
    ``[start_epoch, end_epoch)`` the term is 0. The official code adds the term for
    ``kl_start_epoch < epoch < kl_end_epoch`` (its start 5 is our 6) with ``τ = 5``, ``E = 3``
    (its run script: 2) and ``λ = 0.3``; recording starts with the first call, whatever
    ``start_epoch`` is, and stops once a record could not be read before ``end_epoch``.

    Memory: ``E`` tables of ``N × C`` in ``dtype`` plus one int32 epoch stamp per row and table,
    ``E·N·(C·sizeof(dtype) + 4)`` bytes on ``device``: CIFAR-10 with E = 3 in float16, 3.6 MB;
    ImageNet-1k, 7.7 GB (hence :class:`MESA`). The official code keeps ``E + 1`` float32 tables
    (it writes epoch ``e`` before it reads ``e − E``). ``E`` suffice because each call reads its
    rows of table ``e mod E`` *before* overwriting them with epoch ``e``: the values read are
    those of epoch ``e − E``, the last epoch ``≡ e (mod E)``, and the values written are next
    read at epoch ``e + E``, since the epochs in between use other tables. The stamps make this
    safe when a sample is drawn twice in an epoch (sampling with replacement): its second draw
    finds a stamp ``e`` instead of ``e − E`` and contributes 0 instead of a wrong target.

    Tables live on ``device`` (CPU by default: per batch, ``B × C`` values cross to the logits'
    device); they are buffers, so ``state_dict`` checkpoints them and ``.to()`` moves them. Under
    DDP every rank needs the whole table (a distributed sampler reshuffles samples across ranks).
    Indices come from the loader, e.g. through :class:`IndexedDataset`.
    """

    def __init__(self, num_samples: int, num_classes: int, *, epochs_ago: int = 3, temperature: float = 5.0,
                 weight: float = 0.3, start_epoch: int = 5, end_epoch: Optional[int] = None,
                 dtype: torch.dtype = torch.float16, device: Any = "cpu"):
        check_int("num_samples", num_samples, 1)
        check_int("num_classes", num_classes, 2)
        check_int("epochs_ago", epochs_ago, 1)
        _check_common(temperature, weight, start_epoch, end_epoch)
        check("dtype", dtype in TABLE_DTYPES, dtype, "torch.float16, torch.bfloat16, torch.float32 or torch.float64")
        super().__init__()
        self.num_samples, self.num_classes, self.epochs_ago = num_samples, num_classes, epochs_ago
        self.temperature, self.weight = float(temperature), float(weight)
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.register_buffer("outputs", torch.zeros(epochs_ago, num_samples, num_classes, dtype=dtype, device=device))
        # -1: never written. int32: an epoch count, 4 bytes against C half-precision logits.
        self.register_buffer("recorded_epoch", torch.full((epochs_ago, num_samples), -1, dtype=torch.int32,
                                                          device=device))

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, num_classes={self.num_classes}, epochs_ago={self.epochs_ago}, "
                f"temperature={self.temperature}, weight={self.weight}, start_epoch={self.start_epoch}, "
                f"end_epoch={self.end_epoch}, dtype={self.outputs.dtype}")

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the tables and their stamps: ``E·N·(C·sizeof(dtype) + 4)``."""
        return sum(b.numel() * b.element_size() for b in (self.outputs, self.recorded_epoch))

    def active(self, epoch: int) -> bool:
        """Whether the term is on at ``epoch`` (``start_epoch ≤ epoch < end_epoch``)."""
        return self.start_epoch <= epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def _indices(self, logits: Tensor, indices: Any) -> Tensor:
        ok = isinstance(indices, Tensor) and indices.dim() == 1 and not indices.is_floating_point() \
            and indices.dtype != torch.bool and indices.numel() == logits.shape[0]
        shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        check("indices", ok, shape, f"an integer tensor of shape ({logits.shape[0]},), one index per row of logits")
        idx = indices.to(self.outputs.device, torch.long)
        if idx.numel():
            low, high = int(idx.min()), int(idx.max())
            check("indices", low >= 0 and high < self.num_samples, (low, high),
                  f"sample indices in [0, {self.num_samples}) (num_samples)")
        return idx

    def forward(self, logits: Tensor, indices: Tensor, epoch: int) -> Tensor:
        """The trajectory term for this batch (a 0-dim tensor on ``logits.device``, differentiable
        in ``logits``); records ``logits`` for ``epoch``."""
        _check_logits(logits, self.num_classes)
        _check_epoch(epoch)
        idx = self._indices(logits, indices)
        slot, past = epoch % self.epochs_ago, epoch - self.epochs_ago
        term = None
        if self.active(epoch) and self.weight and past >= 0:
            # Read before the write below: the rows of this table still hold epoch e − E.
            stored = self.outputs[slot].index_select(0, idx).to(logits.device, non_blocking=True)
            valid = (self.recorded_epoch[slot].index_select(0, idx) == past).to(logits.device, non_blocking=True)
            kl = trajectory_kl(logits, stored, self.temperature)
            # where, not a product: the rows of an invalid record may hold anything (inf in fp16).
            term = torch.where(valid, kl, torch.zeros_like(kl)).sum() * (self.weight / max(logits.shape[0], 1))
        if self.end_epoch is None or epoch + self.epochs_ago < self.end_epoch:
            with torch.no_grad():
                self.outputs[slot].index_copy_(0, idx, logits.detach().to(self.outputs.device, self.outputs.dtype))
                self.recorded_epoch[slot].index_fill_(0, idx, epoch)
        if term is None:
            term = torch.zeros((), device=logits.device, dtype=torch.promote_types(logits.dtype, torch.float32))
        return term


class MESA(nn.Module):
    """Memory-Efficient Sharpness-Aware training (Du et al., NeurIPS 2022): the trajectory loss
    towards an exponential moving average of the weights.

    ``v_t = β·v_{t−1} + (1 − β)·θ_t`` with ``v_0 = θ_0`` (the weights at construction; timm's
    ``ModelEmaV2``, which the official code uses), ``β = decay``, kept by
    ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``; parameters *and*
    buffers are averaged (``use_buffers=True``: the teacher's BatchNorm statistics are the EMA of
    the student's, as in ``ModelEmaV2``). Call :meth:`update` after every optimizer step.

    ``term = mesa(logits, inputs, epoch)`` runs the teacher on ``inputs`` (without gradient,
    always in eval mode, as ``ModelEmaV2`` keeps it, so BatchNorm uses the averaged statistics
    and dropout is off; its mode is put back afterwards) and returns, for
    ``start_epoch ≤ epoch < end_epoch``,
    ``λ·τ²/|B|·Σ_i KL(softmax(f_v(x_i)/τ) ‖ softmax(z_i/τ))`` (:func:`trajectory_kl`), else 0
    without running the teacher. ``forward(module, inputs) -> logits`` adapts other model
    signatures (default ``module(inputs)``, e.g. ``lambda m, b: m(**b).logits`` for HF models);
    ``teacher_logits=`` passes logits computed elsewhere instead of ``inputs``. The official code
    adds the term for ``kl_start_epoch < epoch < kl_end_epoch`` (start 5, our 6) with ``τ = 5``,
    ``λ = 0.8``, ``β = 0.9998``.

    Memory: one copy of the model's parameters and buffers, no per-sample state. Build it from
    the bare model (``ddp_model.module``): the EMA is a local copy on every rank.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.9998, temperature: float = 5.0, weight: float = 0.8,
                 start_epoch: int = 5, end_epoch: Optional[int] = None,
                 forward: Optional[Callable[[nn.Module, Any], Tensor]] = None):
        check("model", isinstance(model, nn.Module), type(model).__name__, "a torch.nn.Module")
        check("decay", is_real(decay) and 0.0 <= decay < 1.0, decay, "a float in [0, 1)")
        _check_common(temperature, weight, start_epoch, end_epoch)
        check("forward", forward is None or callable(forward), type(forward).__name__,
              "None or a callable(module, inputs) -> logits")
        super().__init__()
        self.decay, self.temperature, self.weight = float(decay), float(temperature), float(weight)
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self._forward = forward
        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        # AveragedModel copies the model on its first update (n_averaged == 0); counting the copy
        # made here as that first average gives v_1 = β·θ_0 + (1 − β)·θ_1, the recursion from v_0 = θ_0.
        self.ema.n_averaged.fill_(1)
        self.ema.requires_grad_(False)
        self.ema.eval()
        # A plain attribute, not a submodule: the student's weights stay out of this state_dict.
        self.__dict__["_student"] = model

    def extra_repr(self) -> str:
        return (f"decay={self.decay}, temperature={self.temperature}, weight={self.weight}, "
                f"start_epoch={self.start_epoch}, end_epoch={self.end_epoch}")

    @property
    def teacher(self) -> nn.Module:
        """The EMA model ``f_v`` (the averaged copy)."""
        return self.ema.module

    def active(self, epoch: int) -> bool:
        """Whether the term is on at ``epoch`` (``start_epoch ≤ epoch < end_epoch``)."""
        return self.start_epoch <= epoch and (self.end_epoch is None or epoch < self.end_epoch)

    @torch.no_grad()
    def update(self) -> None:
        """``v ← β·v + (1 − β)·θ`` for every parameter and buffer (after each optimizer step)."""
        self.ema.update_parameters(self._student)

    @torch.no_grad()
    def teacher_logits(self, inputs: Any) -> Tensor:
        """``f_v(inputs)`` in eval mode, without gradient."""
        module = self.ema.module
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            return module(inputs) if self._forward is None else self._forward(module, inputs)
        finally:
            for m, mode in modes:
                m.training = mode

    def forward(self, logits: Tensor, inputs: Any = None, epoch: int = 0, *,
                teacher_logits: Optional[Tensor] = None) -> Tensor:
        """The trajectory term for this batch (a 0-dim tensor, differentiable in ``logits``)."""
        _check_logits(logits)
        _check_epoch(epoch)
        check("inputs/teacher_logits", (inputs is None) != (teacher_logits is None),
              (type(inputs).__name__, type(teacher_logits).__name__), "exactly one of inputs and teacher_logits")
        if not (self.active(epoch) and self.weight):
            return torch.zeros((), device=logits.device, dtype=torch.promote_types(logits.dtype, torch.float32))
        target = self.teacher_logits(inputs) if teacher_logits is None else teacher_logits
        check("teacher logits", isinstance(target, Tensor) and target.shape == logits.shape,
              tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__,
              f"a tensor of the logits' shape {tuple(logits.shape)}")
        return trajectory_kl(logits, target, self.temperature).mean() * self.weight
