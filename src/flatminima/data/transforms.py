"""Decoding and transforming images for the streaming datasets, with PIL, numpy and torch only (no
torchvision): :class:`ImageFiles` (a list of image files or an array of images, decoded as RGB) and
:class:`ImageTransform` (crop, resize, flip, normalize).

:class:`ImageTransform` is the usual ImageNet pipeline of Szegedy et al. (CVPR 2015, "Going deeper
with convolutions", the *Inception* crop) as torchvision implements it:

* training: ``RandomResizedCrop(size, scale, ratio)`` then ``RandomHorizontalFlip(0.5)``: up to 10
  tries of an area fraction ``s ~ U(scale)`` and a log aspect ratio ``log r ~ U(log ratio)``,
  ``w = round(sqrt(s·A·r))``, ``h = round(sqrt(s·A/r))``, accepted when the box fits, its corner
  uniform among the positions that fit; else the central crop of the largest box whose aspect ratio
  is clamped to ``ratio``; the box is resized to ``size × size`` (bilinear);
* evaluation: the shorter side resized (bilinear) to ``round(size / resize_ratio)`` (the longer
  one to ``int(S·long/short)``), then the central ``size × size`` crop (offsets ``round((H−size)/2)``);
* then ``C×H×W`` float32 in ``[0, 1]`` (``uint8 / 255``), normalized ``(x − mean) / std`` per channel.

The random draws come from a ``torch.Generator`` the caller passes, in torchvision's order
(``uniform_`` scale, ``uniform_`` log ratio, ``randint`` top, ``randint`` left, then ``rand`` for the
flip), so a generator in a given state gives the crop torchvision would draw from the global RNG in
that state; the global RNG is never used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .._extras import require
from .base import PathLike
from ..core.validation import check, check_bool, check_int, is_real

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pil_image() -> Any:
    """The ``PIL.Image`` module (the ``images`` extra)."""
    return require("PIL.Image", "images", "flatminima.data (reading image files)")


def _pair(value: Any, ok) -> bool:
    try:
        items = list(value)
    except TypeError:
        return False
    return len(items) == 2 and all(is_real(v) for v in items) and ok(*map(float, items))


def _triple(value: Any, positive: bool) -> bool:
    try:
        items = list(value)
    except TypeError:
        return False
    return len(items) == 3 and all(is_real(v) and (v > 0 or not positive) for v in items)


class ImageTransform:
    """A PIL image → normalized ``3 × size × size`` float32 tensor (see the module docstring).

    ``train=True`` draws the random resized crop and the flip (``flip=False``: no flip) from the
    generator passed to :meth:`__call__`; ``train=False`` is the deterministic resize + center crop.
    """

    def __init__(self, size: int, train: bool, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), resize_ratio: float = 0.875, flip: bool = True):
        check_int("size", size, 1)
        check_bool("train", train)
        check("mean", _triple(mean, False), mean, "3 finite numbers (one per RGB channel)")
        check("std", _triple(std, True), std, "3 finite numbers > 0 (one per RGB channel)")
        check("scale", _pair(scale, lambda a, b: 0 < a <= b <= 1), scale, "(low, high) with 0 < low <= high <= 1")
        check("ratio", _pair(ratio, lambda a, b: 0 < a <= b), ratio, "(low, high) with 0 < low <= high")
        check("resize_ratio", is_real(resize_ratio) and 0 < resize_ratio <= 1, resize_ratio, "a number in (0, 1]")
        check_bool("flip", flip)
        self.size, self.train, self.flip = size, train, flip
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.scale, self.ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
        self.resize_ratio = float(resize_ratio)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        if self.train:
            return (f"ImageTransform(size={self.size}, train=True, scale={self.scale}, ratio={self.ratio}, "
                    f"flip={self.flip}, mean={self.mean}, std={self.std})")
        return (f"ImageTransform(size={self.size}, train=False, resize_ratio={self.resize_ratio}, "
                f"mean={self.mean}, std={self.std})")

    # -- training: random resized crop ---------------------------------------------------------
    def crop_params(self, width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of a random resized crop of a ``width × height`` image (torchvision's
        ``RandomResizedCrop.get_params``, its draws taken from ``generator``)."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=generator).item()
            aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]),
                                                       generator=generator)).item()
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
                return top, left, h, w
        # No try fitted: the central crop with the aspect ratio clamped to `ratio`.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    # -- evaluation: resize + center crop ------------------------------------------------------
    def eval_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` after the evaluation resize (shorter side ``round(size / resize_ratio)``)."""
        short = int(round(self.size / self.resize_ratio))
        if width <= height:
            return short, int(short * height / width)
        return int(short * width / height), short

    def __call__(self, image: Any, generator: Optional[torch.Generator] = None) -> Tensor:
        Image = pil_image()
        bilinear = Image.Resampling.BILINEAR
        width, height = image.size
        if self.train:
            check("generator", isinstance(generator, torch.Generator), generator,
                  "a torch.Generator (the training transform draws its crop and flip from it)")
            top, left, h, w = self.crop_params(width, height, generator)
            image = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), bilinear)
            if self.flip and torch.rand(1, generator=generator).item() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            new = self.eval_size(width, height)
            if new != (width, height):
                image = image.resize(new, bilinear)
            width, height = image.size
            top, left = int(round((height - self.size) / 2.0)), int(round((width - self.size) / 2.0))
            image = image.crop((left, top, left + self.size, top + self.size))
        return self.to_tensor(image)

    def to_tensor(self, image: Any) -> Tensor:
        """``3 × H × W`` float32: ``(uint8 / 255 − mean) / std`` of an RGB PIL image."""
        array = np.array(image.convert("RGB"), dtype=np.uint8)
        x = torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div_(255.0)
        return x.sub_(self._mean).div_(self._std)


