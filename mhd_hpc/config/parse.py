"""Reading a job: defaults <- YAML file <- ``key=value`` overrides, type-checked against the
tree's annotations (every error names the dotted key), then validated (``validation``)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Union

import yaml

from mhd_hpc.config.keys import ADDED_KEYS
from mhd_hpc.config.tree import JobConfig
from mhd_hpc.config.validation import validate
from mhd_hpc.errors import ConfigError

__all__ = ["load_config", "config_from_dict", "config_from_saved", "parse_override",
           "JobArgumentParser", "OVERRIDES_HELP"]

#: How every command that reads a job explains its overrides (argparse help and epilogs).
OVERRIDES_HELP = ("dotted key=value overrides of the job's keys, values in YAML, without "
                  "dashes (for example run.steps=60 topology.kind=cycle)")


class JobArgumentParser(argparse.ArgumentParser):
    """The argument parser of a command that reads a job and ``key=value`` overrides: help
    texts keep their line breaks, and an option-like override (``--run.steps=60``) is answered
    with the form that works (``run.steps=60``) instead of a bare "unrecognized arguments"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        # parse_intermixed_args counts the optional overrides among the missing arguments
        message = message.replace(", key=value", "")
        if "unrecognized arguments" in message:
            words, fixed = message.split(":", 1)[1].split(), []
            for i, word in enumerate(words):
                if not word.startswith("--"):
                    continue
                after = words[i + 1] if i + 1 < len(words) else "-"
                value = "" if "=" in word else "=" + (after if after[:1] != "-" else "VALUE")
                fixed.append(word.lstrip("-") + value)
            if fixed:
                message += ("\njob keys are given as key=value words without dashes: "
                            f"{' '.join(fixed)} (every key and its default: mhd-config)")
        super().error(message)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# YAML 1.1 (PyYAML) reads 1e-4 and 1e5 as strings (it wants a dot: 1.0e-4): numbers written that
# way are accepted where numbers are due.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _as_number(value: Any) -> float | int | None:
    """``value`` as a Python number when it is one (or a string spelling one), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip()
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``: ints are accepted where floats are due,
    integral floats (1e5, 100000.0) where ints are, numbers in scientific notation as strings;
    NaN and infinities are refused (a NaN timeout or learning rate never does what was meant)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):  # already built (re-applying a resolved config)
            return value
        item = tp()
        _apply(item, value, key + ".")
        return item
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp in (int, float):
        number = _as_number(value)
        try:
            finite = number is None or math.isfinite(number)
        except OverflowError:  # an int beyond any float
            finite = False
        if not finite:
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        if tp is float and number is not None:
            return float(number)
        if tp is int and number is not None and float(number).is_integer():
            return int(number)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a new annotation kind was added without support here
        raise TypeError(f"unsupported config annotation {tp} at {key}")
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _apply(obj: Any, data: dict, prefix: str) -> None:
    """Set the fields of dataclass ``obj`` from ``data``, recursing into sections."""
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(key, f"unknown key{hint} (valid here: {', '.join(names)})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value) with the value read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(text, "override must look like key=value (e.g. distill.nu_aux=3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse value {raw!r}: {exc}") from None
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return out


def config_from_dict(data: dict) -> JobConfig:
    """Defaults <- ``data``, type-checked but not validated."""
    cfg = JobConfig()
    _apply(cfg, data, "")
    return cfg


def config_from_saved(data: dict) -> JobConfig:
    """A run folder's resolved config: like :func:`config_from_dict`, but keys the file lacks
    because they did not exist when it was written take their ``ADDED_KEYS`` value."""
    cfg = config_from_dict(data)
    for key, value in ADDED_KEYS.items():
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if not isinstance(node, dict) or parts[-1] not in node:
            _apply(cfg, _nest(key, value), "")
    return cfg


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Defaults <- YAML file <- ``key=value`` overrides, type-checked, then validated."""
    cfg = JobConfig()
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError("<job file>", f"file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError("<job file>", f"{path} is not valid YAML: {exc}") from None
        _apply(cfg, data, "")
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value), "")
    validate(cfg)
    return cfg
