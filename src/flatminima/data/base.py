"""The :class:`Dataset` container, its input helpers (:func:`take`, :func:`inputs_to`) and the user cache folder."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from ..core.validation import check, check_int, check_optional_int, check_range

PathLike = Union[str, os.PathLike]
#: A batch of inputs: one tensor (images), or a dict of tensors with the same first dimension (text:
#: ``input_ids``, ``attention_mask``), indexed and moved together.
Inputs = Union[Tensor, Mapping[str, Tensor]]


def take(x: Inputs, index: Union[Tensor, slice]) -> Inputs:
    """``x[index]`` for a tensor, or for every tensor of a dict of inputs (same first dimension)."""
    if isinstance(x, Mapping):
        return {k: v[index] for k, v in x.items()}
    return x[index]


def inputs_to(x: Inputs, device: Union[str, torch.device]) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


@dataclass
class Dataset:
    """A classification dataset split into train and test; ``x_*`` are tensors or dicts of tensors
    (:data:`Inputs`) indexed along their first dimension; ``input_shape`` excludes the batch."""

    name: str
    x_train: Inputs
    y_train: Tensor
    x_test: Inputs
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    source: str = ""
    #: The true training labels when ``y_train`` holds noisy ones (:meth:`with_label_noise`), else None.
    y_train_clean: Optional[Tensor] = None

    def subset(self, n: Optional[int], seed: int = 0) -> "Dataset":
        """The first ``n`` training examples of a seeded permutation (the test set is kept whole)."""
        check_optional_int("subset", n, 1)
        check_int("seed", seed, 0)
        if n is None or n >= len(self.y_train):
            return self
        idx = torch.randperm(len(self.y_train), generator=torch.Generator().manual_seed(seed))[:n]
        clean = None if self.y_train_clean is None else self.y_train_clean[idx]
        return replace(self, x_train=take(self.x_train, idx), y_train=self.y_train[idx], y_train_clean=clean)

    def with_label_noise(self, fraction: float, seed: int = 0) -> "Dataset":
        """Symmetric label noise: exactly ``round(fraction · n)`` training examples, the first of a
        permutation seeded by ``seed``, get a label drawn uniformly from the *other* classes (so
        ``fraction`` is the share of wrong labels); the test set is untouched and the true labels
        are kept in ``y_train_clean``. ``fraction = 0`` returns the dataset itself."""
        check_range("label_noise", fraction, 0.0, 1.0, high_open=True)
        check_int("seed", seed, 0)
        if fraction == 0:
            return self
        check("label_noise", self.y_train_clean is None, fraction, "noise added once (these labels are noisy already)")
        n, classes = len(self.y_train), self.num_classes
        check("label_noise", round(fraction * n) >= 1, fraction, f"0, or at least 1/{n} (one of the {n} labels)")
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n, generator=generator)[:round(fraction * n)]
        shift = torch.randint(1, classes, (len(chosen),), generator=generator)  # never 0: always another class
        noisy = self.y_train.clone()
        noisy[chosen] = (noisy[chosen].cpu() + shift).remainder(classes).to(noisy.device)
        return replace(self, y_train=noisy, y_train_clean=self.y_train)

    def to(self, device: Union[str, torch.device]) -> "Dataset":
        clean = None if self.y_train_clean is None else self.y_train_clean.to(device)
        return replace(self, x_train=inputs_to(self.x_train, device), y_train=self.y_train.to(device),
                       x_test=inputs_to(self.x_test, device), y_test=self.y_test.to(device), y_train_clean=clean)


def _standardize(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    """Scale both splits with the training set's scalar mean and standard deviation."""
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, (x_test - mean) / std


def _check_path(name: str, value: Any) -> None:
    check(name, value is None or isinstance(value, (str, os.PathLike)), value, "None or a path")


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/flatminima`` (``~/.cache/flatminima`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flatminima"
