"""Configuration merging in the HighwayEnv style: ``default_config()`` <- YAML file <- keyword arguments."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ralis_gym.errors import ConfigError

T = TypeVar("T")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping document raises ``ConfigError``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values, got {type(data).__name__}")
    return dict(data)


def check_keys(keys: Iterable[Any], valid: Sequence[str], where: str = "config") -> None:
    """Raise ``ConfigError`` for the first key not in ``valid``, with the closest valid key as a hint
    (a typo such as ``budjet`` is answered with ``did you mean 'budget'?``) and the valid keys."""
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(str(key), [str(k) for k in valid], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(map(str, valid))}")


def merge_config(
    defaults: Mapping[str, Any], *updates: Mapping[str, Any] | None, where: str = "config"
) -> dict[str, Any]:
    """Deep-merge ``updates`` into a copy of ``defaults``; unknown keys raise ``ConfigError``.

    Nested mappings merge key by key, so ``{"final_training": {"patience": 5}}`` keeps the other
    final-training settings. A default of ``None`` or a non-mapping accepts any value.
    """
    out = copy.deepcopy(dict(defaults))
    for update in updates:
        if not update:
            continue
        check_keys(update, sorted(out), where)
        for key, value in update.items():
            if isinstance(out[key], Mapping) and out[key] and isinstance(value, Mapping):
                out[key] = merge_config(out[key], value, where=f"{where}.{key}")
            else:
                out[key] = copy.deepcopy(value)
    return out


def parse_dataclass_args(cls: type[T], description: str | None = None, argv: list[str] | None = None) -> T:
    """Command-line flags from a dataclass of defaults (the typed args block of the example scripts).

    ``field_name`` becomes ``--field-name`` with the default's type (for a ``None`` default the
    annotation's: ``float | None`` parses floats, anything else strings); a ``bool`` field is a switch
    that sets it to True.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=f"(default: {f.default})")
        else:
            kind = type(f.default)
            if f.default is None:
                kind = next((t for t in typing.get_args(hints[f.name]) if t in (int, float)), str)
            parser.add_argument(flag, type=kind, default=f.default, help=f"(default: {f.default})")
    return cls(**vars(parser.parse_args(argv)))
