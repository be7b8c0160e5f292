"""Text-to-text continual learning (T5 + LoRA) through the HF Trainer's flat-minima mixin: the
Trainer's regularizer equals the engine's, O-LoRA's penalty enters as added by hand, exact match,
and a whole continual run on real VADER sentences, offline, writing under its folder only."""

from __future__ import annotations

import json
import os
import random
import tempfile

import numpy as np
import pytest
import torch

import flatminima as fm

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")

from flatminima.continual import ContinualLoRA, continual_metrics  # noqa: E402
from flatminima.continual import seq2seq  # noqa: E402
from flatminima.continual.metrics import jsonable  # noqa: E402
from flatminima.integrations.hf import FlatMinimaSeq2SeqTrainer, FlatMinimaTrainer  # noqa: E402

MICRO, LR = 4, 0.05


@pytest.fixture(scope="module")
def tasks():
    return seq2seq.seq2seq_tasks(["tweets", "movies"], train_subset=24, test_subset=12, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tasks):
    return seq2seq.build_tokenizer(tasks)


def _model(tokenizer, dtype=torch.float64):
    base = seq2seq.tiny_t5(len(tokenizer), d_model=16, layers=2, heads=2, d_ff=32, seed=3, dtype=dtype)
    return seq2seq.with_lora(base, r=2, alpha=4, target_modules=("q", "v", "wi"), seed=3)


def _rows(tokenizer, task):
    return seq2seq.encode(tokenizer, task.train)


def _batches(tokenizer, task):
    rows, collate = _rows(tokenizer, task), transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    return [collate(rows[i:i + MICRO]) for i in range(0, len(rows) - MICRO + 1, MICRO)]


class _InOrder(FlatMinimaSeq2SeqTrainer):
    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


def _args(tmp_path, steps, accumulation, **kw):
    return transformers.Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=accumulation, learning_rate=LR, weight_decay=0.0, max_grad_norm=0.0,
        lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        dataloader_drop_last=True, remove_unused_columns=False, label_names=["labels"], seed=0,
        dataloader_pin_memory=False, **kw)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _r(model):
    """A non-quadratic penalty (its value at w + ε differs from a linearisation)."""
    params = _trainable(model)
    return 0.3 * sum((p * p).sum() for p in params) + 2.0 * sum(p.pow(4).sum() for p in params)


def _loss(model, batch):
    return model(**batch).loss


def _halve_a(model):
    """A descent hook: the A factors' gradients halved in place."""
    for name, p in model.named_parameters():
        if p.grad is not None and "lora_A" in name:
            p.grad.mul_(0.5)


@pytest.mark.parametrize("accumulation,at,hook", [(1, "every", None), (2, "every", None), (1, "clean", None),
                                                  (2, "clean", _halve_a)])
def test_trainer_regularizer_equals_the_engine_step(tmp_path, tasks, tokenizer, accumulation, at, hook):
    """SAM + SGD(momentum) with R (in every pass, or its gradient once at w) and a descent hook:
    2 Trainer steps = 2 TrainStep steps (float64, 1e-10); R enters once per optimizer step whatever
    the accumulation (not divided by it, not once per micro-batch)."""
    steps, hyper = 2, {"rho": 0.05}
    trainer = _InOrder(model=_model(tokenizer), args=_args(tmp_path, steps, accumulation, optim="sgd",
                                                               optim_args="momentum=0.9"),
                       train_dataset=_rows(tokenizer, tasks[0]), processing_class=tokenizer,
                       data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
                       flat_method="sam", flat_hyperparameters=hyper, regularizer=_r, regularizer_at=at,
                       descent_hook=hook)
    trainer.train()
    batches = _batches(tokenizer, tasks[0])

    def hand(regularizer, regularizer_at=at, descent_hook=hook):
        model = _model(tokenizer)
        opt = fm.create("sam", torch.optim.SGD(_trainable(model), lr=LR, momentum=0.9), total_steps=steps, **hyper)
        step = fm.TrainStep(model, opt, _loss, regularizer=regularizer, regularizer_at=regularizer_at,
                            descent_hook=descent_hook)
        for k in range(steps):
            step(batches[k * accumulation:(k + 1) * accumulation])
        return _trainable(model)

    want, without = hand(_r), hand(None)
    other = hand(_r, "clean" if at == "every" else "every")
    got = _trainable(trainer.model)
    assert len(got) == len(want) == 32 and all(p.dtype == torch.float64 for p in got)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert max((a - b).abs().max().item() for a, b in zip(want, without)) > 1e-4  # R moved the weights
    assert max((a - b).abs().max().item() for a, b in zip(want, other)) > 1e-8  # and where it enters matters
    if hook is not None:
        assert max((a - b).abs().max().item() for a, b in zip(want, hand(_r, at, None))) > 1e-4


