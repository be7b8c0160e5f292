"""The registry of named tasks: :func:`register_task`, :func:`load_task` and the built-in loaders."""

from __future__ import annotations

import functools
from typing import Callable

from ..core.registry import Registry
from .base import Dataset
from .images import load_digits, load_fashion_mnist
from .text import VADER_DOMAINS, load_vader


# --------------------------------------------------------------------------------------------
# task registry

TASKS: Registry[Callable[..., Dataset]] = Registry("task")
register_task = TASKS.register


def available_tasks() -> list[str]:
    return TASKS.names()


def task_loader(name: str) -> Callable[..., Dataset]:
    """The loader registered as task ``name``."""
    return TASKS.get(name)


def load_task(name: str, **options) -> Dataset:
    """Load task ``name`` with its loader's keyword ``options``."""
    return task_loader(name)(**options)


register_task("digits")(load_digits)
register_task("fashion_mnist")(load_fashion_mnist)
for _domain in VADER_DOMAINS:
    register_task(f"vader_{_domain}")(functools.partial(load_vader, domain=_domain))
