"""Per-task flatness over a continual run: the matrices equal direct diagnostics calls on models
restored from the saved checkpoints (float64, same seeds), the loss lines match the interpolation
computed by hand, nothing of the model changes, and the flatness-forgetting correlation matches
numpy by hand."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.continual.adapters import ContinualLoRA
from flatminima.continual.flatness import (PerTaskFlatness, direct_flatness, embed_state,
                                           flatness_forgetting_correlation, line_barrier, line_losses, load_checkpoint,
                                           restore_checkpoint)

peft = pytest.importorskip("peft")

T, ITER, POINTS = 3, 8, 5


def build(strategy: str, upto: int = -1):
    """The run's model as built (seed 0), its adapters replayed without training up to task ``upto``."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(base, config).to(torch.float64)
    cl = ContinualLoRA(model, strategy, trainable=("2",), seed=3,
                       config=peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"], lora_dropout=0.0))
    for t in range(upto + 1):
        cl.start_task(t)
        cl.end_task()
    return model, cl


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def task_batches(i: int) -> list:
    g = torch.Generator().manual_seed(100 + i)
    return [(torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
            for _ in range(3)]


def train_run(strategy: str, folder, quantities=("lambda_max", "trace", "line"), spaces=("lora", "all")):
    model, cl = build(strategy)
    flat = PerTaskFlatness(quantities, spaces, batches=2, iterations=ITER, line_points=POINTS, seed=5,
                           checkpoint_dir=folder)
    flat.start(model)
    snapshots = []
    for j in range(T):
        cl.start_task(j)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
        for batch in task_batches(j):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
        cl.end_task()
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        flat.after_task(j, model, [(loss_fn, task_batches(i)) for i in range(j + 1)])
    return model, flat, snapshots


@pytest.mark.parametrize("strategy", ["seq-lora", "inc-lora", "o-lora"])
def test_matrices_equal_direct_calls_on_restored_checkpoints(strategy, tmp_path):
    model, flat, snapshots = train_run(strategy, tmp_path)
    rec = flat.record()
    assert rec["checkpoints"] == [f"task{j}.pt" for j in range(T)]
    fresh = []
    for j in range(T):
        m, _ = build(strategy, upto=j)
        restore_checkpoint(m, tmp_path / f"task{j}.pt")
        state = m.state_dict()
        assert set(state) == set(snapshots[j])
        assert all(torch.equal(state[k], snapshots[j][k]) for k in state), "restore is bit-exact"
        fresh.append(m)
    for j in range(T):
        for i in range(T):
            for key in ("lambda_max/lora", "lambda_max/all", "trace/lora", "trace/all"):
                got = rec["quantities"][key][j][i]
                if i > j:
                    assert got is None
                    continue
                quantity, space = key.split("/")
                want = direct_flatness(fresh[j], loss_fn, task_batches(i)[:2], space, quantity, iterations=ITER, seed=5)
                assert abs(got - want) <= 1e-10 * max(1.0, abs(want)), (key, j, i)
    # the Hessian on the task just learned: positive top eigenvalue, the trace of a 2-layer net finite
    assert all(rec["quantities"]["lambda_max/all"][j][j] > 0 for j in range(T))

    t = np.linspace(0, 1, POINTS)
    assert rec["line"]["t"] == list(t)
    for j in range(T):
        for i in range(T):
            barrier = rec["quantities"]["line/barrier"][j][i]
            if i >= j:
                assert barrier is None
                assert f"{i}>{j}" not in rec["line"]["loss"]
                continue
            loss = np.asarray(rec["line"]["loss"][f"{i}>{j}"])
            batches = task_batches(i)[:2]
            # θ(0) computes θ_i's function (later adapters zero, a folded adapter zero-padded), θ(1) is θ_j
            with torch.no_grad():
                end_i = sum(6 * loss_fn(fresh[i], b).item() for b in batches) / 12
                end_j = sum(6 * loss_fn(fresh[j], b).item() for b in batches) / 12
            assert loss[0] == pytest.approx(end_i, abs=1e-12) and loss[-1] == pytest.approx(end_j, abs=1e-12)
            assert barrier == pytest.approx(loss.max() - max(loss[0], loss[-1]), abs=1e-15)
            if strategy == "seq-lora":  # one structure: θ(t) by hand, tensor by tensor
                a, b = fresh[i].state_dict(), fresh[j].state_dict()
                for k, tk in enumerate(t):
                    m = copy.deepcopy(fresh[j])
                    with torch.no_grad():
                        for name, p in m.state_dict(keep_vars=True).items():
                            p.copy_((1 - tk) * a[name] + tk * b[name])
                        want = sum(6 * loss_fn(m, bt).item() for bt in batches) / 12
                    assert loss[k] == pytest.approx(want, abs=1e-12)
            # the same line from the file, directly
            direct = line_losses(fresh[j], load_checkpoint(tmp_path / f"task{i}.pt"), loss_fn, batches, t)
            np.testing.assert_allclose(direct, loss, rtol=0, atol=1e-12)


def test_nothing_of_the_model_changes_and_memory_checkpoints(tmp_path):
    model, cl = build("inc-lora")
    flat = PerTaskFlatness(("lambda_max", "trace", "line"), ("lora", "all", "trainable"), batches=1, iterations=4,
                           line_points=3)
    flat.start(model)
    for j in range(2):
        cl.start_task(j)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05)
        cl.end_task()
        model.train(j == 0)
        model.base_model.model[1].train(True)  # mixed modes stay mixed
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        grads = [p.requires_grad for p in model.parameters()]
        modes = [m.training for m in model.modules()]
        rng = torch.get_rng_state()
        flat.after_task(j, model, [(loss_fn, task_batches(i)) for i in range(j + 1)])
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert grads == [p.requires_grad for p in model.parameters()]
        assert modes == [m.training for m in model.modules()]
        assert torch.equal(rng, torch.get_rng_state())
    rec = flat.record()
    assert rec["checkpoints"] == [] and not list(tmp_path.iterdir())
    assert sorted(rec["quantities"]) == sorted([f"{q}/{s}" for q in ("lambda_max", "trace")
                                                for s in ("lora", "all", "trainable")] + ["line/barrier"])
    assert rec["quantities"]["line/barrier"] == [[None, None], [rec["quantities"]["line/barrier"][1][0], None]]
    assert isinstance(rec["quantities"]["line/barrier"][1][0], float)
    budget = rec["budget"]
    assert (budget["batches"], budget["iterations"], budget["line_points"]) == (1, 4, 3)
    # Hutchinson: exactly `iterations` probes per run; Lanczos at most `iterations` products
    runs = 3 * 3  # (1 + 2) tasks × 3 spaces
    assert runs * 4 < budget["batch_hvps"] <= 2 * runs * 4
    assert budget["line_forwards"] == 3
    # in-memory checkpoints hold only what differs from the model as built: no frozen base weight
    saved = set(flat._checkpoints[1]["state"])
    assert "base_model.model.0.base_layer.weight" not in saved and "base_model.model.2.weight" in saved
    assert "base_model.model.0.lora_A.task1.weight" in saved and "base_model.model.0.lora_A.default.weight" in saved


def test_without_start_the_first_checkpoint_is_the_whole_state_and_finetune_has_no_lora(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(torch.float64)
    flat = PerTaskFlatness(("lambda_max",), ("lora", "all"), batches=1, iterations=3, checkpoint_dir=tmp_path)
    flat.after_task(0, model, [(loss_fn, task_batches(0))])
    assert set(load_checkpoint(tmp_path / "task0.pt")["state"]) == set(model.state_dict())
    rec = flat.record()
    assert rec["quantities"]["lambda_max/lora"] == [[None]] and rec["line"] is None
    assert rec["quantities"]["lambda_max/all"][0][0] == pytest.approx(
        direct_flatness(model, loss_fn, task_batches(0)[:1], "all", "lambda_max", iterations=3), abs=1e-12)


def test_embedding_pads_and_zero_fills():
    model = nn.Linear(3, 2).to(torch.float64)
    checkpoint = {"names": ["weight"], "state": {"weight": torch.ones(1, 3, dtype=torch.float64)}}
    out = embed_state(model, checkpoint, ["weight", "bias"])
    assert torch.equal(out["weight"], torch.tensor([[1.0, 1, 1], [0, 0, 0]], dtype=torch.float64))
    assert torch.equal(out["bias"], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="checkpoint"):  # existed then, not saved, changed since: no value
        embed_state(model, {"names": ["weight", "bias"], "state": {}}, ["bias"])
    with pytest.raises(ValueError, match="checkpoint"):
        embed_state(model, {"names": ["weight"], "state": {"weight": torch.ones(4, 3)}}, ["weight"])
    assert line_barrier([1.0, 3.0, 2.0]) == 1.0 and line_barrier([1.0, 0.5, 2.0]) == 0.0


def test_bad_input_is_refused_before_anything_changes(tmp_path):
    for kwargs, name in [({"quantities": ("sharp",)}, "quantities"), ({"spaces": ("lora", "lora")}, "spaces"),
                         ({"batches": 0}, "batches"), ({"iterations": 0}, "iterations"),
                         ({"line_points": 1}, "line_points"), ({"seed": 1.5}, "seed")]:
        with pytest.raises(ValueError, match=name):
            PerTaskFlatness(**kwargs)
    model, _ = build("seq-lora")
    flat = PerTaskFlatness(checkpoint_dir=tmp_path / "ck")
    with pytest.raises(ValueError, match="Invalid j"):
        flat.after_task(1, model, [(loss_fn, task_batches(0))] * 2)
    with pytest.raises(ValueError, match="evaluations"):
        flat.after_task(0, model, [(loss_fn, task_batches(0))] * 2)
    with pytest.raises(ValueError, match="evaluations"):
        flat.after_task(0, model, [(loss_fn, [])])
    assert not (tmp_path / "ck").exists() and flat.record()["quantities"]["lambda_max/lora"] == []
    other, _ = build("inc-lora", upto=1)
    flat.after_task(0, model, [(loss_fn, task_batches(0))])
    with pytest.raises(ValueError, match="model"):  # another structure: refused, nothing written
        before = {k: v.clone() for k, v in other.state_dict().items()}
        restore_checkpoint(other, tmp_path / "ck" / "task0.pt")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="space"):
        direct_flatness(model, loss_fn, task_batches(0), "base", "trace")


# ------------------------------------------------------------------------------ flatness vs forgetting


def unit(lams, acc, key="lambda_max/lora"):
    T = len(acc)
    matrix = [[lams[i] if i == j else (0.0 if i < j else None) for i in range(T)] for j in range(T)]
    return {"scenario": "class", "accuracy": {"class": acc}, "flatness": {"quantities": {key: matrix}}}


A = [[0.9, 0.1, 0.1, 0.1], [0.7, 0.8, 0.1, 0.1], [0.6, 0.7, 0.9, 0.1], [0.5, 0.6, 0.6, 0.9]]
B = [[0.8, 0.1, 0.1, 0.1], [0.8, 0.9, 0.1, 0.1], [0.4, 0.8, 0.7, 0.1], [0.3, 0.9, 0.6, 0.8]]


def test_correlation_by_hand():
    # forgetting f_i = max_{i <= l < 3} a[l][i] - a[3][i]:
    # A: f0 = 0.9 - 0.5 = 0.4, f1 = 0.8 - 0.6 = 0.2, f2 = 0.9 - 0.6 = 0.3
    # B: f0 = 0.8 - 0.3 = 0.5, f1 = 0.9 - 0.9 = 0.0, f2 = 0.7 - 0.6 = 0.1
    ra, rb = unit([3.0, 1.0, 2.0, 9.0], A), unit([4.0, 2.0, 2.0, 9.0], B)
    x = np.array([3.0, 1.0, 2.0, 4.0, 2.0, 2.0])
    y = np.array([0.4, 0.2, 0.3, 0.5, 0.0, 0.1])
    out = flatness_forgetting_correlation([ra, rb, {"accuracy": {"class": A}}], "lora")
    assert (out["n_units"], out["n_points"]) == (2, 6)
    assert out["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    # ranks, ties averaged: x → [5, 1, 3, 6, 3, 3]; y → [5, 3, 4, 6, 1, 2]
    rx, ry = np.array([5, 1, 3, 6, 3, 3.0]), np.array([5, 3, 4, 6, 1, 2.0])
    assert out["spearman"] == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)
    # Unit A alone: x (3, 1, 2) and y (0.4, 0.2, 0.3) rise together: r = 1.
    single = flatness_forgetting_correlation([ra], "lora")
    assert single["pearson"] == pytest.approx(1.0, abs=1e-12) and single["pearson_ci"] is None
    # Two units: a resample is AA (r_A), BB (r_B) or AB/BA (the pooled r), each drawn with
    # probability ≥ 1/4 → the 2.5 % and 97.5 % quantiles of 1000 draws are the least and largest of them.
    r_b = np.corrcoef([4.0, 2.0, 2.0], [0.5, 0.0, 0.1])[0, 1]
    values = [1.0, r_b, np.corrcoef(x, y)[0, 1]]
    assert out["pearson_ci"] == pytest.approx([min(values), max(values)], abs=1e-12)
    again = flatness_forgetting_correlation([ra, rb], "lora")
    assert again == out  # seeded
    # without flatness (older runs): nothing to correlate
    empty = flatness_forgetting_correlation([{"accuracy": {"class": A}, "scenario": "class"}], "all")
    assert (empty["n_units"], empty["pearson"], empty["spearman"]) == (0, None, None)
    flat = flatness_forgetting_correlation([unit([1.0, 1.0, 1.0, 1.0], A)], "lora")
    assert flat["pearson"] is None  # no spread
    with pytest.raises(ValueError, match="level"):
        flatness_forgetting_correlation([ra], "lora", level=95)


# ------------------------------------------------------------------------------ the report


def report_records(with_flatness=True):
    tasks = ["classes 0-1", "classes 2-3", "classes 4-5"]
    records = []
    for seed in (0, 1, 2):
        for strategy in ("seq-lora", "o-lora"):
            base = 0.6 + 0.05 * seed + (0.02 if strategy == "o-lora" else 0.0)
            acc = [[base if i == j else (base - 0.1 * (j - i) * (1 + seed) / 3 if i < j else 0.5) for i in range(3)]
                   for j in range(3)]
            from flatminima.continual.metrics import continual_metrics, jsonable

            metrics = {s: jsonable(continual_metrics(acc)) for s in ("task", "class")}
            record = {
                "unit": f"sam_{strategy}_seed{seed}", "method": "sam", "seed": seed, "strategy": strategy,
                "registry_name": "sam", "hyperparameters": {}, "scenario": "task", "tasks": tasks, "order": tasks,
                "accuracy": {"task": acc, "class": acc}, "metrics": metrics, "lambda_max": {"lora": [1.0, 2.0, 3.0]},
                "final": {"test_acc": metrics["task"]["average_accuracy"], "test_loss": 0.5, "train_loss": 0.4,
                          "time_per_step_s": 0.002, "train_time_s": 1.0, "steps": 10}}
            if with_flatness and not (seed == 2 and strategy == "o-lora"):  # one older record without flatness
                lam = [[(1.0 + seed + 2 * i) if i == j else (0.5 if i < j else None) for i in range(3)]
                       for j in range(3)]
                barrier = [[0.1 * (i + 1) if i < j else None for i in range(3)] for j in range(3)]
                record["flatness"] = {"quantities": {"lambda_max/lora": lam, "lambda_max/all": lam,
                                                     "line/barrier": barrier}}
            records.append(record)
    return records


def test_report_tables_figures_and_page(tmp_path):
    pytest.importorskip("matplotlib")
    from flatminima.continual.metrics import average_incremental_accuracy
    from flatminima.experiment import ExperimentConfig, preset, write_results
    from flatminima.experiment.tables import experiment_tables

    records = report_records()
    tables = {t.key: t for t in experiment_tables(records)}
    summary = tables["continual_summary"]
    assert summary.columns == ["method / strategy (evaluation)", "AAA", "FAA", "forgetting", "BWT", "seeds"]
    row = summary.rows[0]
    assert row[0].text == "sam / seq-lora (task)"
    runs = [r for r in records if r["strategy"] == "seq-lora"]
    aaa = [100 * average_incremental_accuracy(r["accuracy"]["task"]) for r in runs]
    assert row[1].mean == pytest.approx(np.mean(aaa), abs=1e-12) and row[1].std == pytest.approx(np.std(aaa, ddof=1))
    assert row[2].mean == pytest.approx(np.mean([100 * r["metrics"]["task"]["average_accuracy"] for r in runs]))
    assert [r[0].text for r in summary.rows] == ["sam / seq-lora (task)", "sam / seq-lora (class)",
                                                 "sam / o-lora (task)", "sam / o-lora (class)"]
    corr = tables["flatness_forgetting"]
    assert corr.section == "Flatness across tasks"
    assert [r[0].text for r in corr.rows] == ["sam / seq-lora (lora)", "sam / seq-lora (all)", "sam / o-lora (lora)",
                                              "sam / o-lora (all)"]
    # seq-lora: 3 units × 2 tasks; o-lora: the record without flatness left out → 2 units
    assert [(r[1].text, r[2].text) for r in corr.rows] == [("3", "6"), ("3", "6"), ("2", "4"), ("2", "4")]
    want = flatness_forgetting_correlation(runs, "lora")
    assert corr.rows[0][3].mean == want["pearson"] and corr.rows[0][4].mean == want["spearman"]
    lo, hi = want["pearson_ci"]
    assert corr.rows[0][3].text == f"{want['pearson']:+.2f} [{lo:+.2f}, {hi:+.2f}]" and lo <= want["pearson"] <= hi
    assert list(tables)[-2:] == ["continual_time", "flatness_forgetting"]

    config = ExperimentConfig.from_dict({"out_dir": str(tmp_path), "seeds": [0, 1, 2]},
                                        base=preset("continual_quick"))
    write_results(tmp_path, config, records, wall_time=1.0, device=torch.device("cpu"), log=lambda _: None)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Flatness across tasks" in html and "Average incremental accuracy (AAA)" in html
    # continual.png, 2 + 2 accuracy matrices (task, class), 2 groups × 3 flatness heatmaps
    # ... and per space, λ_max right after each task against its forgetting
    assert html.count("<img") == 1 + 4 + 6 + 2
    assert (tmp_path / "flatness" / "forgetting_vs_lambda_max_all.png").is_file()
    from flatminima.continual.metrics import forgetting_per_task
    from flatminima.continual.flatness import flatness_forgetting_points

    r = runs[0]
    xs, ys = flatness_forgetting_points(r, "lora")
    T = len(r["tasks"])
    assert xs == [r["flatness"]["quantities"]["lambda_max/lora"][i][i] for i in range(T - 1)]
    assert ys == [f for f in forgetting_per_task(r["accuracy"][r["scenario"]])[:T - 1]]
    assert (tmp_path / "matrices" / "sam__o-lora__class.png").is_file()
    saved = json.loads((tmp_path / "flatness" / "sam__o-lora.json").read_text())
    # λ_max[1][1] = 1 + seed + 2, averaged over seeds 0 and 1 (seed 2 has no flatness)
    assert saved["runs"] == 2 and saved["quantities"]["lambda_max/lora"][1][1] == pytest.approx((3.0 + 4.0) / 2)
    assert saved["quantities"]["line/barrier"][0] == [None, None, None]

    # older records without any flatness: no flatness section, no error
    older = report_records(with_flatness=False)
    assert "flatness_forgetting" not in {t.key for t in experiment_tables(older)}
    out = tmp_path / "older"
    write_results(out, config, older, wall_time=1.0, device=torch.device("cpu"), log=lambda _: None)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Flatness across tasks" not in page and page.count("<img") == 1 + 4 and not (out / "flatness").exists()
