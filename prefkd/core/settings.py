"""Stage settings written once: a dataclass per stage generates its CLI options and its rule flags.

Each field is declared with :func:`setting` (default, one-line doc, optional choices and the config key it
is read from).  From that one declaration:

- :func:`add_options` builds the ``argparse`` options of the stage's CLI (``--batch-size`` for
  ``batch_size``, a list field takes several values, a bool field is ``--x`` / ``--no-x``);
- :func:`from_args` turns parsed arguments back into the dataclass;
- :func:`config_values` reads the fields that name a config key from a validated config;
- :func:`to_flags` writes values as the CLI flags a Snakemake rule passes, so no rule spells a flag by hand.

A test checks that every config key a field names exists in the schema with the same default.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import typing
from typing import Any

from prefkd.errors import PrefkdError

_NO_DEFAULT = dataclasses.MISSING


def setting(
    default: Any = _NO_DEFAULT, doc: str = "", *, choices=None, config: str | None = None, flag: str | None = None
):
    """A dataclass field with its CLI help, allowed values and config key (a dotted path, e.g.
    ``train.batch_size``; ``{name}`` placeholders are filled by :func:`config_values`). ``flag`` overrides
    the option name derived from the field name (``--in`` for a field ``in_``, a Python keyword)."""
    metadata = {"doc": doc, "choices": tuple(choices) if choices is not None else None, "config": config, "flag": flag}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(annotation) -> tuple[type, bool, bool]:
    """(element type, is a list, may be None) of a field annotation such as ``list[str]`` or ``str | None``."""
    optional = False
    args = typing.get_args(annotation)
    if args and type(None) in args:
        optional = True
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) in (list, tuple):
        return typing.get_args(annotation)[0], True, optional
    return annotation, False, optional


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def option_name(f: dataclasses.Field) -> str:
    """``--batch-size`` for a field ``batch_size`` (or the field's own ``flag``)."""
    return f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"


def default_of(f: dataclasses.Field):
    if f.default is not _NO_DEFAULT:
        return f.default
    if f.default_factory is not _NO_DEFAULT:
        return f.default_factory()
    return _NO_DEFAULT


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--option`` per field of the settings dataclass ``cls``; fields without a default are required."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        kind, is_list, _ = _base_type(hints[f.name])
        default = default_of(f)
        required = default is _NO_DEFAULT
        doc = f.metadata.get("doc", "")
        kwargs: dict[str, Any] = {"help": doc or None, "dest": f.name}
        if kind is bool and not is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if is_list:  # `--x a b` and `--x a --x b` both give [a, b]; the default is filled in by from_args
                kwargs.update(nargs="+" if required else "*", action="extend")
                default = None if not required else default
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        parser.add_argument(option_name(f), **kwargs)


def from_args(cls, args: argparse.Namespace):
    """The settings dataclass ``cls`` from parsed arguments (unknown attributes are ignored; a list option
    that was not given takes the field's default)."""
    given = vars(args)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in given and not (given[f.name] is None and _base_type(_hints(cls)[f.name])[1]):
            values[f.name] = given[f.name]
    return cls(**values)


def config_values(cls, config: dict, **names: str) -> dict:
    """``{field: value}`` for every field of ``cls`` that names a config key, read from ``config``
    (``{role}``-style placeholders in the key are filled from ``names``)."""
    values = {}
    for f in dataclasses.fields(cls):
        key = f.metadata.get("config")
        if not key:
            continue
        node: Any = config
        for part in key.format(**names).split("."):
            if not isinstance(node, dict) or part not in node:
                raise PrefkdError(f"config key {key.format(**names)!r} (setting {cls.__name__}.{f.name}) is missing.")
            node = node[part]
        values[f.name] = node
    return values


def to_flags(cls, values: dict) -> str:
    """The CLI flags of ``values`` (field -> value) for the stage whose settings are ``cls``, shell-quoted.

    A key that is not a field of ``cls`` is an error (a setting must have exactly one place); ``None`` is
    left out (the option keeps its default). Flags come in the order of the fields, whatever the order of
    ``values`` (a config's key order), so Snakemake sees the same params for the same settings."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    parts: list[str] = []
    for name in values:
        if name not in fields:
            raise PrefkdError(f"{cls.__name__} has no setting {name!r}; its settings are: {', '.join(fields)}.")
    for name in fields:
        value = values.get(name)
        if value is None:
            continue
        flag = option_name(fields[name])
        kind, is_list, _ = _base_type(hints[name])
        if kind is bool and not is_list:
            parts.append(flag if value else f"--no-{flag.removeprefix('--')}")
        elif is_list:
            items = [str(v) for v in value]
            if items:
                parts.append(" ".join([flag, *map(shlex.quote, items)]))
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def schema_defaults(cls) -> dict[str, Any]:
    """``{config key: dataclass default}`` of the fields that name a config key without placeholders."""
    return {
        f.metadata["config"]: default_of(f)
        for f in dataclasses.fields(cls)
        if f.metadata.get("config") and "{" not in f.metadata["config"] and default_of(f) is not _NO_DEFAULT
    }
