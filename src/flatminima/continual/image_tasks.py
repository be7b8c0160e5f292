"""Continual sequences of image datasets streamed from disk (:class:`~flatminima.data.FolderDataset`).

Class-incremental (scenario ``"class"``), the protocol of L2P/DualPrompt/CODA-Prompt/InfLoRA: the
labels in ``class_order`` (the identity, or ``torch.randperm`` from a generator seeded with
``class_order_seed``, or an explicit permutation) are cut by :func:`class_incremental_split` into a
first task of ``init_cls`` classes, then tasks of ``increment`` classes; when ``increment`` does not
divide the rest, the remainder is one shorter last task (7 classes, 3 then 2: ``[3, 2, 2]``; 10
classes, 4 then 4: ``[4, 4, 2]``). Labels stay global (not renumbered by the order), every task
keeps the dataset's own train/test split of its classes, and the sequence's ``class_order`` is set
so that a run saves it. ``train_per_class``/``test_per_class`` keep per class a seeded part
(``torch.randperm`` from a generator seeded with ``derive_seed(subset_seed, class, split)``, so a
class's part does not depend on the order or the other classes).

Sequences: ``image_folder`` (any root and layout), ``imagenet_r`` (200 classes, 10 + 10 × 19),
``cifar100`` (100, 10 + 10 × 9), ``cub`` (200, 10 + 10 × 19), ``cars`` (196, 16 + 20 × 9),
``domainnet`` (345, 5 tasks of 69), ``fashion_folder`` (Fashion-MNIST exported as PNGs, 2 + 2 × 4)
and the domain-incremental ``domain_folders`` (one task per domain sub-folder, one label space). A
named dataset without ``root`` raises ``ValueError`` saying what to download
(:func:`dataset_instructions`). Every option is checked before any file is read.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..core.schedules import derive_seed
from ..core.validation import check, check_bool, check_int, check_optional_int, is_int
from ..data import (IMAGENET_MEAN, IMAGENET_STD, FolderDataset, PathLike, check_image_options, export_fashion_folder,
                    load_image_folder)
from .tasks import ContinualTask, TaskSequence, _classes_name, register_sequence

FASHION_MEAN, FASHION_STD = (0.2860,) * 3, (0.3530,) * 3  # Fashion-MNIST's training pixels (gray → RGB)
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
_PASS = "and pass that folder as --data-root (task_options.root)"
INSTRUCTIONS = {
    "imagenet_r": "ImageNet-R (Hendrycks et al., ICCV 2021; 200 classes, 30,000 images, no official split): download "
                  "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar, unpack it with "
                  f"`tar -xf imagenet-r.tar` (it makes imagenet-r/<class>/<image>.jpg) {_PASS}: imagenet-r, the one "
                  "holding the 200 class folders (or its parent)",
    "cifar100": "CIFAR-100 (Krizhevsky, 2009; 100 classes, 50,000 train / 10,000 test): download "
                "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, unpack it with "
                f"`tar -xzf cifar-100-python.tar.gz` (it makes cifar-100-python/{{train,test,meta}}) {_PASS}: the "
                "one holding cifar-100-python (or cifar-100-python itself)",
    "cub": "CUB-200-2011 (Wah et al., 2011; 200 classes, 5,994 train / 5,794 test): download CUB_200_2011.tgz from "
           "https://data.caltech.edu/records/65de6-vhk29, unpack it with `tar -xzf CUB_200_2011.tgz` "
           f"{_PASS}: CUB_200_2011, holding images.txt, image_class_labels.txt, train_test_split.txt and images/",
    "cars": "Stanford Cars (Krause et al., 3dRR 2013; 196 classes, 8,144 train / 8,041 test; "
            "https://ai.stanford.edu/~jkrause/cars/car_dataset.html, no longer served): get its class-folder "
            "version (e.g. Kaggle's stanford-car-dataset-by-classes-folder), unpack it so that one folder holds "
            f"train/<class>/<image> and test/<class>/<image> for the 196 classes, {_PASS}",
    "domainnet": "DomainNet (Peng et al., ICCV 2019; 345 classes, 6 domains): from http://ai.bu.edu/M3SDA/ download "
                 "into one folder the six domain zips (clipart, infograph, painting, quickdraw, real, sketch) and "
                 "their split files <domain>_train.txt and <domain>_test.txt, unzip every zip there (`unzip "
                 f"clipart.zip` makes clipart/<class>/<image>) {_PASS}: the one holding the .txt files",
    "image_folder": "a dataset in one of the layouts of flatminima.data.LAYOUTS (e.g. root/<class>/<image>); "
                    "pass its folder as --data-root (task_options.root)",
    "domain_folders": "a folder of domains root/<domain>/<class>/<image> (every domain with the same class "
                      "folders); pass it as --data-root (task_options.root)",
}


def dataset_instructions(name: str) -> str:
    """What to download for dataset ``name`` (a key of :data:`INSTRUCTIONS`), how to unpack it and
    which folder to pass as ``--data-root`` / ``task_options.root``."""
    check("name", name in INSTRUCTIONS, name, f"one of {', '.join(INSTRUCTIONS)}")
    return INSTRUCTIONS[name]


def _check_order_options(init_cls: Any, increment: Any, class_order_seed: Any, class_order: Any) -> None:
    check_int("init_cls", init_cls, 1)
    check_int("increment", increment, 1)
    check_optional_int("class_order_seed", class_order_seed, 0)
    ok = class_order is None or (not isinstance(class_order, (str, bytes)) and hasattr(class_order, "__iter__")
                                 and all(is_int(c) for c in class_order))
    check("class_order", ok, class_order, "None or a list of ints (a permutation of the labels)")
    check("class_order", class_order is None or class_order_seed is None, class_order,
          "None when class_order_seed is set (one or the other fixes the order)")


def make_class_order(num_classes: int, class_order_seed: Optional[int] = None,
                     class_order: Optional[Sequence[int]] = None) -> list[int]:
    """``class_order`` when given (checked to be a permutation of ``0..num_classes−1``), else
    ``torch.randperm(num_classes)`` from a generator seeded with ``class_order_seed``, else the identity."""
    check_int("num_classes", num_classes, 1)
    _check_order_options(1, 1, class_order_seed, class_order)
    if class_order is not None:
        order = [int(c) for c in class_order]
        check("class_order", sorted(order) == list(range(num_classes)), class_order,
              f"a permutation of 0..{num_classes - 1}")
        return order
    if class_order_seed is None:
        return list(range(num_classes))
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(class_order_seed)).tolist()


def class_incremental_split(num_classes: int, init_cls: int, increment: int,
                            class_order_seed: Optional[int] = None,
                            class_order: Optional[Sequence[int]] = None) -> list[list[int]]:
    """The label groups of a class-incremental sequence: ``order[:init_cls]``, then consecutive
    chunks of ``increment`` (the last one shorter when ``increment`` does not divide the rest), each
    sorted; ``order`` = :func:`make_class_order` ``(num_classes, class_order_seed, class_order)``."""
    check_int("num_classes", num_classes, 1)
    _check_order_options(init_cls, increment, class_order_seed, class_order)
    check("init_cls", init_cls <= num_classes, init_cls, f"an int in [1, {num_classes}] (num_classes)")
    order = make_class_order(num_classes, class_order_seed, class_order)
    groups = [order[:init_cls]] + [order[k:k + increment] for k in range(init_cls, num_classes, increment)]
    return [sorted(g) for g in groups]


def per_class_positions(labels: Tensor, classes: Sequence[int], per_class: Optional[int], seed: int,
                        stream: int) -> Tensor:
    """Sorted positions of ``labels`` in ``classes``; with ``per_class``, at most that many per class,
    the first of ``torch.randperm`` from a generator seeded with ``derive_seed(seed, class, stream)``."""
    picked = []
    for c in classes:
        members = torch.nonzero(labels == c).flatten()
        if per_class is not None and len(members) > per_class:
            g = torch.Generator().manual_seed(derive_seed(seed, c, stream))
            members = members[torch.randperm(len(members), generator=g)[:per_class]]
        picked.append(members)
    return torch.cat(picked).sort().values if picked else torch.zeros(0, dtype=torch.long)


def _check_caps(train_per_class: Any, test_per_class: Any, subset_seed: Any) -> None:
    check_optional_int("train_per_class", train_per_class, 1)
    check_optional_int("test_per_class", test_per_class, 1)
    check_int("subset_seed", subset_seed, 0)


def split_folder_dataset(base: FolderDataset, name: str, init_cls: int, increment: int,
                         class_order_seed: Optional[int] = None, class_order: Optional[Sequence[int]] = None,
                         train_per_class: Optional[int] = None, test_per_class: Optional[int] = None,
                         subset_seed: int = 0) -> TaskSequence:
    """``base`` as a class-incremental :class:`TaskSequence` (see the module docstring); each task
    is ``base.select(...)`` (shared decoded-on-demand items, no copy)."""
    _check_caps(train_per_class, test_per_class, subset_seed)
    groups = class_incremental_split(base.num_classes, init_cls, increment, class_order_seed, class_order)
    order = make_class_order(base.num_classes, class_order_seed, class_order)
    tasks = []
    for classes in groups:
        train = per_class_positions(base.y_train, classes, train_per_class, subset_seed, 0)
        test = per_class_positions(base.y_test, classes, test_per_class, subset_seed, 1)
        task = _classes_name(classes)
        tasks.append(ContinualTask(task, replace(base.select(train, test), name=f"{name}/{task}"), classes))
    return TaskSequence(name, tasks, base.num_classes, base.input_shape, "class", class_order=order)


def _root(dataset: str, root: Any, inner: Sequence[str] = ()) -> Path:
    """``root`` (or its first sub-folder in ``inner`` that exists), checked to be a folder."""
    ok = isinstance(root, (str, os.PathLike)) and Path(root).is_dir()
    check("root", ok, root, f"the folder of {dataset}: {dataset_instructions(dataset)}")
    for sub in inner:
        if (Path(root) / sub).is_dir():
            return Path(root) / sub
    return Path(root)


def _named(dataset: str, root: Any, layout: str, classes: int, init_cls: int, increment: int, order_seed: Any,
           order: Any, caps: tuple, subset_seed: int, inner: Sequence[str] = (), **load: Any) -> TaskSequence:
    """Load a named dataset of ``classes`` classes (every option checked first) and split it."""
    _check_order_options(init_cls, increment, order_seed, order)
    check("init_cls", init_cls <= classes, init_cls, f"an int in [1, {classes}] ({dataset} has {classes} classes)")
    _check_caps(*caps, subset_seed)
    if order is not None:
        make_class_order(classes, None, order)
    check_image_options(layout, name=dataset, **load)
    path = _root(dataset, root, inner)
    base = load_image_folder(path, layout, name=dataset, **load)
    check("root", base.num_classes == classes, str(path),
          f"{dataset} with {classes} classes (found {base.num_classes}): {dataset_instructions(dataset)}")
    return split_folder_dataset(base, dataset, init_cls, increment, order_seed, order, *caps, subset_seed)


@register_sequence("image_folder")
def load_image_folder_sequence(root: Optional[PathLike] = None, layout: str = "folder", init_cls: int = 10,
                               increment: int = 10, class_order_seed: Optional[int] = None,
                               class_order: Optional[list[int]] = None, image_size: int = 224, augment: bool = True,
                               test_fraction: float = 0.2, split_seed: int = 0, workers: int = 0,
                               train_per_class: Optional[int] = None, test_per_class: Optional[int] = None,
                               subset_seed: int = 0, split_name: Optional[Any] = None,
                               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                               resize_ratio: float = 0.875) -> TaskSequence:
    """Any dataset of :func:`~flatminima.data.load_image_folder` (``root`` in ``layout``) as a
    class-incremental sequence: ``init_cls`` classes, then ``increment`` per task."""
    _check_order_options(init_cls, increment, class_order_seed, class_order)
    _check_caps(train_per_class, test_per_class, subset_seed)
    load = dict(image_size=image_size, augment=augment, test_fraction=test_fraction, split_seed=split_seed,
                workers=workers, split_name=split_name, mean=mean, std=std, resize_ratio=resize_ratio)
    check_image_options(layout, **load)
    path = _root("image_folder", root)
    base = load_image_folder(path, layout, name=path.name, **load)
    return split_folder_dataset(base, "image_folder", init_cls, increment, class_order_seed, class_order,
                                train_per_class, test_per_class, subset_seed)


def _load(image_size, augment, test_fraction, split_seed, workers, mean, std, resize_ratio) -> dict[str, Any]:
    return dict(image_size=image_size, augment=augment, test_fraction=test_fraction, split_seed=split_seed,
                workers=workers, mean=mean, std=std, resize_ratio=resize_ratio)


@register_sequence("imagenet_r")
def load_imagenet_r(root: Optional[PathLike] = None, init_cls: int = 10, increment: int = 10,
                    class_order_seed: Optional[int] = None, class_order: Optional[list[int]] = None,
                    image_size: int = 224, augment: bool = True, test_fraction: float = 0.2, split_seed: int = 0,
                    workers: int = 0, train_per_class: Optional[int] = None, test_per_class: Optional[int] = None,
                    subset_seed: int = 0, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    resize_ratio: float = 0.875) -> TaskSequence:
    """ImageNet-R (200 classes; layout ``"folder"``, a seeded 80/20 stratified split), 10 + 10 × 19."""
    return _named("imagenet_r", root, "folder", 200, init_cls, increment, class_order_seed, class_order,
                  (train_per_class, test_per_class), subset_seed, ("imagenet-r",),
                  **_load(image_size, augment, test_fraction, split_seed, workers, mean, std, resize_ratio))


@register_sequence("cifar100")
def load_cifar100(root: Optional[PathLike] = None, init_cls: int = 10, increment: int = 10,
                  class_order_seed: Optional[int] = None, class_order: Optional[list[int]] = None,
                  image_size: int = 224, augment: bool = True, workers: int = 0,
                  train_per_class: Optional[int] = None, test_per_class: Optional[int] = None, subset_seed: int = 0,
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                  resize_ratio: float = 0.875) -> TaskSequence:
    """CIFAR-100 (100 classes, its 50k/10k split, fine labels; 32×32 images resized), 10 + 10 × 9."""
    return _named("cifar100", root, "cifar100", 100, init_cls, increment, class_order_seed, class_order,
                  (train_per_class, test_per_class), subset_seed, (),
                  **_load(image_size, augment, 0.2, 0, workers, mean, std, resize_ratio))


@register_sequence("cub")
def load_cub(root: Optional[PathLike] = None, init_cls: int = 10, increment: int = 10,
             class_order_seed: Optional[int] = None, class_order: Optional[list[int]] = None, image_size: int = 224,
             augment: bool = True, workers: int = 0, train_per_class: Optional[int] = None,
             test_per_class: Optional[int] = None, subset_seed: int = 0, mean: Sequence[float] = IMAGENET_MEAN,
             std: Sequence[float] = IMAGENET_STD, resize_ratio: float = 0.875) -> TaskSequence:
    """CUB-200-2011 (200 classes, its official train/test split), 10 + 10 × 19."""
    return _named("cub", root, "cub", 200, init_cls, increment, class_order_seed, class_order,
                  (train_per_class, test_per_class), subset_seed, (),
                  **_load(image_size, augment, 0.2, 0, workers, mean, std, resize_ratio))


@register_sequence("cars")
def load_cars(root: Optional[PathLike] = None, init_cls: int = 16, increment: int = 20,
              class_order_seed: Optional[int] = None, class_order: Optional[list[int]] = None, image_size: int = 224,
              augment: bool = True, workers: int = 0, train_per_class: Optional[int] = None,
              test_per_class: Optional[int] = None, subset_seed: int = 0, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, resize_ratio: float = 0.875) -> TaskSequence:
    """Stanford Cars (196 classes as ``train/`` and ``test/`` class folders), 16 + 20 × 9."""
    return _named("cars", root, "train_test", 196, init_cls, increment, class_order_seed, class_order,
                  (train_per_class, test_per_class), subset_seed, ("car_data/car_data", "car_data"),
                  **_load(image_size, augment, 0.2, 0, workers, mean, std, resize_ratio))


@register_sequence("domainnet")
def load_domainnet(root: Optional[PathLike] = None, init_cls: int = 69, increment: int = 69,
                   class_order_seed: Optional[int] = None, class_order: Optional[list[int]] = None,
                   domains: Sequence[str] = DOMAINNET_DOMAINS, image_size: int = 224, augment: bool = True,
                   workers: int = 0, train_per_class: Optional[int] = None, test_per_class: Optional[int] = None,
                   subset_seed: int = 0, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   resize_ratio: float = 0.875) -> TaskSequence:
    """DomainNet class-incremental (345 classes, the split files of ``domains`` pooled), 5 tasks of 69."""
    check("domains", not isinstance(domains, str) and hasattr(domains, "__iter__") and bool(list(domains))
          and all(isinstance(d, str) for d in domains), domains, f"a non-empty list of names, e.g. {DOMAINNET_DOMAINS}")
    return _named("domainnet", root, "split_file", 345, init_cls, increment, class_order_seed, class_order,
                  (train_per_class, test_per_class), subset_seed, (), split_name=list(domains),
                  **_load(image_size, augment, 0.2, 0, workers, mean, std, resize_ratio))


def _check_names(name: str, value: Any, allow_none: bool) -> None:
    ok = (value is None and allow_none) or (not isinstance(value, (str, bytes)) and hasattr(value, "__iter__") and
                                            bool(list(value)) and all(isinstance(v, str) and v for v in value)
                                            and len(set(value)) == len(list(value)))
    check(name, ok, value, ("None or " if allow_none else "") + "a non-empty list of distinct folder names")


@register_sequence("domain_folders")
def load_domain_folders(root: Optional[PathLike] = None, domains: Optional[list[str]] = None, layout: str = "folder",
                        image_size: int = 224, augment: bool = True, test_fraction: float = 0.2, split_seed: int = 0,
                        workers: int = 0, train_per_class: Optional[int] = None, test_per_class: Optional[int] = None,
                        subset_seed: int = 0, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD, resize_ratio: float = 0.875) -> TaskSequence:
    """Domain-incremental: one task per domain ``root/<domain>`` (``domains`` in that order; default
    every visible sub-folder, sorted), each in ``layout`` (``"folder"`` or ``"train_test"``), all with
    the same class folders (one label space of every class), scenario ``"domain"``."""
    check("layout", layout in ("folder", "train_test"), layout, "'folder' or 'train_test'")
    _check_names("domains", domains, True)
    _check_caps(train_per_class, test_per_class, subset_seed)
    load = _load(image_size, augment, test_fraction, split_seed, workers, mean, std, resize_ratio)
    check_image_options(layout, **load)
    path = _root("domain_folders", root)
    names = list(domains) if domains is not None else sorted(
        d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    for d in names or [None]:
        check("domains", d is not None and (path / d).is_dir(), d, f"sub-folders of {path}")
    tasks: list[ContinualTask] = []
    for t, domain in enumerate(names):
        ds = load_image_folder(path / domain, layout, name=f"domain_folders/{domain}", **load)
        first = tasks[0].data if tasks else ds
        check("root", ds.class_names == first.class_names, str(path / domain),
              f"the same class folders as {names[0]} ({len(first.class_names)}: {first.class_names[:3]}...)")
        every = list(range(ds.num_classes))
        train = per_class_positions(ds.y_train, every, train_per_class, subset_seed, 2 * t)
        test = per_class_positions(ds.y_test, every, test_per_class, subset_seed, 2 * t + 1)
        tasks.append(ContinualTask(domain, ds.select(train, test), every))
    return TaskSequence("domain_folders", tasks, tasks[0].data.num_classes, tasks[0].data.input_shape, "domain")


@register_sequence("fashion_folder")
def load_fashion_folder(init_cls: int = 2, increment: int = 2, class_order_seed: Optional[int] = None,
                        class_order: Optional[list[int]] = None, train_per_class: Optional[int] = None,
                        test_per_class: Optional[int] = None, image_size: int = 32, augment: bool = False,
                        workers: int = 0, mean: Sequence[float] = FASHION_MEAN, std: Sequence[float] = FASHION_STD,
                        resize_ratio: float = 1.0, root: Optional[PathLike] = None, fetch: bool = True) -> TaskSequence:
    """Fashion-MNIST through the streaming path: :func:`~flatminima.data.export_fashion_folder`
    (``train_per_class``/``test_per_class``: the first images of each class in file order; ``root``/
    ``fetch``: where the idx files are, as for :func:`~flatminima.data.load_fashion_mnist`) read back
    in layout ``"train_test"``, gray as RGB, resized to ``image_size`` (``resize_ratio=1``: no
    crop); class-incremental, 2 + 2 × 4."""
    _check_order_options(init_cls, increment, class_order_seed, class_order)
    check("init_cls", init_cls <= 10, init_cls, "an int in [1, 10] (Fashion-MNIST has 10 classes)")
    if class_order is not None:
        make_class_order(10, None, class_order)
    check_optional_int("train_per_class", train_per_class, 1)
    check_optional_int("test_per_class", test_per_class, 1)
    check_bool("fetch", fetch)
    load = _load(image_size, augment, 0.2, 0, workers, mean, std, resize_ratio)
    check_image_options("train_test", **load)
    folder = export_fashion_folder(None, train_per_class, test_per_class, fashion_root=root, fetch=fetch)
    base = load_image_folder(folder, "train_test", name="fashion_folder", **load)
    return split_folder_dataset(base, "fashion_folder", init_cls, increment, class_order_seed, class_order)
