"""Continual-learning metrics (flatminima.continual.metrics) on accuracy matrices worked by hand.

a[j][i] = accuracy on task i after training task j (rows: after task j, columns: on task i).
"""

from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch

from flatminima.continual.metrics import (
    average_accuracy,
    backward_transfer,
    continual_metrics,
    forgetting,
    forgetting_per_task,
    format_metrics_table,
    forward_transfer,
    learning_accuracy,
    plot_accuracy_matrix,
    save_accuracy_matrix,
)

# A 3 x 3 matrix worked by hand.
A3 = [[0.9, 0.2, 0.1],
      [0.7, 0.8, 0.3],
      [0.6, 0.9, 0.7]]
B3 = [0.1, 0.25, 0.05]  # baseline accuracies b_i (b_0 unused)


def test_three_tasks_by_hand():
    # ACC = (a20 + a21 + a22) / 3 = (0.6 + 0.9 + 0.7) / 3 = 2.2 / 3 = 0.7333...
    assert average_accuracy(A3) == pytest.approx(2.2 / 3)
    # LA = (a00 + a11 + a22) / 3 = (0.9 + 0.8 + 0.7) / 3 = 0.8
    assert learning_accuracy(A3) == pytest.approx(0.8)
    # BWT = ((a20 - a00) + (a21 - a11)) / 2 = ((0.6 - 0.9) + (0.9 - 0.8)) / 2 = (-0.3 + 0.1) / 2 = -0.1
    assert backward_transfer(A3) == pytest.approx(-0.1)
    # f0 = max(a00, a10) - a20 = max(0.9, 0.7) - 0.6 = 0.3
    # f1 = max(a11) - a21 = 0.8 - 0.9 = -0.1 (final accuracy beats the peak: negative forgetting)
    # f2 undefined (last task) -> NaN;  F = (0.3 - 0.1) / 2 = 0.1
    per_task = forgetting_per_task(A3)
    assert len(per_task) == 3
    assert per_task[:2] == pytest.approx([0.3, -0.1])
    assert math.isnan(per_task[2])
    assert forgetting(A3) == pytest.approx(0.1)
    # FWT = ((a01 - b1) + (a12 - b2)) / 2 = ((0.2 - 0.25) + (0.3 - 0.05)) / 2 = (-0.05 + 0.25) / 2 = 0.1
    assert forward_transfer(A3, B3) == pytest.approx(0.1)
    assert math.isnan(forward_transfer(A3, None))

    m = continual_metrics(A3, baseline=B3)
    assert m["T"] == 3 and isinstance(m["T"], int)
    assert m["average_accuracy"] == pytest.approx(2.2 / 3)
    assert m["learning_accuracy"] == pytest.approx(0.8)
    assert m["backward_transfer"] == pytest.approx(-0.1)
    assert m["forgetting"] == pytest.approx(0.1)
    assert m["forward_transfer"] == pytest.approx(0.1)
    for key in ("average_accuracy", "learning_accuracy", "backward_transfer", "forgetting", "forward_transfer"):
        assert type(m[key]) is float
    assert math.isnan(continual_metrics(A3)["forward_transfer"])


@pytest.mark.parametrize("convert", [list, np.array, lambda x: np.array(x, dtype=np.float32), torch.tensor],
                         ids=["list", "numpy", "float32", "torch"])
def test_input_types_agree(convert):
    m = continual_metrics(convert(A3), baseline=convert(B3))
    assert m["average_accuracy"] == pytest.approx(2.2 / 3, abs=1e-6)
    assert m["backward_transfer"] == pytest.approx(-0.1, abs=1e-6)
    assert m["forward_transfer"] == pytest.approx(0.1, abs=1e-6)


def test_single_task():
    m = continual_metrics([[0.83]], baseline=[0.1])
    assert m["T"] == 1
    assert m["average_accuracy"] == pytest.approx(0.83)
    assert m["learning_accuracy"] == pytest.approx(0.83)
    for key in ("backward_transfer", "forgetting", "forward_transfer"):
        assert math.isnan(m[key]), key
    assert len(m["forgetting_per_task"]) == 1 and math.isnan(m["forgetting_per_task"][0])
    assert math.isnan(backward_transfer(np.array([[0.5]])))
    assert math.isnan(forgetting([[0.5]]))
    assert math.isnan(forward_transfer([[0.5]], [0.5]))