@pytest.mark.parametrize("accumulation", [1, 2])
def test_plain_sgd_with_a_regularizer_is_one_step_on_loss_plus_r(tmp_path, tasks, tokenizer, accumulation):
    """The base method: w' = w − η ∇[(1/N) Σ_n L(w; B_n) + R(w)], computed by hand with autograd."""
    trainer = _InOrder(model=_model(tokenizer), args=_args(tmp_path, 1, accumulation, optim="sgd"),
                       train_dataset=_rows(tokenizer, tasks[0]), processing_class=tokenizer,
                       data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
                       flat_method="sgd", regularizer=_r)
    trainer.train()
    model = _model(tokenizer)
    params = _trainable(model)
    window = _batches(tokenizer, tasks[0])[:accumulation]
    objective = sum(_loss(model, b) for b in window) / accumulation + _r(model)
    grads = torch.autograd.grad(objective, params)
    for got, p, g in zip(_trainable(trainer.model), params, grads):
        torch.testing.assert_close(got, p.detach() - LR * g, rtol=0, atol=1e-10)


def test_o_lora_penalty_through_the_trainer_equals_it_added_by_hand(tmp_path, tasks, tokenizer):
    """Task 1 of O-LoRA (past adapter folded from task 0): one SGD step of the Trainer with
    regularizer = ContinualLoRA.penalty equals w − η ∇(L + penalty) by hand; the new adapter's B is 0
    at init, so its A moves by the penalty's gradient only."""

    def task1():
        model = _model(tokenizer)
        continual = ContinualLoRA(model, "o-lora", orth_weight=0.5, l2_weight=0.1, seed=0)
        continual.start_task(0)
        continual.end_task()
        continual.start_task(1)
        return model, continual

    model, continual = task1()
    trainer = _InOrder(model=model, args=_args(tmp_path, 1, 1, optim="sgd"), train_dataset=_rows(tokenizer, tasks[1]),
                       processing_class=tokenizer,
                       data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
                       flat_method="sgd", regularizer=lambda _m: continual.penalty())
    trainer.train()
    ref, ref_continual = task1()
    params = ref_continual.trainable_parameters()
    penalty = ref_continual.penalty()
    assert penalty.dtype == torch.float64 and penalty.item() > 0.1
    batch = _batches(tokenizer, tasks[1])[0]
    grads = torch.autograd.grad(_loss(ref, batch) + penalty, params)
    data_only = torch.autograd.grad(_loss(ref, batch), params)
    got = continual.trainable_parameters()
    assert [p.shape for p in got] == [p.shape for p in params] and len(got) == 32
    for a, p, g in zip(got, params, grads):
        torch.testing.assert_close(a, p.detach() - LR * g, rtol=0, atol=1e-10)
    assert max((g - d).abs().max().item() for g, d in zip(grads, data_only)) > 1e-3


def test_regularizer_arguments_are_validated(tmp_path, tasks, tokenizer):
    args, rows = _args(tmp_path, 1, 1), _rows(tokenizer, tasks[0])
    with pytest.raises(ValueError, match=r"Invalid regularizer: 'float'.*callable"):
        FlatMinimaTrainer(model=_model(tokenizer), args=args, train_dataset=rows, regularizer=0.5)
    with pytest.raises(ValueError, match=r"Invalid regularizer_at: 'sometimes'.*'every', 'clean'"):
        FlatMinimaTrainer(model=_model(tokenizer), args=args, train_dataset=rows, regularizer=_r,
                          regularizer_at="sometimes")
    with pytest.raises(ValueError, match=r"Invalid descent_hook: 'str'"):
        FlatMinimaTrainer(model=_model(tokenizer), args=args, train_dataset=rows, descent_hook="project")


