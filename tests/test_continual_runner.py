"""Class-incremental continual runs through the experiment runner, on image folders built here:
every strategy × SGD/SAM/Flat-LoRA/C-Flat, the seen-class mask, metrics against the saved
matrices, the per-task flatness matrices against direct calls, and the dataset presets' --data-root."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from flatminima.continual.tasks import ContinualTask
from flatminima.data import Dataset
from flatminima.experiment.continual_eval import Evaluator, allowed_classes, train_classes

pytest.importorskip("peft")
PIL = pytest.importorskip("PIL.Image")

CLASSES = 6
COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40), (200, 40, 210), (40, 210, 220)]


def image_folder(root, per_class_train=10, per_class_test=4, size=10, classes=CLASSES, split=True):
    """``root/{train,test}/<class>/<i>.png`` (or ``root/<class>/<i>.png`` with ``split=False``): a
    class's images are its colour plus seeded noise (learnable from a few pixels)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        for part, n in (("train", per_class_train), ("test", per_class_test)) if split else (("", per_class_train),):
            folder = root / part / f"class_{c:02d}" if split else root / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(COLORS[c % len(COLORS)]) + rng.normal(0, 25, (size, size, 3)), 0, 255)
                PIL.fromarray(pixels.astype(np.uint8)).save(folder / f"{part or 'img'}_{i}.png")
    return root


# --------------------------------------------------------------------------------------------
# the masks


