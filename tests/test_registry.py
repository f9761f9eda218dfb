"""The family registry: names resolve lazily to classes; tests register fakes through the public seam."""

import pytest

from rsna_infer.models import registry
from rsna_infer.models.registry import FAMILY_PATHS, family_class, family_tables, register_family
from rsna_infer.specs import FAMILIES


def test_every_shipped_family_resolves():
    assert set(FAMILY_PATHS) == set(FAMILIES)
    for name in FAMILIES:
        assert family_class(name).name == name


def test_register_family_replaces_and_returns_the_previous_path(monkeypatch):
    monkeypatch.setattr(registry, "FAMILY_PATHS", dict(FAMILY_PATHS))
    old = register_family("roi", "rsna_infer.stage2.fusion:FusionFamily")
    assert old == "rsna_infer.stage2.roi:RoiFamily"
    assert family_class("roi").__name__ == "FusionFamily"
    with pytest.raises(ValueError, match="module:Class"):
        register_family("roi", "no_colon")
    with pytest.raises(ValueError, match="unknown family"):
        family_class("nope")


def test_the_docs_tables_of_a_family_name_both_sections():
    text = family_tables("sag2d")
    assert "sag2d `model_kwargs`:" in text and "sag2d `input.extra`:" in text
    assert "| `foramen_offset_mm` | `18.0` |" in text and "| `sampled_slices` |" in text