def test_task_never_learned():
    # Task 1 is never learned: its column stays at chance (0.5, binary) throughout.
    a = [[0.9, 0.5, 0.5],
         [0.9, 0.5, 0.5],
         [0.8, 0.5, 0.95]]
    # f0 = max(0.9, 0.9) - 0.8 = 0.1;  f1 = max(a11) - a21 = 0.5 - 0.5 = 0;  F = 0.05
    assert forgetting_per_task(a)[:2] == pytest.approx([0.1, 0.0])
    assert forgetting(a) == pytest.approx(0.05)
    # BWT = ((0.8 - 0.9) + (0.5 - 0.5)) / 2 = -0.05
    assert backward_transfer(a) == pytest.approx(-0.05)
    # LA = (0.9 + 0.5 + 0.95) / 3;  ACC = (0.8 + 0.5 + 0.95) / 3
    assert learning_accuracy(a) == pytest.approx(2.35 / 3)
    assert average_accuracy(a) == pytest.approx(2.25 / 3)

    # A task at 0 all along (e.g. its head was never trained): no forgetting either.
    z = [[0.9, 0.0], [0.7, 0.0]]
    # Only task 0 counts: f0 = 0.9 - 0.7 = 0.2; BWT = 0.7 - 0.9 = -0.2
    assert forgetting(z) == pytest.approx(0.2)
    assert backward_transfer(z) == pytest.approx(-0.2)
    z3 = [[0.0, 0.1, 0.1], [0.0, 0.9, 0.1], [0.0, 0.6, 0.9]]
    assert forgetting_per_task(z3)[:2] == pytest.approx([0.0, 0.3])


def test_forgetting_ignores_rows_before_the_task_was_learned():
    # a[0][1] = 0.7 > a[1][1] = 0.5: the accuracy on task 1 *before* it was trained must not count.
    a = [[0.9, 0.7, 0.1],
         [0.8, 0.5, 0.1],
         [0.8, 0.4, 0.9]]
    # f0 = max(0.9, 0.8) - 0.8 = 0.1
    # f1 = max(a11) - a21 = 0.5 - 0.4 = 0.1   (counting row 0 would give 0.7 - 0.4 = 0.3)
    # F = (0.1 + 0.1) / 2 = 0.1               (counting row 0 would give 0.2)
    assert forgetting_per_task(a)[:2] == pytest.approx([0.1, 0.1])
    assert forgetting(a) == pytest.approx(0.1)
    # The maximum does run over later rows: a peak after learning counts.
    b = [[0.6, 0.1, 0.1],
         [0.9, 0.8, 0.1],
         [0.5, 0.8, 0.9]]
    # f0 = max(0.6, 0.9) - 0.5 = 0.4 (peak in row 1, after task 0 was learned); f1 = 0.8 - 0.8 = 0
    assert forgetting_per_task(b)[:2] == pytest.approx([0.4, 0.0])
    # while BWT only compares with the diagonal: ((0.5 - 0.6) + (0.8 - 0.8)) / 2 = -0.05
    assert backward_transfer(b) == pytest.approx(-0.05)


def test_perfect_retention_and_catastrophic_forgetting():
    kept = [[0.9, 0.1, 0.1],
            [0.9, 0.8, 0.1],
            [0.9, 0.8, 0.7]]
    assert backward_transfer(kept) == pytest.approx(0.0)
    assert forgetting(kept) == pytest.approx(0.0)
    assert average_accuracy(kept) == pytest.approx(learning_accuracy(kept))

    # Each task learned perfectly and entirely overwritten by the next.
    lost = np.eye(4)
    m = continual_metrics(lost, baseline=np.zeros(4))
    assert m["average_accuracy"] == pytest.approx(0.25)
    assert m["learning_accuracy"] == pytest.approx(1.0)
    assert m["backward_transfer"] == pytest.approx(-1.0)
    assert m["forgetting"] == pytest.approx(1.0)
    assert m["forgetting_per_task"][:3] == pytest.approx([1.0, 1.0, 1.0])
    assert m["forward_transfer"] == pytest.approx(0.0)


