"""Loss landscapes, interpolation, the distribution-shift trial, plots and ``.npz`` files."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_sharpness import ORIGIN, Quadratic, assert_untouched, ce, classification, mlp, point, quad_loss, snapshot, spd
from torch import nn

from flatminima.diagnostics.landscape import (filter_normalized_direction, interpolate, landscape_directions,
                                              load_npz, loss_landscape, save_npz)
from flatminima.diagnostics.robustness import accuracy, corruption_robustness, perturbation_curve
from flatminima.diagnostics.shift import mixed_dataset, shift_strength, shift_trial

D = torch.float64


def filters(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def assert_filter_normalized(direction, weights, tol=1e-12, centered=False):
    for d, w in zip(direction, weights):
        rows, ref = filters(d), filters(w)
        if centered:
            assert rows.mean(1).abs().max() < tol
        torch.testing.assert_close(rows.norm(dim=1), ref.norm(dim=1), rtol=tol, atol=0)


# -- directions ------------------------------------------------------------------------------


def test_filter_normalized_directions_linear_and_conv():
    torch.manual_seed(0)
    linear, conv = nn.Linear(5, 7).to(D), nn.Conv2d(3, 4, 3).to(D)
    weights = [linear.weight.detach(), linear.bias.detach(), conv.weight.detach(), conv.bias.detach()]
    d = filter_normalized_direction(weights, seed=3)
    assert [t.shape for t in d] == [w.shape for w in weights] and all(t.dtype == D for t in d)
    assert_filter_normalized([d[0], d[2]], [weights[0], weights[2]])
    assert d[2].reshape(4, -1).shape == (4, 27)  # a conv filter is an output channel (in × kh × kw)
    assert not d[1].any() and not d[3].any()  # one_d="ignore": biases do not move
    d = filter_normalized_direction(weights, seed=3, one_d="filter", center=True)
    assert_filter_normalized(d, weights, centered=True)  # a bias is one filter: zero mean, norm ‖b‖
    # Same seed, same direction; float32 weights give float32 directions.
    assert torch.equal(filter_normalized_direction(weights, seed=3, one_d="filter", center=True)[2], d[2])
    assert filter_normalized_direction([linear.weight.float()], seed=0)[0].dtype == torch.float32


def test_filter_normalization_only_rescales_by_default_as_li_et_al():
    """net_plotter.py: d_i ← z_i·‖w_i‖/‖z_i‖ per filter, no centring; 1-D: zero (ignore='biasbn') or w."""
    torch.manual_seed(0)
    linear, conv = nn.Linear(5, 7).to(D), nn.Conv2d(3, 4, 3).to(D)
    weights = [linear.weight.detach(), linear.bias.detach(), conv.weight.detach(), conv.bias.detach()]
    g = torch.Generator().manual_seed(3)
    z = [torch.randn(w.shape, generator=g, dtype=D) for w in weights]  # the draws the direction rescales
    d = filter_normalized_direction(weights, seed=3)
    for k in (0, 2):
        rows, zr, wr = filters(d[k]), filters(z[k]), filters(weights[k])
        torch.testing.assert_close(rows, zr * (wr.norm(dim=1) / zr.norm(dim=1))[:, None], rtol=1e-14, atol=0)
        assert rows.mean(1).abs().min() > 1e-6  # not centred
    assert not d[1].any() and not d[3].any()
    d = filter_normalized_direction(weights, seed=3, one_d="weight")
    assert torch.equal(d[1], weights[1]) and torch.equal(d[3], weights[3])  # the code's d.copy_(w)
    centred = filter_normalized_direction(weights, seed=3, center=True)
    assert_filter_normalized([centred[0], centred[2]], [weights[0], weights[2]], centered=True)
    assert not torch.allclose(centred[0], filter_normalized_direction(weights, seed=3)[0])


def test_orthogonalized_pair_stays_filter_normalized():
    model = mlp()
    weights = [p.detach() for p in model.parameters()]
    for center in (False, True):
        d1, d2 = landscape_directions(model, count=2, params="all", one_d="filter", orthogonalize=True, seed=4,
                                      center=center)
        dot = sum(float((a * b).sum()) for a, b in zip(d1, d2))
        assert abs(dot) < 1e-12
        assert_filter_normalized(d1, weights, centered=center)
        assert_filter_normalized(d2, weights, centered=center)


# -- slices ----------------------------------------------------------------------------------


def test_slices_of_the_quadratic_are_exact():
    A, x = spd(), point()
    model = Quadratic(A, x)
    alphas, betas = np.linspace(-1, 1, 5), np.array([-0.5, 0.0, 0.25])
    r = loss_landscape(model, quad_loss, ORIGIN, alphas=alphas, params="all", one_d="filter", seed=2)
    (d,) = landscape_directions(model, count=1, params="all", one_d="filter", seed=2)
    flat = torch.cat([t.flatten() for t in d])
    for a, value in zip(alphas, r.loss):
        y = x + a * flat
        assert value == pytest.approx(float(0.5 * y @ A @ y), rel=1e-13)
    with torch.no_grad():
        assert r.loss[2] == r.clean_loss == float(quad_loss(model, ORIGIN))  # α = 0: the clean loss, exactly
    assert r.dims == 1 and r.metric is None and r.space == "all"
    # 2-D with explicit directions (any shape-matching tensors), loss[i, j] = L(x + α_i d₁ + β_j d₂).
    d1 = [torch.randn(2, 3, dtype=D), torch.randn(2, dtype=D)]
    d2 = [torch.randn(2, 3, dtype=D), torch.randn(2, dtype=D)]
    r = loss_landscape(model, quad_loss, ORIGIN, alphas=alphas, betas=betas, directions=[d1, d2])
    f1, f2 = (torch.cat([t.flatten() for t in d]) for d in (d1, d2))
    for i, j in np.ndindex(5, 3):
        y = x + alphas[i] * f1 + betas[j] * f2
        assert r.loss[i, j] == pytest.approx(float(0.5 * y @ A @ y), rel=1e-13)
    assert r.cosine == pytest.approx(float(f1 @ f2 / (f1.norm() * f2.norm())), rel=1e-12)
    # one_d="ignore": the bias does not move, so the slice is the one along (d_W, 0).
    r = loss_landscape(model, quad_loss, ORIGIN, alphas=alphas, params="all", seed=2)
    (d,) = landscape_directions(model, count=1, params="all", seed=2)
    assert not d[1].any()
    y = x + alphas[-1] * torch.cat([d[0].flatten(), d[1]])
    assert r.loss[-1] == pytest.approx(float(0.5 * y @ A @ y), rel=1e-13)


def test_landscape_with_accuracy_on_the_grid():
    model, data = mlp(), classification()
    r = loss_landscape(model, ce, data, alphas=[-0.5, 0.0, 0.5], betas=[0.0, 1.0], metric_fn=accuracy, seed=1)
    with torch.no_grad():
        acc = float((model.eval()(data[0]).argmax(-1) == data[1]).double().mean())
    assert r.loss.shape == r.metric.shape == (3, 2)
    assert r.metric[1, 0] == r.clean_metric == acc and r.loss[1, 0] == r.clean_loss


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def peft_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], lora_dropout=0.0,
                             init_lora_weights=False)  # B ≠ 0, so W' ≠ W0
    return peft.get_peft_model(Tiny(), config).to(D)


def test_merged_weight_direction_matches_an_explicit_copy():
    model, data = peft_model(), classification(32)
    from flatminima.lora import lora_layers, merged_weight

    before = snapshot(model)
    alphas = [-0.7, 0.0, 0.4]
    r = loss_landscape(model, ce, data, alphas=alphas, merged=True, seed=5)
    assert_untouched(model, before)
    (d,) = landscape_directions(model, count=1, merged=True, seed=5)
    layers = lora_layers(model)
    assert len(d) == len(layers) == 2
    # Normalized on the merged weight W' = W0 + s·BA, not on W0.
    assert_filter_normalized(d, [merged_weight(layer) for layer in layers])
    for a, value in zip(alphas, r.loss):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for layer, delta in zip(lora_layers(twin), d):
                layer.weight.add_(a * delta)
            expected = float(ce(twin.eval(), data))
        assert value == pytest.approx(expected, rel=1e-13, abs=1e-15)
    assert r.loss[1] == r.clean_loss and r.space == "merged"
    # The LoRA subspace: only A and B move (B ≠ 0 here, so both get a direction).
    lora = loss_landscape(model, ce, data, alphas=alphas, betas=alphas, params="lora", seed=5)
    assert lora.space == "lora" and lora.loss[1, 1] == lora.clean_loss
    assert_untouched(model, before)


# -- interpolation ---------------------------------------------------------------------------


def test_interpolation_endpoints_are_the_models_losses():
    a, b, data = mlp(0), mlp(1), classification()
    with torch.no_grad():
        la, lb = float(ce(a.eval(), data)), float(ce(b.eval(), data))
    before = snapshot(a), snapshot(b)
    r = interpolate(a, b, ce, data, ts=[-0.5, 0.0, 0.5, 1.0, 1.5], metric_fn=accuracy)
    assert r.loss[1] == la and r.loss[3] == lb
    diff = torch.cat([(p - q).detach().flatten() for p, q in zip(b.parameters(), a.parameters())])
    assert r.distance == pytest.approx(float(diff.norm()), rel=1e-14)
    assert interpolate(a, b.state_dict(), ce, data, ts=[1.0]).loss[0] == lb  # a state dict as model b
    assert_untouched(a, before[0])
    assert_untouched(b, before[1])
    # BatchNorm: with buffers="interpolate" the running statistics move along with the weights.
    a, b = mlp(0, bn=True), mlp(1, bn=True)
    for m, shift in ((a, 0.3), (b, -0.2)):
        m.bn.running_mean.add_(shift)
        m.bn.running_var.mul_(1.5 + shift)
    with torch.no_grad():
        la, lb = float(ce(a.eval(), data)), float(ce(b.eval(), data))
    r = interpolate(a, b, ce, data, ts=[0.0, 1.0], buffers="interpolate")
    assert r.loss.tolist() == [la, lb]
    assert interpolate(a, b, ce, data, ts=[1.0]).loss[0] != lb  # model a's statistics: not model b's loss


# -- distribution shift (GA-SAM §2.4) --------------------------------------------------------


def test_shift_trial_on_quadratics_is_exact():
    # L(w; D) = mean ½(w − c)ᵀA(w − c): the test loss is the training loss shifted by δ, plus C.
    A = spd()
    g = torch.Generator().manual_seed(3)
    train, test = torch.randn(10, 8, generator=g, dtype=D), torch.randn(12, 8, generator=g, dtype=D) + 0.5
    theta, theta_star = Quadratic(A, train.mean(0)), Quadratic(A, test.mean(0))
    before = snapshot(theta)
    r = shift_trial(theta, theta_star, quad_loss, train, test, ts=np.linspace(-0.5, 1.5, 9))
    assert_untouched(theta, before)
    np.testing.assert_allclose(r.shifted_train_loss, r.test_loss, rtol=1e-12)
    with torch.no_grad():
        assert r.train_loss[2] == pytest.approx(float(quad_loss(theta, train)), rel=1e-14)  # t = 0
        assert r.test_loss[6] == pytest.approx(float(quad_loss(theta_star, test)), rel=1e-14)  # t = 1
    assert r.delta_norm == pytest.approx(float((test.mean(0) - train.mean(0)).norm()), rel=1e-12)
    assert np.argmin(r.train_loss) == 2 and np.argmin(r.test_loss) == 6


def test_shift_strength_is_linear_in_the_mixing_ratio():
    # Constant rows: the minimum on D_mix is exactly (1 − k/n)·c0 + (k/n)·c1, so ‖δ_η‖ = η·‖c1 − c0‖.
    A, c0, c1 = spd(), point(1), point(2)
    train, test = c0.expand(20, 8).clone(), c1.expand(20, 8).clone()
    theta = Quadratic(A, c0)
    etas = [0.1, 0.25, 0.5, 0.75, 1.0]

    def finetune(eta):
        return Quadratic(A, mixed_dataset(train, test, eta, seed=1).mean(0))

    r = shift_strength(theta, finetune, etas=etas)
    norm = float((c1 - c0).norm())
    np.testing.assert_allclose(r.delta_norms, np.asarray(etas) * norm, rtol=1e-12)
    assert r.slope == pytest.approx(norm, rel=1e-12) and r.r2 == pytest.approx(1.0)
    np.testing.assert_allclose(r.ratios, etas, rtol=1e-12)
    r2 = shift_strength(theta, {eta: finetune(eta).state_dict() for eta in etas})
    np.testing.assert_allclose(r2.delta_norms, r.delta_norms, rtol=1e-15)
    r3 = shift_strength(theta, [finetune(eta) for eta in etas], etas=etas)
    np.testing.assert_allclose(r3.delta_norms, r.delta_norms, rtol=1e-15)
    mixed = mixed_dataset(classification(20), classification(30, seed=2), 0.25, seed=0)
    assert mixed[0].shape == (20, 6) and mixed[1].shape == (20,)


# -- plots and files -------------------------------------------------------------------------


def test_plots_and_npz(tmp_path):
    plots = pytest.importorskip("flatminima.diagnostics.plots")
    pytest.importorskip("matplotlib")
    model, data = mlp(), classification()
    one = loss_landscape(model, ce, data, alphas=np.linspace(-1, 1, 5), metric_fn=accuracy)
    two = loss_landscape(model, ce, data, alphas=np.linspace(-1, 1, 5), betas=np.linspace(-1, 1, 4))
    interp = interpolate(model, mlp(1), ce, data, ts=np.linspace(-0.5, 1.5, 5))
    curve = perturbation_curve(model, ce, data, radii=[0.0, 0.01, 0.1], samples=2, steps=2)
    trial = shift_trial(model, mlp(1), ce, data, classification(seed=2), ts=[0.0, 0.5, 1.0])
    strength = shift_strength(model, {0.5: mlp(1), 1.0: mlp(2)})
    drawn = [plots.plot_landscape(one, tmp_path / "one.png"),
             plots.plot_landscape(two, tmp_path / "two.png", title="2-D", log=True),
             plots.plot_interpolation(interp, tmp_path / "interp.png"),
             plots.plot_perturbation_curve(curve, tmp_path / "curve.png"),
             plots.plot_shift_trial(trial, tmp_path / "trial.png"),
             plots.plot_shift_strength(strength, tmp_path / "strength.png")]
    for path in drawn:
        blob = open(path, "rb").read()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000, path
    # .npz round trip: arrays, scalars, None fields left out, tables as JSON.
    loaded = load_npz(save_npz(two, tmp_path / "two"))
    assert loaded["type"] == "Landscape" and loaded["space"] == "trainable" and loaded["cosine"] == two.cosine
    np.testing.assert_array_equal(loaded["loss"], two.loss)
    np.testing.assert_array_equal(loaded["betas"], two.betas)
    loaded = load_npz(save_npz(one, tmp_path / "one.npz"))
    assert "betas" not in loaded and loaded["orthogonalized"] is False
    np.testing.assert_array_equal(loaded["metric"], one.metric)
    table = corruption_robustness(model, ce, data, [0.1], steps=1)
    assert load_npz(save_npz(table, tmp_path / "table.npz"))["rows"] == table.to_dict()["rows"]


# -- bad input -------------------------------------------------------------------------------


def test_bad_arguments_are_refused_and_leave_the_model_alone():
    model, data, other, linear = mlp(), classification(), mlp(1), nn.Linear(2, 2)
    before = snapshot(model)  # (the models above are built first: building one draws from the RNG)
    cases = [
        (lambda: loss_landscape(model, ce, data, one_d="bias"), "one_d"),
        (lambda: loss_landscape(model, ce, data, alphas=[]), "alphas"),
        (lambda: loss_landscape(model, ce, data, alphas=0.5), "alphas"),
        (lambda: loss_landscape(model, ce, data, betas=[0.0, float("inf")]), "betas"),
        (lambda: loss_landscape(model, ce, data, directions=[[torch.zeros(3)]]), "directions"),
        (lambda: loss_landscape(model, ce, data, merged=True, params="all"), "params"),
        (lambda: loss_landscape(model, ce, data, metric_fn=3), "metric_fn"),
        (lambda: landscape_directions(model, count=3), "count"),
        (lambda: landscape_directions(model, center=1), "center"),
        (lambda: loss_landscape(model, ce, data, center="yes"), "center"),
        (lambda: interpolate(model, linear, ce, data), "model_b"),
        (lambda: interpolate(model, other, ce, data, buffers="b"), "buffers"),
        (lambda: interpolate(model, other, ce, data, ts=[]), "ts"),
        (lambda: shift_strength(model, lambda eta: other), "etas"),
        (lambda: shift_strength(model, {1.5: other}), "etas"),
        (lambda: mixed_dataset(data, data, 1.2), "eta"),
        (lambda: mixed_dataset(data, classification(8), 0.5), "size"),
        (lambda: save_npz({"loss": 1.0}, "x.npz"), "result"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=f"Invalid {name}"):
            call()
        assert_untouched(model, before)