def test_class_incremental_scores_mask_classes_not_seen_yet_where_they_would_win():
    """A linear model whose logit for the last task's classes is always the largest: scored with the
    seen classes only, the first task's images are all right; over every logit all wrong."""
    torch.manual_seed(0)
    x = torch.eye(6, dtype=torch.float64)[[0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5]]
    y = torch.tensor([0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5])
    model = nn.Linear(6, 6, bias=True).double()
    with torch.no_grad():
        model.weight.copy_(torch.eye(6, dtype=torch.float64))
        model.bias.copy_(torch.tensor([0, 0, 0, 0, 5.0, 5.0], dtype=torch.float64))  # classes 4, 5 always win
    tasks = []
    for t in range(3):
        keep = (y // 2) == t
        data = Dataset(f"t{t}", x[keep], y[keep], x[keep], y[keep], 6, (6,))
        tasks.append(ContinualTask(f"t{t}", data, [2 * t, 2 * t + 1]))
    evaluator = Evaluator(tasks, 6, ["task", "class", "domain"], 4, torch.device("cpu"))
    after_first = evaluator.scores(model, 0)
    assert after_first["class"][0][0] == 1.0  # seen {0, 1}: the winning logits 4, 5 are masked
    assert after_first["domain"][0][0] == 0.0  # every logit: class 4 or 5 wins
    assert after_first["task"][1][0] == 1.0
    # a task not trained yet competes with the seen classes and its own: {0, 1, 2, 3} for task 1
    assert allowed_classes("class", [t.classes for t in tasks], 1, 0) == [0, 1, 2, 3]
    assert after_first["class"][1][0] == 1.0
    assert after_first["class"][2][0] == 1.0 and evaluator.scores(model, 2)["class"][0][0] == 0.0
    assert train_classes("task", [t.classes for t in tasks], 1, replays=False) == [2, 3]
    assert train_classes("task", [t.classes for t in tasks], 1, replays=True) == [0, 1, 2, 3]
    assert train_classes("seen", [t.classes for t in tasks], 2, replays=False) == [0, 1, 2, 3, 4, 5]
    assert train_classes("all", [t.classes for t in tasks], 2, replays=False) is None


# --------------------------------------------------------------------------------------------
# every strategy × SGD, SAM, Flat-LoRA, C-Flat through `flatminima run`

STRATEGIES = ["seq-lora", "inc-lora", "o-lora", "n-lora", "seq-lora+ewc", "seq-lora+lwf",
              "seq-lora+replay", "seq-lora+agem", "seq-lora+gpm", "seq-lora+ogd", "inc-lora+inflora",
              "seq-lora+ewc+replay"]
METHODS = {"sgd": {}, "sam": {"rho": 0.05}, "flatlora": {"rho": 0.05}, "cflat": {"rho": 0.05}}


def folder_config(root, out, strategies, methods, **continual):
    return {
        "name": "folder-test", "task": "image_folder",
        "task_options": {"root": str(root), "layout": "train_test", "init_cls": 2, "increment": 2, "image_size": 8,
                         "augment": False},
        "model": "resnet_lora", "model_options": {"width": 4, "blocks": [1], "r": 2},
        "methods": methods, "seeds": [0], "epochs": 1, "batch_size": 10, "lr": 0.1, "eval_every": 100,
        "eval_batch_size": 50, "diagnostics_samples": 8, "out_dir": str(out), "tensorboard": False,
        "continual": {"strategies": strategies,
                      "strategy_options": {"replay": {"size": 12}, "agem": {"per_task": 6, "batch_size": 6},
                                           "ewc": {"weight": 10.0}, "ogd": {"per_task": 4},
                                           "gpm": {"exclude": ["head"]}},
                      **continual}}


@pytest.fixture(scope="module")
def every_strategy(tmp_path_factory):
    root = image_folder(tmp_path_factory.mktemp("folder"))
    out = tmp_path_factory.mktemp("every")
    path = out / "config.json"
    path.write_text(json.dumps(folder_config(root, out / "results", STRATEGIES, METHODS)))
    proc = subprocess.run([sys.executable, "-m", "flatminima", "run", str(path), "--no-progress"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "results"


def test_every_strategy_and_method_completes_and_metrics_equal_the_saved_matrices(every_strategy):
    runs = sorted((every_strategy / "runs").glob("*.json"))
    records = [json.loads(p.read_text()) for p in runs]
    assert {(r["method"], r["strategy"]) for r in records} == {(m, s) for m in METHODS for s in STRATEGIES}
    for r in records:
        assert r["scenario"] == "class" and r["evaluations"] == ["task", "class"]
        assert r["classes"] == [[0, 1], [2, 3], [4, 5]]
        for e in r["evaluations"]:
            a = np.array(r["accuracy"][e])
            T = len(a)
            final = a[-1].mean()
            aaa = np.mean([a[j, :j + 1].mean() for j in range(T)])
            forgetting = np.mean([a[i:T - 1, i].max() - a[-1, i] for i in range(T - 1)])
            bwt = np.mean([a[-1, i] - a[i, i] for i in range(T - 1)])
            fwt = np.mean([a[i - 1, i] - r["baseline"][e][i] for i in range(1, T)])
            m = r["metrics"][e]
            assert m["average_accuracy"] == pytest.approx(final, abs=1e-12)
            assert m["average_incremental_accuracy"] == pytest.approx(aaa, abs=1e-12)
            assert m["forgetting"] == pytest.approx(forgetting, abs=1e-12)
            assert m["backward_transfer"] == pytest.approx(bwt, abs=1e-12)
            assert m["forward_transfer"] == pytest.approx(fwt, abs=1e-12)
        # the seen-class mask only removes rivals: task-aware accuracy bounds class-incremental
        assert all(t >= c for rt, rc in zip(r["accuracy"]["task"], r["accuracy"]["class"]) for t, c in zip(rt, rc))
    # two steps a task learn these colours above chance (0.5 task-aware), on average over the runs
    assert np.mean([np.diag(r["accuracy"]["task"]).mean() for r in records]) > 0.6
    md = (every_strategy / "results.md").read_text()
    assert "| cflat / inc-lora+inflora |" in md


# --------------------------------------------------------------------------------------------
# per-task flatness through the runner equals the diagnostics called at the saved checkpoints


def test_flatness_matrices_equal_direct_calls_at_the_saved_checkpoints(tmp_path):
    from flatminima.continual.flatness import direct_flatness, restore_checkpoint
    from flatminima.continual.tasks import load_sequence
    from flatminima.experiment.continual_eval import logit_mask, task_loss, test_batches
    from flatminima.experiment.models import build_model
    from dataclasses import replace

    root = image_folder(tmp_path / "folder")
    out = tmp_path / "out"
    config = folder_config(root, out, ["seq-lora"], {"sam": {"rho": 0.05}},
                           flatness={"batches": 1, "iterations": 6, "line_points": 3})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "flatminima", "run", str(path), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record_path,) = (out / "runs").glob("*.json")
    record = json.loads(record_path.read_text())
    flat = record["flatness"]
    unit_dir = out / "runs" / record["unit"]
    assert flat["checkpoints"] == ["task0.pt", "task1.pt", "task2.pt"]
    sequence = load_sequence("image_folder", **config["task_options"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("resnet_lora", replace(sequence.tasks[0].data, num_classes=6), **config["model_options"])
    device = torch.device("cpu")
    for j in range(3):
        restore_checkpoint(model, unit_dir / "checkpoints" / f"task{j}.pt")
        for i in range(3):
            for space in ("lora", "all"):
                for quantity in ("lambda_max", "trace"):
                    value = flat["quantities"][f"{quantity}/{space}"][j][i]
                    if i > j:
                        assert value is None
                        continue
                    loss = task_loss(logit_mask(6, record["classes"][i], device))
                    batches = test_batches(sequence.tasks[i].data, config["diagnostics_samples"], device, 1)
                    direct = direct_flatness(model, loss, batches, space, quantity, iterations=6, seed=0)
                    assert value == pytest.approx(direct, rel=1e-6, abs=1e-9), (quantity, space, i, j)
    barrier = flat["quantities"]["line/barrier"]
    assert barrier[0][0] is None and barrier[2][0] is not None and barrier[0][1] is None
    assert len(flat["line"]["loss"]["0>2"]) == 3
    # the report draws the heatmaps and the flatness-vs-forgetting section
    html = (out / "report.html").read_text()
    assert "Flatness across tasks" in html
    assert any((out / "flatness").glob("*.png"))


# --------------------------------------------------------------------------------------------
# the users' presets: --data-root, and what to download without it


def imagenet_r_folder(root, classes=200, per_class=3):
    rng = np.random.default_rng(1)
    for c in range(classes):
        folder = root / "imagenet-r" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            PIL.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"art_{i}.jpg")
    return root


TINY_VIT = ["model_options.arch=null", "model_options.checkpoint=null", "model_options.patch_size=4",
            "model_options.dim=8", "model_options.depth=1", "model_options.heads=2", "model_options.r=2",
            "task_options.image_size=8", "task_options.workers=0", "device=cpu", "epochs=1", "batch_size=8",
            "eval_batch_size=64", "continual.strategies=[seq-lora]", "continual.flatness=null"]


def test_imagenet_r_20_preset_runs_from_data_root_and_says_what_to_download_without_it(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "flatminima", "run", "--preset", "imagenet_r_20", "--out",
                              str(tmp_path / "none"), "--no-progress", "--methods", "sgd", "--seeds", "0", *TINY_VIT],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0
    assert "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar" in missing.stderr
    assert "--data-root" in missing.stderr and not (tmp_path / "none").exists()

    root = imagenet_r_folder(tmp_path / "data")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "flatminima", "run", "--preset", "imagenet_r_20", "--data-root",
                           str(root), "--out", str(out), "--no-progress", "--methods", "sgd", "--seeds", "0",
                           *TINY_VIT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert len(record["tasks"]) == 20 and all(len(c) == 10 for c in record["classes"])
    assert sorted(c for t in record["classes"] for c in t) == list(range(200))
    assert record["class_order"] is not None and sorted(record["class_order"]) == list(range(200))
    assert record["evaluations"] == ["class", "task", "nme"]
    assert np.array(record["accuracy"]["nme"]).shape == (20, 20)
    assert record["provenance"]["data"]["tensors_sha256"]


def test_the_other_dataset_presets_validate_and_name_their_downloads(tmp_path):
    from flatminima.experiment.presets import preset

    for name, url in (("cifar100_10", "cifar-100-python.tar.gz"), ("cub_20", "data.caltech.edu"),
                      ("domainnet_5", "M3SDA")):
        config = preset(name)
        assert config.continual["flatness"] is not None and config.model == "vit_peft_lora"
        proc = subprocess.run([sys.executable, "-m", "flatminima", "show", "--preset", name, "--out",
                               str(tmp_path / name)], capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and url in proc.stderr, proc.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# per-task schedule


def test_warmup_then_cosine_per_task_follows_the_formula():
    import math

    from flatminima.experiment.training import lr_schedule

    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.2)
    schedule = lr_schedule(opt, "cosine", total=10, warmup_steps=4)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    expected = [0.2 * (s + 1) / 4 for s in range(4)] + [0.2 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 6))
                                                          for s in range(4, 10)]
    assert seen == pytest.approx(expected, abs=1e-15)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_schedule(opt, "cosine", total=4, warmup_steps=4)


def test_flatness_of_a_diverged_model_is_recorded_as_missing_not_raised():
    from flatminima.continual.flatness import PerTaskFlatness

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    flatness = PerTaskFlatness(quantities=["lambda_max", "trace"], spaces=["all"], iterations=4)
    flatness.start(model)
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))  # what a diverged task leaves
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    flatness.after_task(0, model, [(loss, [(x, y)])])
    quantities = flatness.record()["quantities"]
    assert quantities["lambda_max/all"] == [[None]] and quantities["trace/all"] == [[None]]
