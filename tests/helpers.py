"""Shared fixtures for the method tests: a quadratic with two parameter tensors, in float64."""

from __future__ import annotations

import torch
from torch import nn


class Quadratic(nn.Module):
    """``L(x) = ½ xᵀAx`` with ``x = concat(W.flatten(), b)``: a 2×3 matrix and a 2-vector, so
    layer-, filter- and element-wise scales all differ."""

    def __init__(self, seed: int = 0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        M = torch.randn(8, 8, generator=g, dtype=torch.float64)
        self.register_buffer("A", (M @ M.T / 8 + torch.eye(8, dtype=torch.float64)).to(dtype))
        self.W = nn.Parameter(torch.randn(2, 3, generator=g, dtype=torch.float64).to(dtype))
        self.b = nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64).to(dtype))

    def flat(self) -> torch.Tensor:
        return torch.cat([self.W.flatten(), self.b])

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        x = self.flat() if x is None else x
        return 0.5 * x @ self.A @ x

    def closure(self):
        def closure(backward: bool = True):
            loss = self()
            if backward:
                loss.backward()
            return loss.detach()
        return closure


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:6].view(2, 3), x[6:]


class InfGrad(torch.autograd.Function):
    """Identity forward; the backward puts +inf into the first entry of the gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g.view(-1)[0] = float("inf")
        return g
