"""Overrides of a config field from the command line: ``KEY=VALUE`` items.

    flatminima run configs/quick.yaml methods.sam.rho=0.1 epochs=20 seeds=[0,1]

``KEY`` is a field of :class:`~flatminima.experiment.ExperimentConfig`, or a dotted path into one
of its mappings (``methods.sam.rho``, ``task_options.train_subset``, ``continual.strategies``; a
missing mapping on the way is created, so ``methods.mysam.method=sam`` adds a method). ``VALUE``
is read as YAML (``0.1``, ``true``, ``null``, ``[0, 1]``, ``{rho: 0.1}``, anything else a string),
with one difference: a number in exponent form (``1e-3``) is a number, as in JSON. Without PyYAML
the same forms are read by a small flow parser: JSON, plus unquoted strings, ``true``/``false``,
``null``/``~``, and ``[...]``/``{k: v}`` of those. Overrides apply in order (a later one of the same key
wins) on top of the preset and the config file, before the method grids are expanded, and the result
is validated exactly like a config file.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import fields
from typing import Any, NamedTuple, Sequence

from ..core.validation import check
from .config import ExperimentConfig

#: ``KEY=`` at the start of a command-line item: a field name, then ``.``-separated keys.
KEY = re.compile(r"[A-Za-z_]\w*(?:\.[\w+-]+)*=")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class Override(NamedTuple):
    """One override: the dotted ``key``, its parsed ``value``, and how the user wrote it (for errors)."""

    key: str
    value: Any
    source: str


def is_override(item: str) -> bool:
    """Whether a command-line item is ``KEY=VALUE`` (anything else is a config file's path)."""
    return KEY.match(item) is not None


def parse_override(item: str) -> Override:
    """``"methods.sam.rho=0.1"`` → ``Override("methods.sam.rho", 0.1, "methods.sam.rho=0.1")``."""
    check("override", is_override(item), item, "KEY=VALUE, KEY a config field or a dotted path into one")
    key, _, text = item.partition("=")
    return Override(key, parse_value(text, item), item)


def parse_value(text: str, item: str = "") -> Any:
    """A value as written on the command line: YAML (without PyYAML: :func:`parse_flow`), a
    number in exponent form (``1e-3``) read as a number."""
    try:
        import yaml
    except ImportError:
        return parse_flow(text, item)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ValueError(f"Invalid override: {item or text!r} (expected KEY=VALUE with a YAML value: "
                         f"{problem})") from None
    return _number(text.strip()) if isinstance(value, str) and _NUMBER.fullmatch(text.strip()) else value


def parse_flow(text: str, item: str = "") -> Any:
    """The YAML flow forms the command line needs, without PyYAML: JSON, unquoted strings,
    ``true``/``false``, ``null``/``~``, numbers, and ``[...]`` / ``{key: value}`` of these."""
    text = text.strip()
    if text[:1] == "[" and text[-1:] == "]":
        return [parse_flow(part, item) for part in _split(text[1:-1], item)]
    if text[:1] == "{" and text[-1:] == "}":
        mapping = {}
        for part in _split(text[1:-1], item):
            key, sep, value = part.partition(":")
            check("override", sep == ":", item or text, "KEY=VALUE with {key: value, ...} pairs in a mapping")
            mapping[str(parse_flow(key, item))] = parse_flow(value, item)
        return mapping
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return json.loads(text) if text[0] == '"' else text[1:-1].replace("''", "'")
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "~", ""):
        return None
    return _number(text) if _NUMBER.fullmatch(text) else text


def _number(text: str) -> Any:
    return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)


def _split(text: str, item: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes (an empty ``text``: no parts)."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    check("override", depth == 0 and quote is None, item or text, "KEY=VALUE with balanced brackets and quotes")
    parts.append(text[start:])
    return [] if len(parts) == 1 and not parts[0].strip() else parts


def set_key(values: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` of a config mapping (``to_dict()`` form) to ``value``, creating missing
    mappings on the way. ``ValueError`` for a first part that is not a config field (the config
    file's error, naming the whole key) or a part below a value that is not a mapping."""
    parts = key.split(".")
    known = [f.name for f in fields(ExperimentConfig)]
    check("config field", parts[0] in known, key, f"one of {', '.join(known)}")
    node = values
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        check("override", isinstance(node[part], dict), key,
              f"a key into a mapping; {'.'.join(parts[:depth + 1])} is {node[part]!r}, not a mapping")
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(config: ExperimentConfig, overrides: Sequence[Override]) -> ExperimentConfig:
    """A new, validated config: ``config`` with every override set in order. A validation error
    that one override causes on its own starts with how the user wrote it (``epochs=0: Invalid
    epochs: ...``)."""
    if not overrides:
        return config
    base = config.to_dict()

    def values(chosen: Sequence[Override]) -> dict[str, Any]:
        result = copy.deepcopy(base)
        for override in chosen:
            set_key(result, override.key, override.value)
        return result

    merged = values(overrides)  # a key that is no field, or that runs into a value: the key is named
    try:
        return ExperimentConfig.from_dict(merged)
    except ValueError as exc:
        for override in overrides:
            try:
                ExperimentConfig.from_dict(values([override]))
            except ValueError as alone:
                if str(alone) == str(exc):
                    raise ValueError(f"{override.source}: {exc}") from None
        raise