@pytest.mark.parametrize("a", [
    [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]],  # not square
    [0.5, 0.5],  # 1-D
    [[[0.5]]],  # 3-D
    np.zeros((0, 0)),  # T = 0
    [[0.5, 0.5], [0.5]],  # ragged
    [[0.5, 1.5], [0.5, 0.5]],  # > 1 (percent?)
    [[0.5, -0.1], [0.5, 0.5]],  # < 0
    [[0.5, float("nan")], [0.5, 0.5]],  # NaN
    [[0.5, float("inf")], [0.5, 0.5]],  # inf
    [["a", "b"], ["c", "d"]],  # not numbers
])
def test_invalid_matrix(a):
    for fn in (average_accuracy, learning_accuracy, backward_transfer, forgetting, forgetting_per_task,
               continual_metrics):
        with pytest.raises(ValueError, match=r"^Invalid a: .*expected"):
            fn(a)


@pytest.mark.parametrize("baseline", [[0.1, 0.1], [0.1] * 4, [[0.1, 0.1, 0.1]], [0.1, float("nan"), 0.1],
                                      [0.1, 2.0, 0.1]])
def test_invalid_baseline(baseline):
    with pytest.raises(ValueError, match=r"^Invalid baseline: .*expected"):
        forward_transfer(A3, baseline)
    with pytest.raises(ValueError, match=r"^Invalid baseline: .*expected"):
        continual_metrics(A3, baseline=baseline)


