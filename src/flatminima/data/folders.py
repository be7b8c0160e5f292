"""Image datasets read from disk and decoded batch by batch (streaming), for continual learning.

:func:`load_image_folder` reads a layout into a :class:`FolderDataset` (train and test
:class:`ImageFiles`, 0-based labels in item order): ``"folder"`` (``root/<class>/<image>``, ImageNet-R:
no official split, so per class, in label order, a ``torch.randperm`` of its path-sorted files from a
generator seeded with ``split_seed`` puts the first ``min(n − 1, ⌊test_fraction·n + ½⌋)`` in test),
``"train_test"`` (``root/{train,test}/<class>/<image>``), ``"cub"`` (CUB-200-2011's id files, 1-based
labels made 0-based, image-id order), ``"split_file"`` (DomainNet's ``<name>_{train,test}.txt`` lines
``relative/path label``, names concatenated in sorted order) and ``"cifar100"`` (the python pickles,
fine labels, decoded to arrays once). Images are decoded by PIL (the ``images`` extra) as RGB and
transformed by :class:`~flatminima.data.transforms.ImageTransform`; training batches are
``(position, seed)`` pairs (:class:`EpochBatches`), so a sample's augmentation depends only on the
generator, never on the number of workers. :func:`export_fashion_folder` writes Fashion-MNIST as PNGs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..core.schedules import derive_seed
from ..core.validation import check, check_bool, check_choice, check_int, check_optional_int, is_real
from .base import PathLike, _check_path, cache_dir
from .images import _prepared, find_fashion_mnist
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, ImageTransform, pil_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
LAYOUTS = {
    "folder": "class folders root/<class>/<image> (images: " + ", ".join(IMAGE_EXTENSIONS) + ")",
    "train_test": "root/train/<class>/<image> and root/test/<class>/<image>",
    "cub": "CUB_200_2011's images.txt, image_class_labels.txt, train_test_split.txt and images/",
    "split_file": "<name>_train.txt and <name>_test.txt (lines 'relative/path label'), images under root",
    "cifar100": "cifar-100-python/train, cifar-100-python/test and cifar-100-python/meta (CIFAR-100's pickles)",
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
_MANIFEST = "complete.json"


# --------------------------------------------------------------------------------------------
# layouts: each gives (train items, train labels, test items, test labels, class names)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def scan_image_folder(root: PathLike) -> tuple[list[str], list[int], list[str]]:
    """``(paths, labels, class_names)`` of ``root/<class>/<image>``: classes = the visible
    sub-folders sorted by name (label = position), images = visible files with an extension in
    :data:`IMAGE_EXTENSIONS` (any case) anywhere below a class folder, sorted by path; paths are
    POSIX strings relative to ``root``. Raises ``ValueError`` naming ``root`` when it has no class
    folder or a class folder has no image."""
    root = Path(root)
    check("root", root.is_dir(), str(root), f"a folder of class folders: {LAYOUTS['folder']}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and _visible(d.name))
    check("root", bool(classes), str(root), f"a folder of class folders: {LAYOUTS['folder']}; it has none")
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = []
        for folder, dirs, files in os.walk(root / name, followlinks=True):
            dirs[:] = [d for d in dirs if _visible(d)]
            rel = Path(folder).relative_to(root)
            found += [(rel / f).as_posix() for f in files if _visible(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
        check("root", bool(found), str(root), f"class folders holding images ({', '.join(IMAGE_EXTENSIONS)}); "
              f"the class folder {name!r} holds none")
        paths += sorted(found)
        labels += [label] * len(found)
    return paths, labels, classes


def _split_folder(labels: list[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The stratified train/test split of the ``"folder"`` layout (see the module docstring)."""
    y = torch.tensor(labels)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(int(y.max()) + 1):
        members = torch.nonzero(y == c).flatten()
        k = min(len(members) - 1, math.floor(test_fraction * len(members) + 0.5))
        perm = members[torch.randperm(len(members), generator=g)]
        test.append(perm[:k])
        train.append(perm[k:])
    return torch.cat(train).sort().values.tolist(), torch.cat(test).sort().values.tolist()


