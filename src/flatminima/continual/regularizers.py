"""Regularization baselines of continual learning: EWC (a quadratic penalty) and LwF (distillation).

* ``ewc`` (:class:`EWC`; Kirkpatrick et al., PNAS 2017, *Overcoming catastrophic forgetting in
  neural networks*): after task ``t`` the diagonal Fisher ``F_t = E_x E_y[(∂ log p(y|x)/∂θ)²]``
  at the task's final weights ``θ*_t``, then in later tasks the penalty
  ``(λ/2)·Σ_{t past} Σ_k F_{t,k}(θ_k − θ*_{t,k})²``; online EWC (Schwarz et al., ICML 2018,
  *Progress & Compress*) keeps one ``F ← γF + F_t`` anchored at the latest ``θ*``.
* ``lwf`` (:class:`LwF`; Li & Hoiem, TPAMI 2018, *Learning without Forgetting*): the outputs of
  the model as it was before the task, on the current inputs, distilled into the classes seen
  before the task: ``loss + λ·T²·KL(softmax(z_old/T) ‖ softmax(z_new/T))``.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections import OrderedDict
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import foreach as fe
from ..core.schedules import derive_seed
from ..core.validation import check, check_choice, check_fraction, check_int, check_nonnegative, check_optional_int
from ..core.validation import check_positive
from ..data.base import take
from ..lora import lora_layers, reduction_dtype
from .strategy import Baseline, TaskContext, register_baseline

FISHERS = ("empirical", "true")
SPACES = ("parameters", "update")
NORMALIZATIONS = (None, "max", "mean")
PER_SAMPLE = ("auto", "vmap", "loop")
#: seed stream of the true Fisher's labels (with the baseline's seed and the task index)
FISHER_STREAM = 0xE3C


def model_logits(model: nn.Module, x: Any) -> Tensor:
    """``model(x)`` for tensor inputs, ``model(**x).logits`` for a dict (a Hugging Face model)."""
    if isinstance(x, Mapping):
        out = model(**x)
        return out.logits if hasattr(out, "logits") else out
    return model(x)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, every module's own mode restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class _LossOf(nn.Module):
    """``loss_fn(model, (x, y))`` as a module holding ``model``: ``torch.func.functional_call`` on it
    swaps the model's tensors inside any loss function."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x: Any, y: Tensor) -> Tensor:
        return self.loss_fn(self.model, (x, y))


class _Constant(nn.Module):
    def __init__(self, out: Tensor):
        super().__init__()
        self.out = out

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.out


def loss_support(loss_fn, num_classes: int, device: torch.device) -> Tensor:
    """The labels on which ``loss_fn`` is finite (a bool mask): the support of the run's predictive,
    probed with constant logits (a masked class gets an infinite cross-entropy)."""
    stub = _Constant(torch.zeros(1, num_classes, device=device))
    dummy = torch.zeros(1, device=device)
    with torch.no_grad():
        losses = torch.stack([loss_fn(stub, (dummy, torch.tensor([c], device=device))).float()
                              for c in range(num_classes)])
    return torch.isfinite(losses)


def squared_gradients(model: nn.Module, loss_fn, names: list[str], batches, *, labels: str, samples: Optional[int],
                      chunk: int, per_sample: str, seed: int) -> tuple[dict[str, Tensor], int]:
    """``Σ_i g_i²`` of the per-sample gradients ``g_i = ∂ loss_fn(model, (x_i, y_i))/∂θ`` for the
    tensors ``names`` of ``model`` (any tensors: frozen base weights included), and the sample count.
    ``labels="true"`` draws ``y_i ~ p(·|x_i)`` from the model's predictive (restricted to the
    labels the loss allows, :func:`loss_support`) with a CPU generator seeded by ``seed``.
    Per-sample gradients: ``torch.func.vmap(grad(·))`` over chunks of ``chunk`` samples, or one
    ``autograd.grad`` per sample (``"loop"``; ``"auto"``: for dict inputs, whose Hugging Face
    forwards and padding trims are data-dependent)."""
    named = dict(model.named_parameters())
    tensors = {n: named[n].detach() for n in names}
    wrapper, total, count = _LossOf(model, loss_fn), {}, 0
    gen, support = torch.Generator().manual_seed(seed), None

    def one(params, x, y):
        x = {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, Mapping) else x.unsqueeze(0)
        return torch.func.functional_call(wrapper, params, (x, y.unsqueeze(0)))

    per_sample_grad = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))
    keyed = {"model." + n: t for n, t in tensors.items()}
    for x, y in batches:
        if samples is not None:
            keep = min(len(y), samples - count)
            x, y = take(x, slice(0, keep)), y[:keep]
        if labels == "true":
            with torch.no_grad():
                out = model_logits(model, x).float()
            if support is None:
                support = loss_support(loss_fn, out.shape[-1], out.device)
            probs = torch.softmax(out.masked_fill(~support, float("-inf")), -1).cpu()
            y = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(y.device)
        loop = per_sample == "loop" or (per_sample == "auto" and isinstance(x, Mapping))
        step = 1 if loop else chunk
        for i in range(0, len(y), step):
            xs, ys = take(x, slice(i, i + step)), y[i:i + step]
            if loop:
                with torch.enable_grad():
                    leaves = {k: t.requires_grad_() for k, t in ((k, t.detach()) for k, t in keyed.items())}
                    loss = torch.func.functional_call(wrapper, leaves, (xs, ys))
                    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                sq = {k: (g if g is not None else torch.zeros_like(t)).unsqueeze(0)
                      for (k, t), g in zip(leaves.items(), grads)}
            else:
                with torch.no_grad():  # torch.func.grad still works; no outer graph through other tensors
                    sq = per_sample_grad(keyed, xs, ys)
            for k, g in sq.items():
                s = g.detach().to(reduction_dtype(g)).square().sum(0)
                total[k[6:]] = s if k[6:] not in total else total[k[6:]].add_(s)
        count += len(y)
        if samples is not None and count >= samples:
            break
    return total, count


