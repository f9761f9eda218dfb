"""One way to read a parsed JSON object into a dataclass, and the message helpers it uses.

Every JSON config of the package goes through `parse_fields`: the weights manifest and its
model entries (`rsna_infer.specs`: input spec, normalisation), each family's options
(`rsna_infer.options.Options.parse`), augmentation settings, training configs, the GPU
calibration file and the phantom generator's options. It checks what every one of them
needs and nothing else:

- the object is a dict; no key is unknown (the message lists the accepted ones); every
  field without a default is given;
- each value matches its field's annotation (`coerce`: an int where a float is expected is
  fine, a string is not; a bool is not a number) or passes the field's converter, and is one
  of the field's ``choices`` when the field declares them (``metadata={"choices": ...}``).

Every message starts with where the value sits (``"manifest m.json: models[2]"``,
``"config: lr"``), so it names the file and field and says what to fix. Rules between
fields stay with each class (``check()`` or ``__post_init__``). Each caller raises its own
error type (``error=``). Imports nothing of the package.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, fields
from typing import Any

#: ``converter(value, label) -> value``: a field's own parsing; raises `FieldError` (or the
#: caller's error type) with a message that starts with ``label``.
Converter = Callable[[Any, str], Any]


class FieldError(ValueError):
    """A value does not fit its field; `parse_fields` re-raises it as the caller's error type."""


def examples(items: Sequence[object] | Iterable[object], k: int = 5, quote: bool = True) -> str:
    """The first ``k`` items for a message (``repr`` unless ``quote=False``), then ``(+N more)``."""
    items = list(items)
    shown = ", ".join(repr(x) if quote else str(x) for x in items[:k])
    return shown + (f" (+{len(items) - k} more)" if len(items) > k else "")


def head(items: Sequence[object], n: int = 5) -> str:
    """The first ``n`` items as a list, then `` ...`` when there are more (for key lists)."""
    return str(list(items[:n])) + (" ..." if len(items) > n else "")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, what: str) -> Any:
    """``value`` checked against the annotation ``tp`` (float, int, bool, str, dict, list,
    tuple, ``X | None``, Any); ints are accepted for floats and lists for tuples. Raises
    `FieldError` naming ``what``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, what)
            except FieldError as e:
                errors.append(str(e))
        raise FieldError(errors[0] if len(errors) == 1 else f"{what} has the wrong type: {value!r}")
    if tp is Any:
        return value
    base = origin or tp
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
        list: lambda v: isinstance(v, (list, tuple)),
        tuple: lambda v: isinstance(v, (list, tuple)),
    }.get(base)
    if ok is None:
        raise TypeError(f"{what}: unsupported field type {tp!r}")
    if not ok(value):
        raise FieldError(f"{what} must be {_type_name(base)}, got {value!r}")
    if base is float:
        return float(value)
    if base is tuple:
        return tuple(value)
    if base is list:
        return list(value)
    return value


def integer(value: Any, what: str) -> int:
    """``value`` as an int where JSON may hold ``3``, ``3.0`` or ``"3"``; ``true``/``false`` and
    fractions are refused (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise FieldError(f"{what} must be an integer, got {value!r}")
    try:
        out = int(value)
    except ValueError:
        raise FieldError(f"{what} must be an integer, got {value!r}") from None
    if isinstance(value, float) and out != value:
        raise FieldError(f"{what} must be an integer, got {value!r}")
    return out


def optional_dict(value: Any, what: str) -> dict:
    """An object, or ``null`` for an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FieldError(f"{what} must be an object, got {value!r}")
    return dict(value)


def parse_fields(
    cls: type,
    given: Any,
    where: str,
    *,
    noun: str = "field(s)",
    sep: str = ".",
    error: type[Exception] = FieldError,
    convert: Mapping[str, Converter] | None = None,
    ignore: Iterable[str] = (),
    skip: Iterable[str] = (),
    required: Iterable[str] = (),
) -> dict[str, Any]:
    """Keyword arguments for dataclass ``cls`` from the JSON object ``given``.

    ``where`` starts every message (``"{where}: unknown field(s) [...]"``); a field is named
    ``f"{where}{sep}{key}"``. ``convert``: per-field converters instead of the annotation
    check. ``ignore``: keys accepted but not passed on (the caller reads them, e.g. a format
    version). ``skip``: fields the object may not set (filled in by the caller, e.g. a path).
    ``required``: fields that must be given although they have a default. Failures raise
    ``error`` (a converter's own error of that type passes through as is).
    """
    if not isinstance(given, Mapping):
        raise error(f"{where} must be an object, got {type(given).__name__}")
    skip, ignore, convert = set(skip), set(ignore), dict(convert or {})
    known = {f.name: f for f in fields(cls) if f.init and f.name not in skip}
    unknown = sorted(set(given) - set(known) - ignore)
    if unknown:
        raise error(f"{where}: unknown {noun} {unknown}; accepted: {sorted(known)}")
    need = set(required) | {n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING}
    missing = [n for n in known if n in need and n not in given]
    if missing:
        raise error(f"{where}: missing {noun} {missing}")
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key in ignore:
            continue
        label = f"{where}{sep}{key}"
        try:
            v = convert[key](value, label) if key in convert else coerce(value, hints[key], label)
            choices = known[key].metadata.get("choices")
            if choices is not None and v not in choices:
                raise FieldError(f"{label} must be one of {list(choices)}, got {value!r}")
        except FieldError as e:
            if error is FieldError:
                raise
            raise error(str(e)) from None
        out[key] = v
    return out
