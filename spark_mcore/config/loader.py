"""Typed dataclass configs from YAML plus `a.b.c=value` overrides, validated before any work.

Every error names the offending key (dotted path) and, for unknown keys, the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from spark_mcore.errors import UserError, read_utf8

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config value or key is invalid; the message names the key and the fix."""

    label = "config error"


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(sorted(options))}."


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-5" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking every key and type recursively."""
    where = prefix or "<root>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}'.{_closest(str(name), list(fields))}")
        kwargs[name] = _convert(value, hints[name], key)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from e
    return obj


_RANGE_CHECKS: dict[str, Any] = {
    ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, "> 0": lambda v: v > 0,
    "in [0, 1]": lambda v: 0 <= v <= 1, "in [0, 1)": lambda v: 0 <= v < 1, "in (0, 1]": lambda v: 0 < v <= 1,
}


def check_ranges(section: str, obj: Any, rules: dict[str, str]) -> None:
    """Checks numeric fields of config `obj` against `rules` ({field: ">= 1" | "> 0" | ">= 0" |
    "in [0, 1]" | "in [0, 1)" | "in (0, 1]"}); None values are skipped (they mean "automatic").
    The error names `section.field`, the value, the range and the default as an example."""
    defaults = {f.name: f.default for f in dataclasses.fields(obj)}
    for name, rule in rules.items():
        value = getattr(obj, name)
        if value is None or _RANGE_CHECKS[rule](value):
            continue
        example = defaults.get(name)
        hint = f", e.g. {section}.{name}={example}" if example is not dataclasses.MISSING and \
            _RANGE_CHECKS[rule](example) else ""
        raise ConfigError(f"{section}.{name}={value} must be {rule}. Fix: set a value {rule}{hint}")


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, cls: type) -> None:
    parts = dotted.split(".")
    node, node_cls = tree, cls
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)] if dataclasses.is_dataclass(node_cls) else []
        if names and part not in names:
            key = ".".join(parts[: i + 1])
            raise ConfigError(f"unknown config key '{key}' in override '{dotted}'.{_closest(part, names)}")
        if i == len(parts) - 1:
            node[part] = value
            return
        hints = get_type_hints(node_cls) if dataclasses.is_dataclass(node_cls) else {}
        node_cls = hints.get(part, dict)
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child


def apply_overrides(tree: dict[str, Any], overrides: list[str], cls: type) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars/lists) to a raw config tree."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. trainer.lr=1e-5)")
        dotted, raw = item.split("=", 1)
        _set_dotted(tree, dotted.strip(), yaml.safe_load(raw) if raw != "" else "", cls)
    return tree


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        data = yaml.safe_load(read_utf8(p, 'config file', ConfigError)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
    return data


def build(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    tree = load_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(tree, overrides or [], cls))


__all__ = ["ConfigError", "check_ranges", "from_dict", "to_dict", "apply_overrides", "load_yaml", "build"]
