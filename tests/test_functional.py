"""foreach kernels == the plain for-loop reference, in float64 (DESIGN.md §8.4)."""

from __future__ import annotations

import math

import pytest
import torch

from flatminima.core import kernels as F
from flatminima.core import reference as R
from flatminima.core.scale import Scale

TOL = dict(rtol=1e-12, atol=1e-14)


def tensors(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 3, 3), (4,), (7, 5), (1,), (3, 2, 2)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, math.inf])
def test_global_norm(p):
    xs = tensors()
    torch.testing.assert_close(F.global_norm(xs, p), R.global_norm(xs, p), **TOL)


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, math.inf])
def test_dual_direction(p, per_tensor):
    xs = tensors()
    got = F.dual_direction(xs, p, per_tensor)
    want = R.dual_direction(xs, p, per_tensor)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    # the defining properties: unit p-norm, and dᵀx = ‖x‖_q
    q = math.inf if p == 1 else (1.0 if p == math.inf else p / (p - 1))
    if not per_tensor:
        torch.testing.assert_close(F.global_norm(got, p), torch.tensor(1.0, dtype=torch.float64), **TOL)
        dot = sum((a * b).sum() for a, b in zip(got, xs))
        torch.testing.assert_close(dot, F.global_norm(xs, q), **TOL)


def test_dual_direction_p1_splits_ties():
    xs = [torch.tensor([3.0, -3.0, 1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)]
    d = F.dual_direction(xs, 1.0)
    torch.testing.assert_close(d[0], torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(d[1], torch.tensor([0.0], dtype=torch.float64))


def test_zero_gradient_gives_zero_direction():
    xs = [torch.zeros(3, dtype=torch.float64)]
    for p in (1.0, 2.0, 3.0, math.inf):
        assert torch.equal(F.dual_direction(xs, p)[0], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("granularity", ["model", "layer", "filter", "element"])
@pytest.mark.parametrize("kind", ["one", "w", "w_over_g", "gradient_strength", "inv_g", "w_over_sqrt_n"])
@pytest.mark.parametrize("p", [2.0, math.inf, 3.0])
def test_ascent_direction_with_scales(kind, granularity, p):
    ws, gs = tensors(0), tensors(1)
    T = Scale(kind, granularity, eta=0.01)(ws, gs)
    for per_tensor in (False, True):
        got = F.ascent_direction(gs, T, p, per_tensor)
        want = R.ascent_direction(gs, T, p, per_tensor)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("p", [2.0, math.inf])
def test_project(p, per_tensor):
    ws, a = tensors(0), tensors(2)
    T = Scale("w", "filter", eta=0.1)(ws, ws)
    radius = [0.3, 0.1, 0.3, 0.2, 0.5]
    want = R.project(a, T, radius, p, per_tensor)
    got = F.project([t.clone() for t in a], T, radius, p, per_tensor)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **TOL)
    # inside the ball: unchanged
    small = [t * 1e-6 for t in a]
    kept = F.project([t.clone() for t in small], T, radius, p, per_tensor)
    for x, y in zip(kept, small):
        torch.testing.assert_close(x, y, **TOL)


def test_scale_values_by_hand():
    w = [torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)]
    g = [torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)]
    filt = Scale("w", "filter", eta=0.5)(w, g)
    torch.testing.assert_close(filt[0], torch.tensor([[5.5], [1.5]], dtype=torch.float64))
    torch.testing.assert_close(filt[1], torch.tensor(2.5, dtype=torch.float64))
    gs = Scale("gradient_strength", "layer")(w, g)  # √(n_i/n)/‖g_i‖, n = 5
    torch.testing.assert_close(gs[0], torch.tensor(math.sqrt(4 / 5) / math.sqrt(5), dtype=torch.float64))
    torch.testing.assert_close(gs[1], torch.tensor(math.sqrt(1 / 5) / 0.5, dtype=torch.float64))
    el = Scale("w", "element", eta=0.01)(w, g)
    torch.testing.assert_close(el[0], w[0].abs() + 0.01)


def test_clone_and_restore_are_bit_exact():
    xs = [torch.tensor([1e-310, -0.0, float("nan"), 1.0 / 3.0], dtype=torch.float64),
          torch.randn(5, dtype=torch.bfloat16)]
    saved = F.clone(xs)
    for x in xs:
        x.add_(1.0)
    F.restore_(xs, saved)
    for x, s in zip(xs, saved):
        assert torch.equal(x.view(torch.int64 if x.dtype == torch.float64 else torch.int16),
                           s.view(torch.int64 if s.dtype == torch.float64 else torch.int16))


def test_reductions_in_float32_for_low_precision():
    xs = [torch.full((4096,), 1.0, dtype=torch.bfloat16)]
    n = F.global_norm(xs)
    assert n.dtype == torch.float32 and float(n) == 64.0
