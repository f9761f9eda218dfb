"""Family name -> implementing class, imported lazily so that validating a manifest or
printing CLI help never imports torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..specs import FAMILIES, ModelEntry

if TYPE_CHECKING:
    from .family import Family

_FAMILY_PATHS: dict[str, str] = {
    "sag2d": "rsna_infer.stage1.sag2d:Sag2dFamily",
    "sag3d": "rsna_infer.stage1.sag3d:Sag3dFamily",
    "axial3d": "rsna_infer.stage1.axial3d:Axial3dFamily",
    "axial_level": "rsna_infer.stage1.axial_level:AxialLevelFamily",
    "axial_xy": "rsna_infer.stage1.axial_level:AxialXYFamily",
    "fusion": "rsna_infer.stage2.fusion:FusionFamily",
    "roi": "rsna_infer.stage2.roi:RoiFamily",
}
assert set(_FAMILY_PATHS) == set(FAMILIES)


def family_class(name: str) -> type["Family"]:
    """The class implementing family ``name``."""
    try:
        path = _FAMILY_PATHS[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; expected one of {sorted(_FAMILY_PATHS)}") from None
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)


def make_family(entry: ModelEntry) -> "Family":
    """The family object for a manifest entry (validates the variant and kwargs)."""
    return family_class(entry.family)(entry)