def _unzip(pairs: list[tuple[str, int]]) -> tuple[list[str], list[int]]:
    return [p for p, _ in pairs], [c for _, c in pairs]


def _read_folders(root: Path, layout: str, test_fraction: float, seed: int):
    if layout == "folder":
        paths, labels, classes = scan_image_folder(root)
        parts = [[(paths[i], labels[i]) for i in pos] for pos in _split_folder(labels, test_fraction, seed)]
        return root, [_unzip(p) for p in parts], classes
    scans = [scan_image_folder(root / split) for split in ("train", "test")]
    differ = sorted(set(scans[0][2]) ^ set(scans[1][2]))
    check("root", not differ, str(root), f"train/ and test/ with the same class folders; not in both: {differ[:5]}")
    return root, [([f"{split}/{p}" for p in paths], labels) for split, (paths, labels, _) in
                  zip(("train", "test"), scans)], scans[0][2]


def _read_lines(path: Path, label_last: bool) -> list[tuple[str, str]]:
    """Two whitespace-separated fields per non-empty line (``label_last``: split at the last space)."""
    check("root", path.is_file(), str(path.parent), f"a folder holding {path.name}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            parts = line.strip().rsplit(maxsplit=1) if label_last else line.strip().split(maxsplit=1)
            check(f"line {n} of {path}", len(parts) == 2, line, "two fields separated by white space")
            out.append((parts[0], parts[1]))
    return out


def _int_field(value: str, where: str) -> int:
    check(where, value.lstrip("-").isdigit(), value, "an integer")
    return int(value)


def _read_cub(root: Path):
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011").is_dir():
        root = root / "CUB_200_2011"
    images = {i: p for i, p in _read_lines(root / "images.txt", False)}
    labels = {i: _int_field(c, f"label of image {i} in image_class_labels.txt") - 1
              for i, c in _read_lines(root / "image_class_labels.txt", False)}
    is_train = {i: s.strip() == "1" for i, s in _read_lines(root / "train_test_split.txt", False)}
    ids = sorted(images, key=lambda i: _int_field(i, "image id in images.txt"))
    check("root", set(ids) == set(labels) == set(is_train), str(root),
          "images.txt, image_class_labels.txt and train_test_split.txt listing the same image ids")
    if (root / "classes.txt").is_file():
        names = [n for _, n in sorted(_read_lines(root / "classes.txt", False), key=lambda p: int(p[0]))]
    else:
        first = {labels[i]: images[i].split("/")[0] for i in reversed(ids)}
        names = [first.get(c, str(c)) for c in range(max(labels.values()) + 1)]
    check("root", all(0 <= labels[i] < len(names) for i in ids), str(root),
          f"image_class_labels.txt labels in 1..{len(names)}")
    parts = [[("images/" + images[i], labels[i]) for i in ids if is_train[i] == flag] for flag in (True, False)]
    return root, [_unzip(p) for p in parts], names


def _read_split_files(root: Path, split_name: Union[None, str, Sequence[str]]):
    if split_name is None:
        names = sorted(p.name[:-len("_train.txt")] for p in root.glob("*_train.txt"))
        check("root", bool(names), str(root), f"a folder holding {LAYOUTS['split_file']}")
    else:
        names = [split_name] if isinstance(split_name, str) else list(split_name)
    parts = []
    for split in ("train", "test"):
        parts.append([(p, _int_field(c, f"label of {p}")) for n in names
                      for p, c in _read_lines(root / f"{n}_{split}.txt", True)])
    labels = [c for part in parts for _, c in part]
    check("root", min(labels) >= 0, str(root), "split files with labels >= 0")
    first = {c: Path(p).parent.name for p, c in reversed([pair for part in parts for pair in part])}
    return root, [_unzip(p) for p in parts], [first.get(c, str(c)) for c in range(max(labels) + 1)]


def _read_cifar100(root: Path):
    base = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    loaded = {}
    for part in ("train", "test", "meta"):
        check("root", (base / part).is_file(), str(root), f"a folder holding {LAYOUTS['cifar100']}")
        with open(base / part, "rb") as f:  # CIFAR's own format: pickles of numpy arrays and lists
            raw = pickle.load(f, encoding="bytes")
        loaded[part] = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    names = [n.decode() if isinstance(n, bytes) else n for n in loaded["meta"]["fine_label_names"]]
    parts = []
    for part in ("train", "test"):
        data = np.asarray(loaded[part]["data"], dtype=np.uint8)
        # rows are 1024 red, 1024 green, 1024 blue values of a 32×32 image, row-major
        images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        parts.append((images, [int(c) for c in loaded[part]["fine_labels"]]))
    return base, parts, names


# --------------------------------------------------------------------------------------------
# loaders and the dataset


class EpochBatches(torch.utils.data.Sampler):
    """Batches of ``(position, seed)`` pairs. Each pass draws from ``generator``, before its first
    batch, ``torch.randperm(n)`` then one int ``e``; the sample at position ``i`` gets seed
    ``derive_seed(e, i)``. The draws are made lazily, when the first batch is asked for: a DataLoader
    with worker processes calls ``iter`` on its sampler twice on its first pass (once unused), so an
    eager draw would consume the generator differently with and without workers."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True):
        self.n, self.batch_size, self.generator, self.drop_last = n, batch_size, generator, drop_last

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        epoch = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator).item())
        pairs = [(i, derive_seed(epoch, i)) for i in perm]
        stop = len(self) * self.batch_size if self.drop_last else self.n
        for k in range(0, stop, self.batch_size):
            yield pairs[k:k + self.batch_size]


@dataclass
class FolderDataset:
    """A streaming train/test dataset: the interface of :class:`~flatminima.data.Dataset` with loaders
    instead of tensors (``y_train``/``y_test`` are CPU int64 labels in item order)."""

    name: str
    train: ImageFiles
    test: ImageFiles
    y_train: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    source: str = ""
    workers: int = 0
    class_names: list[str] = field(default_factory=list)
    pin_memory: bool = False

    def _loader(self, files: ImageFiles, **kwargs) -> DataLoader:
        # A private generator: the DataLoader draws its worker base seed from it, not from the global RNG.
        return DataLoader(files, num_workers=self.workers, pin_memory=self.pin_memory,
                          generator=torch.Generator().manual_seed(0), **kwargs)

    def train_loader(self, batch_size: int, generator: torch.Generator, drop_last: bool = True) -> DataLoader:
        """Augmented batches ``(x N×3×H×W float32, y N int64)`` in an order drawn from ``generator``
        each epoch (:class:`EpochBatches`); worker processes persist across epochs."""
        check_int("batch_size", batch_size, 1)
        check("generator", isinstance(generator, torch.Generator), generator, "a torch.Generator")
        check_bool("drop_last", drop_last)
        check("batch_size", not drop_last or batch_size <= len(self.train), batch_size,
              f"at most the {len(self.train)} training images (drop_last=True)")
        return self._loader(self.train, batch_sampler=EpochBatches(len(self.train), batch_size, generator, drop_last),
                            persistent_workers=self.workers > 0)

    def test_loader(self, batch_size: int) -> DataLoader:
        """The test split in order, evaluation transform."""
        check_int("batch_size", batch_size, 1)
        return self._loader(self.test, batch_size=batch_size)

    def eval_train_loader(self, batch_size: int) -> DataLoader:
        """The training split in order, evaluation transform (no augmentation)."""
        check_int("batch_size", batch_size, 1)
        return self._loader(self.train, batch_size=batch_size)

    def test_batch(self, n: int) -> tuple[Tensor, Tensor]:
        """The first ``min(n, len(test))`` test images (evaluation transform) and their labels."""
        check_int("n", n, 1)
        k = min(n, len(self.test))
        check("n", k > 0, n, "a test split that is not empty")
        return torch.stack([self.test[i][0] for i in range(k)]), self.y_test[:k].clone()

    def to(self, device: Union[str, torch.device]) -> "FolderDataset":
        """Batches are moved by the caller; on CUDA the loaders pin memory (same images, same order)."""
        pin = torch.device(device).type == "cuda"
        return self if pin == self.pin_memory else replace(self, pin_memory=pin)

    def select(self, train_idx: Optional[Tensor], test_idx: Optional[Tensor]) -> "FolderDataset":
        """The dataset over the given positions of each split (``None``: all); labels stay global."""
        parts = {}
        for split, idx, files in (("train_idx", train_idx, self.train), ("test_idx", test_idx, self.test)):
            ok = idx is None or (isinstance(idx, Tensor) and idx.dim() == 1 and not idx.is_floating_point()
                                 and idx.dtype != torch.bool
                                 and (len(idx) == 0 or (-len(files) <= int(idx.min()) and int(idx.max()) < len(files))))
            check(split, ok, idx, f"None or a 1-D integer tensor of positions in [0, {len(files)})")
            parts[split] = files if idx is None else files.select(idx)
        return replace(self, train=parts["train_idx"], test=parts["test_idx"], y_train=parts["train_idx"].labels,
                       y_test=parts["test_idx"].labels)

    def subset(self, n: Optional[int], seed: int = 0) -> "FolderDataset":
        """The first ``n`` training items of a seeded permutation, as
        :meth:`flatminima.data.Dataset.subset` (the same positions for the same ``n``, ``seed`` and
        size); the test split is kept whole."""
        check_optional_int("subset", n, 1)
        check_int("seed", seed, 0)
        if n is None or n >= len(self.y_train):
            return self
        return self.select(torch.randperm(len(self.y_train), generator=torch.Generator().manual_seed(seed))[:n], None)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of both splits' :meth:`ImageFiles.update_digest` and the class names."""
        h = hashlib.sha256(json.dumps(self.class_names).encode())
        for files in (self.train, self.test):
            files.update_digest(h)
        return h.hexdigest()


def check_image_options(layout: str = "folder", image_size: int = 224, augment: bool = True,
                        test_fraction: float = 0.2, split_seed: int = 0, workers: int = 0, name: Optional[str] = None,
                        split_name: Union[None, str, Sequence[str]] = None, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD, resize_ratio: float = 0.875):
    """Check the options of :func:`load_image_folder` (``ValueError`` naming the first bad one); return
    its (evaluation, training) transforms, the training one ``None`` without ``augment``."""
    check_choice("layout", layout, tuple(LAYOUTS))
    check_bool("augment", augment)
    check("test_fraction", is_real(test_fraction) and 0 < test_fraction < 1, test_fraction, "a number in (0, 1)")
    check_int("split_seed", split_seed, 0)
    check_int("workers", workers, 0)
    check("name", name is None or (isinstance(name, str) and name != ""), name, "None or a non-empty string")
    names_ok = split_name is None or isinstance(split_name, str) or (
        isinstance(split_name, (list, tuple)) and bool(split_name) and all(isinstance(s, str) for s in split_name))
    check("split_name", names_ok and (split_name is None or layout == "split_file"), split_name,
          "None, or (layout 'split_file') a name or a non-empty list of names <name> of <name>_train.txt")
    evaluate = ImageTransform(image_size, False, mean, std, resize_ratio=resize_ratio)
    return evaluate, ImageTransform(image_size, True, mean, std) if augment else None


def load_image_folder(root: Optional[PathLike], layout: str = "folder", image_size: int = 224, augment: bool = True,
                      test_fraction: float = 0.2, split_seed: int = 0, workers: int = 0, name: Optional[str] = None,
                      split_name: Union[None, str, Sequence[str]] = None, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD, resize_ratio: float = 0.875) -> FolderDataset:
    """The :class:`FolderDataset` of ``root`` in ``layout`` (see the module docstring), images
    ``3 × image_size × image_size``; training crops augmented (``augment``) or evaluation-transformed.
    ``test_fraction``/``split_seed`` apply to ``"folder"`` only, ``split_name`` to ``"split_file"``
    only. Every option is checked before any file is read."""
    evaluate, train_transform = check_image_options(layout, image_size, augment, test_fraction, split_seed, workers,
                                                    name, split_name, mean, std, resize_ratio)
    _check_path("root", root)
    check("root", root is not None and Path(root).is_dir(), root,
          f"the folder of a {layout!r} dataset: {LAYOUTS[layout]}")
    if layout in ("folder", "train_test"):
        path, parts, classes = _read_folders(Path(root), layout, test_fraction, split_seed)
    elif layout == "split_file":
        path, parts, classes = _read_split_files(Path(root), split_name)
    else:
        path, parts, classes = (_read_cub if layout == "cub" else _read_cifar100)(Path(root))
    files = [ImageFiles(path, items, torch.tensor(labels, dtype=torch.long), evaluate) for items, labels in parts]
    check("root", len(files[0]) > 0, str(root), f"a {layout!r} dataset with training images")
    train = ImageFiles(files[0].root, files[0].items, files[0].labels, evaluate, train_transform)
    return FolderDataset(name or path.name, train, files[1], train.labels, files[1].labels, len(classes),
                         (3, image_size, image_size), str(path), workers, list(classes))


# --------------------------------------------------------------------------------------------
# Fashion-MNIST as a folder of PNGs


def fashion_folder_name(per_class_train: Optional[int] = None, per_class_test: Optional[int] = None) -> str:
    """``fashion_mnist_folder``, with ``-train<n>``/``-test<m>`` for the per-class caps."""
    caps = "".join(f"-{s}{n}" for s, n in (("train", per_class_train), ("test", per_class_test)) if n is not None)
    return "fashion_mnist_folder" + caps


def export_fashion_folder(cache: Optional[PathLike] = None, per_class_train: Optional[int] = None,
                          per_class_test: Optional[int] = None, fashion_root: Optional[PathLike] = None,
                          fetch: bool = True) -> Path:
    """Write Fashion-MNIST (:func:`~flatminima.data.find_fashion_mnist` ``(fashion_root, fetch)``) as
    ``<cache>/<fashion_folder_name>/{train,test}/<label>_<name>/<index>.png`` (``cache`` defaults to
    :func:`~flatminima.data.cache_dir`; ``<index>``: 5 digits, the image's position in its idx file;
    class folders ``0_t-shirt_top`` … ``9_ankle_boot`` sort in label order) and return that folder.
    The caps keep the first ``per_class_*`` images of each class in file order. Written once into a
    temporary folder renamed into place (a folder with its ``complete.json`` is reused as it is)."""
    _check_path("cache", cache)
    check_optional_int("per_class_train", per_class_train, 1)
    check_optional_int("per_class_test", per_class_test, 1)
    _check_path("fashion_root", fashion_root)
    check_bool("fetch", fetch)
    base = Path(cache) if cache is not None else cache_dir()
    final = base / fashion_folder_name(per_class_train, per_class_test)
    if (final / _MANIFEST).is_file():
        return final
    Image = pil_image()
    arrays = _prepared(find_fashion_mnist(fashion_root, fetch))
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=base))
    classes = [f"{c}_{n.lower().replace('/', '_').replace(' ', '_')}" for c, n in enumerate(FASHION_CLASSES)]
    try:
        counts = {}
        for split, cap in (("train", per_class_train), ("test", per_class_test)):
            images, labels = arrays[f"{split}_images"].numpy(), arrays[f"{split}_labels"].numpy()
            for c, folder in enumerate(classes):
                (tmp / split / folder).mkdir(parents=True)
                members = np.flatnonzero(labels == c)[:cap]
                for i in members:
                    Image.fromarray(images[i]).save(tmp / split / folder / f"{i:05d}.png")
                counts[f"{split}/{folder}"] = len(members)
        (tmp / _MANIFEST).write_text(json.dumps({"classes": classes, "counts": counts}, indent=1))
        if final.exists() and not (final / _MANIFEST).is_file():
            shutil.rmtree(final)  # an interrupted copy made by hand: ours are renamed into place complete
        try:
            tmp.rename(final)
        except OSError:
            if not (final / _MANIFEST).is_file():  # not another process that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final