def test_exact_match_by_hand_and_greedy_decoding(tasks, tokenizer):
    assert seq2seq.exact_match([" positive", "negative ", "positive", "neg"],
                               ["positive", "negative", "negative", "negative"]) == 0.5
    assert seq2seq.exact_match(["Positive"], ["positive"]) == 0.0
    with pytest.raises(ValueError, match="predictions"):
        seq2seq.exact_match(["positive"], ["positive", "negative"])
    model = _model(tokenizer)
    model.train()
    pairs = tasks[0].test[:5]
    out = seq2seq.evaluate(model, tokenizer, pairs, batch_size=2, max_new_tokens=3)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    # greedy decoding by hand: argmax of the next token, from the pad token, until </s> or 3 tokens
    hand = []
    with torch.no_grad():
        for source, _ in pairs:
            enc = {k: v for k, v in tokenizer(source, return_tensors="pt").items() if k in ("input_ids", "attention_mask")}
            ids = [model.config.decoder_start_token_id]
            for _ in range(3):
                logits = model(**enc, decoder_input_ids=torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
                if ids[-1] == tokenizer.eos_token_id:
                    break
            hand.append(tokenizer.decode(ids, skip_special_tokens=True))
    assert out["predictions"] == hand
    assert out["accuracy"] == seq2seq.exact_match(hand, [t for _, t in pairs])
    rows = seq2seq.encode(tokenizer, pairs)
    collate = transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    with torch.no_grad():
        model.eval()
        token_loss = sum(model(**collate([r])).loss.item() * len(r["labels"]) for r in rows)
        model.train()
    assert out["loss"] == pytest.approx(token_loss / sum(len(r["labels"]) for r in rows), rel=1e-12)


def test_tokenizer_is_a_deterministic_function_of_the_texts(tasks, tokenizer):
    shuffled = [seq2seq.Seq2SeqTask(t.name, list(reversed(t.train)), t.test) for t in tasks]
    again = seq2seq.build_tokenizer(shuffled)

    def pipeline(tok):  # the tokenizer's definition, without the call-time truncation/padding state
        return {k: v for k, v in json.loads(tok.backend_tokenizer.to_str()).items() if k not in ("truncation", "padding")}

    assert pipeline(again) == pipeline(tokenizer) == pipeline(seq2seq.build_tokenizer(tasks))
    vocab = tokenizer.get_vocab()
    assert [vocab[w] for w in ("<pad>", "</s>", "<unk>", "negative", "positive")] == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    # after the reserved words, ids follow decreasing counts (ties alphabetical), counted by hand
    counts, backend = {}, tokenizer.backend_tokenizer
    for t in tasks:
        for s, y in t.train:
            for w in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(s + " " + y)):
                counts[w[0]] = counts.get(w[0], 0) + 1
    reserved = {"<pad>", "</s>", "<unk>", "negative", "positive", "sentiment", ":", "tweets", "movies"}
    ranked = sorted((w for w in counts if w not in reserved), key=lambda w: (-counts[w], w))
    assert [vocab[w] for w in ranked[:20]] == list(range(len(reserved), len(reserved) + 20))
    assert len(vocab) == len(reserved) + len(ranked)
    enc = tokenizer("tweets sentiment: zzqx good")["input_ids"]
    assert enc[:3] == [vocab["tweets"], vocab["sentiment"], vocab[":"]] and enc[3] == 2 and enc[-1] == 1
    small = seq2seq.build_tokenizer(tasks, vocab_size=50)
    assert len(small.get_vocab()) == 50 and small.get_vocab()["positive"] == 4


def test_continual_run_two_tasks_two_orders_offline_under_out_dir(tmp_path, tasks, tokenizer, monkeypatch):
    """SAM + O-LoRA over 2 tasks in both orders: the record's metrics are continual_metrics of the
    saved matrix; nothing is written outside out_dir (temp folder and working folder stay empty);
    the caller's RNGs and the model's mode are untouched."""
    scratch, cwd = tmp_path / "tmp", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.chdir(cwd)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state())
    for order in (["tweets", "movies"], ["movies", "tweets"]):
        out = tmp_path / "out" / "-".join(order)
        model = _model(tokenizer, torch.float32)
        model.eval()
        record = seq2seq.train_seq2seq_continual(
            model, tokenizer, tasks, order, "o-lora", "sam", {"rho": 0.05}, out_dir=out, epochs=1, batch_size=8,
            lr=0.03, seed=0, strategy_options={"orth_weight": 0.5}, logging_steps=1)
        assert not model.training
        saved = json.loads((out / "accuracy_matrix.json").read_text())
        on_disk = json.loads((out / "record.json").read_text())
        assert saved["tasks"] == record["order"] == order
        assert saved["matrix"] == record["accuracy"] == on_disk["accuracy"]
        assert record["metrics"] == jsonable(continual_metrics(saved["matrix"], saved["baseline"]))
        assert on_disk["metrics"] == record["metrics"]
        assert record["metrics"]["average_accuracy"] == pytest.approx(sum(saved["matrix"][-1]) / 2, abs=1e-15)
        assert all(abs(v * 12 - round(v * 12)) < 1e-9 for row in record["accuracy"] for v in row)  # 12 test sentences
        final = [seq2seq.exact_match(p, [y for _, y in t.test])
                 for p, t in zip(record["predictions"], [tasks[[x.name for x in tasks].index(n)] for n in order])]
        assert final == record["accuracy"][-1]
        assert [p["steps"] for p in record["per_task"]] == [3, 3] and all(len(p["losses"]) == 3 for p in record["per_task"])
        assert list(model.peft_config) == ["past"]  # both tasks folded into the frozen past
    assert sorted(os.listdir(scratch)) == [] and sorted(os.listdir(cwd)) == []
    written = {p.name for p in (tmp_path / "out" / "tweets-movies").iterdir()}
    assert written - {"accuracy_matrix.png", "trainer"} == {"accuracy_matrix.csv", "accuracy_matrix.json", "record.json"}
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.random.get_rng_state(), states[2])


