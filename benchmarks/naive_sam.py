"""The common public SAM implementation, kept as the reference point of ``step_overhead.py``.

This is the widely copied per-parameter formulation (Foret et al. 2021, as in the popular
``sam.py`` of github.com/davda54/sam): a Python loop over the parameters that clones every
weight into ``state[p]["old_p"]``, a global gradient norm built from a stacked list of per-tensor
norms, ``p.add_(e_w)`` per tensor, and ``p.data = old_p`` to restore. It is deliberately *not*
optimised: it is what the library's fused SAM step is measured against (DESIGN.md §9).

The only change from the public version is the interface, so both run from the same benchmark
loop: it wraps an optimizer *instance* (like ``flatminima``) instead of a class, and
``step(closure)`` runs both passes itself, with ``closure(backward=True)`` doing forward and
backward and returning the loss, and returns the clean loss. ``tests/test_benchmarks.py`` checks
that it takes the same steps as ``flatminima.SAM`` (float64, to 1e-10).
"""

from __future__ import annotations

import torch


class NaiveSAM(torch.optim.Optimizer):
    """``NaiveSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)``."""

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False):
        if rho < 0.0:
            raise ValueError(f"Invalid rho, should be non-negative: {rho}")
        defaults = dict(rho=rho, adaptive=adaptive)
        super().__init__(base_optimizer.param_groups, defaults)  # adds rho/adaptive to the base's groups
        self.base_optimizer = base_optimizer
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)  # climb to the local maximum "w + e(w)"
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]  # get back to "w" from "w + e(w)"
        self.base_optimizer.step()  # do the actual "sharpness-aware" update
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is not None, "Sharpness Aware Minimization requires closure, but it was not provided"
        closure = torch.enable_grad()(closure)  # the closure should do a full forward-backward pass
        self.zero_grad(set_to_none=True)
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    def _grad_norm(self) -> torch.Tensor:
        shared_device = self.param_groups[0]["params"][0].device  # in case of model parallelism
        norm = torch.norm(
            torch.stack([
                ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(shared_device)
                for group in self.param_groups for p in group["params"]
                if p.grad is not None
            ]),
            p=2,
        )
        return norm

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups
