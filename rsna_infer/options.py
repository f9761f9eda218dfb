"""Family options as typed dataclasses: one way to declare what a family accepts.

Every family declares its ``model_kwargs`` (head and loss settings) and its ``input.extra``
keys (family-specific input settings) as a frozen dataclass derived from `Options`: one
field per option, its default, and a one-line ``doc``. `Options.parse` validates them the
way every JSON config of the package is validated (`rsna_infer.validate.parse_fields`):
unknown keys fail with the accepted list, values are checked against the field's type (an
int where a float is expected is fine, a string is not) and its ``choices``; the class's
``check`` adds the family's own rules. The family then reads ``self.options.z_window``; no
default is written twice. Torch-free, so manifests validate instantly.
``python -m rsna_infer.models.registry FAMILY`` prints a family's tables for the docs.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from .specs import SpecError
from .validate import parse_fields

T = TypeVar("T", bound="Options")


def option(default: Any, doc: str, *, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with a default, a one-line doc and, optionally, the allowed values."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


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
        """Validated options from a manifest entry's dict (``where`` prefixes every message);
        `rsna_infer.validate.parse_fields` does the checks every JSON config shares."""
        values = parse_fields(cls, dict(given or {}), where, noun=cls.section, sep=f": {cls.section}.", error=SpecError)
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
