"""Label noise, the training-set evaluation (memorization), the paired comparisons over seeds and
the evidence presets: exact shares, hand computations, and a noisy run through ``flatminima run``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from flatminima import data, runner
from flatminima.cli import main
from flatminima.experiment import ExperimentConfig, preset
from flatminima.experiment.comparisons import (paired_comparisons, paired_difference, paired_table, t_quantile_975,
                                               verdict)
from flatminima.experiment.evidence_presets import EVIDENCE_PRESETS, EVIDENCE_SUITES
from flatminima.experiment.training import evaluate_train
from flatminima.experiment.units import unit_settings


def _digits(n: int = 400) -> data.Dataset:
    return data.load_task("digits").subset(n)


# -- the noise ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.1, 0.4, 0.6])
def test_noise_corrupts_exactly_the_share_asked_always_to_another_class(fraction):
    clean = _digits()
    noisy = clean.with_label_noise(fraction, seed=3)
    n = len(clean.y_train)
    wrong = noisy.y_train != clean.y_train
    assert int(wrong.sum()) == round(fraction * n)
    # the corrupted examples are the first round(p n) of the seeded permutation
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:round(fraction * n)]
    assert torch.equal(wrong.nonzero().flatten(), chosen.sort().values)
    assert torch.equal(noisy.y_train_clean, clean.y_train) and clean.y_train_clean is None
    assert torch.equal(noisy.x_train, clean.x_train) and torch.equal(noisy.y_test, clean.y_test)
    assert int(noisy.y_train.min()) >= 0 and int(noisy.y_train.max()) < clean.num_classes
    again = clean.with_label_noise(fraction, seed=3)
    assert torch.equal(again.y_train, noisy.y_train)  # deterministic
    assert not torch.equal(clean.with_label_noise(fraction, seed=4).y_train, noisy.y_train)


def test_noise_is_uniform_over_the_other_classes():
    """Over many examples of one class, each of the 9 other classes is about equally frequent."""
    y = torch.zeros(90_000, dtype=torch.long)
    base = data.Dataset("ones", torch.zeros(len(y), 1), y, torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), 10, (1,))
    noisy = base.with_label_noise(0.5).y_train
    counts = torch.bincount(noisy, minlength=10)
    assert counts[0] == 45_000
    expected = 45_000 / 9
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi2 < 27.9  # the 0.999 quantile of chi-squared with 8 degrees of freedom


def test_noise_refuses_what_it_cannot_do():
    clean = _digits(100)
    for fraction, message in [(1.0, r"Invalid label_noise: 1\.0"), (-0.1, "Invalid label_noise"),
                              (0.001, r"at least 1/100")]:
        with pytest.raises(ValueError, match=message):
            clean.with_label_noise(fraction)
    with pytest.raises(ValueError, match="noise added once"):
        clean.with_label_noise(0.2).with_label_noise(0.2)
    assert clean.with_label_noise(0.0) is clean
    sub = clean.with_label_noise(0.5).subset(50, seed=1)  # the clean labels follow a subset
    idx = torch.randperm(100, generator=torch.Generator().manual_seed(1))[:50]
    assert torch.equal(sub.y_train_clean, clean.y_train[idx])


# -- training-set evaluation ---------------------------------------------------------------------

class Fixed(nn.Module):
    """Predicts the class stored in the first input feature."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes
        self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0].long(), self.classes).float() + self.bias


def test_train_accuracy_and_memorization_equal_a_hand_count():
    y_true = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    y_noisy = torch.tensor([0, 1, 2, 3, 1, 2, 3, 0])  # the last four corrupted
    predicted = torch.tensor([0, 1, 0, 3, 1, 1, 3, 3])  # memorizes 2 of the 4 wrong labels
    x = torch.stack([predicted.float(), torch.zeros(8)], 1)
    ds = data.Dataset("hand", x, y_noisy, x[:1], y_true[:1], 4, (2,), y_train_clean=y_true)
    model = Fixed(4).eval()
    got = evaluate_train(model, ds, batch_size=3)
    assert got == {"train_acc": (predicted == y_noisy).float().mean().item(), "memorized": 0.5}
    assert got["train_acc"] == 5 / 8 and not model.training
    clean = data.Dataset("hand", x, y_true, x[:1], y_true[:1], 4, (2,))
    assert evaluate_train(model.train(), clean, 8) == {"train_acc": 5 / 8} and model.training


