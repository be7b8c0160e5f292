"""SAF and MESA trajectory losses against hand computations in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.trajectory import MESA, SAF, IndexedDataset, trajectory_kl

TAU = 2.0


def hand_kl(teacher: list[float], student: list[float], tau: float) -> float:
    """``τ²·Σ_c p_c·log(p_c/q_c)`` with ``p = softmax(teacher/τ)``, ``q = softmax(student/τ)``, in plain Python."""
    ep = [math.exp(t / tau) for t in teacher]
    eq = [math.exp(s / tau) for s in student]
    p = [e / sum(ep) for e in ep]
    q = [e / sum(eq) for e in eq]
    return tau * tau * sum(pc * math.log(pc / qc) for pc, qc in zip(p, q))


def test_trajectory_kl_matches_hand_and_official_form():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    kl = trajectory_kl(z, y, TAU)
    assert kl.dtype == torch.float64 and kl.shape == (4,)
    for i in range(4):
        assert kl[i].item() == pytest.approx(hand_kl(y[i].tolist(), z[i].tolist(), TAU), rel=1e-12)
    # The official code's expression (F.kl_div(log q, p), summed over classes, × τ²).
    official = F.kl_div(F.log_softmax(z / TAU, dim=1), F.softmax(y / TAU, dim=1), reduction="none").sum(-1) * TAU**2
    torch.testing.assert_close(kl, official, rtol=1e-12, atol=1e-14)
    assert torch.all(trajectory_kl(z, z, TAU).abs() < 1e-12)


def _saf(**kw):
    args = dict(epochs_ago=2, temperature=TAU, weight=0.5, start_epoch=0, dtype=torch.float64)
    args.update(kw)
    return SAF(6, 3, **args)


def test_saf_term_history_and_routing():
    saf = _saf()
    g = torch.Generator().manual_seed(1)
    e0 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    # Epochs 0 and 1: no record from E = 2 epochs before yet.
    assert saf(e0, torch.tensor([4, 1]), 0).item() == 0.0
    assert saf(torch.randn(2, 3, generator=g, dtype=torch.float64), torch.tensor([1, 4]), 1).item() == 0.0
    # Epoch 2 reads epoch 0's rows by sample index (here in another order); sample 0 has none.
    z = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    term = saf(z, torch.tensor([1, 4, 0]), 2)
    expected = 0.5 / 3 * (hand_kl(e0[1].tolist(), z[0].tolist(), TAU) + hand_kl(e0[0].tolist(), z[1].tolist(), TAU))
    assert term.item() == pytest.approx(expected, rel=1e-12)
    # Gradient: λ/|B|·τ·(q − p) for the rows with a record, 0 for the others.
    term.backward()
    p = torch.softmax(e0[[1, 0]] / TAU, 1)
    q = torch.softmax(z.detach()[:2] / TAU, 1)
    torch.testing.assert_close(z.grad[:2], 0.5 / 3 * TAU * (q - p), rtol=1e-10, atol=1e-14)
    assert torch.all(z.grad[2] == 0)
    # The epoch-2 logits replaced epoch 0's rows in the same table (slot 2 mod 2 = 0).
    torch.testing.assert_close(saf.outputs[0, [1, 4, 0]], z.detach())
    assert saf.recorded_epoch[0, [1, 4, 0]].tolist() == [2, 2, 2]
    assert saf.recorded_epoch[1, [1, 4]].tolist() == [1, 1] and saf.recorded_epoch[:, [2, 3, 5]].eq(-1).all()


def test_saf_memory_is_e_tables_in_the_compact_dtype():
    saf = SAF(100, 10, epochs_ago=3)
    assert saf.outputs.shape == (3, 100, 10) and saf.outputs.dtype == torch.float16
    assert saf.outputs.numel() == 3 * 100 * 10
    assert saf.recorded_epoch.numel() == 3 * 100 and saf.recorded_epoch.dtype == torch.int32
    assert saf.memory_bytes == 3 * 100 * (10 * 2 + 4)
    assert set(saf.state_dict()) == {"outputs", "recorded_epoch"}
    assert SAF(100, 10, epochs_ago=2, dtype=torch.bfloat16).memory_bytes == 2 * 100 * (10 * 2 + 4)


def test_saf_half_precision_table_is_the_target():
    saf = SAF(4, 3, epochs_ago=1, temperature=TAU, weight=1.0, start_epoch=0)  # float16 tables
    g = torch.Generator().manual_seed(2)
    old = torch.randn(4, 3, generator=g, dtype=torch.float64) * 3
    saf(old, torch.arange(4), 0)
    z = torch.randn(4, 3, generator=g, dtype=torch.float64)
    rounded = old.half().double()
    expected = sum(hand_kl(rounded[i].tolist(), z[i].tolist(), TAU) for i in range(4)) / 4
    assert saf(z, torch.arange(4), 1).item() == pytest.approx(expected, rel=1e-12)


def test_saf_zero_outside_start_end_and_recording_window():
    saf = _saf(start_epoch=3, end_epoch=5, epochs_ago=1)
    z = torch.randn(6, 3, dtype=torch.float64)
    idx = torch.arange(6)
    # (logits scaled, not shifted: a shift leaves the softmax as it is)
    for epoch in range(3):
        assert saf(z * (epoch + 1), idx, epoch).item() == 0.0  # history exists from epoch 1, term off until 3
    assert saf(z * 4, idx, 3).item() > 0  # reads epoch 2
    assert saf(z, idx, 4).item() > 0  # reads epoch 3 (epoch 4's record would only serve epoch 5)
    assert saf.recorded_epoch.eq(3).all()
    assert saf(z, idx, 5).item() == 0.0 and saf(z, idx, 6).item() == 0.0


def test_saf_repeated_sample_in_an_epoch_gets_no_stale_target():
    saf = _saf(epochs_ago=1)
    saf(torch.randn(1, 3, dtype=torch.float64), torch.tensor([2]), 0)
    assert saf(torch.randn(1, 3, dtype=torch.float64), torch.tensor([2]), 1).item() > 0
    # Drawn again in epoch 1 (sampling with replacement): epoch 0's record is gone.
    assert saf(torch.randn(1, 3, dtype=torch.float64), torch.tensor([2]), 1).item() == 0.0


def test_saf_rejects_bad_configuration_and_inputs():
    bad = [dict(epochs_ago=0), dict(temperature=0.0), dict(temperature=float("inf")), dict(weight=-1.0),
           dict(start_epoch=-1), dict(start_epoch=3, end_epoch=3), dict(dtype=torch.int8)]
    for kw in bad:
        with pytest.raises(ValueError, match="Invalid"):
            _saf(**kw)
    with pytest.raises(ValueError, match="num_classes"):
        SAF(10, 1)
    with pytest.raises(ValueError, match="num_samples"):
        SAF(0, 3)
    saf = _saf()
    z = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="indices"):
        saf(z, torch.tensor([0, 6]), 0)
    with pytest.raises(ValueError, match="indices"):
        saf(z, torch.tensor([0.0, 1.0]), 0)
    with pytest.raises(ValueError, match="indices"):
        saf(z, torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="logits"):
        saf(torch.zeros(2, 4), torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="epoch"):
        saf(z, torch.tensor([0, 1]), -1)


def test_indexed_dataset_gives_loader_indices():
    data = torch.utils.data.TensorDataset(torch.arange(10.0).view(5, 2), torch.arange(5))
    loader = torch.utils.data.DataLoader(IndexedDataset(data), batch_size=2, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    seen = []
    for indices, (x, y) in loader:
        assert torch.equal(y, indices) and torch.equal(x[:, 0], 2.0 * indices)
        seen += indices.tolist()
    assert sorted(seen) == list(range(5))
    with pytest.raises(ValueError, match="dataset"):
        IndexedDataset(42)


# ---------------------------------------------------------------------------------------------
# MESA


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()


def _float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def test_mesa_ema_follows_the_recursion_and_kl_matches_hand():
    model = _net()
    beta = 0.8
    mesa = MESA(model, decay=beta, temperature=TAU, weight=0.7, start_epoch=1)
    v = _float_state(model)  # v_0 = θ_0
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    g = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(3):
        x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        mesa.update()
        theta = _float_state(model)
        v = {k: beta * v[k] + (1 - beta) * theta[k] for k in v}
    ema = _float_state(mesa.teacher)
    assert set(ema) == set(v)  # parameters and BatchNorm statistics
    for k in v:
        torch.testing.assert_close(ema[k], v[k], rtol=1e-12, atol=1e-14)
    assert not any(p.requires_grad for p in mesa.parameters())

    # The teacher, built by hand from v, in eval mode.
    teacher = copy.deepcopy(model)
    teacher.load_state_dict({**model.state_dict(), **v})
    teacher.eval()
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    logits = model(x)
    target = teacher(x)
    term = mesa(logits, x, epoch=1)
    expected = 0.7 * sum(hand_kl(target[i].tolist(), logits[i].tolist(), TAU) for i in range(5)) / 5
    assert term.item() == pytest.approx(expected, rel=1e-12)
    term.backward()  # differentiable in the student's logits only
    assert model[0].weight.grad is not None
    assert model.training and mesa.teacher.training is False  # nobody's mode changed
    assert mesa(logits.detach(), teacher_logits=target, epoch=1).item() == pytest.approx(expected, rel=1e-12)
    assert "ema.module.0.weight" in mesa.state_dict() and not any(k.startswith("_student") for k in mesa.state_dict())


def test_mesa_is_zero_outside_its_epochs_without_running_the_teacher():
    model = _net()
    mesa = MESA(model, start_epoch=2, end_epoch=4)
    calls = []
    mesa.teacher.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 4, dtype=torch.float64)
    logits = model(x)
    assert mesa(logits, x, 1).item() == 0.0 and mesa(logits, x, 4).item() == 0.0 and not calls
    assert mesa(logits, x, 3).item() > 0 and calls == [1]


def test_mesa_custom_forward_and_bad_configuration():
    model = _net()
    mesa = MESA(model, start_epoch=0, forward=lambda m, batch: m(batch["x"]))
    x = torch.randn(3, 4, dtype=torch.float64)
    assert mesa(model(x), {"x": x}, 0).item() >= 0
    for kw in [dict(decay=1.0), dict(decay=-0.1), dict(temperature=-1.0), dict(weight=-0.5),
               dict(start_epoch=2, end_epoch=1), dict(forward=3)]:
        with pytest.raises(ValueError, match="Invalid"):
            MESA(model, **kw)
    with pytest.raises(ValueError, match="model"):
        MESA(torch.zeros(3))
    logits = model(x)
    with pytest.raises(ValueError, match="exactly one"):
        mesa(logits, x, 0, teacher_logits=logits.detach())
    with pytest.raises(ValueError, match="exactly one"):
        mesa(logits, None, 0)
    with pytest.raises(ValueError, match="teacher logits"):
        mesa(logits, teacher_logits=logits[:2].detach(), epoch=0)
