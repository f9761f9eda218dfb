"""Family options as typed dataclasses: one way to declare what a family accepts.

Every family declares its ``model_kwargs`` (head and loss settings) and its ``input.extra``
keys (family-specific input settings) as a frozen dataclass derived from `Options`: one
field per option, its default, and a one-line ``doc``. `Options.parse` is the one place that
validates them: unknown keys fail with the accepted list, values are checked against the
field's type (an int where a float is expected is fine, a string is not), and the class's
``check`` adds the family's own rules. The family then reads ``self.options.z_window``; no
default is written twice. Torch-free, so manifests validate instantly.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from .specs import SpecError

T = TypeVar("T", bound="Options")


def option(default: Any, doc: str, *, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with a default, a one-line doc and, optionally, the allowed values."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, what: str) -> Any:
    """``value`` checked against the annotation ``tp`` (float, int, bool, str, dict, list, tuple,
    ``X | None``, Any); ints are accepted for floats and lists for tuples."""
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
                return _coerce(value, a, what)
            except SpecError as e:
                errors.append(str(e))
        raise SpecError(errors[0] if len(errors) == 1 else f"{what} has the wrong type: {value!r}")
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
        raise TypeError(f"{what}: unsupported option type {tp!r}")
    if not ok(value):
        raise SpecError(f"{what} must be {_type_name(base)}, got {value!r}")
    if base is float:
        return float(value)
    if base is tuple:
        return tuple(value)
    if base is list:
        return list(value)
    return value


@dataclass(frozen=True)
class Options:
    """Base of a family's options; subclasses add fields with `option(default, doc)`.

    ``section`` names where the options live in a manifest entry (``model_kwargs`` or
    ``input.extra``), for messages.
    """

    section: ClassVar[str] = "model_kwargs"

    def check(self) -> None:
        """The family's own rules on the parsed values (raise `SpecError` with the message)."""

    @classmethod
    def parse(cls: type[T], given: dict[str, Any] | None, where: str) -> T:
        """Validated options from a manifest entry's dict (``where`` prefixes every message)."""
        given = dict(given or {})
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise SpecError(f"{where}: unknown {cls.section} {unknown}; accepted: {sorted(known)}")
        values = {}
        for key, value in given.items():
            what = f"{where}: {cls.section}.{key}"
            v = _coerce(value, hints[key], what)
            choices = known[key].metadata.get("choices")
            if choices is not None and v not in choices:
                raise SpecError(f"{what} must be one of {list(choices)}, got {value!r}")
            values[key] = v
        opts = cls(**values)
        try:
            opts.check()
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None
        return opts

    @classmethod
    def describe(cls) -> dict[str, tuple[Any, str]]:
        """``{name: (default, doc)}`` of every option (for docs and ``--help`` texts)."""
        out = {}
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            out[f.name] = (default, f.metadata.get("doc", ""))
        return out

    def need(self, cond: bool, message: str) -> None:
        """Raise `SpecError` naming this section unless ``cond`` (for ``check``)."""
        if not cond:
            raise SpecError(f"{self.section}.{message}")


@dataclass(frozen=True)
class ExtraOptions(Options):
    """Base of a family's ``input.extra`` options; every family accepts ``aug``."""

    section: ClassVar[str] = "input.extra"

    aug: dict | None = option(None, "training augmentation (fields: see the family's augmentation spec)")


def markdown_table(cls: type[Options]) -> str:
    """The options of ``cls`` as a markdown table (name, default, what it does), for docs."""
    rows = ["| option | default | |", "|---|---|---|"]
    for name, (default, doc) in cls.describe().items():
        rows.append(f"| `{name}` | `{default!r}` | {doc} |")
    return "\n".join(rows)


def family_tables(family: str) -> str:
    """Both option tables of a registered family (``model_kwargs`` and ``input.extra``)."""
    from .models.registry import family_class

    cls = family_class(family)
    return "\n\n".join(f"{family} `{t.section}`:\n\n{markdown_table(t)}" for t in (cls.options_type, cls.input_options_type))


if __name__ == "__main__":  # python -m rsna_infer.options FAMILY [FAMILY ...]: the tables for the docs
    import sys

    print("\n\n".join(family_tables(f) for f in sys.argv[1:]))
