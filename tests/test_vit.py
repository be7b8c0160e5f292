"""flatminima.vit without timm: the ViT, the LoRA builder, checkpoints (files, the hub cache), the
runner's ``vit_lora`` model and ``examples/vit_lora_sam.py``. (Equality with timm's own ViT:
tests/test_timm.py, in the timm environment.)"""

from __future__ import annotations

import importlib.util
import runpy
from pathlib import Path

import pytest
import torch

from flatminima import vit
from flatminima.experiment import ExperimentConfig, build_model, preset, run_experiment
from flatminima.lora import QKVLoRA
from flatminima.lora.protocol import lora_layers
from flatminima.vit import (
    VisionTransformer,
    find_hf_checkpoint,
    read_state_dict,
    vit_lora,
    vit_sizes,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"image_size": 8, "patch_size": 2, "dim": 16, "depth": 3, "heads": 2, "in_channels": 1}
HAS_TIMM = importlib.util.find_spec("timm") is not None


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _trainable(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_vit_shapes_keys_and_init():
    torch.manual_seed(0)
    model = VisionTransformer(num_classes=7, **TINY)
    assert model(_x()).shape == (3, 7)
    assert model.forward_features(_x()).shape == (3, 1 + 16, 16)
    assert model.forward_head(model.forward_features(_x()), pre_logits=True).shape == (3, 16)
    keys = list(model.state_dict())
    assert keys[:4] == ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert keys[4:16] == [f"blocks.0.{k}" for k in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                                                   "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                                                   "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    assert keys[-4:] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert model.blocks[0].attn.qkv.weight.shape == (48, 16) and model.blocks[0].norm1.eps == 1e-6
    assert model.cls_token.abs().max() < 1e-4 and all(
        m.bias.abs().max() == 0 for m in model.modules() if isinstance(m, torch.nn.Linear))
    features = VisionTransformer(num_classes=0, **TINY)
    assert isinstance(features.head, torch.nn.Identity) and features(_x()).shape == (3, 16)
    with pytest.raises(ValueError, match=r"Invalid x: a tensor of shape \(3, 1, 6, 6\)"):
        model(torch.zeros(3, 1, 6, 6))


def test_attention_is_softmax_of_scaled_scores():
    torch.manual_seed(0)
    attn = VisionTransformer(num_classes=2, **TINY).double().blocks[0].attn
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    heads = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
    assert torch.allclose(attn(x), attn.proj(heads.transpose(1, 2).reshape(2, 5, 16)), atol=1e-12)


def test_sizes_and_their_errors():
    assert vit_sizes("vit_base_patch16_224") == {**vit.SIZES}
    assert vit_sizes("vit_small_patch16_224.augreg_in21k_ft_in1k")["dim"] == 384
    assert vit_sizes({"dim": 64, "heads": 4})["depth"] == 12
    for arch, match in [("vit_huge", "Invalid arch: 'vit_huge'"), ({"width": 3}, "Invalid arch: 'width'"),
                        ({"dim": 30, "heads": 4}, "Invalid heads: 4 .expected a divisor of dim = 30"),
                        ({"patch_size": 300}, "Invalid patch_size: 300"), ({"depth": 0}, "Invalid depth: 0"),
                        ({"mlp_ratio": True}, "Invalid mlp_ratio")]:
        with pytest.raises(ValueError, match=match):
            vit_sizes(arch)


def test_vit_lora_freezes_the_backbone_and_trains_lora_and_head():
    torch.manual_seed(0)
    model = vit_lora(10, TINY, r=4, alpha=8, backend="flatminima")
    assert type(model) is VisionTransformer and model.head.out_features == 10
    assert _trainable(model) == sorted([f"blocks.{i}.attn.qkv.linear_{ab}_{t}.weight" for i in range(3)
                                        for ab in "ab" for t in "qv"] + ["head.weight", "head.bias"])
    layers = lora_layers(model)
    assert [layer.name for layer in layers] == [f"blocks.{i}.attn.qkv" for i in range(3)]
    assert [(a.rows.start, a.rows.stop, a.scaling) for a in layers[0].adapters] == [(0, 16, 2.0), (32, 48, 2.0)]
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "linear_" not in k}
    plain = VisionTransformer(num_classes=10, **TINY)
    plain.load_state_dict({k.replace("qkv.qkv.", "qkv."): v for k, v in backbone.items()})
    with torch.no_grad():  # B = 0: the backbone's function
        assert torch.equal(model(_x()), plain(_x()))
    some = vit_lora(3, TINY, r=2, targets="qkv", blocks=[0, -1], backend="flatminima")
    assert [type(b.attn.qkv) is QKVLoRA for b in some.blocks] == [True, False, True]
    assert some.blocks[0].attn.qkv.targets == "qkv"


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "Invalid r: 0"), ({"alpha": -1}, "Invalid alpha: -1"), ({"targets": "qq"}, "Invalid targets: 'qq'"),
    ({"dropout": 1.0}, "Invalid dropout: 1.0"), ({"blocks": [0, 3]}, r"Invalid blocks: \[0, 3\] .expected None"),
    ({"blocks": [1, -2]}, r"Invalid blocks: \[1, -2\]"), ({"backend": "jax"}, "Invalid backend: 'jax'"),
    ({"num_classes": 0}, "Invalid num_classes: 0"), ({"checkpoint": 3}, "Invalid checkpoint: 'int'"),
    ({"checkpoint": "weights.npz"}, "Invalid checkpoint: 'weights.npz'"),
    ({"checkpoint": "hf-cache"}, "Invalid arch: 'dict' .expected a timm model name with checkpoint='hf-cache'"),
])
def test_vit_lora_refuses_bad_arguments_before_building(kwargs, match):
    state = torch.random.get_rng_state()
    args = {"num_classes": 10, "arch": TINY, "backend": "flatminima", **kwargs}
    with pytest.raises(ValueError, match=match):
        vit_lora(**args)
    if "blocks" not in kwargs:  # refused before the model is drawn
        assert torch.equal(torch.random.get_rng_state(), state)


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint file at .*nothing.safetensors"):
        vit_lora(10, TINY, checkpoint=tmp_path / "nothing.safetensors", backend="flatminima")


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed")
def test_without_timm_auto_is_ours_and_timm_names_the_extra():
    assert type(vit_lora(10, TINY, r=2)) is VisionTransformer
    with pytest.raises(ImportError, match=r"pip install 'flatminima\[timm\]'"):
        vit_lora(10, TINY, backend="timm")


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed")
def test_a_broken_timm_install_falls_back_to_ours_under_auto_only(tmp_path, monkeypatch):
    (tmp_path / "timm").mkdir()  # timm beside a torchvision built for another torch: its import raises
    (tmp_path / "timm" / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="timm is installed but cannot be imported .operator torchvision::nms"):
        assert type(vit_lora(10, TINY, r=2)) is VisionTransformer
    with pytest.raises(RuntimeError, match="torchvision::nms"):
        vit_lora(10, TINY, backend="timm")


