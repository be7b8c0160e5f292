"""Optional dependencies ("extras"): import one, or say which ``pip install`` brings it.

Every module that needs a package outside the core requirements (transformers, lightning,
deepspeed, ...) imports it through :func:`require`, so a missing extra is always reported the
same way: a :class:`ModuleNotFoundError` (an :class:`ImportError`) that names the package, what
needs it and the exact command to run, ``pip install 'flatminima[<extra>]'``.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def install_hint(extra: str) -> str:
    """The command that installs an extra: ``pip install 'flatminima[<extra>]'``."""
    return f"pip install 'flatminima[{extra}]'"


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """Import ``module`` (a dotted name) and return it.

    If it (or something it imports) is missing, raise ``ModuleNotFoundError`` naming ``module``,
    ``purpose`` (what needs it, e.g. ``"flatminima.integrations.hf"``) and
    ``pip install 'flatminima[<extra>]'``, chained to the original error so its cause stays visible.
    A package that is installed but fails to import for another reason re-raises unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:  # any other ImportError: installed but broken, re-raised
        missing = error.name or ""
        # `module` itself (or its package) absent, or a dependency of it: say which.
        state = "is not installed" if module == missing or module.startswith(missing + ".") else "could not be imported"
        needs = f" {purpose} needs it;" if purpose else ""
        raise ModuleNotFoundError(
            f"The optional package {module!r} {state} ({error});{needs} "
            f"install it with: {install_hint(extra)}", name=module) from error
