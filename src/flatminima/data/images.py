"""Image tasks: scikit-learn's digits, and Fashion-MNIST from its idx files (found, fetched, cached)."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..core.validation import check_bool, check_int, check_optional_int
from .base import Dataset, PathLike, _check_path, _standardize, cache_dir


# --------------------------------------------------------------------------------------------
# digits


def load_digits(test_size: int = 360, seed: int = 0) -> Dataset:
    """scikit-learn's 8×8 digits, scaled to [0, 1], standardized; stratified split fixed by ``seed``."""
    check_int("test_size", test_size, 10, 1787)  # stratified: each of the 10 classes on both sides
    check_int("seed", seed, 0)
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, bunch.target, test_size=test_size, random_state=seed,
                                              stratify=bunch.target)
    x_tr, x_te = _standardize(torch.from_numpy(x_tr), torch.from_numpy(x_te))
    return Dataset("digits", x_tr, torch.from_numpy(y_tr).long(), x_te, torch.from_numpy(y_te).long(), 10,
                   (1, 8, 8), "sklearn.datasets.load_digits")


# --------------------------------------------------------------------------------------------
# idx files and Fashion-MNIST

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

FASHION_FILES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
                 "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
_FASHION_IN_DEB = "usr/share/datasets/fashion-mnist"  # where the Debian package puts the files
FASHION_PACKAGE_DIR = Path("/") / _FASHION_IN_DEB
FASHION_ENV = "FLATMINIMA_FASHION_MNIST"


def read_idx(path: PathLike, ndim: Optional[int] = None) -> np.ndarray:
    """Parse an idx file (LeCun's MNIST format; gzip-compressed when its name ends in ``.gz``).

    Header: two zero bytes, a dtype code (0x08 = uint8, ...), the number of dimensions, then each
    dimension as a big-endian int32 (magic 2051 = uint8 images ``N×rows×cols``, 2049 = uint8 labels).
    Raises ``ValueError`` on a bad magic number, an unexpected ``ndim`` or a truncated body.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (magic bytes {data[:4].hex()})")
    dtype, dims = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    if ndim is not None and dims != ndim:
        raise ValueError(f"{path}: idx file has {dims} dimensions, expected {ndim}")
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=dims, offset=4))
    offset, count = 4 + 4 * dims, int(np.prod(shape))
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: idx body has {len(data) - offset} bytes, shape {shape} needs "
                         f"{count * dtype.itemsize}")
    return np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _has_fashion(folder: Optional[Path]) -> bool:
    return folder is not None and all((folder / f).is_file() for f in FASHION_FILES.values())


def _fashion_search_path(root: Optional[PathLike]) -> list[Path]:
    env = os.environ.get(FASHION_ENV)
    dirs = [Path(root) if root else None, Path(env) if env else None, FASHION_PACKAGE_DIR,
            cache_dir() / "fashion-mnist"]
    return [d for d in dirs if d is not None]


def _fetch_with_apt(dest: Path) -> None:
    """``apt-get download dataset-fashion-mnist`` + ``dpkg -x`` into a temp dir; copy the files to ``dest``."""
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise RuntimeError("apt-get/dpkg not found")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=tmp, check=True, capture_output=True,
                       timeout=600)
        deb = next(Path(tmp).glob("dataset-fashion-mnist_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "x")], check=True, capture_output=True, timeout=600)
        _copy_fashion(Path(tmp) / "x" / _FASHION_IN_DEB, dest)


def _fetch_with_torchvision(dest: Path) -> None:
    from torchvision.datasets import FashionMNIST

    with tempfile.TemporaryDirectory() as tmp:
        FashionMNIST(tmp, train=True, download=True)
        _copy_fashion(Path(tmp) / "FashionMNIST" / "raw", dest)


def _copy_fashion(src: Path, dest: Path) -> None:
    if not _has_fashion(src):
        raise RuntimeError(f"the Fashion-MNIST files are not in {src}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in FASHION_FILES.values():  # via a temporary name: an interrupted copy leaves no truncated file
        part = dest / f"{name}.part{os.getpid()}"
        shutil.copyfile(src / name, part)
        part.replace(dest / name)


def find_fashion_mnist(root: Optional[PathLike] = None, fetch: bool = True) -> Path:
    """The folder holding the four Fashion-MNIST ``.gz`` files (see :mod:`flatminima.data` for the order).

    With ``fetch`` and no folder found, fill the cache with ``apt-get download``, else torchvision.
    """
    _check_path("root", root)
    check_bool("fetch", fetch)
    searched = _fashion_search_path(root)
    for folder in searched:
        if _has_fashion(folder):
            return folder
    errors = []
    if fetch:
        dest = cache_dir() / "fashion-mnist"
        for how, fetcher in (("apt-get download", _fetch_with_apt), ("torchvision", _fetch_with_torchvision)):
            try:
                fetcher(dest)
                return dest
            except Exception as exc:  # any failure here only means: try the next way
                detail = exc.stderr.decode(errors="replace").strip() if getattr(exc, "stderr", None) else exc
                errors.append(f"{how}: {type(exc).__name__}: {detail}")
    raise FileNotFoundError(
        "Fashion-MNIST not found in " + ", ".join(map(str, searched)) + ". Install it with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or install torchvision on a machine with "
        f"internet access (it downloads into the cache), or set ${FASHION_ENV} to a folder holding "
        + ", ".join(FASHION_FILES.values()) + "." + ("".join("\n  " + e for e in errors)))


def _prepared(folder: Path) -> dict[str, Tensor]:
    """uint8 tensors parsed from ``folder``, cached as a ``.pt`` keyed by the source files' path, size, mtime."""
    stats = [folder.resolve() / f for f in FASHION_FILES.values()]
    key = hashlib.sha256(repr([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in stats]).encode())
    cached = cache_dir() / "fashion-mnist" / f"prepared-{key.hexdigest()[:16]}.pt"
    if cached.is_file():
        try:
            return torch.load(cached, weights_only=True)
        except Exception:  # a truncated or foreign file: parse again and overwrite it
            pass
    ndims = {"train_images": 3, "train_labels": 1, "test_images": 3, "test_labels": 1}
    arrays = {k: torch.from_numpy(read_idx(folder / f, ndims[k])) for k, f in FASHION_FILES.items()}
    if arrays["train_images"].shape[0] != arrays["train_labels"].shape[0] or \
            arrays["test_images"].shape[0] != arrays["test_labels"].shape[0]:
        raise ValueError(f"{folder}: image and label counts differ")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        torch.save(arrays, tmp)
        tmp.replace(cached)
    except OSError:
        pass  # a read-only cache only costs the parse next time
    return arrays