def _save(state, path: Path) -> Path:
    if path.suffix == ".safetensors":
        pytest.importorskip("safetensors.torch").save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("name, wrap", [("vit.safetensors", False), ("vit.pth", False), ("vit.bin", True)])
def test_checkpoint_loads_the_backbone_and_a_new_head_when_classes_differ(tmp_path, name, wrap):
    torch.manual_seed(0)
    donor = VisionTransformer(num_classes=10, **TINY)
    state = donor.state_dict()
    path = _save({"state_dict": state} if wrap else state, tmp_path / name)
    same = vit_lora(10, TINY, r=2, checkpoint=path, backend="flatminima")
    loaded = {k.replace("qkv.qkv.", "qkv."): v for k, v in same.state_dict().items() if "linear_" not in k}
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match=r"head \(head.bias \(10,\), head.weight \(10, 16\)\) does not fit"):
        other = vit_lora(4, TINY, r=2, checkpoint=str(path), backend="flatminima")
    assert other.head.weight.shape == (4, 16) and other.head.bias.abs().max() == 0  # initialized anew
    assert torch.equal(other.blocks[1].mlp.fc1.weight, state["blocks.1.mlp.fc1.weight"])
    assert torch.equal(other.blocks[2].attn.qkv.qkv.weight, state["blocks.2.attn.qkv.weight"])
    assert "head.weight" in _trainable(other) and "blocks.1.mlp.fc1.weight" not in _trainable(other)


def test_checkpoint_of_another_architecture_is_refused_naming_the_keys(tmp_path):
    path = _save(VisionTransformer(num_classes=10, **{**TINY, "depth": 2, "dim": 8}).state_dict(), tmp_path / "a.pth")
    with pytest.raises(ValueError, match=r"Invalid checkpoint: .*a.pth \(cls_token: \(1, 1, 8\) for \(1, 1, 16\); "
                                         r".* more\) \(expected the weights of the model's architecture"):
        vit_lora(10, TINY, checkpoint=path, backend="flatminima")
    deeper = VisionTransformer(num_classes=10, **{**TINY, "depth": 4}).state_dict()
    with pytest.raises(ValueError, match=r"\(unexpected blocks.3.norm1.weight; "):
        vit_lora(10, TINY, checkpoint=_save(deeper, tmp_path / "b.pth"), backend="flatminima")
    headless = {k: v for k, v in deeper.items() if not k.startswith(("head.", "blocks.3."))}
    with pytest.warns(UserWarning, match=r"its head \(none\) does not fit"):
        vit_lora(10, TINY, checkpoint=_save(headless, tmp_path / "c.pth"), backend="flatminima")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        read_state_dict(tmp_path / "list.pt")


def _cache_repo(hub: Path, name: str, revision: str, file: str = "model.safetensors", state=None, main=True):
    snapshot = hub / f"models--timm--{name}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    if main:
        (hub / f"models--timm--{name}" / "refs").mkdir(exist_ok=True)
        (hub / f"models--timm--{name}" / "refs" / "main").write_text(revision)
    return _save(state if state is not None else {"x": torch.zeros(1)}, snapshot / file)


