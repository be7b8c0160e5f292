"""`torchrun` with 2 gloo processes takes the same steps as one process on the whole batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import torchrun

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "torchrun_ddp.py"


def _run(tmp_path: Path, ranks: int, *args: str) -> dict:
    out = tmp_path / f"w{ranks}.pt"
    args = ("--steps", "8", "--out", str(out), *args)
    if ranks > 1:
        proc = torchrun(ranks, EXAMPLE, *args, timeout=120)
    else:
        proc = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("method", ["sam"])
def test_torchrun_two_ranks_with_a_shared_perturbation_equal_one_process(tmp_path, method):
    one = _run(tmp_path, 1, "--method", method, "--sync-perturbation")
    two = _run(tmp_path, 2, "--method", method, "--sync-perturbation")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-10, atol=1e-12, msg=key)


def test_torchrun_per_rank_perturbation_is_m_sharpness(tmp_path):
    """Without a shared ε each rank perturbs by its own gradient: a different (valid) step."""
    one = _run(tmp_path, 1, "--method", "sam")
    two = _run(tmp_path, 2, "--method", "sam")
    assert any(not torch.allclose(two[k], one[k], rtol=1e-8, atol=1e-10) for k in one)


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _fsdp2_available(), reason="torch without FSDP2 (fully_shard)")
@pytest.mark.parametrize("method", ["sam", "gasam", "mrwp", "randomsearchsam", "flatlora"])
def test_fsdp2_two_ranks_equal_one_process(tmp_path, method):
    """FSDP2 reduce-scatters every gradient, so ε comes from the whole batch's gradient: the
    steps of one process on the whole batch, with norms over the DTensor shards; random noise is
    drawn whole and each rank keeps its chunk, random-search candidates are chosen from the
    all-reduced loss. Flat-LoRA (LoRA on every linear layer): the noisy weight is built inside the
    layer's forward from the whole weight FSDP2 gathered, its row scale from the gathered factors."""
    lora = ["--lora", "--hyper", '{"rho": 0.1}'] if method == "flatlora" else []
    one = _run(tmp_path, 1, "--method", method, "--sync-perturbation", *lora)
    two = _run(tmp_path, 2, "--method", method, "--fsdp", "--sync-perturbation", *lora)
    if method == "flatlora":  # the noise mattered: not the steps of σ = 0
        zero = _run(tmp_path, 1, "--method", method, "--sync-perturbation", "--lora", "--hyper", '{"rho": 0.0}')
        assert any(not torch.allclose(zero[k], one[k], rtol=1e-6, atol=1e-8) for k in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.skipif(not _fsdp2_available(), reason="torch without FSDP2 (fully_shard)")
def test_fsdp2_refuses_methods_that_do_not_run_on_shards(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*launcher, str(EXAMPLE), "--steps", "1", "--method", "mrwp", "--hyper", '{"parallel": true}',
                           "--fsdp"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "MRWP on FSDP2 (DTensor) parameters" in proc.stderr
