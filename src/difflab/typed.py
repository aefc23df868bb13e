"""Plain dataclasses to and from nested dicts (YAML, JSON), strictly: an unknown key, or a value of the wrong
type, is an error naming the key. Shared by the experiment config and the network registry.

A dataclass may define ``from_mapping(values, prefix)`` and ``to_mapping()`` to own its own layout (the model
section, whose options depend on the network kind).
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from typing import Any

from difflab.errors import DifflabError

# YAML 1.1 (PyYAML) reads 1e-3 (no dot) as a string; such a number is accepted where a float is expected.
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _check_value(value: Any, hint: Any, key: str) -> Any:
    """Coerce YAML values to the field's annotated type where that is lossless; otherwise raise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_value(value, option, key)
            except DifflabError:
                pass
        raise DifflabError(f"{key}: {value!r} is not a valid {_type_name(hint)}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
            if item is None and len(args) != len(value):
                raise DifflabError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_check_value(v, item or args[i], f"{key}[{i}]") for i, v in enumerate(value))
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
    elif hint in (int, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
    raise DifflabError(f"{key}: {value!r} is not a valid {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def from_dict(cls: type, values: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise DifflabError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    if hasattr(cls, "from_mapping"):
        return cls.from_mapping(values, prefix)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise DifflabError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_mapping"):
        return _plain(value.to_mapping())
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(config: Any) -> dict:
    """Nested plain dict (tuples as lists) suitable for YAML and JSON."""
    return json.loads(json.dumps(_plain(config)))
