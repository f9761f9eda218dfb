"""Family options: one declarative mechanism (typed dataclasses), validated in one place."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from rsna_infer.models.registry import family_class
from rsna_infer.options import ExtraOptions, Options, markdown_table, option
from rsna_infer.specs import FAMILIES, SpecError

DOCS = Path(__file__).resolve().parents[1] / "docs"


@dataclass(frozen=True)
class _Demo(Options):
    width: int = option(8, "channels")
    rate: float = option(0.5, "a rate")
    name: str | None = option(None, "optional name")
    mode: str = option("a", "mode", choices=("a", "b"))
    flag: bool = option(False, "a switch")

    def check(self) -> None:
        self.need(0 <= self.rate <= 1, f"rate must be in [0, 1], got {self.rate}")


def test_parse_defaults_types_and_messages():
    o = _Demo.parse({"rate": 1, "name": "x"}, "model 'm'")
    assert (o.width, o.rate, o.name, o.mode, o.flag) == (8, 1.0, "x", "a", False) and isinstance(o.rate, float)
    for given, msg in (({"widht": 3}, r"unknown model_kwargs \['widht'\]; accepted: \['flag', 'mode'"),
                       ({"width": 2.5}, "model_kwargs.width must be int"),
                       ({"width": True}, "model_kwargs.width must be int"),
                       ({"flag": 1}, "model_kwargs.flag must be bool"),
                       ({"mode": "c"}, r"model_kwargs.mode must be one of \['a', 'b'\]"),
                       ({"rate": 2.0}, r"model 'm': model_kwargs.rate must be in \[0, 1\]")):
        with pytest.raises(SpecError, match=msg):
            _Demo.parse(given, "model 'm'")
    assert _Demo.describe()["width"] == (8, "channels")
    assert "| `mode` | `'a'` | mode |" in markdown_table(_Demo)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_declares_its_options_and_the_docs_name_them(family):
    cls = family_class(family)
    assert issubclass(cls.options_type, Options) and issubclass(cls.input_options_type, ExtraOptions)
    assert "aug" in cls.input_options_type.describe()
    docs = (DOCS / ("stage1.md" if family in ("sag2d", "sag3d", "axial3d", "axial_level", "axial_xy") else "stage2.md")).read_text()
    for name in [*cls.options_type.describe(), *cls.input_options_type.describe()]:
        assert f"`{name}`" in docs, f"{family}: option {name!r} is not documented"
