"""EWC and LwF against hand computations on softmax regression in float64: Fisher from the closed-form
per-sample gradient (p − e_y)xᵀ, penalty values and gradients of the per-task sum and of online EWC,
the true Fisher's seeded labels, EWC on a PEFT LoRA update ΔW = s·BA, LwF's distillation term and
its one old forward per step under SAM, and bad options refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima as fm
from flatminima.continual.regularizers import EWC, FISHER_STREAM, LwF, loss_support, squared_gradients
from flatminima.continual.strategy import BASELINES, TaskContext, make_baselines
from flatminima.core.schedules import derive_seed
from flatminima.data import take
from flatminima.engine import TrainStep

D, C = torch.float64, 3


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def masked_ce(classes):
    def loss_fn(model, batch):
        x, y = batch
        out = model(x)
        mask = torch.full((out.shape[-1],), float("-inf"), dtype=out.dtype)
        mask[list(classes)] = 0.0
        return F.cross_entropy(out + mask, y)
    return loss_fn


def data(seed, n=10, dim=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=D), torch.randint(0, C, (n,), generator=g)


def context(model, x, y, index=0, batch=4, loss_fn=ce, params=None, seen=(0, 1, 2)):
    batches = [(take(x, slice(i, i + batch)), y[i:i + batch]) for i in range(0, len(y), batch)]
    return TaskContext(index=index, model=model, loss_fn=loss_fn, memory_loss_fn=loss_fn,
                       batches=lambda n: iter(batches if n is None else batches[:n]),
                       parameters=list(model.parameters()) if params is None else params,
                       classes=list(seen), seen_classes=list(seen), seed=0, device=torch.device("cpu"))


def linear(seed=0, dim=2):
    torch.manual_seed(seed)
    return nn.Linear(dim, C).to(D)


def hand_fisher(model, x, y, allowed=None):
    """(1/N)Σ_i g_i² from g_W = (p − e_y)xᵀ, g_b = p − e_y (softmax over ``allowed``), sample by sample."""
    fw, fb = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    with torch.no_grad():
        for xi, yi in zip(x, y):
            z = model.weight @ xi + model.bias
            if allowed is not None:
                z = z + torch.tensor([0.0 if c in allowed else float("-inf") for c in range(C)], dtype=D)
            r = torch.softmax(z, 0) - F.one_hot(yi, C).to(D)
            fw += torch.outer(r, xi) ** 2
            fb += r ** 2
    return fw / len(y), fb / len(y)


def test_registered_and_built_by_strategy():
    assert {"ewc", "lwf"} <= set(BASELINES.names())
    built = make_baselines("seq-lora+ewc+lwf", {"ewc": {"weight": 3.0}, "lwf": {"temperature": 4.0}},
                           model=nn.Linear(1, 1), seed=5)
    assert isinstance(built[0], EWC) and built[0].weight == 3.0 and built[0].seed == 5
    assert isinstance(built[1], LwF) and built[1].temperature == 4.0


@pytest.mark.parametrize("per_sample", ["vmap", "loop"])
def test_empirical_fisher_matches_per_sample_closed_form(per_sample):
    model = linear()
    x, y = data(1)
    ewc = EWC(per_sample=per_sample, samples=None, chunk=3)
    ewc.end_task(context(model, x, y))
    fw, fb = hand_fisher(model, x, y)
    (w, rw, mw, cw), (b, rb, mb, cb) = ewc._tensors.values()
    assert w is model.weight and b is model.bias and cw == cb == 0.0
    torch.testing.assert_close(rw.square(), fw, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(rb.square(), fb, rtol=1e-12, atol=1e-15)
    assert torch.equal(mw, model.weight.detach()) and ewc.sample_counts == [10]


def test_samples_and_batches_budget():
    model = linear()
    x, y = data(1)
    for kwargs, n in (({"samples": 5}, 5), ({"samples": None, "n_batches": 2}, 8), ({"samples": 6, "n_batches": 1}, 4)):
        ewc = EWC(**kwargs)
        ewc.end_task(context(model, x, y))
        fw, _ = hand_fisher(model, x[:n], y[:n])
        torch.testing.assert_close(next(iter(ewc._tensors.values()))[1].square(), fw, rtol=1e-12, atol=1e-15)
        assert ewc.sample_counts == [n]


def test_true_fisher_draws_seeded_labels_from_the_masked_predictive():
    model = linear()
    x, y = data(1)
    ewc = EWC(fisher="true", samples=None, seed=3)
    ewc.end_task(context(model, x, y, index=2, loss_fn=masked_ce([0, 2])))
    # the same draws by hand: one multinomial per batch from the float32 masked softmax
    gen = torch.Generator().manual_seed(derive_seed(3, 2, FISHER_STREAM))
    mask = torch.tensor([0.0, float("-inf"), 0.0])
    labels = []
    with torch.no_grad():
        for i in range(0, 10, 4):
            probs = torch.softmax(model(x[i:i + 4]).float() + mask, -1)
            labels.append(torch.multinomial(probs, 1, generator=gen).squeeze(1))
    sampled = torch.cat(labels)
    assert not (sampled == 1).any()
    fw, fb = hand_fisher(model, x, sampled, allowed={0, 2})
    blocks = list(ewc._tensors.values())
    torch.testing.assert_close(blocks[0][1].square(), fw, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(blocks[1][1].square(), fb, rtol=1e-12, atol=1e-15)
    empirical = EWC(samples=None)
    empirical.end_task(context(model, x, sampled, loss_fn=masked_ce([0, 2])))
    torch.testing.assert_close(list(empirical._tensors.values())[0][1], blocks[0][1], rtol=1e-12, atol=1e-15)
    assert torch.equal(loss_support(masked_ce([0, 2]), 3, torch.device("cpu")), torch.tensor([True, False, True]))


def test_true_fisher_converges_to_the_expected_fisher():
    """Σ_c p_c (p − e_c)²x² over many draws: within 6 standard errors of the sample mean."""
    model = linear()
    x = data(2, n=1)[0].repeat(4000, 1)
    ewc = EWC(fisher="true", samples=None, chunk=500)
    ewc.end_task(context(model, x, torch.zeros(4000, dtype=torch.long), batch=500))
    with torch.no_grad():
        p = torch.softmax(model(x[:1])[0], 0)
    per_label = torch.stack([(p - F.one_hot(torch.tensor(c), C).to(D)) ** 2 for c in range(C)])  # bias block
    mean = (p[:, None] * per_label).sum(0)
    sd = ((p[:, None] * per_label ** 2).sum(0) - mean ** 2).sqrt() / 4000 ** 0.5
    got = list(ewc._tensors.values())[1][1].square()
    assert ((got - mean).abs() <= 6 * sd).all(), (got, mean, sd)


def two_tasks(online=False, decay=1.0, weight=2.0):
    model = linear()
    ewc = EWC(weight, online=online, decay=decay, samples=None)
    xa, ya = data(1)
    ewc.end_task(context(model, xa, ya, index=0))
    fa = hand_fisher(model, xa, ya)
    star_a = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=D))
    xb, yb = data(2)
    ewc.start_task(context(model, xb, yb, index=1))
    ewc.end_task(context(model, xb, yb, index=1))
    fb = hand_fisher(model, xb, yb)
    star_b = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(8), dtype=D))
    return model, ewc, fa, star_a, fb, star_b


def test_classic_penalty_is_the_sum_over_tasks():
    model, ewc, fa, star_a, fb, star_b = two_tasks()
    params = list(model.parameters())
    want = sum((f * (p - s) ** 2).sum() for fs, ss in ((fa, star_a), (fb, star_b)) for f, p, s in zip(fs, params, ss))
    value = ewc.penalty(model)
    torch.testing.assert_close(value, 0.5 * 2.0 * want.detach(), rtol=1e-12, atol=0)
    grads = torch.autograd.grad(value, params)
    for i, g in enumerate(grads):
        hand = 2.0 * (fa[i] * (params[i] - star_a[i]) + fb[i] * (params[i] - star_b[i]))
        torch.testing.assert_close(g, hand.detach(), rtol=1e-12, atol=1e-15)
    assert ewc.state() == {"tasks": 2, "samples": [10, 10], "tensors": 2, "updates": 0}


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_online_penalty_decays_the_fisher_and_keeps_one_anchor(decay):
    model, ewc, fa, _, fb, star_b = two_tasks(online=True, decay=decay)
    params = list(model.parameters())
    value = ewc.penalty(model)
    fisher = [decay * a + b for a, b in zip(fa, fb)]
    want = sum((f * (p - s) ** 2).sum() for f, p, s in zip(fisher, params, star_b))
    torch.testing.assert_close(value, want.detach(), rtol=1e-12, atol=0)
    for g, f, p, s in zip(torch.autograd.grad(value, params), fisher, params, star_b):
        torch.testing.assert_close(g, (2.0 * f * (p - s)).detach(), rtol=1e-12, atol=1e-15)


def zero(value):
    return value.dim() == 0 and float(value) == 0.0 and not value.requires_grad and value.dtype == D


def test_penalty_skips_frozen_tensors_and_is_zero_before_a_task():
    model, ewc, fa, star_a, fb, star_b = two_tasks()
    assert zero(EWC().penalty(model))
    model.weight.requires_grad_(False)
    value = ewc.penalty(model)
    b = model.bias
    want = (fa[1] * (b - star_a[1]) ** 2 + fb[1] * (b - star_b[1]) ** 2).sum()
    torch.testing.assert_close(value, want.detach(), rtol=1e-12, atol=0)
    model.bias.requires_grad_(False)
    assert zero(ewc.penalty(model))


@pytest.mark.parametrize("normalize", ["max", "mean"])
def test_normalized_fisher(normalize):
    model = linear()
    x, y = data(1)
    ewc = EWC(normalize=normalize, samples=None)
    ewc.end_task(context(model, x, y))
    for block, f in zip(ewc._tensors.values(), hand_fisher(model, x, y)):
        scale = f.max() if normalize == "max" else f.mean()
        torch.testing.assert_close(block[1].square(), f / scale, rtol=1e-12, atol=1e-15)


def lora_model(seed=0):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0"], lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(nn.Sequential(nn.Linear(3, C)), config).to(D)


def factors(model, name="default"):
    layer = model.base_model.model[0]
    return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name], layer.base_layer


@pytest.mark.parametrize("normalize", [None, "max"])
def test_update_space_on_a_peft_lora_layer(normalize):
    model = lora_model()
    a, b, s, base = factors(model)
    x, y = data(3, dim=3)
    ewc = EWC(1.5, space="update", normalize=normalize, samples=None)
    ewc.end_task(context(model, x, y, params=[a, b]))
    star = (s * b @ a).detach().clone()
    # ∂L/∂ΔW = ∂L/∂W with W = W0 + sBA: the softmax regression's (p − e_y)xᵀ on the merged weight
    merged = nn.Linear(3, C).to(D)
    with torch.no_grad():
        merged.weight.copy_(base.weight + star)
        merged.bias.copy_(base.bias)
    fisher = hand_fisher(merged, x, y)[0]
    if normalize:
        fisher = fisher / fisher.max()
    (root, mean, const), = ewc._updates.values()
    torch.testing.assert_close(root.square(), fisher, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(mean, star, rtol=1e-12, atol=1e-15)
    assert ewc._tensors == {}  # the factors are seen through ΔW only
    with torch.no_grad():
        a.add_(0.1)
        b.sub_(0.2)
    delta = s * b @ a - star
    value = ewc.penalty(model)
    torch.testing.assert_close(value, (0.75 * (fisher * delta ** 2).sum()).detach(), rtol=1e-12, atol=0)
    ga, gb = torch.autograd.grad(value, [a, b])
    torch.testing.assert_close(gb, (1.5 * s * (fisher * delta) @ a.T).detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ga, (1.5 * s * b.T @ (fisher * delta)).detach(), rtol=1e-12, atol=1e-15)


def test_update_space_sees_a_new_inc_lora_adapter_through_the_sum():
    from flatminima.continual.adapters import ContinualLoRA

    peft = pytest.importorskip("peft")
    model = lora_model()
    config = peft.LoraConfig(r=1, lora_alpha=2, target_modules=["0"], lora_dropout=0.0, init_lora_weights=False)
    cl = ContinualLoRA(model, "inc-lora", config=config, seed=4)
    ewc = EWC(space="update", samples=None)
    x, y = data(3, dim=3)
    cl.start_task(0)
    ewc.start_task(context(model, x, y, params=cl.trainable_parameters()))
    ewc.end_task(context(model, x, y, params=cl.trainable_parameters()))
    (root, _, _), = ewc._updates.values()
    cl.end_task()
    cl.start_task(1)
    ewc.start_task(context(model, x, y, index=1, params=cl.trainable_parameters()))
    a1, b1, s1, _ = factors(model, "task1")
    value = ewc.penalty(model)
    want = 0.5 * (root.square() * (s1 * b1 @ a1) ** 2).sum()
    torch.testing.assert_close(value, want.detach(), rtol=1e-12, atol=0)
    grads = torch.autograd.grad(value, cl.trainable_parameters())
    assert all(g.abs().sum() > 0 for g in grads)


def test_fisher_restores_modes_and_requires_grad():
    model = nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.5), nn.BatchNorm1d(4), nn.Linear(4, C)).to(D)
    model[2].eval()
    flags = [m.training for m in model.modules()]
    x, y = data(1)
    stats = model[2].running_mean.clone()
    rng = torch.get_rng_state()
    EWC(fisher="true").end_task(context(model, x, y))
    assert [m.training for m in model.modules()] == flags
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    assert torch.equal(model[2].running_mean, stats) and torch.equal(torch.get_rng_state(), rng)


def test_squared_gradients_of_frozen_tensors():
    model = linear()
    model.weight.requires_grad_(False)
    x, y = data(1)
    total, n = squared_gradients(model, ce, ["weight"], [(x, y)], labels="empirical", samples=None, chunk=4,
                                 per_sample="vmap", seed=0)
    torch.testing.assert_close(total["weight"] / n, hand_fisher(model, x, y)[0], rtol=1e-12, atol=1e-15)
    assert not model.weight.requires_grad


@pytest.mark.parametrize("kwargs, word", [({"weight": -1.0}, "weight"), ({"fisher": "fake"}, "fisher"),
                                          ({"online": 1}, "online"), ({"decay": 1.5}, "decay"),
                                          ({"space": "delta"}, "space"), ({"normalize": "sum"}, "normalize"),
                                          ({"samples": 0}, "samples"), ({"n_batches": 0}, "n_batches"),
                                          ({"chunk": 0}, "chunk"), ({"per_sample": "jit"}, "per_sample"),
                                          ({"seed": -1}, "seed")])
def test_ewc_options_are_checked(kwargs, word):
    with pytest.raises(ValueError, match=f"Invalid {word}"):
        EWC(**kwargs)


def test_ewc_refuses_tensors_outside_the_model():
    model = linear()
    x, y = data(1)
    with pytest.raises(ValueError, match="Invalid context.parameters"):
        EWC().end_task(context(model, x, y, params=[nn.Parameter(torch.zeros(2))]))


# ---------------------------------------------------------------------------------------------- LwF

class Counted(nn.Linear):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def lwf_setup(weight=0.7, temperature=2.0):
    torch.manual_seed(0)
    model = Counted(2, C).to(D)
    lwf = LwF(weight, temperature)
    x, y = data(1)
    lwf.end_task(context(model, x, y, seen=(0, 1)))
    old = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.weight.add_(0.5)
    return model, lwf, old


def test_lwf_loss_matches_the_hand_formula():
    model, lwf, old = lwf_setup()
    x, y = data(4)
    logits = model(x)
    base = F.cross_entropy(logits, y)
    got = lwf.loss(model, (x, y), logits, base)
    with torch.no_grad():
        z_old = (x @ old["weight"].T + old["bias"])[:, :2] / 2.0
        z_new = logits.detach()[:, :2] / 2.0
        p = torch.softmax(z_old, 1)
        kl = (p * (torch.log(p) - torch.log_softmax(z_new, 1))).sum(1).mean()
    torch.testing.assert_close(got, (base + 0.7 * 4.0 * kl).detach(), rtol=1e-12, atol=0)
    assert got.requires_grad and lwf.state() == {"old_classes": 2}
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not lwf.old.training and not any(p.requires_grad for p in lwf.old.parameters())
    fresh = LwF()
    assert fresh.loss(model, (x, y), logits, base) is base  # no past task: the loss unchanged


def test_lwf_runs_the_old_forward_once_per_step_under_sam():
    model, lwf, _ = lwf_setup()

    def loss_fn(m, batch):
        logits = m(batch[0])
        return lwf.loss(m, batch, logits, F.cross_entropy(logits, batch[1]))

    opt = fm.methods.create("sam", torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    step = TrainStep(model, opt, loss_fn)
    Counted.calls = 0
    for k in range(3):
        step([data(10 + k)])
        assert Counted.calls == 2 * (k + 1) + (k + 1)  # two live passes, one old forward per step
    with pytest.raises(ValueError, match="Invalid temperature"):
        LwF(temperature=0.0)
    with pytest.raises(ValueError, match="Invalid weight"):
        LwF(weight=-0.1)


def test_ewc_in_a_sam_step_matches_a_hand_step():
    model, ewc, fa, star_a, fb, star_b = two_tasks(weight=0.5)
    params = list(model.parameters())
    x, y = data(5)
    w0 = [p.detach().clone() for p in params]

    def objective(ps):
        out = x @ ps[0].T + ps[1]
        pen = sum(((fa[i] * (ps[i] - star_a[i]) ** 2).sum() + (fb[i] * (ps[i] - star_b[i]) ** 2).sum()) for i in range(2))
        return F.cross_entropy(out, y) + 0.25 * pen

    leaves = [w.clone().requires_grad_() for w in w0]
    g = torch.autograd.grad(objective(leaves), leaves)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    pert = [(w + 0.05 * t / norm).requires_grad_() for w, t in zip(w0, g)]
    g2 = torch.autograd.grad(objective(pert), pert)
    want = [w - 0.1 * t for w, t in zip(w0, g2)]
    opt = fm.methods.create("sam", torch.optim.SGD(params, lr=0.1), rho=0.05)
    TrainStep(model, opt, ce, regularizer=ewc.penalty)([(x, y)])
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


def test_ewc_at_the_clean_weights_in_a_sam_step_matches_a_hand_step():
    """regularizer_at="clean": ε from ∇L(w) alone, descent ∇L(w + ε) + ∇R(w)."""
    model, ewc, fa, star_a, fb, star_b = two_tasks(weight=0.5)
    params = list(model.parameters())
    x, y = data(5)
    w0 = [p.detach().clone() for p in params]

    def loss(ps):
        return F.cross_entropy(x @ ps[0].T + ps[1], y)

    leaves = [w.clone().requires_grad_() for w in w0]
    g = torch.autograd.grad(loss(leaves), leaves)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    pert = [(w + 0.05 * t / norm).requires_grad_() for w, t in zip(w0, g)]
    g2 = torch.autograd.grad(loss(pert), pert)
    reg = [0.5 * (fa[i] * (w0[i] - star_a[i]) + fb[i] * (w0[i] - star_b[i])) for i in range(2)]
    want = [w - 0.1 * (t + r) for w, t, r in zip(w0, g2, reg)]
    opt = fm.methods.create("sam", torch.optim.SGD(params, lr=0.1), rho=0.05)
    TrainStep(model, opt, ce, regularizer=ewc.penalty, regularizer_at="clean")([(x, y)])
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)
    fresh, twin = linear(), linear()  # task 0: the zero penalty leaves the step a plain SAM step
    TrainStep(fresh, fm.methods.create("sam", torch.optim.SGD(fresh.parameters(), lr=0.1), rho=0.05), ce,
              regularizer=EWC().penalty, regularizer_at="clean")([(x, y)])
    TrainStep(twin, fm.methods.create("sam", torch.optim.SGD(twin.parameters(), lr=0.1), rho=0.05), ce)([(x, y)])
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), twin.parameters()))


class Tokens(nn.Module):
    """A text classifier called as model(**inputs): mean of the unmasked token embeddings, then a head."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(7, 2), nn.Linear(2, C)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        return self.head((self.embed(input_ids) * m).sum(1) / m.sum(1))


