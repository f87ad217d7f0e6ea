"""Maps config dataclasses (PeerConfig, RouterConfig, ...) onto argparse flags and DMOE_* variables.

A field `hidden_dim` becomes the flag `--hidden-dim` and the variable `DMOE_HIDDEN_DIM`. Precedence:
flag, then variable, then the dataclass default. Field metadata supplies `help`, `choices` and `nargs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any


def config_field(default: Any, help: str, **extra: Any):
    """A dataclass field whose metadata (help, choices, nargs) becomes its flag's argparse settings."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def _base_type(annotation: Any) -> tuple[type, bool]:
    """The scalar type of a field annotation and whether it is a list."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(annotation)[0], True
    return annotation, False


def _parse_value(kind: type, text: str, name: str) -> Any:
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true/false, got {text!r}")
    if text.strip().lower() in ("none", "") and kind is not str:
        return None
    return kind(text)


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of `config_cls` to `parser` (defaults read from DMOE_* variables)."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if field.name in skip:
            continue
        kind, is_list = _base_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        env_name = "DMOE_" + field.name.upper()
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if env_name in os.environ:
            raw = os.environ[env_name]
            default = (
                [_parse_value(kind, item, env_name) for item in raw.replace(",", " ").split()]
                if is_list
                else _parse_value(kind, raw, env_name)
            )
        help_text = field.metadata.get("help", "")
        shown_default = "none" if default in (None, (), []) else default
        kwargs: dict[str, Any] = dict(default=default, help=f"{help_text} [{env_name}; default: {shown_default}]")
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = lambda text, kind=kind, flag=flag: _parse_value(kind, text, flag)
            kwargs["metavar"] = field.metadata.get("metavar", field.name.upper())
            if is_list:
                kwargs["nargs"] = field.metadata.get("nargs", "*")
            if "choices" in field.metadata:
                kwargs["choices"] = field.metadata["choices"]
                kwargs.pop("metavar")
        parser.add_argument(flag, dest=field.name, **kwargs)


def config_from_args(config_cls: type, args: argparse.Namespace, **overrides: Any):
    """Build `config_cls` from parsed arguments (fields absent from `args` keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}
    for name, value in values.items():
        if isinstance(value, tuple):
            values[name] = list(value)
    values.update(overrides)
    return config_cls(**values)