def _pixel_stats(images: Tensor) -> tuple[float, float]:
    """Exact mean and std of ``images / 255`` (uint8) from a 256-bin histogram (no float copy)."""
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum()
    mean = (counts * values).sum() / n
    std = ((counts * (values - mean) ** 2).sum() / (n - 1)).sqrt()
    return float(mean), float(std)


def load_fashion_mnist(root: Optional[PathLike] = None, subset: Optional[int] = None, fetch: bool = True) -> Dataset:
    """Fashion-MNIST as ``N×1×28×28`` floats (scaled to [0, 1], then standardized with the full training
    set's mean and std) and int64 labels; ``subset`` keeps a seeded random part of the training set
    (the same part as :meth:`Dataset.subset` with seed 0). The options are checked before any file
    is looked for."""
    _check_path("root", root)
    check_optional_int("subset", subset, 1)
    check_bool("fetch", fetch)
    folder = find_fashion_mnist(root, fetch)
    arrays = _prepared(folder)
    mean, std = _pixel_stats(arrays["train_images"])
    y_tr = arrays["train_labels"].long()
    full = Dataset("fashion_mnist", arrays["train_images"], y_tr, arrays["test_images"], arrays["test_labels"].long(),
                   10, (1, 28, 28), str(folder)).subset(subset)

    def prepare(images: Tensor) -> Tensor:
        return images.unsqueeze(1).float().div_(255.0).sub_(mean).div_(std)

    return replace(full, x_train=prepare(full.x_train), x_test=prepare(full.x_test))
