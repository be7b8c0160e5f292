"""fp16 integrations under the real CUDA GradScalers (skipped without a GPU).

The CPU tests of the integrations (``test_hf.py``, ``test_lightning.py``, ``test_accelerate.py``)
hand each framework, on the CPU, the GradScaler and native autocast it would build on a GPU,
because every one of them turns fp16 off on a CPU. Here each framework builds its own fp16 setup on
CUDA (HF Trainer ``fp16=True``, Lightning ``precision="16-mixed"``, Accelerate
``mixed_precision="fp16"``), and a flatminima SAM step taken through it is checked against the
engine's own step (``fm.TrainStep`` with a CUDA ``GradScaler`` and fp16 autocast) on the same
micro-batches: every pass runs in half precision, the window whose pass gets an inf gradient entry
is skipped (no weight moves, the method's step count stays), the scale backs off once, and the
weights agree step for step. ``benchmarks/gpu_check.sh`` runs this file on the GPU machine.

The init scale is set where a framework lets it be (2^8 or 2^10, as in the CPU tests) so that the
only overflow is the injected one; the scaler is the framework's class on the ``cuda`` device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flatminima as fm
from helpers import InfGrad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_matmul():
    """No TF32 in the float32 parts: the framework's run and the engine's must round alike."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state, fixed by the first Accelerator: fp16 needs its own."""
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def _is_cuda_scaler(scaler) -> bool:
    return isinstance(scaler, torch.amp.GradScaler) and scaler._device == "cuda" and scaler.is_enabled()


def _cuda_states_close(got, want, rtol, atol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        for k in b:
            assert a[k].device.type == "cuda"
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol,
                                       msg=lambda m, i=i, k=k: f"step {i + 1}, {k}: {m}")


# -- Accelerate -------------------------------------------------------------------------------------