def test_cnn_head_hidden_adds_one_relu_layer():
    from flatminima.experiment import build_model

    ds = data.Dataset("x", torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long), torch.zeros(1, 1, 28, 28),
                      torch.zeros(1, dtype=torch.long), 10, (1, 28, 28))
    plain, hidden = build_model("cnn", ds, width=4), build_model("cnn", ds, width=4, head_hidden=32)
    assert isinstance(plain.head, nn.Linear) and plain.head.in_features == 8 * 7 * 7
    assert [type(m) for m in hidden.head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert hidden.head[0].out_features == 32 and hidden(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="Invalid model_options.head_hidden: 0"):
        ExperimentConfig.from_dict({"model": "cnn", "model_options": {"head_hidden": 0}}, base=preset("quick"))


# -- the config -----------------------------------------------------------------------------------

def test_noise_settings_are_validated_and_enter_the_fingerprint_only_when_set():
    config = preset("quick")
    unit = runner.plan_units(config)[0]
    settings = unit_settings(config, unit)
    assert "label_noise" not in settings and "eval_train" not in settings  # older records stay done
    noisy = ExperimentConfig.from_dict({"label_noise": 0.4, "eval_train": True}, base=config)
    assert unit_settings(noisy, unit)["label_noise"] == 0.4
    assert runner.fingerprint(noisy, unit) != runner.fingerprint(config, unit)
    compared = ExperimentConfig.from_dict({"compare": [["sam", "sgd"]]}, base=config)
    assert runner.fingerprint(compared, unit) == runner.fingerprint(config, unit)  # a report setting
    for change, message in [({"label_noise": 1.0}, r"Invalid label_noise: 1\.0"),
                            ({"compare": [["sam", "nope"]]}, r"Invalid compare: .*pairs of the config's methods"),
                            ({"compare": [["sam", "sam"]]}, r"Invalid compare"),
                            ({"eval_train": "yes"}, r"Invalid eval_train: 'yes' \(expected true or false\)")]:
        with pytest.raises(ValueError, match=message):
            ExperimentConfig.from_dict(change, base=config)
    with pytest.raises(ValueError, match="Invalid label_noise: 0.2 .*continual"):
        ExperimentConfig.from_dict({"label_noise": 0.2}, base=preset("continual_quick"))


def test_narrowing_the_methods_keeps_the_comparisons_among_them(tmp_path, capsys):
    from flatminima.cli import build_parser
    from flatminima.commands import resolve_experiments, split_items

    def resolved(*flags):
        parser = build_parser()
        args, extra = parser.parse_known_args(["run", "--preset", "long_schedule", *flags, "--out", str(tmp_path)])
        split_items(parser, args, extra)
        return next(iter(resolve_experiments(args).values()))

    assert resolved().compare == [["mrwp", "sam"], ["mrwp", "rwp"], ["sam-2b", "sam"], ["mrwp-2b", "mrwp"]]
    assert resolved("--methods", "sgd,sam,sam-2b").compare == [["sam-2b", "sam"]]
    assert resolved("--methods", "sgd").compare == []


def test_evidence_presets_are_what_their_docs_say():
    assert EVIDENCE_SUITES["label_noise"] == ("label_noise_0", "label_noise_40", "label_noise_60")
    for name in EVIDENCE_PRESETS:
        config = preset(name)
        assert config.out_dir.endswith(name) and len(config.seeds) >= 3
        assert "flatlora" not in config.methods
    for level in (0, 40, 60):
        cpu, gpu = preset(f"label_noise_{level}"), preset(f"label_noise_gpu_{level}")
        assert cpu.label_noise == gpu.label_noise == level / 100 and cpu.eval_train
        assert cpu.train_subset == 2000 and gpu.train_subset is None and gpu.device == "cuda"
        assert cpu.methods["gasam"]["granularity"] == "model" and cpu.methods["sam-rho0.2"]["rho"] == 0.2
    long = preset("long_schedule")
    assert long.epochs == preset("long_schedule_gpu").epochs == 200
    assert {"sgd", "sam", "rwp", "mrwp", "sam-2b", "mrwp-2b"} == set(long.methods)


# -- paired comparisons ---------------------------------------------------------------------------

def test_t_quantiles_and_the_paired_interval():
    assert t_quantile_975(1) == 12.7062 and t_quantile_975(2) == 4.3027 and t_quantile_975(30) == 2.0423
    for df, exact in [(31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799), (10_000, 1.9602)]:
        assert abs(t_quantile_975(df) - exact) < 2e-4, df
    with pytest.raises(ValueError, match="df"):
        t_quantile_975(0)
    d = paired_difference([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])  # differences 2, 3, 4
    assert d["n"] == 3 and d["mean"] == 3.0 and d["std"] == 1.0
    half = 4.3027 / math.sqrt(3)
    assert d["ci"] == pytest.approx((3 - half, 3 + half))
    assert verdict(d["ci"]) == "higher" and verdict((-2.0, -1.0)) == "lower"
    assert verdict((-1.0, 1.0)) == "not established" and paired_difference([1.0], [0.0])["ci"] is None


def _record(method: str, seed: int, acc: float, lam: float) -> dict:
    return {"method": method, "registry_name": "base" if method == "sgd" else "sam", "seed": seed,
            "final": {"test_acc": acc, "time_per_step_s": 0.01}, "diagnostics": {"summary": {"lambda_max": lam}}}


def test_paired_table_pairs_by_seed():
    records = [_record("sgd", s, 0.50 + 0.1 * s, 10.0 * (s + 1)) for s in range(3)]
    records += [_record("sam", s, 0.52 + 0.1 * s + 0.01 * s, 5.0 * (s + 1)) for s in (2, 0, 1)]
    records.append(_record("sam", 7, 0.99, 1.0))  # a seed the reference lacks: left out
    [row] = paired_comparisons(records)
    assert row["seeds"] == [2, 0, 1]
    acc = row["metrics"]["test accuracy"]
    assert acc["mean"] == pytest.approx(3.0) and acc["std"] == pytest.approx(1.0)
    lam = row["metrics"]["λ_max"]
    assert math.exp(lam["mean"]) == pytest.approx(0.5) and lam["std"] == pytest.approx(0.0, abs=1e-12)
    table = paired_table(records)
    assert table.rows[0][-1].text == "higher" and table.rows[0][3].text == "×0.50 [0.50, 0.50]"
    assert paired_table(records[:3]) is None  # the reference alone
    records += [_record("asam", s, 0.50 + 0.1 * s + 0.02, 20.0 * (s + 1)) for s in range(2)]
    rows = paired_comparisons(records, [["sam", "asam"], ["sam", "nope"]])
    assert [(r["method"], r["reference"], r["seeds"]) for r in rows] == [
        ("sam", "sgd", [2, 0, 1]), ("asam", "sgd", [0, 1]), ("sam", "asam", [0, 1])]
    assert rows[2]["metrics"]["test accuracy"]["mean"] == pytest.approx(0.5)  # +2 and +3 against +2 and +2
    assert [r[0].text for r in paired_table(records, [["sam", "asam"]]).rows] == ["sam vs sgd", "asam vs sgd",
                                                                                 "sam vs asam"]


# -- end to end -----------------------------------------------------------------------------------

def test_a_noisy_run_records_memorization_and_tabulates_the_comparison(tmp_path):
    out = tmp_path / "noisy"
    assert main(["run", "--preset", "quick", "--methods", "sgd,sam", "--seeds", "0,1", "--epochs", "3",
                 "label_noise=0.4", "eval_train=true", "diagnostics=[hessian]", "--out", str(out),
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    noisy = _digits(10**6).with_label_noise(0.4)  # the quick preset's data: digits, whole, then noise
    for name in ("sgd_seed0", "sam_seed1"):
        record = json.loads((out / "runs" / f"{name}.json").read_text())
        curves, final = record["curves"], record["final"]
        assert len(curves["train_acc"]) == len(curves["memorized"]) == len(curves["eval_step"])
        assert final["train_acc"] == curves["train_acc"][-1] and 0 <= final["memorized"] <= 1
        assert curves["train_acc"][0] != curves["train_acc"][-1]
    assert int((noisy.y_train != noisy.y_train_clean).sum()) == round(0.4 * len(noisy.y_train))
    [row] = results["paired"]
    assert row["method"] == "sam" and row["reference"] == "sgd" and row["seeds"] == [0, 1]
    summary = {r["method"]: r for r in results["summary"]}
    assert summary["sgd"]["memorized_mean"] is not None
    md = (out / "results.md").read_text()
    assert "wrong labels memorized (%)" in md and "Each method against sgd on the same seeds" in md
    assert "train_acc_mean" in (out / "results.csv").read_text().splitlines()[0]
