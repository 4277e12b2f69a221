"""Typed loading of config dataclasses from parsed YAML / JSON: every mistake is refused at load time with the file,
the field, the value and what is allowed.

Checked against each field's annotation: unknown keys; ``bool`` given as a string or number (YAML ``"false"`` is
truthy); ``int`` given as a float or bool (``batch_size: 100.5``, ``batch_size: true``); non-finite floats;
a string where a list goes (``eval_splits: test`` would become ``['t', 'e', 's', 't']``); ``Literal`` choices;
nested dataclasses, recursively. Numbers in bounds declared with :func:`bounds` in a field's metadata.
A float written ``1e-3`` is read as the number: YAML 1.1 (PyYAML) parses it as a string.

Example::

    @dataclass(frozen=True)
    class Opt:
        lr: float = field(default=0.1, metadata=bounds(gt=0))
        steps: int = field(default=10, metadata=bounds(ge=1))

    from_mapping(Opt, {"lr": "1e-3"}, "run.yaml")   # Opt(lr=0.001, steps=10)
    from_mapping(Opt, {"steps": 2.5}, "run.yaml")   # ConfigError: run.yaml: steps = 2.5: expected an integer
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, Union

T = TypeVar("T")
N = TypeVar("N", int, float)
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A config value that is not allowed; the message names the file, the field, the value and what is allowed."""


def bounds(*, ge: float | None = None, gt: float | None = None, le: float | None = None) -> dict[str, Any]:
    """Field metadata: the value must be ``>= ge``, ``> gt``, ``<= le`` (use as ``field(metadata=bounds(ge=1))``)."""
    return {"bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}}


def check_bounds(config: Any) -> None:
    """Checks every field of the dataclass instance ``config`` against its :func:`bounds` (for ``__post_init__``,
    so a config built in Python is held to the same limits as one loaded from a file)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if "bounds" in f.metadata and isinstance(value, (int, float)) and not isinstance(value, bool):
            _within(value, f"{type(config).__name__}.{f.name}", f.metadata["bounds"])


def from_mapping(cls: type[T], raw: Any, where: str) -> T:
    """``cls(**raw)`` after checking every key and value of ``raw`` against ``cls``'s fields (recursively).

    Args:
        cls: a dataclass.
        raw: parsed YAML / JSON (``None``, an empty file, is refused: a config must say what it runs).
        where: the file (and field path) for messages, e.g. ``"examples/run.yaml"``.
    """
    if not isinstance(raw, Mapping):
        kind = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {kind}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; {cls.__name__} has {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _check(hints[name], value, _child(where, name), fields[name].metadata.get("bounds", {}))
              for name, value in raw.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _child(where: str, name: str) -> str:
    """``"run.yaml"`` + ``lr`` -> ``"run.yaml: lr"``; ``"run.yaml: model"`` + ``dim`` -> ``"run.yaml: model.dim"``."""
    return f"{where}.{name}" if ": " in where else f"{where}: {name}"


def _check(hint: Any, value: Any, where: str, limits: Mapping[str, float]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return _union(args, value, where, limits)
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} = {value!r}: expected one of {list(args)}")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    if origin in (tuple, list):
        return _sequence(origin, args, value, where)
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} = {value!r}: expected a mapping")
        return dict(value)
    if hint in _SCALARS:
        return _SCALARS[hint](value, where, limits)
    raise TypeError(f"{where}: unsupported annotation {hint!r}")


def _union(args: tuple[Any, ...], value: Any, where: str, limits: Mapping[str, float]) -> Any:
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # Optional[X]: X's own message
        return _check(options[0], value, where, limits)
    errors = []
    for option in options:
        try:
            return _check(option, value, where, limits)
        except ConfigError as e:
            errors.append(str(e).removeprefix(f"{where} = {value!r}: expected "))
    raise ConfigError(f"{where} = {value!r}: expected {' or '.join(errors)}")


def _bool(value: Any, where: str, limits: Mapping[str, float]) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} = {value!r}: expected true or false (a YAML boolean, unquoted)")
    return value


def _int(value: Any, where: str, limits: Mapping[str, float]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} = {value!r}: expected an integer")
    return _within(value, where, limits)


def _str(value: Any, where: str, limits: Mapping[str, float]) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} = {value!r}: expected a string")
    return value


def _float(value: Any, where: str, limits: Mapping[str, float]) -> float:
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} = {value!r}: expected a number")
    if not math.isfinite(value):
        raise ConfigError(f"{where} = {value!r}: expected a finite number")
    return _within(float(value), where, limits)


_SCALARS: dict[Any, Callable[[Any, str, Mapping[str, float]], Any]] = {bool: _bool, int: _int, float: _float,
                                                                       str: _str}


def _sequence(origin: Any, args: tuple[Any, ...], value: Any, where: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} = {value!r}: expected a list (write [{value}] for one element)"
                          if isinstance(value, str) else f"{where} = {value!r}: expected a list")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item_types = [args[0]] * len(value)
    elif origin is tuple:
        if len(args) != len(value):
            raise ConfigError(f"{where} = {value!r}: expected a list of {len(args)} elements")
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(value)
    items = [_check(t, v, f"{where}[{i}]", {}) for i, (t, v) in enumerate(zip(item_types, value, strict=True))]
    return tuple(items) if origin is tuple else items


def _within(value: N, where: str, limits: Mapping[str, float]) -> N:
    if "ge" in limits and not value >= limits["ge"]:
        raise ConfigError(f"{where} = {value!r}: must be >= {limits['ge']}")
    if "gt" in limits and not value > limits["gt"]:
        raise ConfigError(f"{where} = {value!r}: must be > {limits['gt']}")
    if "le" in limits and not value <= limits["le"]:
        raise ConfigError(f"{where} = {value!r}: must be <= {limits['le']}")
    return value
