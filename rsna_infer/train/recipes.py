"""The competition ensemble: one training recipe per member, and the manifest template made from them.

``configs/stage1/*.json`` and ``configs/stage2/*.json`` are the recipes (competition scale,
GPU) of every member of the full ensemble after the 7th-place write-up: every stage-1
keypoint family, and three-view fusion plus per-view ROI graders on pvt_v2_b1/b2,
convnext_tiny/small and densenet161. ``weights_manifest.json`` at the top of the repository
is *generated* from them (`template_manifest`), so the two cannot drift (a test regenerates
it and compares):

    python -m rsna_infer.train.recipes            # rewrite weights_manifest.json from configs/
    python -m rsna_infer.train.recipes --check    # exit 1 if it is out of date

Every member has ``n_folds`` entries ``{name}_f{k}`` (stage-1 folds are averaged, stage-2
folds too, as the 7th-place method does; docs/train.md), files
``weights/{name}_f{k}.safetensors`` (where ``rsna-infer train --merge`` puts them), and
placeholder blend weights (uniform over the members that predict a group) until
``rsna-infer fit-blend`` fits them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..constants import GROUPS
from ..models.manifest import Manifest
from ..output import atomic_write_text
from ..specs import FAMILIES, ModelEntry
from .config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs"
TEMPLATE = REPO / "weights_manifest.json"
STAGES = ("stage1", "stage2")

TEMPLATE_NOTES = (
    "Competition ensemble TEMPLATE, generated from configs/stage1 and configs/stage2 by "
    "`python -m rsna_infer.train.recipes` (do not edit by hand): every member x fold of the full method "
    "(the 7th-place two-stage method, docs/train.md) with its architecture and input contract. No weights ship for it: train the recipes "
    "(docs/train.md), then `rsna-infer train --merge` writes the real manifest (these entries, with sha256) "
    "and `rsna-infer fit-blend` its blend weights. Loading this file as is fails fast naming the first "
    "missing weights file. The demo weights are rsna_infer/demo/weights_manifest.json."
)


def recipe_paths(config_dir: str | Path = CONFIG_DIR) -> list[Path]:
    """The recipes, stage 1 then stage 2, sorted by name."""
    config_dir = Path(config_dir)
    return [p for stage in STAGES for p in sorted((config_dir / stage).glob("*.json"))]


def load_recipes(config_dir: str | Path = CONFIG_DIR, check_family: bool = False) -> list[TrainConfig]:
    """Every recipe, validated, in pipeline order (family, then name); a recipe in the wrong
    stage folder is an error."""
    out = []
    for p in recipe_paths(config_dir):
        cfg = load_config(p, check_family=check_family)
        if p.parent.name != f"stage{cfg.stage}":
            raise ValueError(f"{p}: a stage-{cfg.stage} recipe ({cfg.family}) in {p.parent.name}/")
        out.append(cfg)
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"recipe name(s) {dup} appear twice in {config_dir}")
    return sorted(out, key=lambda c: (FAMILIES.index(c.family), c.name))


def groups_of(cfg: TrainConfig) -> tuple[str, ...]:
    """Condition groups a stage-2 member predicts (fusion: all; ROI: its view's)."""
    return tuple(GROUPS) if cfg.family == "fusion" else (cfg.variant,)


def template_manifest(recipes: list[TrainConfig], n_folds: int | None = None) -> Manifest:
    """Manifest entries for every fold of every recipe (``n_folds`` default: each recipe's)."""
    stage2 = [c for c in recipes if c.stage == 2]
    share = {g: sum(g in groups_of(c) for c in stage2) for g in GROUPS}
    models: list[ModelEntry] = []
    for cfg in recipes:
        folds = n_folds or cfg.n_folds
        for k in range(folds):
            entry = cfg.model_entry(k)
            entry.file = f"weights/{entry.name}.safetensors"
            if cfg.stage == 2:
                entry.blend = {g: round(1.0 / share[g] / folds, 6) if g in groups_of(cfg) else 0.0 for g in GROUPS}
            models.append(entry)
    return Manifest(models=models, notes=TEMPLATE_NOTES, root=REPO)


def template_text(config_dir: str | Path = CONFIG_DIR) -> str:
    """The template's JSON text, as written to ``weights_manifest.json``."""
    man = template_manifest(load_recipes(config_dir))
    return json.dumps(man.to_dict(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the ensemble template (weights_manifest.json) from the recipes.")
    p.add_argument("--configs", type=Path, default=CONFIG_DIR)
    p.add_argument("--out", type=Path, default=TEMPLATE)
    p.add_argument("--check", action="store_true", help="exit 1 when --out differs from what the recipes give")
    args = p.parse_args(argv)
    text = template_text(args.configs)
    if args.check:
        same = args.out.is_file() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'OUT OF DATE: run python -m rsna_infer.train.recipes'}")
        return 0 if same else 1
    atomic_write_text(args.out, text)
    n = len(json.loads(text)["models"])
    print(f"wrote {args.out} ({n} entries from {len(recipe_paths(args.configs))} recipes)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