class _Quadratic(torch.autograd.Function):
    """``Σ_k ‖r_k ⊙ (θ_k − m_k)‖²`` with the gradient ``2 r_k² ⊙ (θ_k − m_k)``, in foreach ops."""

    @staticmethod
    def forward(ctx, roots, means, *params):
        cast = [p.detach().to(r.dtype) for p, r in zip(params, roots)]
        scaled = fe.mul(fe.sub(cast, means), roots)
        ctx.scaled, ctx.roots, ctx.dtypes = scaled, roots, [p.dtype for p in params]
        return torch.stack(fe.norm(scaled)).square().sum()

    @staticmethod
    def backward(ctx, grad):
        grads = fe.mul(fe.mul(ctx.scaled, ctx.roots), 2 * grad)
        return (None, None, *(g.to(d) for g, d in zip(grads, ctx.dtypes)))


@register_baseline("ewc")
class EWC(Baseline):
    """Elastic weight consolidation on the tensors each task trains, or on the LoRA update.

    After task ``t`` (:meth:`end_task`): ``F_t = (1/N)·Σ_i (∂ log p(y_i|x_i)/∂θ)²`` over ``N``
    training examples of the task (``samples``, from at most ``n_batches`` batches), with ``log p``
    the task's training log-likelihood (``-context.loss_fn``), at ``θ*_t``, in eval mode (dropout
    off, BatchNorm's running statistics; every module's mode restored). ``fisher="empirical"``
    uses the data's labels, ``"true"`` labels drawn from the model's predictive (seeded).

    Penalty (:meth:`penalty`), ``λ = weight``:

    * classic (``online=False``): ``(λ/2)·Σ_{t past} Σ_k F_{t,k}(θ_k − θ*_{t,k})²``, one term per
      past task, kept exactly as one quadratic ``(λ/2)·Σ_k [A_k(θ_k − m_k)² + c_k]`` with
      ``A = Σ_t F_t``, ``m = Σ_t F_t θ*_t / A`` and ``c = Σ_t F_t(θ*_t − m)²``: the same value and
      gradient, two buffers per tensor whatever the number of tasks;
    * online (``online=True``, Schwarz et al. 2018): ``F ← γ·F + F_t`` (``γ = decay``), one anchor
      ``θ*`` (the latest): ``(λ/2)·Σ_k F_k(θ_k − θ*_k)²``.

    ``space="parameters"``: ``θ`` are the tensors trained in the task (``context.parameters``:
    seq-LoRA's factors and the head; finetune: every weight). A tensor that no longer trains (an
    inc-LoRA adapter of a finished task) is left out: frozen, it keeps its anchor, so its term is 0;
    new tensors (a new task's adapter) have no Fisher, so inc-LoRA's penalty is on the shared head.

    ``space="update"``: each LoRA layer's update ``ΔW = Σ_{active} s·P(BA)`` (``rows × n_in``, read
    through :func:`flatminima.lora.lora_layers`) is the variable: ``F`` is the Fisher of
    ``∂L/∂ΔW = ∂L/∂W`` (the merged weight's gradient) and the penalty ``(λ/2)·Σ F ⊙ (ΔW − ΔW*)²``
    sees every active adapter, so inc-LoRA's new adapters are penalized through the sum; the
    non-LoRA trained tensors (the head) keep the parameter-space term. ``normalize`` divides each
    block's ``F_t`` (a layer's, or a tensor's) by its max (``"max"``) or mean (``"mean"``).

    ``per_sample``: how per-sample gradients are taken (:func:`squared_gradients`); ``chunk``:
    samples per vectorized call (memory ``chunk × |θ|``); ``seed``: the true Fisher's labels.
    """

    has_penalty = True

    def __init__(self, weight: float = 1.0, *, fisher: str = "empirical", online: bool = False, decay: float = 1.0,
                 space: str = "parameters", normalize: Optional[str] = None, samples: Optional[int] = 1024,
                 n_batches: Optional[int] = None, chunk: int = 32, per_sample: str = "auto", seed: int = 0):
        self.weight = check_nonnegative("weight", weight)
        self.fisher = check_choice("fisher", fisher, FISHERS)
        check("online", isinstance(online, bool), online, "True or False")
        self.online, self.decay = online, check_fraction("decay", decay)
        self.space = check_choice("space", space, SPACES)
        self.normalize = check_choice("normalize", normalize, NORMALIZATIONS)
        self.samples = check_optional_int("samples", samples, 1)
        self.n_batches = check_optional_int("n_batches", n_batches, 1)
        self.chunk = check_int("chunk", chunk, 1)
        self.per_sample = check_choice("per_sample", per_sample, PER_SAMPLE)
        self.seed = check_int("seed", seed, 0)
        # tensor blocks: id -> [tensor, root √A, mean m, constant c]; ΔW blocks: layer name -> [root, m, c]
        self._tensors: dict[int, list] = {}
        self._updates: dict[str, list] = {}
        self._layers: Optional[dict[str, Any]] = None
        self.tasks, self.sample_counts = 0, []

    def start_task(self, context: TaskContext) -> None:
        self._layers = {layer.name: layer for layer in lora_layers(context.model)} if self._updates else None

    def end_task(self, context: TaskContext) -> None:
        model, trained = context.model, {id(p): p for p in context.parameters}
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [tuple(p.shape) for i, p in trained.items() if i not in names]
        check("context.parameters", not missing, f"tensors of shapes {missing[:3]}", "parameters of context.model")
        layers, plain = {}, dict(trained)
        if self.space == "update":
            for layer in lora_layers(model):
                factors = {id(t) for a in layer.active() for t in (a.a, a.b)}
                for t in (t for a in layer.adapters for t in (a.a, a.b)):
                    plain.pop(id(t), None)  # LoRA factors are seen through ΔW
                if factors & trained.keys():
                    layers[names[id(layer.base.weight)]] = layer
        targets = [names[i] for i in plain] + list(layers)
        with evaluation_mode(model):
            total, count = squared_gradients(
                model, context.loss_fn, targets, context.batches(self.n_batches), labels=self.fisher,
                samples=self.samples, chunk=self.chunk, per_sample=self.per_sample,
                seed=derive_seed(self.seed, context.index, FISHER_STREAM))
        check("context.batches", count > 0, "no examples", "at least one training example for the Fisher")
        for i, p in plain.items():
            self._merge(self._tensors, i, self._normalized(total[names[i]] / count), p.detach(), tensor=p)
        for name, layer in layers.items():
            rows = layer.rows
            fisher = self._normalized(total[name].reshape(rows, -1) / count)
            self._merge(self._updates, layer.name, fisher, layer.delta(fisher.dtype).reshape(rows, -1))
        self.tasks += 1
        self.sample_counts.append(count)
        self._layers = None

    def _normalized(self, fisher: Tensor) -> Tensor:
        if self.normalize is None:
            return fisher
        scale = fisher.max() if self.normalize == "max" else fisher.mean()
        return fisher / scale if float(scale) > 0 else fisher

    def _merge(self, blocks: dict, key, fisher: Tensor, anchor: Tensor, tensor: Optional[Tensor] = None) -> None:
        """Fold ``F_t`` anchored at ``θ*_t`` into the block's quadratic ``A(θ − m)² + c``."""
        anchor = anchor.to(fisher.dtype, copy=True)
        head = [tensor] if tensor is not None else []
        if key not in blocks:
            blocks[key] = [*head, fisher.sqrt(), anchor, 0.0]
            return
        root, mean, const = blocks[key][-3:]
        old = root.square()
        if self.online:
            blocks[key] = [*head, (self.decay * old + fisher).sqrt(), anchor, 0.0]
            return
        total = old + fisher
        merged = torch.where(total > 0, (old * mean + fisher * anchor) / total.clamp_min(torch.finfo(total.dtype).tiny),
                             anchor)
        const += float((old * (mean - merged).square() + fisher * (anchor - merged).square()).sum())
        blocks[key] = [*head, total.sqrt(), merged, const]

    def penalty(self, model: nn.Module) -> Tensor:
        """``(λ/2)·Σ_blocks [‖√A ⊙ (θ − m)‖² + c]`` over the blocks that train now (class docstring);
        a 0-dim zero without a graph while none does."""
        live = [b for b in self._tensors.values() if b[0].requires_grad]
        terms, const = [], 0.0
        if live:
            terms.append(_Quadratic.apply([b[1] for b in live], [b[2] for b in live], *[b[0] for b in live]))
            const += sum(b[3] for b in live)
        if self._updates:
            layers = self._layers if self._layers is not None else {lay.name: lay for lay in lora_layers(model)}
            for name, (root, mean, c) in self._updates.items():
                layer = layers.get(name)
                if layer is None:
                    continue
                delta = layer.add_delta_(torch.zeros_like(mean))
                if delta.requires_grad:
                    terms.append(((delta - mean) * root).square().sum())
                    const += c
        if not terms:  # nothing trains under a Fisher yet (task 0): a constant 0, no graph
            param = next(model.parameters())
            return torch.zeros((), dtype=reduction_dtype(param), device=param.device)
        return (0.5 * self.weight) * (torch.stack(terms).sum() + const)

    def state(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "samples": list(self.sample_counts), "tensors": len(self._tensors),
                "updates": len(self._updates)}


