"""Lightning integration: a Trainer run matches ``fm.TrainStep`` on the same micro-batches, step for
step (float64 on CPU, so the comparison is exact), with bf16 autocast, and under 2-process gloo DDP."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.multiprocessing.spawn import ProcessExitedException

pl = pytest.importorskip("lightning.pytorch")

import flatminima as fm  # noqa: E402
from flatminima.integrations.lightning import FlatMinimaModule  # noqa: E402

ROWS = 8


def make_net(dtype=torch.float64, bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(16) if bn else nn.Identity()
    return nn.Sequential(nn.Linear(6, 16), norm, nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def make_batches(n: int, dtype=torch.float64, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(ROWS, 6, generator=g, dtype=dtype), torch.randint(0, 3, (ROWS,), generator=g))
            for _ in range(n)]


def loss_fn(net: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(net(x), y)


def make_optimizer(params, method: str, **hyper):
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    return fm.create(method, base, **hyper)


class Net(FlatMinimaModule):
    def __init__(self, method: str, net: nn.Module, batches: list, interval: str = "step", **options):
        super().__init__(method, **options)
        self.net, self.batches, self.interval = net, batches, interval

    def compute_loss(self, batch):
        return loss_fn(self.net, batch)

    def configure_optimizers(self):
        opt = self.flat_optimizer(torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}

    def train_dataloader(self):
        # batch_size=None: every item is one micro-batch, as given.
        return torch.utils.data.DataLoader(self.batches, batch_size=None)


class Recorder(pl.Callback):
    """The weights and BatchNorm buffers after every optimizer step."""

    def __init__(self):
        self.states, self.seen = [], 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step != self.seen:
            self.seen = trainer.global_step
            self.states.append({k: v.detach().clone() for k, v in module.net.state_dict().items()})


def trainer(**options) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **options})


def lightning_run(method, batches, hyper, options, net=None, interval="step", **trainer_options):
    module = Net(method, net if net is not None else make_net(), batches, interval=interval, **hyper, **options)
    recorder = Recorder()
    t = trainer(callbacks=[recorder], **trainer_options)
    t.fit(module)
    return recorder.states, module, t


def reference_run(method, windows, hyper, options, net=None, total_steps=None, epoch_ends=(), autocast=None):
    net = net if net is not None else make_net()
    opt = make_optimizer(net.parameters(), method, total_steps=total_steps, **hyper)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    step = fm.TrainStep(net, opt, loss_fn, autocast_dtype=autocast, **options)
    states = []
    for i, window in enumerate(windows):
        step(window)
        if not epoch_ends:
            sched.step()
        elif i in epoch_ends:
            sched.step()
        states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    return states


def assert_states_equal(got, want, atol=0.0):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        for k in b:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0,
                                       msg=lambda m, i=i, k=k: f"step {i + 1}, {k}: {m}")


CASES = {
    # A strength schedule checks that the module passes the run's exact total_steps (20).
    "sam": ({"rho": 0.05, "schedule": "linear"}, {"max_grad_norm": 1.0}),
    "mrwp": ({"sigma": 0.01}, {}),
    "looksam": ({"rho": 0.05, "k": 3}, {"accumulation": "full"}),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_trainer_run_matches_train_step_step_for_step(method):
    hyper, options = CASES[method]
    batches = make_batches(80)
    got, module, t = lightning_run(method, batches, hyper, {"accumulate": 4, **options}, max_steps=20)
    assert t.global_step == 20 and module.optimizers().optimizer.step_count == 20
    want = reference_run(method, [batches[i:i + 4] for i in range(0, 80, 4)], hyper, options, total_steps=20)
    assert_states_equal(got, want)


def test_epoch_end_closes_a_short_window_and_epoch_schedulers_step_per_epoch():
    batches = make_batches(10)  # 4 + 4 + 2 per epoch, two epochs
    hyper = {"rho": 0.05, "schedule": "cosine"}
    got, _, t = lightning_run("sam", batches, hyper, {"accumulate": 4}, interval="epoch", max_epochs=2)
    windows = [batches[0:4], batches[4:8], batches[8:10]] * 2
    want = reference_run("sam", windows, hyper, {}, total_steps=6, epoch_ends=(2, 5))
    assert t.global_step == 6
    assert_states_equal(got, want)


def test_statistics_are_logged():
    _, _, t = lightning_run("sam", make_batches(8), {"rho": 0.05}, {"accumulate": 2, "log_statistics": True})
    for key in ("train_loss", "flat/clean_loss", "flat/perturbed_loss", "flat/sharpness", "flat/eps_norm"):
        assert key in t.callback_metrics and torch.isfinite(t.callback_metrics[key])


def test_bf16_mixed_matches_train_step_under_bf16_autocast():
    # Lightning's bf16 plugin puts the autocast around training_step, hence around every pass.
    batches = make_batches(16, dtype=torch.float32)
    got, _, _ = lightning_run("sam", batches, {"rho": 0.05}, {"accumulate": 4},
                              net=make_net(torch.float32), precision="bf16-mixed")
    want = reference_run("sam", [batches[i:i + 4] for i in range(0, 16, 4)], {"rho": 0.05}, {},
                         net=make_net(torch.float32), autocast=torch.bfloat16)
    assert_states_equal(got, want)  # bit for bit: the same bf16 kernels in the same order


class Overflowing:
    """``loss_fn`` whose ``at``-th call (counted from 0) gets an inf gradient entry; records the
    dtype the network computes in."""

    def __init__(self, at: int):
        self.at, self.calls, self.dtypes = at, 0, set()

    def __call__(self, net, batch):
        from helpers import InfGrad

        x, y = batch
        out = net(x)
        self.dtypes.add(out.dtype)
        loss = nn.functional.cross_entropy(out.float(), y)
        if self.calls == self.at:
            loss = loss + 0.0 * InfGrad.apply(next(net.parameters())).sum()
        self.calls += 1
        return loss


class OverflowNet(Net):
    def __init__(self, *args, overflow: Overflowing, **kwargs):
        super().__init__(*args, **kwargs)
        self.overflow = overflow

    def compute_loss(self, batch):
        return self.overflow(self.net, batch)


def test_16_mixed_matches_train_step_with_a_gradscaler_and_skips_an_overflow():
    """fp16: Lightning's precision plugin owns the GradScaler (its unscale, step and update); the
    engine scales every pass with it. The 2nd step's perturbed pass overflows: skipped, as by the
    engine with the same scaler. (Lightning turns "16-mixed" into bf16 on the CPU; the plugin built by
    hand is what it builds on a GPU, and CPU fp16 autocast is real.)"""
    from lightning.pytorch.plugins import MixedPrecision

    batches = make_batches(16, dtype=torch.float32)
    overflow = Overflowing(at=9)  # SAM over windows of 4: 5 passes per step; call 9 is step 2's perturbed pass
    module = OverflowNet("sam", make_net(torch.float32), batches, overflow=overflow, rho=0.05, accumulate=4,
                         max_grad_norm=1.0)
    recorder = Recorder()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    t = trainer(callbacks=[recorder], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    t.fit(module)
    assert overflow.dtypes == {torch.float16}
    assert module.optimizers().optimizer.step_count == 3 and scaler.get_scale() == 2.0**7

    net = make_net(torch.float32)
    opt = make_optimizer(net.parameters(), "sam", rho=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    reference = Overflowing(at=9)
    step = fm.TrainStep(net, opt, reference, autocast_dtype=torch.float16, max_grad_norm=1.0,
                        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    want, skipped = [], []
    for i in range(0, 16, 4):
        skipped.append(step(batches[i:i + 4]).skipped)
        sched.step()  # Lightning counts the skipped step in global_step and steps the scheduler
        want.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    assert skipped == [False, True, False, False] and t.global_step == 4
    assert_states_equal(recorder.states, want, atol=1e-6)
    for name, _ in module.net.named_parameters():  # the skipped step moved no weight
        assert torch.equal(recorder.states[1][name], recorder.states[0][name])


@pytest.mark.parametrize("bad, match", [
    ({"method": "no-such-method"}, "method name"),
    ({"accumulate": 0}, "accumulate"),
    ({"accumulate": 2.0}, "accumulate"),
    ({"accumulation": "some"}, "accumulation"),
    ({"bn": "moving"}, "bn"),
    ({"rho": -1.0}, "rho"),
    ({"radius": 0.1}, "hyperparameter 'radius'"),
])
def test_bad_configuration_raises_when_the_module_is_built(bad, match):
    options = {"method": "sam", **bad}
    with pytest.raises(ValueError, match=match):
        Net(options.pop("method"), make_net(), [], **options)


def test_bad_trainer_configuration_raises_before_the_first_step():
    class Plain(Net):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Plain("sam", make_net(), make_batches(4), accumulate=2)
    before = copy.deepcopy(module.net.state_dict())
    with pytest.raises(ValueError, match="flat_optimizer"):
        trainer(max_steps=2).fit(module)
    assert all(torch.equal(before[k], v) for k, v in module.net.state_dict().items())


# -- DDP: 2 processes, gloo, Lightning's ddp_spawn ------------------------------------------------

class RankNet(Net):
    """Each rank reads its own micro-batches: the even ones on rank 0, the odd ones on rank 1."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches[self.global_rank::2], batch_size=None)