class ImageFiles(torch.utils.data.Dataset):
    """Images (paths relative to ``root``, or an ``N×H×W×3`` uint8 array) and their labels.

    ``files[i]`` is ``(transform(image i), label)``; ``files[(i, seed)]`` applies ``train_transform``
    (``transform`` when ``None``) with its draws from ``torch.Generator().manual_seed(seed)``.
    ``index`` maps positions to items, so that :meth:`select` shares the items (no copy)."""

    def __init__(self, root: PathLike, items: Union[Sequence[str], np.ndarray], labels: Tensor,
                 transform: ImageTransform, train_transform: Optional[ImageTransform] = None,
                 index: Optional[np.ndarray] = None):
        self.root, self.items, self.labels = Path(root), items, labels.long().cpu()
        self.transform, self.train_transform = transform, train_transform
        self.index = np.arange(len(items)) if index is None else np.asarray(index, dtype=np.int64)
        check("labels", len(self.labels) == len(self.index), len(self.labels), f"{len(self.index)} labels")
        self._labels = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.index)

    def image(self, position: int) -> Any:
        """The RGB PIL image at ``position``."""
        Image = pil_image()
        item = self.items[self.index[position]]
        if isinstance(self.items, np.ndarray):
            return Image.fromarray(item).convert("RGB")
        with Image.open(self.root / item) as opened:
            return opened.convert("RGB")

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> tuple[Tensor, int]:
        if isinstance(key, tuple):
            position, seed = key
            transform = self.train_transform or self.transform
            x = transform(self.image(position), torch.Generator().manual_seed(int(seed)) if transform.train else None)
        else:
            position = key
            x = self.transform(self.image(position))
        return x, self._labels[position]

    def select(self, positions: Tensor) -> "ImageFiles":
        positions = positions.cpu().long()
        return ImageFiles(self.root, self.items, self.labels[positions], self.transform, self.train_transform,
                          self.index[positions.numpy()])

    def update_digest(self, h: Any) -> None:
        """Feed ``h`` the transforms, labels, every relative path and file size (arrays: their shape)
        and the bytes of up to 64 evenly spaced items."""
        n = len(self)
        h.update(f"{self.transform!r}|{self.train_transform!r}|{n}\n".encode())
        h.update(self.labels.numpy().astype("<i8").tobytes())
        picks = sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n, 64))}) if n else []
        if isinstance(self.items, np.ndarray):
            h.update(repr(self.items.shape[1:]).encode())
            for p in picks:
                h.update(self.items[self.index[p]].tobytes())
            return
        for i in self.index:
            h.update(f"{self.items[i]}\t{(self.root / self.items[i]).stat().st_size}\n".encode())
        for p in picks:
            h.update((self.root / self.items[self.index[p]]).read_bytes())
