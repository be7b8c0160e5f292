"""The optimizer shell's contract with torch: AMP in the explicit form, closures, state dicts in
torch's layout, one method per base optimizer, mixed dtypes, and clear refusals."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import flatminima as fm
from helpers import InfGrad, Quadratic

LR = 0.1


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def bit_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# -- 1. the explicit form with a GradScaler ---------------------------------------------------

def explicit_step(model, opt, scaler=None, inf_in_perturbed=False, context=False):
    """The explicit form as an AMP user writes it (``scaler.step(opt); scaler.update()``)."""
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    opt.zero_grad()
    scale(model()).backward()
    if context:
        with opt.perturbed(scaler=scaler):
            scale(model()).backward()
    else:
        for _ in opt.perturbations(scaler=scaler):
            x = InfGrad.apply(model.flat()) if inf_in_perturbed else None
            scale(model(x)).backward()
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


def make(name, **hp):
    model = Quadratic()
    opt = fm.create(name, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), **hp)
    opt.track_statistics()
    return model, opt


@pytest.mark.parametrize("name, hp", [("gasam", {"epsilon": 0.05}), ("gasam", {"epsilon": 0.05, "steps": 2}),
                                      ("sam", {"rho": 0.05}), ("looksam", {"rho": 0.05, "k": 2})])
def test_explicit_form_with_scaler_unscales_each_pass(name, hp):
    plain_model, plain = make(name, **hp)
    amp_model, amp = make(name, **hp)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    for _ in range(3):
        explicit_step(plain_model, plain)
        explicit_step(amp_model, amp, scaler)
        # Power-of-two scales unscale exactly: the same ε, gradient norm and update, bit for bit.
        for key in ("eps_norm", "grad_norm", "perturbed_grad_norm"):
            if key in plain.statistics:
                assert torch.equal(amp.statistics[key], plain.statistics[key]), key
        assert bit_equal(params_of(amp_model), params_of(plain_model))
    assert amp.step_count == plain.step_count == 3
    if name == "gasam":
        assert float(plain.statistics["eps_norm"]) > 0.01  # ε from true gradients (scaled ones give ≈ 0)


def test_perturbed_context_with_scaler_matches_the_unscaled_step():
    plain_model, plain = make("sam")
    amp_model, amp = make("sam")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    explicit_step(plain_model, plain, context=True)
    explicit_step(amp_model, amp, scaler, context=True)
    assert bit_equal(params_of(amp_model), params_of(plain_model))


@pytest.mark.parametrize("name, hp", [("sam", {}), ("looksam", {"k": 1}), ("gasam", {"steps": 2})])
def test_explicit_form_with_scaler_skips_the_step_on_inf_in_any_pass(name, hp):
    model, opt = make(name, **hp)
    twin_model, twin = make(name, **hp)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    explicit_step(model, opt, scaler)
    explicit_step(twin_model, twin)
    before, state = params_of(model), copy.deepcopy(opt.state_dict())
    explicit_step(model, opt, scaler, inf_in_perturbed=True)
    assert bit_equal(params_of(model), before)
    assert opt.step_count == 1 and scaler.get_scale() == 2.0**9
    after = opt.state_dict()
    assert all(torch.equal(after["state"][i]["momentum_buffer"], s["momentum_buffer"]) for i, s in state["state"].items())
    assert after["flatminima"]["step"] == 1
    for i, own in state["flatminima"]["state"].items():  # LookSAM's g_v: not committed
        assert all(torch.equal(after["flatminima"]["state"][i][k], v) for k, v in own.items())
    # The skipped step leaves nothing behind: the next one is the twin's second step.
    explicit_step(model, opt, scaler)
    explicit_step(twin_model, twin)
    assert bit_equal(params_of(model), params_of(twin_model)) and opt.step_count == 2


def test_explicit_form_refuses_a_scaler_of_another_kind():
    model, opt = make("sam")
    model().backward()
    with pytest.raises(ValueError, match="Invalid scaler"):
        next(iter(opt.perturbations(scaler=object())))


def test_train_step_with_scaler_under_float64_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        results = []
        for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**8)):
            model = Quadratic()
            opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=LR), rho=0.05)
            step = fm.TrainStep(model, opt, lambda m, b: m(), scaler=scaler)
            for _ in range(2):
                assert step([None]).skipped is (None if scaler is None else False)
            results.append(params_of(model))
        assert bit_equal(*results)
    finally:
        torch.set_default_dtype(previous)


# -- 2. gradients left in .grad before step(closure) ------------------------------------------

@pytest.mark.parametrize("name", ["base", "sam", "gasam", "randomsearchsam", "rwp", "mrwp", "looksam"])
def test_step_closure_ignores_gradients_already_in_grad(name):
    weights = []
    for stale in (False, True):
        model = Quadratic()
        opt = fm.create(name, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9))
        for _ in range(2):
            if stale:
                for p in model.parameters():
                    p.grad = torch.full_like(p, 100.0)
            opt.step(model.closure())
        weights.append(params_of(model))
    assert bit_equal(*weights)


# -- 3. state dicts in torch's layout ---------------------------------------------------------

def trained(name="sam", steps=2, **hp):
    model = Quadratic()
    opt = fm.create(name, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), **hp)
    for _ in range(steps):
        opt.step(model.closure())
    return model, opt


def momentum(opt):
    return [opt.state[p]["momentum_buffer"] for g in opt.param_groups for p in g["params"]]


def test_state_dict_is_torch_layout_with_the_method_state_nested():
    model, opt = trained("looksam", k=1)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "flatminima"}
    assert sd["flatminima"]["method"] == "looksam" and sd["flatminima"]["step"] == 2
    assert set(sd["flatminima"]["state"]) == {0, 1} and "looksam.gv" in sd["flatminima"]["state"][0]
    # A plain torch optimizer of the base's type loads it (extra keys are ignored).
    plain = torch.optim.SGD(Quadratic().parameters(), lr=0.5, momentum=0.9)
    plain.load_state_dict(sd)
    assert plain.param_groups[0]["lr"] == LR
    assert bit_equal([plain.state[p]["momentum_buffer"] for p in plain.param_groups[0]["params"]], momentum(opt))
    # torch.load(weights_only=True) reads it.
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["flatminima"]["step"] == 2


def test_resume_from_a_saved_state_dict_is_bit_identical():
    model, opt = trained("looksam", k=2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for _ in range(3):
        opt.step(model.closure())
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = Quadratic()
    model2.load_state_dict(saved["model"])
    opt2 = fm.LookSAM(torch.optim.SGD(model2.parameters(), lr=LR, momentum=0.9), k=2)
    opt2.load_state_dict(saved["opt"])
    for _ in range(3):
        opt2.step(model2.closure())
    assert bit_equal(params_of(model2), params_of(model)) and opt2.step_count == 5


def test_old_layout_checkpoints_still_load():
    model, opt = trained("looksam", k=1)
    sd = copy.deepcopy(opt.state_dict())  # torch's state dicts share the live tensors
    old = {"base": {"state": sd["state"], "param_groups": sd["param_groups"]},
           "flat": {k: v for k, v in sd["flatminima"].items() if k != "method"}}
    model2 = Quadratic()
    model2.load_state_dict(model.state_dict())
    opt2 = fm.LookSAM(torch.optim.SGD(model2.parameters(), lr=LR, momentum=0.9), k=1)
    opt2.load_state_dict(old)
    opt.step(model.closure())
    opt2.step(model2.closure())
    assert bit_equal(params_of(model2), params_of(model)) and opt2.step_count == 3


@pytest.mark.parametrize("name,hp,old,new", [
    ("looksam", dict(k=2), "looksam_gv", "looksam.gv"), ("ssam", dict(interval=1), "ssam_mask", "ssam.mask"),
    ("rwp", dict(fisher_eta=0.5, sigma=0.01), "fisher", "noise.fisher")])
def test_checkpoints_with_the_earlier_state_keys_resume_bit_identically(name, hp, old, new):
    """Before each component kept its state under a namespace, LookSAM's direction, SSAM's mask and
    RWP's Fisher EMA were stored as "looksam_gv", "ssam_mask" and "fisher": such checkpoints still
    resume exactly (the state is renamed on load, not silently dropped)."""
    model, opt = trained(name, **hp)
    sd = copy.deepcopy(opt.state_dict())
    assert all(set(s) == {new} for s in sd["flatminima"]["state"].values()) and sd["flatminima"]["state"]
    sd["flatminima"]["state"] = {i: {old: s[new]} for i, s in sd["flatminima"]["state"].items()}
    model2 = Quadratic()
    model2.load_state_dict(model.state_dict())
    opt2 = fm.create(name, torch.optim.SGD(model2.parameters(), lr=LR, momentum=0.9), **hp)
    opt2.load_state_dict(sd)
    assert all(set(opt2.method_state[p]) == {new} for p in model2.parameters())
    for _ in range(2):
        opt.step(model.closure())
        opt2.step(model2.closure())
    assert bit_equal(params_of(model2), params_of(model)) and opt2.step_count == opt.step_count == 4


def test_plain_checkpoint_loads_with_method_state_fresh_and_strength_kept():
    model = Quadratic()
    plain = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    for _ in range(2):
        plain.zero_grad()
        model().backward()
        plain.step()
    model2 = Quadratic()
    opt = fm.LookSAM(torch.optim.SGD(model2.parameters(), lr=LR, momentum=0.9), rho=0.2, k=1)
    opt.step(model2.closure())
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["lr"] == 0.3 and opt.strengths() == [0.2]
    assert opt.step_count == 0 and not opt.method_state
    assert bit_equal(momentum(opt), [plain.state[p]["momentum_buffer"] for p in model.parameters()])


def test_distributed_checkpoint_state_dict_functions_accept_a_method():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt = trained("sam")
    opt.zero_grad(set_to_none=True)
    osd = get_optimizer_state_dict(model, opt)
    assert set(osd["state"]) == {"W", "b"} and opt.step_count == 2
    model2 = Quadratic()
    opt2 = fm.SAM(torch.optim.SGD(model2.parameters(), lr=0.7, momentum=0.9), rho=0.3)
    set_optimizer_state_dict(model2, opt2, osd)  # on a fresh method: DCP's zero-gradient init step
    assert opt2.param_groups[0]["lr"] == LR and opt2.param_groups[0]["rho"] == 0.05
    assert bit_equal(momentum(opt2), momentum(opt)) and opt2.step_count == 0
    assert bit_equal(params_of(model2), params_of(Quadratic()))  # the init step (lr = 0) moved nothing


# -- 4. loading another method's state, or a broken one, changes nothing ----------------------

def snapshot(opt):
    return copy.deepcopy(opt.state_dict()), [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups]


@pytest.mark.parametrize("source, target, match", [
    ("sam", "aesam", "'sam'.*'aesam'"), ("base", "sam", "'base'.*'sam'"), ("rwp", "sam", "'rwp'.*'sam'")])
def test_loading_another_methods_state_is_refused_and_changes_nothing(source, target, match):
    _, other = trained(source, steps=1)
    model, opt = trained(target)
    before, groups = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(other.state_dict())
    after, groups_after = snapshot(opt)
    assert groups_after == groups and after["flatminima"] == before["flatminima"]
    assert bit_equal(momentum(opt), [s["momentum_buffer"] for s in before["state"].values()])


def broken(sd, edit):
    sd = copy.deepcopy(sd)
    edit(sd)
    return sd


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "param groups of sizes"),
    (lambda sd: sd["param_groups"][0].update(rho=-1.0), "Invalid rho"),
    (lambda sd: sd["param_groups"][0].update(lr=float("nan")), "Invalid lr"),
    (lambda sd: sd["flatminima"].update(step=-1), "Invalid step"),
    (lambda sd: sd["flatminima"].update(trigger={"oops": 1}), "trigger state"),
    (lambda sd: sd["flatminima"]["state"].update({7: {}}), "keyed by index"),
    (lambda sd: sd.pop("state"), "torch's keys"),
])
def test_a_broken_state_dict_is_refused_before_anything_changes(edit, match):
    model, opt = trained("aesam")
    before, groups = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(broken(opt.state_dict(), edit))
    after, groups_after = snapshot(opt)
    assert groups_after == groups and after["flatminima"] == before["flatminima"]


def test_old_layout_of_a_method_with_another_strength_is_refused():
    _, rwp = trained("rwp", steps=1)
    sd = rwp.state_dict()
    old = {"base": {"state": sd["state"], "param_groups": sd["param_groups"]},
           "flat": {k: v for k, v in sd["flatminima"].items() if k != "method"}}
    _, opt = trained("sam")
    with pytest.raises(ValueError, match="without 'rho'"):
        opt.load_state_dict(old)


# -- 5. one method per base optimizer ---------------------------------------------------------

def test_wrapping_a_base_twice_is_refused():
    base = torch.optim.SGD(Quadratic().parameters(), lr=LR)
    first = fm.SAM(base, rho=0.05)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in base.param_groups])
    with pytest.raises(ValueError, match="already wrapped by SAM.*new base optimizer"):
        fm.SAM(base, rho=0.5)
    assert [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups] == groups
    assert first.strengths() == [0.05] and fm.FlatOptimizer.wrapping(base) is first


def test_train_step_with_a_plain_optimizer_reuses_its_base_method():
    model, twin = Quadratic(), Quadratic()
    plain = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for _ in range(3):
        fm.train_step(model, plain, lambda m, b: m(), [None])
    engine = fm.TrainStep(twin, torch.optim.SGD(twin.parameters(), lr=LR, momentum=0.9), lambda m, b: m())
    for _ in range(3):
        engine([None])
    assert bit_equal(params_of(model), params_of(twin)) and fm.FlatOptimizer.wrapping(plain).step_count == 3


# -- 6. mixed dtypes --------------------------------------------------------------------------

@pytest.mark.parametrize("normalization", ["global", "per_tensor"])
def test_sam_on_float32_and_float64_parameters_matches_the_per_tensor_reference(normalization):
    a = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    b = nn.Parameter(torch.tensor([3.0, -1.0], dtype=torch.float64))
    ca, cb = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 4.0], dtype=torch.float64)
    rho = 0.1

    def grads(x, y):  # L = ½ Σ c_a a² + ½ Σ c_b b²
        return ca.double() * x, cb * y

    xa, xb = a.detach().double(), b.detach().clone()
    ga, gb = grads(xa, xb)
    if normalization == "global":
        n = torch.cat([ga, gb]).norm()
        ea, eb = rho * ga / n, rho * gb / n
    else:
        ea, eb = rho * ga / ga.norm(), rho * gb / gb.norm()
    da, db = grads(xa + ea, xb + eb)
    opt = fm.SAM(torch.optim.SGD([a, b], lr=LR), rho=rho, normalization=normalization)

    def closure():
        loss = 0.5 * (ca * a * a).sum() + 0.5 * (cb * b * b).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert a.dtype == torch.float32 and b.dtype == torch.float64
    torch.testing.assert_close(a.detach(), (xa - LR * da).float(), rtol=0, atol=1e-6)
    # The float32 gradient's norm is reduced in float32, and with a global norm it enters b's ε.
    torch.testing.assert_close(b.detach(), xb - LR * db, rtol=0, atol=1e-12 if normalization == "per_tensor" else 1e-7)


# -- 8, 9. clear refusals ---------------------------------------------------------------------

@pytest.mark.parametrize("scope", [5, "weights", [1, 2], torch.zeros(3)])
def test_a_scope_of_the_wrong_kind_names_scope_and_the_kinds(scope):
    base = torch.optim.SGD(Quadratic().parameters(), lr=LR)
    with pytest.raises(ValueError, match="Invalid scope.*an nn.Module, an iterable of parameters"):
        fm.SAM(base, scope=scope)
    assert fm.FlatOptimizer.wrapping(base) is None


def test_random_search_closure_returning_none_is_refused_with_weights_restored():
    model = Quadratic()
    opt = fm.RandomSearchSAM(torch.optim.SGD(model.parameters(), lr=LR))
    before = params_of(model)

    def closure(backward=True):
        loss = model()
        if backward:
            loss.backward()

    with pytest.raises(ValueError, match="Invalid closure.*returns the loss"):
        opt.step(closure)
    assert bit_equal(params_of(model), before) and opt.step_count == 0


def test_scaler_step_after_passes_without_the_scaler_is_refused():
    model, opt = make("gasam")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = params_of(model)
    scaler.scale(model()).backward()
    for _ in opt.perturbations():
        scaler.scale(model()).backward()
    with pytest.raises(RuntimeError, match="perturbations\\(scaler=scaler\\)"):
        scaler.step(opt)
    assert bit_equal(params_of(model), before) and opt.step_count == 0