class SaveStates(Recorder):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_end(self, trainer, module):
        if trainer.global_rank == 0:
            torch.save(self.states, self.path)


def test_ddp_spawn_matches_the_per_rank_engine_semantics(tmp_path):
    """SAM with per-rank ε (DESIGN.md §4): each rank's ε from its own accumulated clean gradient, the
    descent gradient the mean over ranks of ∇L_r(w + ε_r). No BatchNorm: DDP broadcasts rank 0's
    buffers at every forward, which a one-process reference would have to mimic."""
    batches, steps, n = make_batches(2 * 4 * 5), 5, 4
    path = tmp_path / "states.pt"
    for attempt in (1, 2):
        module = RankNet("sam", make_net(bn=False), batches, accumulate=n, rho=0.05)
        try:
            trainer(strategy="ddp_spawn", devices=2, max_steps=steps, callbacks=[SaveStates(path)],
                    use_distributed_sampler=False).fit(module)
            break
        except ProcessExitedException as error:
            # gloo's transport sometimes aborts a rank at exit on a loaded machine (see helpers.torchrun)
            if attempt == 2 or error.signal_name != "SIGABRT":
                raise
    got = torch.load(path)

    net = make_net(bn=False)
    opt = make_optimizer(net.parameters(), "sam", rho=0.05, total_steps=steps)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    engine = fm.TrainStep(net, opt, loss_fn)
    want = []
    for s in range(steps):
        grads = []
        for rank in range(2):
            engine.passes(batches[rank::2][s * n:(s + 1) * n])
            grads.append([p.grad.clone() for p in net.parameters()])
        for p, g0, g1 in zip(net.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
        sched.step()
        want.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    assert_states_equal(got, want, atol=1e-12)


def test_lightning_example_trains_on_digits():
    import runpy
    from pathlib import Path

    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "lightning_sam.py"))
    assert example["main"](["--epochs", "1", "--precision", "bf16-mixed"]) > 0.5


