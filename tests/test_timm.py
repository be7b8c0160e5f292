"""timm's ViT and ours: the same modules, keys and function; QKVLoRA on timm's fused qkv; the builder on timm.

Runs where timm is installed (``bash scripts/setup.sh timm`` makes ``.venv-timm``; CI runs this file
there); skipped elsewhere."""

from __future__ import annotations

import copy
import runpy
from pathlib import Path

import pytest
import torch

from flatminima.lora import QKVLoRA, add_qkv_lora
from flatminima.lora.protocol import lora_layers
from flatminima.vit import ARCHS, VisionTransformer, read_state_dict, vit_lora

timm = pytest.importorskip("timm")

TINY = {"image_size": 8, "patch_size": 2, "dim": 32, "depth": 3, "heads": 4, "in_channels": 1}


def _timm_tiny(num_classes: int = 5) -> torch.nn.Module:
    s = TINY
    return timm.models.vision_transformer.VisionTransformer(
        img_size=s["image_size"], patch_size=s["patch_size"], in_chans=s["in_channels"], num_classes=num_classes,
        embed_dim=s["dim"], depth=s["depth"], num_heads=s["heads"])


def _images(n: int = 4, dtype=torch.float64, side: int = 8, channels: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_same_state_dict_same_logits(dtype, tol):
    torch.manual_seed(0)
    theirs = _timm_tiny().to(dtype).eval()
    ours = VisionTransformer(num_classes=5, **TINY).to(dtype).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = _images(dtype=dtype)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() <= tol
        assert (ours.forward_features(x) - theirs.forward_features(x)).abs().max().item() <= tol


def _layout(model):
    return [(name, type(m).__name__) for name, m in model.named_modules()]


def test_vit_base_patch16_224_keys_shapes_modules_and_function_equal_timms(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    theirs = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    state = theirs.state_dict()
    ours = VisionTransformer().eval()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in state.items()]
    assert _layout(ours) == _layout(theirs)
    path = tmp_path / "model.safetensors"  # the file a timm hub repository holds
    safetensors.save_file(state, str(path))
    ours.load_state_dict(read_state_dict(path), strict=True)
    x = _images(2, torch.float32, 224, 3)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", sorted(set(ARCHS) - {"vit_base_patch16_224"}))
def test_every_known_arch_has_timms_keys_and_shapes(arch):
    with torch.device("meta"):
        theirs = timm.create_model(arch, pretrained=False, num_classes=7)
        ours = VisionTransformer(num_classes=7, **ARCHS[arch])
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert _layout(ours) == _layout(theirs)


def _randomize_lora(model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QKVLoRA):
                for t in m.targets:
                    for lin in m.part(t):
                        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen, dtype=lin.weight.dtype) * 0.3)


@pytest.mark.parametrize("targets, blocks", [("qv", None), ("qkv", [0, 2]), ("v", [-1])])
def test_qkv_lora_on_timms_vit_equals_the_merged_weight_in_a_copy(targets, blocks):
    torch.manual_seed(0)
    reference = _timm_tiny().double().eval()
    model = add_qkv_lora(copy.deepcopy(reference), r=4, alpha=8, targets=targets, blocks=blocks)
    _randomize_lora(model)
    d, s = TINY["dim"], 8 / 4
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            lora = block.attn.qkv
            if not isinstance(lora, QKVLoRA):
                continue
            w = reference.blocks[i].attn.qkv.weight  # W0 + s·[B_q A_q ; B_k A_k ; B_v A_v], untargeted parts 0
            for t in lora.targets:
                a, b = lora.part(t)
                k = "qkv".index(t)
                w[k * d:(k + 1) * d] += s * b.weight @ a.weight
    x = _images()
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-10
    layers = lora_layers(model)
    assert [layer.name for layer in layers] == [f"blocks.{i}.attn.qkv" for i in range(3)
                                                 if blocks is None or i in [j % 3 for j in blocks]]
    for layer in layers:
        i = int(layer.name.split(".")[1])
        assert (layer.merged() - reference.blocks[i].attn.qkv.weight).abs().max().item() <= 1e-12


def test_builder_on_timm_trains_only_lora_and_head_and_loads_a_timm_checkpoint(tmp_path):
    torch.manual_seed(0)
    donor = _timm_tiny(num_classes=5)
    path = tmp_path / "tiny.pth"
    torch.save(donor.state_dict(), path)
    with pytest.warns(UserWarning, match="head"):
        model = vit_lora(10, TINY, r=4, alpha=8, checkpoint=path, backend="timm")
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    assert isinstance(model.blocks[0].attn.qkv, QKVLoRA)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted([f"blocks.{i}.attn.qkv.linear_{ab}_{t}.weight" for i in range(3) for ab in "ab"
                                for t in "qv"] + ["head.weight", "head.bias"])
    assert model.head.out_features == 10
    with torch.no_grad():  # B = 0: the backbone's features are the checkpoint's
        assert torch.equal(model.forward_features(_images(dtype=torch.float32)),
                           donor.eval().forward_features(_images(dtype=torch.float32)))
    auto = vit_lora(10, "vit_tiny_patch16_224", r=2, backend="auto")
    assert type(auto) is timm.models.vision_transformer.VisionTransformer


def test_builder_backends_compute_the_same_function_from_one_checkpoint(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    safetensors.save_file(_timm_tiny(num_classes=10).state_dict(), str(path))
    a = vit_lora(10, TINY, r=4, checkpoint=path, backend="timm").double().eval()
    b = vit_lora(10, TINY, r=4, checkpoint=path, backend="flatminima").double().eval()
    b.load_state_dict(a.state_dict(), strict=True)  # the LoRA factors too: same keys
    _randomize_lora(a)
    _randomize_lora(b)
    x = _images()
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max().item() <= 1e-10


def test_example_trains_timms_vit(capsys):
    pytest.importorskip("sklearn")
    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "vit_lora_sam.py"))
    with pytest.warns(UserWarning, match="head"):
        results = example["main"](["--method", "all", "--epochs", "1", "--pretrain-epochs", "1", "--backend", "timm"])
    assert list(results) == ["sgd", "sam", "flatlora"] and all(0.0 <= a <= 1.0 for a in results.values())
    assert "flatlora: LoRA (Q, V) + head" in capsys.readouterr().out