def test_save_round_trip(tmp_path):
    names = ["split 0", "split 1", "split 2"]
    paths = save_accuracy_matrix(A3, tmp_path / "out", task_names=names, extra={"method": "SAM", "seed": 3})
    assert paths["csv"] == tmp_path / "out" / "accuracy_matrix.csv"
    assert paths["json"] == tmp_path / "out" / "accuracy_matrix.json"

    with open(paths["csv"], newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["after \\ on", *names]
    assert [r[0] for r in rows[1:]] == names
    assert [[float(v) for v in r[1:]] for r in rows[1:]] == A3  # exact

    text = paths["json"].read_text(encoding="utf-8")

    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    doc = json.loads(text, parse_constant=no_nan)
    assert doc["tasks"] == names
    assert doc["matrix"] == A3
    assert doc["method"] == "SAM" and doc["seed"] == 3
    assert doc["metrics"]["T"] == 3
    assert doc["metrics"]["backward_transfer"] == pytest.approx(-0.1)
    assert doc["metrics"]["forgetting"] == pytest.approx(0.1)
    assert doc["metrics"]["forward_transfer"] is None  # NaN -> null
    assert doc["metrics"]["forgetting_per_task"][2] is None
    assert '"forward_transfer": null' in text
    # The saved matrix gives back the same metrics.
    again = continual_metrics(doc["matrix"])
    assert again["average_accuracy"] == doc["metrics"]["average_accuracy"]

    # T = 1: every undefined metric is null.
    one = save_accuracy_matrix([[0.7]], tmp_path, name="single")
    metrics = json.loads(one["json"].read_text(), parse_constant=no_nan)["metrics"]
    assert metrics["backward_transfer"] is None and metrics["forgetting"] is None
    assert metrics["average_accuracy"] == pytest.approx(0.7)
    rows = list(csv.reader(one["csv"].open(newline="")))
    assert rows == [["after \\ on", "task 0"], ["task 0", "0.7"]]


def test_save_png(tmp_path):
    pytest.importorskip("matplotlib")
    paths = save_accuracy_matrix(np.eye(3) * 0.9 + 0.05, tmp_path)
    assert paths["png"] == tmp_path / "accuracy_matrix.png"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Direct call, T = 1 and a larger matrix (annotation sizes, no metrics for T = 1).
    for T in (1, 12):
        out = tmp_path / f"m{T}.png"
        plot_accuracy_matrix(np.tril(np.full((T, T), 0.8)) + 0.1, out, title=f"T = {T}")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    paths = save_accuracy_matrix(A3, tmp_path)
    assert set(paths) == {"csv", "json"}
    assert not (tmp_path / "accuracy_matrix.png").exists()


@pytest.mark.parametrize("kwargs, arg", [
    ({"task_names": ["a", "b"]}, "task_names"),
    ({"task_names": "abc"}, "task_names"),
    ({"task_names": iter(["a", "b", "c"])}, "task_names"),
    ({"name": "sub/dir"}, "name"),
    ({"name": ""}, "name"),
    ({"extra": {"matrix": 1}}, "extra"),
    ({"extra": [1, 2]}, "extra"),
])
def test_save_invalid(tmp_path, kwargs, arg):
    with pytest.raises(ValueError, match=rf"^Invalid {arg}: .*expected"):
        save_accuracy_matrix(A3, tmp_path, **kwargs)
    with pytest.raises(ValueError, match=r"^Invalid a: "):
        save_accuracy_matrix([[2.0]], tmp_path)


def test_format_metrics_table():
    def metrics(acc, la, bwt, fgt, fwt=float("nan")):
        return {"T": 3, "average_accuracy": acc, "learning_accuracy": la, "backward_transfer": bwt,
                "forgetting": fgt, "forward_transfer": fwt}

    table = format_metrics_table({
        # ACC 70 %, 80 % -> mean 75.00, sample std sqrt(((70-75)^2 + (80-75)^2) / 1) = 7.0711 -> 7.07
        # LA 90 %, 90 % -> 90.00 ± 0.00; BWT -10 %, -20 % -> -15.00 ± 7.07; forgetting 10, 20 -> 15.00 ± 7.07
        "SGD": [metrics(0.7, 0.9, -0.1, 0.1), metrics(0.8, 0.9, -0.2, 0.2)],
        # one seed: std 0; FWT given: 0.05 -> 5.00 ± 0.00
        "SAM|a": [metrics(0.85, 0.95, -0.05, 0.06, 0.05)],
    })
    lines = table.strip().split("\n")
    assert lines[0] == "| label | ACC | LA | BWT | forgetting | FWT | seeds |"
    assert len(lines) == 4
    assert lines[2] == "| SGD | 75.00 ± 7.07 | 90.00 ± 0.00 | -15.00 ± 7.07 | 15.00 ± 7.07 | – | 2 |"
    assert lines[3] == "| SAM\\|a | 85.00 ± 0.00 | 95.00 ± 0.00 | -5.00 ± 0.00 | 6.00 ± 0.00 | 5.00 ± 0.00 | 1 |"

    # Real continual_metrics dicts work, and partially defined cells say how many seeds count.
    rows = [continual_metrics(A3, baseline=B3), continual_metrics(A3)]
    line = format_metrics_table({"x": rows}).strip().split("\n")[2]
    assert "73.33 ± 0.00" in line and "-10.00 ± 0.00" in line and "10.00 ± 0.00 (n=1)" in line

    with pytest.raises(ValueError, match=r"^Invalid results\['x'\]: .*expected"):
        format_metrics_table({"x": []})
    with pytest.raises(ValueError, match=r"^Invalid results: .*expected"):
        format_metrics_table([rows])


def test_average_incremental_accuracy_by_hand():
    from flatminima.continual.metrics import average_incremental_accuracy

    # A_0 = 0.9; A_1 = (0.7 + 0.8) / 2 = 0.75; A_2 = (0.6 + 0.9 + 0.7) / 3 = 2.2 / 3
    # AAA = (0.9 + 0.75 + 2.2 / 3) / 3
    expected = (0.9 + 0.75 + 2.2 / 3) / 3
    assert average_incremental_accuracy(A3) == pytest.approx(expected, abs=1e-15)
    # weighted by test-set sizes n = (1, 3, 2) (PyCIL: all test samples of the seen classes):
    # A_0 = 0.9; A_1 = (0.7·1 + 0.8·3) / 4 = 0.775; A_2 = (0.6·1 + 0.9·3 + 0.7·2) / 6 = 4.7 / 6
    weighted = (0.9 + 0.775 + 4.7 / 6) / 3
    assert average_incremental_accuracy(A3, weights=[1, 3, 2]) == pytest.approx(weighted, abs=1e-15)
    assert average_incremental_accuracy(A3, weights=[5, 5, 5]) == pytest.approx(expected, abs=1e-15)
    m = continual_metrics(A3, weights=[1, 3, 2])
    assert m["average_incremental_accuracy"] == pytest.approx(weighted, abs=1e-15)
    assert continual_metrics(A3)["average_incremental_accuracy"] == pytest.approx(expected, abs=1e-15)
    assert "final_average_accuracy" not in m  # FAA is "average_accuracy": one key, no duplicate
    assert continual_metrics([[0.83]])["average_incremental_accuracy"] == pytest.approx(0.83)
    for bad in ([1, 2], [1, 0, 2], [1, float("nan"), 2], "abc"):
        with pytest.raises(ValueError, match="weights"):
            average_incremental_accuracy(A3, weights=bad)