def test_hf_cache_is_found_offline_where_the_environment_says(tmp_path, monkeypatch):
    monkeypatch.setitem(vit.ARCHS, "vit_toy_patch2_8", {k: v for k, v in TINY.items() if k != "in_channels"})
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    with pytest.raises(FileNotFoundError, match=r"looked for .*hub/models--timm--vit_toy_patch2_8\[\.<tag>\]/snapshots"):
        vit_lora(10, "vit_toy_patch2_8", checkpoint="hf-cache", backend="flatminima")
    torch.manual_seed(0)
    state = VisionTransformer(num_classes=1000, **{**TINY, "in_channels": 3}).state_dict()
    old = _cache_repo(hub, "vit_toy_patch2_8.augreg_in1k", "aaa", state={"x": torch.zeros(1)}, main=False)
    new = _cache_repo(hub, "vit_toy_patch2_8.augreg_in1k", "bbb", state=state)
    assert find_hf_checkpoint("vit_toy_patch2_8") == new and old.is_file()  # refs/main's revision
    with pytest.warns(UserWarning, match="head"):
        model = vit_lora(10, "vit_toy_patch2_8", r=2, checkpoint="hf-cache", backend="flatminima")
    assert torch.equal(model.pos_embed, state["pos_embed"]) and model.head.out_features == 10
    bin_file = _cache_repo(hub, "vit_toy_patch2_8.other", "ccc", file="pytorch_model.bin")
    with pytest.raises(ValueError, match=r"found vit_toy_patch2_8.augreg_in1k, vit_toy_patch2_8.other: pass arch="):
        find_hf_checkpoint("vit_toy_patch2_8")
    assert find_hf_checkpoint("vit_toy_patch2_8.other") == bin_file
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # the hub is HF_HOME/hub
    assert find_hf_checkpoint("vit_toy_patch2_8.other") == bin_file
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert vit.hf_hub_cache() == tmp_path / "home" / ".cache" / "huggingface" / "hub"


def test_runner_model_and_its_option_checks():
    pytest.importorskip("sklearn")
    from flatminima.data import load_digits

    torch.manual_seed(0)
    data = load_digits()
    model = build_model("vit_lora", data, r=2, lora_blocks=[1])
    assert model(data.x_test[:5]).shape == (5, 10)
    assert [type(b.attn.qkv) is QKVLoRA for b in model.blocks] == [False, True]
    with pytest.raises(ValueError, match="Invalid model_options.patch_size: 3 .expected a divisor of the image side 8"):
        build_model("vit_lora", data, patch_size=3)
    for options, match in [({"lora_blocks": [-1]}, r"Invalid model_options.lora_blocks: \[-1\]"),
                           ({"targets": "qx"}, "Invalid model_options.targets: 'qx'"),
                           ({"heads": 0}, "Invalid model_options.heads: 0"),
                           ({"checkpoint": 5}, "Invalid model_options.checkpoint: 5")]:
        with pytest.raises(ValueError, match=match):
            ExperimentConfig.from_dict({"model": "vit_lora", "model_options": options}, base=preset("quick"))


def test_the_runner_trains_it(tmp_path):
    pytest.importorskip("sklearn")
    config = ExperimentConfig.from_dict({
        "name": "vit", "task": "digits", "model": "vit_lora", "model_options": {"r": 2, "lora_blocks": [0]},
        "methods": {"sgd": {}, "flatlora": {"rho": 0.05}}, "seeds": [0], "epochs": 1, "train_subset": 128,
        "batch_size": 32, "diagnostics": [], "out_dir": str(tmp_path), "tensorboard": False}, base=preset("quick"))
    records = run_experiment(config, progress=False, log=lambda _: None)["records"]
    assert [r["unit"] for r in records] == ["sgd_seed0", "flatlora_seed0"]
    assert all(0.0 <= r["final"]["test_acc"] <= 1.0 for r in records)


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("sklearn")
    return runpy.run_path(str(ROOT / "examples" / "vit_lora_sam.py"))


@pytest.mark.parametrize("method", ["sgd", "sam", "flatlora", "all"])
def test_example_runs_every_method(example, method, capsys):
    with pytest.warns(UserWarning, match="head"):  # the 5-digit checkpoint's head, replaced
        results = example["main"](["--method", method, "--epochs", "1", "--pretrain-epochs", "1",
                                   "--backend", "flatminima", "--rank", "2", "--lr", "0.05", "--seed", "1"])
    assert list(results) == (["sgd", "sam", "flatlora"] if method == "all" else [method])
    assert all(0.0 <= acc <= 1.0 for acc in results.values())
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed")
def test_example_auto_backend_runs_without_timm(example):
    with pytest.warns(UserWarning, match="head"):
        results = example["main"](["--method", "sgd", "--epochs", "3", "--pretrain-epochs", "8"])
    assert results["sgd"] > 0.4  # learns (0.61 measured): ten classes, chance is 0.1
