"""Family name -> implementing class, imported lazily so that validating a manifest or
printing CLI help never imports torch.

A new family is one module with its `Family` subclass plus one line in `FAMILY_PATHS` (and
its name in `rsna_infer.specs.FAMILIES`). `register_family` adds or replaces one at run time
(tests register fake families with it, on a copy of `FAMILY_PATHS` they put back after). ``python -m rsna_infer.models.registry FAMILY ...``
prints the families' option tables for the docs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..options import markdown_table
from ..specs import FAMILIES, ModelEntry

if TYPE_CHECKING:
    from .family import Family

#: Family name -> ``"module:Class"``: the families the package ships, plus `register_family`.
FAMILY_PATHS: dict[str, str] = {
    "sag2d": "rsna_infer.stage1.sag2d:Sag2dFamily",
    "sag3d": "rsna_infer.stage1.sag3d:Sag3dFamily",
    "axial3d": "rsna_infer.stage1.axial3d:Axial3dFamily",
    "axial_level": "rsna_infer.stage1.axial_level:AxialLevelFamily",
    "axial_xy": "rsna_infer.stage1.axial_level:AxialXYFamily",
    "fusion": "rsna_infer.stage2.fusion:FusionFamily",
    "roi": "rsna_infer.stage2.roi:RoiFamily",
}
assert set(FAMILY_PATHS) == set(FAMILIES)


def register_family(name: str, path: str) -> str | None:
    """Make family ``name`` resolve to ``path`` (``"module:Class"``, imported on first use)
    and return the path it replaces (None for a new name). Manifest entries can name it
    once it is one of `rsna_infer.specs.FAMILIES`."""
    module, sep, cls = path.partition(":")
    if not (module and sep and cls):
        raise ValueError(f"family path {path!r} must look like 'package.module:Class'")
    previous = FAMILY_PATHS.get(name)
    FAMILY_PATHS[name] = path
    return previous


def family_class(name: str) -> type["Family"]:
    """The class implementing family ``name``."""
    try:
        path = FAMILY_PATHS[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; expected one of {sorted(FAMILY_PATHS)}") from None
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)


def make_family(entry: ModelEntry) -> "Family":
    """The family object for a manifest entry (validates the variant and kwargs)."""
    return family_class(entry.family)(entry)


def family_tables(family: str) -> str:
    """Both option tables of a registered family (``model_kwargs`` and ``input.extra``)."""
    cls = family_class(family)
    return "\n\n".join(f"{family} `{t.section}`:\n\n{markdown_table(t)}" for t in (cls.options_type, cls.input_options_type))


if __name__ == "__main__":  # python -m rsna_infer.models.registry FAMILY [FAMILY ...]: the tables for the docs
    import sys

    print("\n\n".join(family_tables(f) for f in sys.argv[1:]))
