"""docs/results.md §2: GA-SAM's layer-wise scale moves fresh LoRA factors by more than their own
norm, one scale for the whole model does not (examples/gasam_lora_radius.py, a few steps)."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")


def test_gasam_layer_scale_moves_lora_b_by_more_than_its_norm(capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "gasam_lora_radius.py"
    spec = importlib.util.spec_from_file_location("gasam_lora_radius", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    layer, model = module.main(["--steps", "3", "--methods", "gasam-k2,gasam-k2-model"])
    assert layer["eps_B"] > 2.0 and layer["grad_B"] > 2.0  # the radius and the B gradient blow up
    assert model["eps_B"] < 0.1 and model["eps_A"] < 0.01 and model["grad_B"] < 1.5
    assert "| gasam-k2 |" in capsys.readouterr().out