def test_accelerate_fp16_on_cuda_matches_the_engine_and_skips_an_overflow(fresh_accelerate_state):
    import accelerate
    from accelerate.utils import GradScalerKwargs

    from flatminima.integrations.accelerate import AccelerateStep

    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).cuda()
        g = torch.Generator().manual_seed(1)
        data = [(torch.randn(4, 6, generator=g).cuda(), torch.randint(0, 3, (4,), generator=g).cuda())
                for _ in range(24)]
        return model, data

    calls = {"n": 0, "dtypes": set()}

    def overflowing(model, batch):  # the 2nd window's perturbed pass (call 8) gets an inf gradient entry
        out = model(batch[0])
        loss = nn.functional.cross_entropy(out.float(), batch[1])
        calls["n"] += 1
        if calls["n"] == 8:  # SAM over windows of 3: 3 clean passes + 1 perturbed pass per window
            loss = loss + 0.0 * InfGrad.apply(next(model.parameters())).sum()
        return loss

    accelerator = accelerate.Accelerator(mixed_precision="fp16", gradient_accumulation_steps=3,
                                         kwargs_handlers=[GradScalerKwargs(init_scale=2.0**8)])
    assert accelerator.device.type == "cuda" and accelerator.native_amp and _is_cuda_scaler(accelerator.scaler)
    model, data = setup()
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    model, opt = accelerator.prepare(model, opt)
    model[3].register_forward_hook(lambda module, args, out: calls["dtypes"].add(out.dtype))
    step = AccelerateStep(accelerator, model, opt, overflowing, max_grad_norm=1.0)
    skipped, states = [], []
    for batch in data:
        result = step(batch)
        if result:
            skipped.append(result.skipped)
            assert result.skipped == opt.step_was_skipped and torch.isfinite(result.loss)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert skipped == [False, True] + [False] * 6
    assert calls["dtypes"] == {torch.float16}
    assert accelerator.scaler.get_scale() == 2.0**7 and opt.optimizer.step_count == 7
    params = [k for k, _ in model.named_parameters()]
    assert all(torch.equal(states[1][k], states[0][k]) for k in params)  # the skipped window moved no weight
    assert all(torch.isfinite(v).all() for v in states[-1].values())

    ref, _ = setup()
    ref_opt = fm.SAM(torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    calls["n"] = 0
    engine = fm.TrainStep(ref, ref_opt, overflowing, max_grad_norm=1.0, scaler=scaler, autocast_dtype=torch.float16)
    want = []
    for k in range(0, len(data), 3):
        assert engine(data[k:k + 3]).skipped == skipped[len(want)]
        want.append({name: v.detach().clone() for name, v in ref.state_dict().items()})
    assert scaler.get_scale() == accelerator.scaler.get_scale() and ref_opt.step_count == 7
    _cuda_states_close(states, want, rtol=1e-5, atol=1e-6)


# -- Lightning ----------------------------------------------------------------------------------------


def test_lightning_16_mixed_on_cuda_matches_the_engine_and_skips_an_overflow():
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins import MixedPrecision
    from test_lightning import (OverflowNet, Overflowing, Recorder, make_batches, make_net, make_optimizer,
                                trainer)

    # What Lightning builds itself for precision="16-mixed" on a GPU: its plugin with a CUDA GradScaler.
    built = pl.Trainer(accelerator="gpu", devices=1, precision="16-mixed", logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False)
    assert isinstance(built.precision_plugin, MixedPrecision) and _is_cuda_scaler(built.precision_plugin.scaler)

    # The same plugin with a smaller init scale, so that the injected inf is the only overflow.
    batches = make_batches(16, dtype=torch.float32)
    overflow = Overflowing(at=9)  # SAM over windows of 4: 5 passes per step; call 9 is step 2's perturbed pass
    module = OverflowNet("sam", make_net(torch.float32), batches, overflow=overflow, rho=0.05, accumulate=4,
                         max_grad_norm=1.0)
    recorder = Recorder()
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    t = trainer(accelerator="gpu", callbacks=[recorder], plugins=[MixedPrecision("16-mixed", "cuda", scaler=scaler)])
    t.fit(module)
    assert t.precision_plugin.scaler is scaler and next(module.net.parameters()).device.type == "cuda"
    assert overflow.dtypes == {torch.float16}
    assert module.optimizers().optimizer.step_count == 3 and scaler.get_scale() == 2.0**7 and t.global_step == 4
    for name, _ in module.net.named_parameters():  # the skipped step moved no weight
        assert torch.equal(recorder.states[1][name], recorder.states[0][name])
    assert all(torch.isfinite(v).all() for v in recorder.states[-1].values())

    net = make_net(torch.float32).cuda()
    opt = make_optimizer(net.parameters(), "sam", rho=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    reference = Overflowing(at=9)
    ref_scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    step = fm.TrainStep(net, opt, reference, autocast_dtype=torch.float16, max_grad_norm=1.0, scaler=ref_scaler)
    cuda_batches = [(x.cuda(), y.cuda()) for x, y in batches]
    want, skipped = [], []
    for i in range(0, 16, 4):
        skipped.append(step(cuda_batches[i:i + 4]).skipped)
        sched.step()  # Lightning counts the skipped step in global_step and steps the scheduler
        want.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    assert skipped == [False, True, False, False] and ref_scaler.get_scale() == scaler.get_scale()
    _cuda_states_close(recorder.states, want, rtol=1e-5, atol=1e-6)


# -- Hugging Face Trainer -----------------------------------------------------------------------------


def test_hf_trainer_fp16_on_cuda_matches_the_engine_and_skips_an_overflow(tmp_path, fresh_accelerate_state):
    transformers = pytest.importorskip("transformers")
    from test_hf import ACCUMULATION, MICRO, _examples, _InOrder, _model, _Overflow, _Record

    steps, examples = 4, _examples()

    class Overflowing(_InOrder):
        overflow = _Overflow(at=7)  # SAM: 5 passes per step (4 clean + 1 perturbed): step 2, clean pass 3

        def compute_loss(self, model, inputs, *args, **kwargs):
            return self.overflow(model, inputs)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUMULATION, learning_rate=1e-3, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=0, report_to=[], save_strategy="no",
        logging_steps=5, seed=0, dataloader_drop_last=True, disable_tqdm=True, fp16=True)
    record = _Record()
    trainer = Overflowing(model=_model(), args=args, train_dataset=examples, callbacks=[record], flat_method="sam",
                          flat_hyperparameters={"rho": 0.05})
    # The Trainer's accelerator built its fp16 setup on the GPU: native autocast and a CUDA GradScaler
    # (init scale 2^16); one with init scale 2^10 takes its place, so the injected inf is the only overflow.
    assert trainer.args.device.type == "cuda" and trainer.accelerator.native_amp
    assert _is_cuda_scaler(trainer.accelerator.scaler)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    trainer.accelerator.scaler = scaler
    halves = []
    trainer.model.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda m, a, out: halves.append(out.dtype == torch.float16))
    trainer.train()
    assert halves and all(halves)
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert scaler.get_scale() == 2.0**9 and trainer.optimizer.optimizer.step_count == steps - 1
    assert len(record.weights) == steps
    assert all(torch.equal(a, b) for a, b in zip(record.weights[1], record.weights[0]))  # the skipped step
    assert all(torch.isfinite(w).all() for w in record.weights[-1])

    model = _model().cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.create("sam", torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0), total_steps=steps, rho=0.05)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, steps)
    ref_scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    step = fm.TrainStep(model, opt, _Overflow(at=7), max_grad_norm=1.0, autocast_dtype=torch.float16,
                        scaler=ref_scaler)
    batches = [examples[i:i + MICRO] for i in range(0, len(examples), MICRO)]
    skipped = []
    for k in range(steps):
        window = [{key: v.cuda() for key, v in transformers.default_data_collator(
            batches[(k * ACCUMULATION + j) % len(batches)]).items()} for j in range(ACCUMULATION)]
        skipped.append(step(window).skipped)
        if not skipped[-1]:
            sched.step()
        for a, b in zip(record.weights[k], params):
            # AdamW normalizes each entry's step, so fp16 rounding differences between the two runs
            # show at the update's scale (lr = 1e-3) only where a gradient entry is ~0.
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"step {k + 1}")
    assert skipped == [False, True] + [False] * (steps - 2) and ref_scaler.get_scale() == scaler.get_scale()
