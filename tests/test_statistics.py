"""Per-step statistics the methods record (opt.track_statistics): closed forms on a quadratic."""

from __future__ import annotations

import pytest
import torch
from helpers import Quadratic
from torch import nn

import flatminima as fm


def _sam_by_hand(q: Quadratic, rho: float):
    x = q.flat().detach()
    g = q.A @ x
    eps = rho * g / g.norm()
    gp = q.A @ (x + eps)
    return {"clean_loss": 0.5 * x @ q.A @ x, "perturbed_loss": 0.5 * (x + eps) @ q.A @ (x + eps),
            "grad_norm": g.norm(), "perturbed_grad_norm": gp.norm(), "eps_norm": eps.norm(),
            "cosine": g @ gp / (g.norm() * gp.norm())}


@pytest.mark.parametrize("form", ["closure", "train_step", "explicit"])
def test_sam_statistics_match_the_closed_form(form):
    q = Quadratic()
    opt = fm.SAM(torch.optim.SGD(q.parameters(), lr=0.1), rho=0.3)
    opt.track_statistics()
    for _ in range(3):
        want = _sam_by_hand(q, 0.3)
        step = opt.step_count
        if form == "closure":
            opt.step(q.closure())
        elif form == "train_step":
            fm.TrainStep(q, opt, lambda m, b: m())([None])
        else:
            opt.zero_grad()
            q().backward()
            with opt.perturbed():
                q().backward()
            opt.step()
        stats = opt.statistics
        assert stats["step"] == step
        keys = ["grad_norm", "perturbed_grad_norm", "eps_norm", "cosine"]
        if form != "explicit":  # the explicit form runs the passes itself: no losses reach the method
            keys += ["clean_loss", "perturbed_loss"]
            torch.testing.assert_close(stats["sharpness"], want["perturbed_loss"] - want["clean_loss"], rtol=1e-12, atol=0)
        for key in keys:
            torch.testing.assert_close(stats[key].double(), want[key], rtol=1e-6 if key == "cosine" else 1e-12,
                                       atol=0, msg=key)


def test_rwp_statistics_have_no_clean_pass_and_the_noise_norm():
    q = Quadratic()
    opt = fm.RWP(torch.optim.SGD(q.parameters(), lr=0.0), sigma=0.1, noise="uniform")
    opt.track_statistics()
    opt.step(q.closure())
    stats = opt.statistics
    assert "clean_loss" not in stats and "sharpness" not in stats and "cosine" not in stats
    # the step counter has moved on: regenerate the noise of step 0
    opt._step = 0
    eps = torch.cat([e.flatten() for e in opt.perturbation.noise(opt, list(q.parameters()), [0, 0])])
    torch.testing.assert_close(stats["eps_norm"], eps.norm(), rtol=1e-12, atol=0)
    x = q.flat().detach()
    torch.testing.assert_close(stats["perturbed_loss"], 0.5 * (x + eps) @ q.A @ (x + eps), rtol=1e-12, atol=0)


@pytest.mark.parametrize("start, chosen", [(0.0, "clean"), (1.0, "candidate")])
def test_random_search_records_the_norm_of_the_point_it_descends_from(start, chosen):
    """At the top of a concave bump every candidate on the ρ-sphere has a lower loss than w, so the
    search descends from w itself (‖ε‖ = 0); on the convex side from a candidate (‖ε‖ = ρ)."""
    w = nn.Parameter(torch.full((3,), start, dtype=torch.float64))

    def closure(backward=True):
        loss = (w ** 4 - w ** 2).sum()
        if backward:
            loss.backward()
        return loss

    opt = fm.RandomSearchSAM(torch.optim.SGD([w], lr=0.1), rho=0.1, candidates=3)
    opt.track_statistics()
    opt.step(closure)
    want = 0.0 if chosen == "clean" else 0.1
    torch.testing.assert_close(opt.statistics["eps_norm"], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    assert (opt.statistics["perturbed_loss"] == opt.statistics["clean_loss"]) == (chosen == "clean")


def test_statistics_are_off_by_default_and_a_skipped_trigger_has_no_perturbed_pass():
    q = Quadratic()
    opt = fm.SAM(torch.optim.SGD(q.parameters(), lr=0.1), rho=0.3)
    opt.step(q.closure())
    assert opt.statistics == {}
    opt = fm.LookSAM(torch.optim.SGD(q.parameters(), lr=0.1), rho=0.3, k=2)
    opt.track_statistics(cosine=False)
    opt.step(q.closure())
    assert {"perturbed_loss", "eps_norm"} <= set(opt.statistics) and "cosine" not in opt.statistics
    opt.step(q.closure())  # LookSAM's off step: the clean pass only
    assert "perturbed_loss" not in opt.statistics and "clean_loss" in opt.statistics
    with pytest.raises(ValueError, match="enabled"):
        opt.track_statistics("yes")


def test_tracking_does_not_change_the_steps():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    for i, net in enumerate(nets):
        opt = fm.GASAM(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), epsilon=0.05, steps=2)
        if i:
            opt.track_statistics()
        for _ in range(3):
            fm.TrainStep(net, opt, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))([(x, y)])
    for a, b in zip(*(net.parameters() for net in nets)):
        assert torch.equal(a, b)


def test_training_log_records_per_layer_norms_and_statistics(tmp_path):
    from flatminima.diagnostics import TrainingLog
    from flatminima.diagnostics.plots import plot_training_log

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    opt = fm.SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=0.05)
    opt.track_statistics()
    log = TrainingLog(net, every=2)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    for step in range(5):
        fm.TrainStep(net, opt, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))([(x, y)])
        recorded = log.record(step, opt)
        assert recorded == (step % 2 == 0)
        if recorded:
            want = [torch.cat([p.grad.flatten() for p in layer.parameters()]).norm().item() for layer in (net[0], net[2])]
            assert log.grad_norms[-1] == pytest.approx(want, rel=1e-12)
            assert log.statistics["sharpness"][-1] == pytest.approx(float(opt.statistics["sharpness"]), rel=1e-12)
    assert log.steps == [0, 2, 4] and log.layer_names == ["0", "2"]
    saved = log.save(tmp_path / "log.json")
    assert saved.exists()
    png = plot_training_log(log, tmp_path / "log.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="every"):
        TrainingLog(net, every=0)