def token_batch(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(4) < torch.randint(1, 5, (n, 1), generator=g)).long()
    return {"input_ids": torch.randint(0, 7, (n, 4), generator=g), "attention_mask": mask}, \
        torch.randint(0, C, (n,), generator=g)


def dict_ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(**x), y)


def test_dict_inputs_fisher_and_distillation():
    torch.manual_seed(0)
    model = Tokens().to(D)
    x, y = token_batch(1)
    ewc = EWC(samples=None)  # per_sample="auto": one autograd.grad per example for dict inputs
    ctx = context(model, x, y, loss_fn=dict_ce)
    ewc.end_task(ctx)
    want = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(6):  # explicit per-sample gradients
        xi = {k: v[i:i + 1] for k, v in x.items()}
        for w, g in zip(want, torch.autograd.grad(dict_ce(model, (xi, y[i:i + 1])), list(model.parameters()))):
            w += g ** 2 / 6
    for block, w in zip(ewc._tensors.values(), want):
        torch.testing.assert_close(block[1].square(), w, rtol=1e-12, atol=1e-15)
    vm = EWC(samples=None, per_sample="vmap", chunk=4)
    vm.end_task(ctx)
    for a, b in zip(vm._tensors.values(), ewc._tensors.values()):
        torch.testing.assert_close(a[1], b[1], rtol=1e-12, atol=1e-15)
    lwf = LwF(1.0, 1.0)
    lwf.end_task(context(model, x, y, seen=(0, 1, 2)))
    logits = model(**x)
    assert torch.equal(lwf.old_logits(x), logits.detach())
    out = lwf.loss(model, (x, y), logits, torch.zeros((), dtype=D))
    torch.testing.assert_close(out, torch.zeros((), dtype=D), rtol=0, atol=1e-14)  # same model: KL = 0