def test_readme_lightning_block_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    blocks = re.findall(r"```python\n(.*?)```", (Path(__file__).resolve().parents[1] / "README.md").read_text(),
                        flags=re.S)
    block = next(b for b in blocks if "FlatMinimaModule" in b)
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 4, generator=g), torch.randint(0, 3, (256,), generator=g))
    namespace = {"torch": torch, "loader": torch.utils.data.DataLoader(data, batch_size=8)}
    exec(block, namespace)
    assert namespace["trainer"].global_step == 20
    assert not any(tmp_path.iterdir())  # nothing written (no checkpoints, no logs)


# -- automatic optimization with a flatminima optimizer ------------------------------------------

class Automatic(pl.LightningModule):
    """What Lightning's docs teach: return the optimizer, return the loss from training_step."""

    def __init__(self, net: nn.Module, batches: list):
        super().__init__()
        self.net, self.batches = net, batches

    def training_step(self, batch, batch_idx):
        return loss_fn(self.net, batch)

    def configure_optimizers(self):
        return fm.SAM(torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9), rho=0.05)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)


def test_automatic_optimization_with_accumulate_grad_batches_is_refused_naming_flat_minima_module():
    module = Automatic(make_net(bn=False), make_batches(4))
    before = copy.deepcopy(module.net.state_dict())
    with pytest.raises(ValueError, match=r"accumulate_grad_batches: 2 .*FlatMinimaModule\(method, accumulate=N\)"):
        trainer(accumulate_grad_batches=2).fit(module)
    assert all(torch.equal(before[k], v) for k, v in module.net.state_dict().items())


def test_automatic_optimization_16_mixed_is_refused_naming_flat_minima_module():
    """The fp16 plugin runs Lightning's closure itself and calls step() without it: no room for the
    method's passes. (The plugin built by hand is what Lightning builds on a GPU.)"""
    from lightning.pytorch.plugins import MixedPrecision

    module = Automatic(make_net(torch.float32, bn=False), make_batches(4, dtype=torch.float32))
    before = copy.deepcopy(module.net.state_dict())
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    with pytest.raises(ValueError, match=r"precision: '16-mixed' .*FlatMinimaModule\(method, accumulate=N\)"):
        trainer(plugins=[plugin]).fit(module)
    assert all(torch.equal(before[k], v) for k, v in module.net.state_dict().items())


def test_automatic_optimization_without_accumulation_equals_the_closure_step():
    """accumulate_grad_batches=1: Lightning's closure (training_step + backward) is re-run by the
    method for each pass, so a run equals opt.step(closure) on the same batches, bit for bit."""
    batches = make_batches(5)
    module = Automatic(make_net(bn=False), batches)
    trainer().fit(module)
    net = make_net(bn=False)
    opt = fm.SAM(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    for batch in batches:
        def closure(batch=batch):
            loss = loss_fn(net, batch)
            loss.backward()
            return loss
        opt.step(closure)
    assert opt.step_count == 5 and module.optimizers().optimizer.step_count == 5
    for k, v in net.state_dict().items():
        assert torch.equal(module.net.state_dict()[k], v)
