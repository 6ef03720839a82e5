"""One declaration per option: the CLI flag, the saved JSON config, the Python API and the checks.

An options class is a dataclass whose fields are declared with :func:`option`::

    @dataclass
    class EGPOptions:
        zeta: float = option(0.5, "fraction of the active layers' weights removed per round",
                             low=0.0, high=1.0, low_open=True)

From that one declaration come ``--zeta`` (help, type, choices), the key ``zeta`` in
config.json, the keyword ``EGPOptions(zeta=...)`` and the range check in :func:`validate`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import MISSING, field, fields
from typing import Any, Callable

__all__ = ["option", "validate", "add_to_parser", "add_fields", "cli_fields", "from_namespace", "to_json", "from_json", "non_default",
           "OptionError"]


class OptionError(ValueError):
    """A bad option value; the message names the flag."""


def option(default: Any = MISSING, help: str = "", *, choices=None, low=None, high=None, low_open: bool = False,
           high_open: bool = False, flag: str | None = None, cli: bool = True, default_factory=MISSING,
           metavar: str | None = None, check: Callable[[Any, Any], str | None] | None = None,
           finite: bool = True):
    """A dataclass field with what the CLI and the checks need.

    low/high (with low_open/high_open): numeric range; choices: allowed values; check(value,
    options) -> an error message or None, for rules that involve several options; cli=False keeps
    it out of the command line (API and JSON only); finite: floats must be finite.
    """
    meta = dict(help=help, choices=tuple(choices) if choices is not None else None, low=low, high=high,
                low_open=low_open, high_open=high_open, flag=flag, cli=cli, metavar=metavar, check=check,
                finite=finite)
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(tp) -> tuple[type | None, bool, type | None]:
    """(scalar type, optional, list element type) of a field annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else tp
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        el = typing.get_args(tp)[0] if typing.get_args(tp) else str
        return list, optional, el
    if tp in (int, float, str, bool):
        return tp, optional, None
    return None, optional, None


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _check_one(f: dataclasses.Field, tp, value, opts) -> None:
    base, optional, el = _base_type(tp)
    name = _flag(f)
    m = f.metadata
    if value is None:
        if optional or base is None:
            return
        raise OptionError(f"{name} needs a value")
    if base is bool and not isinstance(value, bool):
        raise OptionError(f"{name} must be true or false, got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise OptionError(f"{name} must be an integer, got {value!r}")
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f"{name} must be a number, got {value!r}")
        if m.get("finite", True) and not math.isfinite(value):
            raise OptionError(f"{name} must be a finite number, got {value!r}")
    if base is str and not isinstance(value, str):
        raise OptionError(f"{name} must be a string, got {value!r}")
    values = value if base is list else [value]
    if base is list and not isinstance(value, (list, tuple)):
        raise OptionError(f"{name} must be a list, got {value!r}")
    for v in values:
        if m.get("choices") is not None and v not in m["choices"]:
            raise OptionError(f"{name} must be one of {', '.join(map(str, m['choices']))}, got {v!r}")
        lo, hi = m.get("low"), m.get("high")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if m.get("finite", True) and isinstance(v, float) and not math.isfinite(v):
                raise OptionError(f"{name} must be finite, got {v!r}")
            bad_lo = lo is not None and (v <= lo if m.get("low_open") else v < lo)
            bad_hi = hi is not None and (v >= hi if m.get("high_open") else v > hi)
            if bad_lo or bad_hi:
                lb = "" if lo is None else ("(" if m.get("low_open") else "[") + f"{lo}"
                hb = "" if hi is None else f"{hi}" + (")" if m.get("high_open") else "]")
                if lo is not None and hi is not None:
                    rng = f"in {lb}, {hb}"
                elif lo is not None:
                    rng = f"{'>' if m.get('low_open') else '>='} {lo}"
                else:
                    rng = f"{'<' if m.get('high_open') else '<='} {hi}"
                raise OptionError(f"{name} must be {rng}, got {v!r}")
    chk = m.get("check")
    if chk is not None:
        msg = chk(value, opts)
        if msg:
            raise OptionError(f"{name} {msg}")


def validate(opts) -> None:
    """Checks every declared option of a dataclass instance; raises OptionError naming the flag."""
    hints = _hints(type(opts))
    for f in fields(opts):
        if "help" not in f.metadata:
            continue
        _check_one(f, hints[f.name], getattr(opts, f.name), opts)


def _parse_bool(s: str) -> bool:
    t = s.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _parse_float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def _parse_int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def _list_parser(el):
    conv = {int: _parse_int, float: _parse_float, str: str}.get(el, str)

    def parse(s: str):
        parts = [p for p in s.split(",") if p.strip() != ""]
        return [conv(p.strip()) for p in parts]

    return parse


def add_to_parser(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, *, prefix: str = "") -> list[str]:
    """Adds one flag per CLI option of ``cls``. The parsed value is None when the flag is not
    given, so defaults stay in one place: the dataclass. Returns the dests."""
    hints = _hints(cls)
    return add_fields(parser, [(f, hints[f.name]) for f in fields(cls)], prefix=prefix)


def cli_fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of every CLI option of ``cls``."""
    hints = _hints(cls)
    return [(f, hints[f.name]) for f in fields(cls) if "help" in f.metadata and f.metadata.get("cli", True)]


def add_fields(parser, items, *, prefix: str = "", users: str = "", show_default: bool = True) -> list[str]:
    """Adds a flag for each (field, resolved type) pair; ``users`` is appended to the help."""
    dests = []
    for f, tp in items:
        m = f.metadata
        if "help" not in m or not m.get("cli", True):
            continue
        base, optional, el = _base_type(tp)
        dest = prefix + f.name
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
        shown = "" if default is None or not show_default else f" (default: {default})"
        kw: dict[str, Any] = dict(dest=dest, default=None, help=(m.get("help") or "") + shown + users)
        kw["metavar"] = m.get("metavar") or f.name.upper()
        if base is bool:
            if default is False:
                kw.update(action="store_const", const=True)
                kw["help"] = (m.get("help") or "") + users
                kw.pop("metavar")
            else:
                kw.update(type=_parse_bool, metavar="true|false")
        elif base is list:
            kw.update(type=_list_parser(el), metavar=m.get("metavar") or "A,B,...")
        else:
            kw["type"] = {int: _parse_int, float: _parse_float, str: str}.get(base, str)
            if m.get("choices") is not None:
                kw["choices"] = list(m["choices"])
                kw["metavar"] = m.get("metavar") or "{" + ",".join(map(str, m["choices"])) + "}"
        parser.add_argument(_flag(f), **kw)
        dests.append(dest)
    return dests


def from_namespace(cls, ns: argparse.Namespace, *, prefix: str = ""):
    """An instance of ``cls`` from parsed flags; flags not given keep the dataclass default."""
    kw = {}
    for f in fields(cls):
        v = getattr(ns, prefix + f.name, None)
        if v is not None:
            kw[f.name] = v
    return cls(**kw)


def to_json(opts) -> dict:
    out = {}
    for f in fields(opts):
        v = getattr(opts, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def from_json(cls, data: dict):
    """Rebuilds options saved by :func:`to_json`; unknown keys are an error that names them."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise OptionError(f"{cls.__name__} has no option(s) {unknown}")
    return cls(**data)


def non_default(opts) -> dict:
    """The options whose value differs from the declared default."""
    out = {}
    for f in fields(opts):
        if f.default is not MISSING:
            d = f.default
        elif f.default_factory is not MISSING:
            d = f.default_factory()
        else:
            d = MISSING
        v = getattr(opts, f.name)
        if d is MISSING or v != d:
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
