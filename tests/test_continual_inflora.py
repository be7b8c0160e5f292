"""InfLoRA: the designed A equals the top-r eigenvectors of the hand-computed projected covariance,
A ⟂ M, training task 2 leaves outputs on task-1 inputs unchanged, A is frozen then restored, and the
lifecycles without a fresh adapter per task are refused before anything changes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flatminima.continual.adapters import ContinualLoRA
from flatminima.continual.inflora import InfLoRA, design_down_projection
from flatminima.continual.projection import extend_basis
from flatminima.continual.strategy import TaskContext
from flatminima.lora import QKVLoRA

D = torch.float64


def context(model, batches, index=0, params=None):
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    return TaskContext(index=index, model=model, loss_fn=None, memory_loss_fn=None,
                       batches=lambda n: iter(batches if n is None else batches[:n]), parameters=params,
                       classes=[0], seen_classes=[0], seed=0, device=torch.device("cpu"))


def test_design_equals_top_eigenvectors_of_projected_covariance():
    rng = np.random.default_rng(0)
    H1, H2 = rng.standard_normal((6, 3)) @ rng.standard_normal((3, 20)), rng.standard_normal((6, 30))
    M = extend_basis(torch.tensor(H1 @ H1.T), None, 1.0)
    assert M.shape == (6, 3)
    A = design_down_projection(torch.tensor(H2 @ H2.T), M, 2).numpy()
    P = np.eye(6) - M.numpy() @ M.numpy().T
    values, vectors = np.linalg.eigh(P @ H2 @ H2.T @ P)
    U = vectors[:, ::-1][:, :2]
    assert values[-2] > 1e-3 * values[-1]  # a real gap: the subspace is well defined
    assert np.abs(A.T @ A - U @ U.T).max() < 1e-10  # same subspace, whatever the signs
    assert np.abs(A @ A.T - np.eye(2)).max() < 1e-12 and np.abs(A @ M.numpy()).max() < 1e-12
    # no memory: the top eigenvectors of H Hᵀ; a complement smaller than r: zero rows, still ⟂ M
    A0 = design_down_projection(torch.tensor(H2 @ H2.T), None, 2).numpy()
    U0 = np.linalg.eigh(H2 @ H2.T)[1][:, ::-1][:, :2]
    assert np.abs(A0.T @ A0 - U0 @ U0.T).max() < 1e-10
    M5 = torch.linalg.qr(torch.randn(6, 5, dtype=D)).Q
    A5 = design_down_projection(torch.tensor(H2 @ H2.T), M5, 3)
    assert (A5[1:] == 0).all() and (A5 @ M5).abs().max() < 1e-12 and abs(A5[0].norm() - 1) < 1e-12


def task_inputs(seed, dim=5, rank=2, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g, dtype=D) @ torch.randn(rank, dim, generator=g, dtype=D)


def train(model, params, x, steps=5, lr=0.5):
    opt = torch.optim.Adam(params, lr=lr)  # any optimizer: A x = 0 on old inputs whatever B does
    target = torch.randn(x.shape[0], 15, generator=torch.Generator().manual_seed(9), dtype=D)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - target).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("threshold", [0.999, 1.0])
def test_task_two_leaves_outputs_on_task_one_inputs_unchanged(threshold):
    torch.manual_seed(0)
    model = nn.Sequential(QKVLoRA(nn.Linear(5, 15).requires_grad_(False), r=2, alpha=4.0)).to(D)
    cl = ContinualLoRA(model, "seq-lora", reset=True, seed=1)
    inflora = InfLoRA(threshold=threshold, lifecycle=cl)
    x1, x2 = task_inputs(1), task_inputs(2, rank=3)
    lora = model[0]
    outputs = {}
    for task, x in enumerate((x1, x2)):
        cl.start_task(task)
        ctx = context(model, [(x[:8], None), (x[8:], None)], index=task)
        inflora.start_task(ctx)
        a = lora.linear_a_q.weight
        assert not a.requires_grad and lora.linear_b_q.weight.requires_grad
        assert torch.equal(lora.linear_b_q.weight, torch.zeros_like(a.T))
        assert torch.allclose(a @ a.T, torch.eye(2, dtype=D) / 3, atol=1e-12)  # rows of norm 1/√3
        assert torch.equal(a, lora.linear_a_v.weight)  # one input, one design for Q and V
        if task == 1:
            M = inflora.memory["0"]
            assert M.shape == (5, 2) and (a @ M).abs().max() < 1e-12 and (a @ x1.T).abs().max() < 1e-12
        train(model, [p for p in model.parameters() if p.requires_grad], x)
        inflora.end_task(ctx)
        assert a.requires_grad
        outputs[task] = model(x1).detach()
        cl.end_task()  # merge-then-reset: the function is kept
        assert (model(x1) - outputs[task]).abs().max() < 1e-12
    assert (outputs[1] - outputs[0]).abs().max() < 1e-10  # task 2 did not move task 1's outputs
    assert (model(x2) - model[0].qkv(x2)).abs().max() == 0.0  # B = 0 after the reset
    # the memory grew by GPM's criterion on task 2's inputs, counted by an explicit SVD here
    M1, R = inflora.memory["0"][:, :2].numpy(), x2.T.numpy()
    S = np.linalg.svd(R - M1 @ (M1.T @ R), compute_uv=False)
    kept, total = ((M1 @ (M1.T @ R)) ** 2).sum(), (R ** 2).sum()
    k = next(k for k in range(4) if kept + (S[:k] ** 2).sum() >= threshold * total or k == (S > 1e-9).sum())
    assert inflora.memory["0"].shape[1] == 2 + k and inflora.state()["zero_rows"] == 0


def test_inc_lora_designs_each_new_adapter_orthogonal_to_the_memory():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"])).to(D)
    cl = ContinualLoRA(model, "inc-lora", seed=0)
    inflora = InfLoRA(threshold=1.0, lifecycle=cl)
    x1, x2 = task_inputs(1), task_inputs(2)
    first = lambda x: model.base_model.model[0](x)  # noqa: E731  (the protected LoRA layer)
    for task, x in enumerate((x1, x2)):
        cl.start_task(task)
        ctx = context(model, [(x, None)], index=task)
        inflora.start_task(ctx)
        if task == 1:
            layer = model.base_model.model[0]
            a = layer.lora_A["task1"].weight
            assert (a @ inflora.memory["base_model.model.0"]).abs().max() < 1e-12 and not a.requires_grad
            before = first(x1).detach()
        params = [p for p in model.parameters() if p.requires_grad]
        assert all("lora_B" in n for n, p in model.named_parameters() if p.requires_grad)
        opt = torch.optim.SGD(params, lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        inflora.end_task(ctx)
        cl.end_task()
    assert (first(x1) - before).abs().max() < 1e-10


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()]


def same(model, snap):
    weights, grads = snap
    return all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items()) and \
        grads == [p.requires_grad for p in model.parameters()]


def test_refuses_lifecycles_without_a_fresh_adapter_before_changing_anything():
    torch.manual_seed(0)
    model = nn.Sequential(QKVLoRA(nn.Linear(5, 15).requires_grad_(False), r=2)).to(D)
    x = task_inputs(1)
    for lifecycle in (ContinualLoRA(model, "seq-lora"), ContinualLoRA(model, "finetune")):
        with pytest.raises(ValueError, match="^Invalid lifecycle: "):
            InfLoRA(lifecycle=lifecycle)
    with pytest.raises(ValueError, match="^Invalid lifecycle: "):
        InfLoRA(lifecycle="inc-lora")
    # finetune: the base weights train
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"^Invalid lifecycle: 'finetune"):
        InfLoRA().start_task(context(model, [(x, None)], params=list(model.parameters())))
    assert same(model, snap)
    # seq-lora without reset, found from the model at the second task
    cl, inflora = ContinualLoRA(model, "seq-lora"), InfLoRA()
    cl.start_task(0)
    inflora.start_task(context(model, [(x, None)]))
    inflora.end_task(context(model, [(x, None)]))
    cl.end_task()
    cl.start_task(1)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="^Invalid lifecycle: 'seq-lora without reset"):
        inflora.start_task(context(model, [(x, None)], index=1))
    assert same(model, snap)
    for kwargs, arg in (({"threshold": 0}, "threshold"), ({"threshold_increment": 2.0}, "threshold_increment"),
                        ({"n_batches": 0}, "n_batches"), ({"a_scale": 0.0}, "a_scale"),
                        ({"a_scale": math.inf}, "a_scale")):
        with pytest.raises(ValueError, match=rf"^Invalid {arg}: "):
            InfLoRA(**kwargs)


def test_refuses_o_lora():
    peft = pytest.importorskip("peft")
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"])).to(D)
    with pytest.raises(ValueError, match="^Invalid lifecycle: 'o-lora'"):
        InfLoRA(lifecycle=ContinualLoRA(model, "o-lora"))