#: old-logit cache entries kept at most (a step's micro-batches; dead inputs are dropped earlier)
_CACHE = 64


@register_baseline("lwf")
class LwF(Baseline):
    """Learning without Forgetting: distill the model as it was before the task into the current one.

    :meth:`end_task` keeps a frozen copy of the model (``requires_grad`` off, eval mode: dropout
    off; the live model is untouched) and the classes seen so far ``C_old``. In later tasks every
    pass's loss becomes (``λ = weight``, ``T = temperature``)::

        loss + λ·T²·KL(softmax(z_old[C_old]/T) ‖ softmax(z[C_old]/T))   (mean over the batch)

    with ``z`` the pass's logits and ``z_old`` the copy's on the same inputs (under ``no_grad``).
    ``T²`` keeps the gradient's scale independent of ``T`` (Hinton et al. 2015); Li & Hoiem use
    ``T = 2`` and ``λ = 1``. The KL differs from their cross-entropy by the old outputs' entropy, a
    constant: same gradient. ``z_old`` depends only on the inputs, so it is cached per input tensor
    (object identity, held by weak reference): a multi-pass method (SAM) runs the old forward once
    per step. Memory: one copy of the model.
    """

    has_loss = True

    def __init__(self, weight: float = 1.0, temperature: float = 2.0):
        self.weight = check_nonnegative("weight", weight)
        self.temperature = check_positive("temperature", temperature)
        self.old: Optional[nn.Module] = None
        self.old_classes: Optional[Tensor] = None
        self._cache: OrderedDict = OrderedDict()

    def end_task(self, context: TaskContext) -> None:
        old = copy.deepcopy(context.model)
        for p in old.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.old = old.eval()
        self.old_classes = torch.tensor(sorted(set(int(c) for c in context.seen_classes)), dtype=torch.long,
                                        device=context.device)
        self._cache.clear()

    def old_logits(self, x: Any) -> Tensor:
        """The frozen copy's logits on ``x``, cached by the identity of ``x``'s tensors."""
        anchors = list(x.values()) if isinstance(x, Mapping) else [x]
        key = tuple(id(t) for t in anchors)
        hit = self._cache.get(key)
        if hit is not None and all(ref() is t for ref, t in zip(hit[0], anchors)):
            return hit[1]
        for k in [k for k, (refs, _) in self._cache.items() if any(ref() is None for ref in refs)]:
            del self._cache[k]
        with torch.no_grad():
            out = model_logits(self.old, x).detach()
        self._cache[key] = ([weakref.ref(t) for t in anchors], out)
        while len(self._cache) > _CACHE:
            self._cache.popitem(last=False)
        return out

    def loss(self, model: nn.Module, batch, logits: Tensor, loss: Tensor) -> Tensor:
        if self.old is None or self.weight == 0:
            return loss
        t, cls = self.temperature, self.old_classes.to(logits.device)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # softmax of fp16/bf16 logits in float32
        old = self.old_logits(batch[0]).index_select(-1, cls).to(dtype) / t
        new = logits.index_select(-1, cls).to(dtype) / t
        kl = F.kl_div(F.log_softmax(new, -1), F.log_softmax(old, -1), log_target=True, reduction="batchmean")
        return loss + (self.weight * t * t) * kl

    def state(self) -> dict[str, Any]:
        return {"old_classes": 0 if self.old_classes is None else len(self.old_classes)}


__all__ = ["EWC", "FISHERS", "FISHER_STREAM", "LwF", "NORMALIZATIONS", "PER_SAMPLE", "SPACES", "evaluation_mode", "loss_support",
           "model_logits", "squared_gradients"]
