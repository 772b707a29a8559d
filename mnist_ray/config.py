"""Frozen config dataclasses become command-line flags; presets are named overrides.

Every job's defaults live in one dataclass (``field(metadata={"help": ...})`` documents a
flag); ``--preset smoke`` applies the job's small end-to-end preset, and flags given
explicitly win over the preset. Unknown flags are errors (argparse), never ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """``int | None`` -> ``int``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field; defaults are suppressed so presets can tell what was given."""
    hints = typing.get_type_hints(cls)
    presets = getattr(cls, "PRESETS", {})
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=argparse.SUPPRESS,
                            help="named settings: " + "; ".join(f"{k}: {v or 'the defaults'}"
                                                                for k, v in presets.items()))
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f.metadata.get("help", "")
        help_ = f"{help_} (default: {default})" if default not in (None, "") else help_
        if f.metadata.get("positional"):  # e.g. `mnist-ray predict IMAGE...`
            parser.add_argument(f.name, nargs="+", metavar=f.metadata.get("metavar", f.name.upper()), help=help_)
        elif tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_)
        else:
            parser.add_argument(_flag(f.name), type=tp, default=argparse.SUPPRESS,
                                metavar=f.metadata.get("metavar", f.name.upper()), help=help_)


def from_args(cls: type, ns: argparse.Namespace):
    """The config: dataclass defaults, then the preset, then the flags that were given."""
    given = {f.name: tuple(v) if isinstance(v, list) else v
             for f in dataclasses.fields(cls) if hasattr(ns, f.name) for v in [getattr(ns, f.name)]}
    preset = dict(getattr(cls, "PRESETS", {}).get(getattr(ns, "preset", "default"), {}))
    return cls(**{**preset, **given})


def to_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)
