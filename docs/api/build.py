"""Build flatminima's API reference from its docstrings with pdoc, and check its cross-references.

    python docs/api/build.py [OUT]        # default: docs/api/html; open OUT/index.html

Every public module gets a page (``pdoc flatminima`` alone documents only the names the package's
``__all__`` lists). A module that needs an extra which is not installed (``flatminima.integrations.hf``
without transformers, ...) is left out, and said so. The docstrings are reStructuredText; their
Sphinx roles (``:func:`~flatminima.x.f```) become pdoc links. The build fails (exit status 1) on a
warning from pdoc or a role whose target does not exist, listing each one.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import sys
import warnings
from pathlib import Path

import pdoc
import pdoc.doc
import pdoc.docstrings
import pdoc.extract
import pdoc.render

HERE = Path(__file__).resolve().parent
ROLE = re.compile(r"(?::py)?:(mod|func|data|const|class|meth|attr|exc|obj):`~?([^`]+)`")
TITLED = re.compile(r".*<([^<>]+)>")  # :role:`title <target>`
# pdoc cannot evaluate the postponed annotations of the methods typing.NamedTuple generates.
NAMED_TUPLE_INIT = re.compile(r"Error parsing type annotation .* for ([\w.]+)\.__init__\.")


def _expected(message: str, skipped: dict[str, str]) -> bool:
    """A warning the build expects: a module left out for its extra (already listed as skipped), or
    an annotation of a NamedTuple's generated ``__init__``."""
    if any(message.startswith(f"Couldn't import {name}:") for name in skipped):
        return True
    match = NAMED_TUPLE_INIT.match(message)
    if match is None:
        return False
    module, _, name = match.group(1).rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    return inspect.isclass(cls) and issubclass(cls, tuple) and hasattr(cls, "_fields")


def public_modules(package: str = "flatminima") -> tuple[list[str], dict[str, str]]:
    """``(names, skipped)``: every module of ``package`` without a ``_`` part that imports, and
    ``{name: why}`` for those whose optional extra is missing."""
    names, skipped = [], {}
    root = importlib.import_module(package)
    found = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".",
                                                                 onerror=lambda name: None)]
    for name in found:
        if any(part.startswith("_") for part in name.split(".")):
            continue
        if any(name.startswith(s + ".") for s in skipped):
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:  # an optional extra (flatminima's own message names it)
            skipped[name] = str(exc).splitlines()[0]
            continue
        names.append(name)
    return names, skipped


def _strip_tilde(convert):
    """pdoc's reST reader, with Sphinx's ``~`` (show the last part only) dropped so the role links."""

    def rst(contents: str, source_file):
        return convert(ROLE.sub(lambda m: f":{m.group(1)}:`{m.group(2)}`", contents), source_file)

    return rst


def _resolve(name: str) -> bool:
    """Whether the dotted ``name`` is a module or an attribute path from one; the last part may also
    be a class's declared field (an annotation) or an attribute its code sets (``self.name = ...``)."""
    parts = name.split(".")
    if not all(parts):
        return False
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for j, attr in enumerate(parts[i:], start=i):
            if hasattr(obj, attr):
                obj = getattr(obj, attr)
            elif j == len(parts) - 1 and inspect.isclass(obj):
                return _declared(obj, attr)
            else:
                return False
        return True
    return False


def _declared(cls: type, attr: str) -> bool:
    for klass in cls.__mro__:
        if attr in getattr(klass, "__annotations__", {}):
            return True
        try:
            if re.search(rf"\bself\.{re.escape(attr)}\b", inspect.getsource(klass)):
                return True
        except (OSError, TypeError):
            continue
    return False


def _candidates(target: str, module: pdoc.doc.Module, scope: list[str]) -> list[str]:
    """The full names a role's target may mean where it is written: relative to the module
    (``.name``), as written, or a name in its class, an enclosing class or the module."""
    if target.startswith("."):
        base = module.modulename if module.is_package else module.modulename.rpartition(".")[0]
        while target.startswith(".."):
            target, base = target[1:], base.rpartition(".")[0]
        return [base + target]
    return [target] + [".".join([module.modulename, *scope[:i], target]) for i in range(len(scope), -1, -1)]


def broken_references(modules: dict[str, pdoc.doc.Module]) -> list[str]:
    """``"<where>: `target`"`` for every role in a docstring whose target does not resolve
    (:func:`_candidates`) to a module or an attribute of one."""
    broken = []

    def check(doc, module: pdoc.doc.Module, scope: list[str]) -> None:
        text = doc.docstring if isinstance(doc, (pdoc.doc.Module, pdoc.doc.Variable)) else doc.obj.__doc__
        if isinstance(doc, pdoc.doc.Class):
            scope = scope + [doc.name]  # a class's docstring names its own members
        for _, target in ROLE.findall(text or ""):  # its own text: not one inherited from a base
            target = " ".join(target.split()).replace(". ", ".").removesuffix("()")
            target = TITLED.fullmatch(target).group(1) if TITLED.fullmatch(target) else target
            if not any(_resolve(c) for c in _candidates(target, module, scope)):
                broken.append(f"{doc.fullname}: `{target}`")

    def visit(doc, module: pdoc.doc.Module, scope: list[str]) -> None:
        if doc.taken_from[0] != module.modulename:  # checked where it is defined
            return
        check(doc, module, scope)
        if isinstance(doc, pdoc.doc.Class):
            for member in doc.own_members:
                visit(member, module, scope + [doc.name])

    for module in modules.values():
        check(module, module, [])
        for member in module.members.values():
            if not isinstance(member, pdoc.doc.Module):
                visit(member, module, [])
    return sorted(set(broken))


def build(out: Path, package: str = "flatminima") -> dict[str, list[str]]:
    """Write the reference into ``out``; returns ``{"modules", "skipped", "warnings", "broken"}``."""
    os.environ.setdefault("PDOC_ALLOW_EXEC", "1")  # modules that run `uname` while importing (platform)
    names, skipped = public_modules(package)
    pdoc.render.configure(docformat="restructuredtext", show_source=False, search=True,
                          footer_text=f"{package} {getattr(importlib.import_module(package), '__version__', '')}")
    convert = pdoc.docstrings.rst
    pdoc.docstrings.rst = _strip_tilde(convert)
    pdoc.docstrings.convert.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            modules = {name: pdoc.doc.Module.from_name(name) for name in names}
            out.mkdir(parents=True, exist_ok=True)
            for module in modules.values():
                page = out / f"{module.fullname.replace('.', '/')}.html"
                page.parent.mkdir(parents=True, exist_ok=True)
                page.write_text(pdoc.render.html_module(module, modules), encoding="utf-8")
            (out / "index.html").write_text(pdoc.render.html_index(modules), encoding="utf-8")
            (out / "search.js").write_text(pdoc.render.search_index(modules), encoding="utf-8")
    finally:
        pdoc.docstrings.rst = convert
        pdoc.docstrings.convert.cache_clear()
    return {"modules": names, "skipped": [f"{k}: {v}" for k, v in skipped.items()],
            "warnings": [f"{w.category.__name__}: {w.message}" for w in caught
                         if not _expected(str(w.message), skipped)],
            "broken": broken_references(modules)}


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else HERE / "html"
    result = build(out)
    for line in result["skipped"]:
        print(f"left out (an extra is missing) {line}")
    for line in result["warnings"] + [f"broken reference in {b}" for b in result["broken"]]:
        print(f"error: {line}", file=sys.stderr)
    print(f"{len(result['modules'])} modules documented in {out / 'index.html'}")
    return 1 if result["warnings"] or result["broken"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
