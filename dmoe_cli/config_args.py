"""Maps config dataclasses (PeerConfig, TrainConfig, ...) onto argparse flags and DMOE_* variables.

A field `hidden_dim` becomes the flag `--hidden-dim` and the variable `DMOE_HIDDEN_DIM`. Precedence:
flag, then variable, then the dataclass default. Field metadata supplies `help`, `choices` and `nargs`.

A field whose type is itself a config dataclass (`TrainConfig.router: RouterConfig`) is nested: its fields
are flattened into the parent's flags (`--k-min` and `DMOE_K_MIN` set `TrainConfig.router.k_min`), shown in
a group of their own in `--help`, and built back into the nested object by `config_from_args`. Flag names
are one namespace: a name found at two levels raises `ValueError` when the parser is built. A parent that
needs other defaults for a nested config, or sets some of its fields itself, says so with `nested_config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

_HIDDEN = "nested_hidden"


def config_field(default: Any, help: str, **extra: Any):
    """A dataclass field whose metadata (help, choices, nargs) becomes its flag's argparse settings."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def nested_config(config_cls: type, *, hidden: tuple[str, ...] = (), **defaults: Any):
    """A field holding a `config_cls` whose defaults differ from that class's own where a job needs it.

    `defaults` are flat field names anywhere below `config_cls` (`steps=600`, or `k_min=2` for a config
    nested deeper); the Python API and the CLI both see them. `hidden` names fields that the parent sets
    itself at run time: they get no flag and keep their default here.
    """
    names = {leaf.name for leaf in _leaves(config_cls)}
    unknown = sorted((set(defaults) | set(hidden)) - names)
    if unknown:
        raise ValueError(f"nested_config({config_cls.__name__}): no such field(s) {unknown}")
    return dataclasses.field(
        default_factory=lambda: config_from_values(config_cls, defaults), metadata={_HIDDEN: tuple(hidden)}
    )


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One flag: a scalar field somewhere in a (possibly nested) config, with its effective default."""

    name: str
    field: dataclasses.Field
    annotation: Any
    default: Any
    hidden: bool
    group: type | None  # the nested config class the field belongs to (None at the top level)


def _nested_class(annotation: Any) -> type | None:
    """The config dataclass a field annotation names, if it names one (`X` or `X | None`)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    return annotation if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) else None


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _walk(
    config_cls: type, defaults: Any, hidden: frozenset[str], group: type | None, path: str
) -> Iterator[tuple[str, _Leaf]]:
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        default = getattr(defaults, field.name) if defaults is not None else _field_default(field)
        nested = _nested_class(hints[field.name])
        if nested is not None:
            below = hidden | frozenset(field.metadata.get(_HIDDEN, ()))
            yield from _walk(nested, default, below, nested, f"{path}.{field.name}")
        else:
            leaf = _Leaf(field.name, field, hints[field.name], default, field.name in hidden, group)
            yield f"{path}.{field.name}", leaf


def _leaves(config_cls: type) -> list[_Leaf]:
    """Every scalar field of `config_cls` and of the configs nested in it, in order; raises on a name clash."""
    seen: dict[str, str] = {}
    leaves = []
    for where, leaf in _walk(config_cls, None, frozenset(), None, config_cls.__name__):
        if leaf.name in seen:
            raise ValueError(
                f"{config_cls.__name__}: the flag --{leaf.name.replace('_', '-')} would set both {seen[leaf.name]} "
                f"and {where}; rename one of the two fields"
            )
        seen[leaf.name] = where
        leaves.append(leaf)
    return leaves


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


class _Converter:
    """The argparse `type` of one flag: its value parsed as `kind`, a bad one reported with the flag and value."""

    def __init__(self, kind: type, flag: str):
        self.kind, self.flag = kind, flag
        self.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its message

    def __call__(self, text: str) -> Any:
        try:
            return _parse_value(self.kind, text, self.flag)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"expected {self.__name__}, got {text!r} ({exc})") from None


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of `config_cls` and of its nested configs (defaults read from DMOE_* variables)."""
    groups: dict[type, Any] = {}
    for leaf in _leaves(config_cls):
        if leaf.hidden or leaf.name in skip:
            continue
        target: Any = parser
        if leaf.group is not None:
            if leaf.group not in groups:
                summary = (leaf.group.__doc__ or "").strip().split("\n", 1)[0] or None
                groups[leaf.group] = parser.add_argument_group(f"{leaf.group.__name__} options", summary)
            target = groups[leaf.group]
        _add_flag(target, leaf)


def _add_flag(target: Any, leaf: _Leaf) -> None:
    kind, is_list = _base_type(leaf.annotation)
    flag = "--" + leaf.name.replace("_", "-")
    env_name = "DMOE_" + leaf.name.upper()
    default = leaf.default
    if env_name in os.environ:
        raw = os.environ[env_name]
        default = (
            [_parse_value(kind, item, env_name) for item in raw.replace(",", " ").split()]
            if is_list
            else _parse_value(kind, raw, env_name)
        )
    metadata = leaf.field.metadata
    shown_default = "none" if default in (None, (), []) else default
    kwargs: dict[str, Any] = dict(
        default=default, help=f"{metadata.get('help', '')} [{env_name}; default: {shown_default}]"
    )
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = _Converter(kind, flag)
        kwargs["metavar"] = metadata.get("metavar", leaf.name.upper())
        if is_list:
            kwargs["nargs"] = metadata.get("nargs", "*")
        if "choices" in metadata:
            kwargs["choices"] = metadata["choices"]
            kwargs.pop("metavar")
    target.add_argument(flag, dest=leaf.name, **kwargs)


def config_from_values(config_cls: type, values: Mapping[str, Any], *, base: Any = None):
    """Build `config_cls` (and the configs nested in it) from flat field names; unnamed fields keep defaults.

    The defaults are those of `base` when given (an instance of `config_cls`), else the dataclasses' own,
    a parent's `nested_config` defaults included.
    """
    unknown = sorted(set(values) - {leaf.name for leaf in _leaves(config_cls)})
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no field(s) {unknown}")
    return _build(config_cls, values, base)


def _build(config_cls: type, values: Mapping[str, Any], base: Any) -> Any:
    hints = typing.get_type_hints(config_cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(config_cls):
        nested = _nested_class(hints[field.name])
        if nested is not None:
            inner = getattr(base, field.name) if base is not None else _field_default(field)
            kwargs[field.name] = _build(nested, values, inner)
        elif field.name in values:
            kwargs[field.name] = values[field.name]
        elif base is not None:
            kwargs[field.name] = getattr(base, field.name)
    return config_cls(**kwargs)


def config_from_args(config_cls: type, args: argparse.Namespace, **overrides: Any):
    """Build `config_cls` from parsed arguments (fields absent from `args` keep their defaults)."""
    leaves = [leaf for leaf in _leaves(config_cls) if not leaf.hidden and hasattr(args, leaf.name)]
    values = {leaf.name: getattr(args, leaf.name) for leaf in leaves}
    for name, value in values.items():
        if isinstance(value, tuple):
            values[name] = list(value)
    values.update(overrides)
    return config_from_values(config_cls, values)


def add_required_initial_peers(parser: argparse.ArgumentParser, verb: str = "join") -> None:
    """`--initial-peers MADDR ...`, required unless `DMOE_INITIAL_PEERS` (spaces or commas) names them."""
    from_env = os.environ.get("DMOE_INITIAL_PEERS", "").replace(",", " ").split()
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        default=from_env,
        required=not from_env,
        metavar="MADDR",
        help=f"DHT nodes to {verb} [DMOE_INITIAL_PEERS; required unless that is set]",
    )
