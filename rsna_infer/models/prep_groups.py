"""Which members of a manifest share one preparation, and where it runs.

The predictor prepares samples once per *preparation group* and runs every member of the
group on them; `rsna-infer estimate` costs the same groups. One rule, used by both:

- stage 1: the folds of one family/variant (they are averaged on their raw outputs, so they
  must share one input);
- stage 2: members of one family/variant whose input spec and model kwargs agree.

A group is prepared by the loading workers (``in_worker``) unless its family needs
keypoints (`needs_keypoints`), or it is a stage-1 group that refines a set an earlier group
wrote (same ``set_key``, e.g. ``axial_xy`` on ``axial_level``): those run in the main process
after the keypoints they read exist.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..io.parallel import usable_cpus
from ..specs import STAGE1_FAMILIES, STAGE2_FAMILIES, ModelEntry

if TYPE_CHECKING:
    from .family import Family


@dataclass
class PrepGroup:
    """Members that share one preparation (see the module docstring)."""

    key: str  # "sag2d/t2" (stage 1), "roi/spinal#0" (stage 2: #n per distinct input of a family/variant)
    stage: int
    members: list[str]
    in_worker: bool = False  # prepared in the loading workers (needs no keypoints)


def needs_keypoints(family: "Family") -> bool:
    """Whether ``family.prepare`` reads keypoints. Families may say so with a
    ``needs_keypoints`` attribute; otherwise stage 2 does and stage 1 does not."""
    return bool(getattr(family, "needs_keypoints", family.stage == 2))


def preparation_groups(
    entries: Sequence[ModelEntry], family: "Callable[[ModelEntry], Family] | Mapping[str, Family] | None" = None
) -> tuple[list[PrepGroup], list[PrepGroup]]:
    """The stage-1 and stage-2 groups of ``entries``, in run order (family order, then
    variant), with ``in_worker`` set. ``family``: the family object of an entry (a callable,
    or a mapping by entry name; default: built with `rsna_infer.models.registry.make_family`)."""
    if family is None:
        from .registry import make_family

        family = make_family
    get = (lambda e: family[e.name]) if isinstance(family, Mapping) else family  # type: ignore[index]
    g1: dict[str, PrepGroup] = {}
    g2: dict[tuple[str, str], PrepGroup] = {}
    rank = {f: i for i, f in enumerate(STAGE1_FAMILIES + STAGE2_FAMILIES)}
    for e in sorted(entries, key=lambda e: (rank[e.family], e.variant)):
        base = f"{e.family}/{e.variant}"
        if e.stage == 1:
            g1.setdefault(base, PrepGroup(base, 1, [])).members.append(e.name)
            continue
        sig = json.dumps([e.input.to_dict(), e.model_kwargs], sort_keys=True, default=str)
        if (base, sig) not in g2:
            n = sum(b == base for b, _ in g2)
            g2[(base, sig)] = PrepGroup(f"{base}#{n}", 2, [])
        g2[(base, sig)].members.append(e.name)
    by_name = {e.name: e for e in entries}
    written: set[str] = set()
    for g in g1.values():
        fam = get(by_name[g.members[0]])
        key = getattr(fam, "set_key", g.key)
        # a group that writes a set an earlier group made refines it: it needs those keypoints
        g.in_worker = not (needs_keypoints(fam) or key in written)
        written.add(key)
    for g in g2.values():
        g.in_worker = not needs_keypoints(get(by_name[g.members[0]]))
    return list(g1.values()), list(g2.values())


def default_num_workers(cpus: int | None = None) -> int:
    """Loading workers by default: one per spare core, at most 4 (Kaggle has 4 CPUs).
    ``cpus``: of another machine (the projection); default this process's
    (`rsna_infer.io.parallel.usable_cpus`)."""
    return max(0, min(4, int(usable_cpus() if cpus is None else cpus) - 1))
