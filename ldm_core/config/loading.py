"""Resolving a config: preset, then the user's YAML file, then ``key=value`` overrides,
built into typed sections that reject unknown keys and wrong types by their dotted name."""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ldm_core.config.errors import ConfigError, suggest
from ldm_core.config.presets import DEFAULT_PRESET, PRESETS, deep_merge
from ldm_core.config.sections import Config
from ldm_core.config.validation import validate

_EXPONENT_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
"""A number in exponent notation, which PyYAML (YAML 1.1) reads as a string without a dot."""


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: typing.Sequence[str] = (),
) -> Config:
    """Resolve preset -> YAML file -> ``key=value`` overrides into a validated Config.

    A YAML file may name its own preset under a top-level ``preset:`` key; ``preset``
    given here wins over it.
    """
    file_data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        file_data = loaded
    file_preset = file_data.pop("preset", None)
    name = preset or file_preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise ConfigError(
            f"preset: unknown preset {name!r}{suggest(name, PRESETS)}; "
            f"choose one of {', '.join(PRESETS)}"
        )
    data = copy.deepcopy(PRESETS[name])
    deep_merge(data, file_data)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    cfg = from_dict(data)
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``'train.amp=bf16'`` -> ``('train.amp', 'bf16')``; values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.autoencoder.steps=10")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key, value


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from plain data, rejecting unknown keys and wrong types by name."""
    return _build(Config, data, prefix="")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}{key}"
            raise ConfigError(f"{where}: unknown key{suggest(key, fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{where}.")
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {
            _coerce(key_type, k, f"{where} key {k!r}"): _coerce(value_type, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: union types are not supported in config")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.match(value):
            value = float(value)  # YAML 1.1 reads 1e9 and 3e-4 (no dot) as strings
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value