def test_bad_run_arguments_are_refused_before_anything_changes(tmp_path, tasks, tokenizer):
    model = _model(tokenizer)
    with pytest.raises(ValueError, match="Invalid strategy"):
        seq2seq.train_seq2seq_continual(model, tokenizer, tasks, strategy="x-lora", out_dir=tmp_path)
    with pytest.raises(ValueError, match="Invalid order"):
        seq2seq.train_seq2seq_continual(model, tokenizer, tasks, ["tweets", "tweets"], out_dir=tmp_path)
    grads = [p.requires_grad for p in model.parameters()]
    for bad, match in (({"method": "samm"}, "samm"), ({"method": "sam", "hyperparameters": {"sigma": 1.0}},
                                                      "Invalid hyperparameters"),
                       ({"regularizer_at": "sometimes"}, "Invalid regularizer_at"), ({"optim": "nope"}, "nope")):
        with pytest.raises(ValueError, match=match):
            seq2seq.train_seq2seq_continual(model, tokenizer, tasks, strategy="o-lora", out_dir=tmp_path, **bad)
        assert [p.requires_grad for p in model.parameters()] == grads
    with pytest.raises(ValueError, match="Invalid domains"):
        seq2seq.seq2seq_tasks(["tweets", "imdb"])
    with pytest.raises(ValueError, match="Invalid heads"):
        seq2seq.tiny_t5(100, d_model=16, heads=3)
    assert list(model.peft_config) == ["default"] and not any(tmp_path.iterdir())


def test_example_runs_from_its_config(tmp_path):
    import runpy
    from pathlib import Path

    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "t5_continual.py"))
    summary = example["main"](["--out", str(tmp_path), "--methods", "sgd", "--strategies", "n-lora", "--orders", "1",
                               "--train-subset", "8", "--test-subset", "4", "--epochs", "1"])
    (key, unit), = summary.items()
    assert key == "sgd/n-lora/tweets-movies-amazon-nyt" and len(unit["accuracy"]) == 4
    saved = json.loads((tmp_path / "sgd" / "n-lora" / "tweets-movies-amazon-nyt" / "accuracy_matrix.json").read_text())
    assert saved["matrix"] == unit["accuracy"]
    assert unit["metrics"] == jsonable(continual_metrics(saved["matrix"], saved["baseline"]))


def test_a_regularizer_or_descent_hook_under_deepspeed_is_refused(tmp_path, tasks, tokenizer):
    """(DeepSpeedStep takes neither; the Trainer's flag stands in for a DeepSpeed run.)"""
    from flatminima.integrations.hf import FlatMinimaMixin

    class DeepSpeedTrainer(transformers.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.is_deepspeed_enabled = True

    class Flat(FlatMinimaMixin, DeepSpeedTrainer):
        pass

    args, rows = _args(tmp_path, 1, 1), _rows(tokenizer, tasks[0])
    for hook in ({"regularizer": _r}, {"descent_hook": _halve_a}):
        with pytest.raises(ValueError, match=f"Invalid {next(iter(hook))}: 'a {next(iter(hook))} under DeepSpeed'"):
            Flat(model=_model(tokenizer), args=args, train_dataset=rows, **hook)
    assert Flat(model=_model(tokenizer), args=args, train_dataset=rows).regularizer is None
