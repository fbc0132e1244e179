"""Typed stage configs: dataclasses loaded from TOML plus ``section.key=value`` overrides.

A stage config is a dataclass whose fields are *section* dataclasses::

    @dataclass
    class SimulateConfig:
        run: RunSection = field(default_factory=RunSection)
        crystal: CrystalSection = field(default_factory=CrystalSection)

The TOML file has one table per section (``[run]``, ``[crystal]``). Values are checked and
converted against the annotations (int, float, str, bool, pathlib.Path, Optional[...],
Literal[...], tuple[...], list[...], nested dataclasses). Unknown keys are errors (with a
"did you mean" hint), because a silently ignored typo in a facility campaign costs a night of
beam time. A section (or the top-level config) may define ``validate(self)`` raising
``ValueError``; the loader re-raises it as :class:`peaknet.errors.ConfigError` naming the file and
key. :func:`save_config` writes the resolved config next to a stage's outputs.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
import sys
import types
import typing
from typing import Any, Iterable, Optional, Sequence, TypeVar, Union

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

T = TypeVar("T")

__all__ = [
    "load_config",
    "save_config",
    "config_to_dict",
    "config_from_dict",
    "apply_overrides",
    "dump_toml",
]


# --------------------------------------------------------------------------- conversion
def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            inner = args[0] if len(args) == 1 else Union[tuple(args)]  # type: ignore[index]
            return True, inner
    return False, tp


def _convert(value: Any, tp: Any, where: str, path: Optional[str]) -> Any:
    """Convert a TOML/override value to the annotated type ``tp`` or raise ConfigError."""
    optional, inner = _is_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or tp is Any:
            return None
        raise ConfigError(path, where, f"a value is required ({_type_name(tp)})")
    tp = inner
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(path, where, f"expected {expected}, got {value!r}")

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad(f"a table [{where}]")
        return _build(tp, value, where, path)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                path, where, f"must be one of {', '.join(repr(a) for a in args)}; got {value!r}"
            )
        return value
    if origin in (Union, types.UnionType):
        for alt in args:
            try:
                return _convert(value, alt, where, path)
            except ConfigError:
                continue
        raise bad(_type_name(tp))
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list ({_type_name(tp)})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(path, where, f"expected {len(args)} values, got {len(value)}")
            items = [_convert(v, a, f"{where}[{i}]", path) for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            items = [_convert(v, elem, f"{where}[{i}]", path) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a table")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise bad("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad("a string")
        return str(value)
    if tp in (pathlib.Path, pathlib.PurePath):
        if not isinstance(value, (str, pathlib.PurePath)):
            raise bad("a path")
        return pathlib.Path(value)
    raise ConfigError(path, where, f"unsupported annotation {tp!r} (a bug in the stage's config)")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type[T], data: dict, prefix: str, path: Optional[str]) -> T:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
            raise ConfigError(path, where, f"unknown key{hint}")
        kwargs[key] = _convert(value, hints[key], where, path)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field without default
        raise ConfigError(path, prefix or "<top>", str(exc)) from None
    return obj


def _validate(obj: Any, prefix: str, path: Optional[str]) -> None:
    """Call ``validate()`` depth-first on every dataclass, wrapping ValueError."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate(value, f"{prefix}.{f.name}" if prefix else f.name, path)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            msg = str(exc)
            key = prefix or "<top>"
            # a message of the form "key: text" names the key inside the section
            head, sep, rest = msg.partition(":")
            if sep and head.strip().isidentifier():
                key = f"{prefix}.{head.strip()}" if prefix else head.strip()
                msg = rest.strip()
            raise ConfigError(path, key, msg) from None


# --------------------------------------------------------------------------- public API
def config_from_dict(cls: type[T], data: dict, path: Optional[str] = None) -> T:
    """Build and validate a config of type ``cls`` from a nested dict (TOML tables)."""
    obj = _build(cls, data, "", path)
    _validate(obj, "", path)
    return obj


def config_to_dict(cfg: Any) -> dict:
    """Nested dict of a config, with paths as strings and tuples as lists (TOML-ready)."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, pathlib.PurePath):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def _parse_override_value(text: str) -> Any:
    """Interpret an override's right-hand side as a TOML value, else as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: Iterable[str], source: str = "command line") -> dict:
    """Apply ``section.key=value`` strings (leading ``--`` allowed) onto a nested dict."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(source, item, "override must look like section.key=value")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(source, key, f"{part!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = _parse_override_value(raw.strip())
    return data


def load_config(
    cls: type[T],
    path: Optional[str | pathlib.Path] = None,
    overrides: Sequence[str] = (),
) -> T:
    """Load a stage config: defaults, then the TOML file at ``path``, then overrides.

    Raises :class:`ConfigError` naming the file and the key for a missing or unparsable file,
    an unknown key, a value of the wrong type, or a failed ``validate()``.
    """
    data: dict = {}
    where = None
    if path is not None:
        where = str(path)
        p = pathlib.Path(path)
        if not p.is_file():
            raise ConfigError(where, None, "config file not found")
        try:
            with open(p, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(where, None, f"not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(where, None, f"not a text file: {exc}") from None
    if overrides:
        data = apply_overrides(data, overrides)
        where = f"{where} + command line" if where else "command line"
    return config_from_dict(cls, data, where)


def dump_toml(cfg: Any) -> str:
    """The config as TOML text (``None`` values are written as comments: TOML has no null)."""
    import tomli_w

    data = config_to_dict(cfg)
    nulls: list[str] = []

    def strip(d: dict, prefix: str) -> dict:
        out = {}
        for k, v in d.items():
            if v is None:
                nulls.append(f"{prefix}{k}")
            elif isinstance(v, dict):
                out[k] = strip(v, f"{prefix}{k}.")
            else:
                out[k] = v
        return out

    text = tomli_w.dumps(strip(data, ""))
    if nulls:
        text = "".join(f"# {k} = none (unset)\n" for k in nulls) + text
    return text


def save_config(cfg: Any, out_dir: str | pathlib.Path, stage: str) -> pathlib.Path:
    """Write the resolved config to ``out_dir/<stage>.config.toml`` and return its path."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{stage}.config.toml"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # unique: ranks may race
    tmp.write_text(dump_toml(cfg))
    tmp.replace(target)
    return target
