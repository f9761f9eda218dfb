"""``rsna-infer fit-blend OOF... --manifest M.json [--out OUT.json] [--dry-run]``: per-group
blend weights on out-of-fold logits, minimising the metric (docs/train.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..constants import GROUPS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("oof", nargs="+", type=Path, help="stage-2 run folders or oof_f*.npz files (all folds of every member)")
    parser.add_argument("--manifest", type=Path, required=True, help="manifest holding those members' entries")
    parser.add_argument("--out", type=Path, default=None, help="where to write the manifest with blend weights (default: in place)")
    parser.add_argument("--dry-run", action="store_true", help="print the CV table and weights, write nothing")


def run_cli(args: argparse.Namespace) -> int:
    from ..models.manifest import ManifestError, load_manifest, save_manifest
    from ..train.blend import fit_blend, format_report, load_oof
    from ..train.folds import check_same_split
    from ..train.manifests import member_name, set_blend_weights

    try:
        man = load_manifest(args.manifest, check_files=False)
        oof = load_oof(args.oof)
    except (ManifestError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    try:
        check_same_split([(man.split, str(args.manifest)), (oof.split, "the out-of-fold files")],
                         "fit-blend's manifest and out-of-fold files")
    except ValueError as e:
        print(f"error: {e}")
        return 2
    in_manifest = {member_name(m) for m in man.stage2}
    absent = sorted(set(oof.members) - in_manifest)
    if absent:
        print(f"error: out-of-fold members {absent} have no entry in {args.manifest} (it holds {sorted(in_manifest)})")
        return 2
    missing = sorted(in_manifest - set(oof.members))
    if missing:
        print(f"warning: stage-2 members {missing} have no out-of-fold file; they get blend weight 0")
    fit = fit_blend(oof, priors=man.priors if man.priors_given else None)
    print(format_report(fit))
    best = min(min(s["total"] for s in fit.member_scores.values()), fit.prior_score["total"])
    print(f"blend gain over the best single member or the priors: {best - fit.blend_score['total']:+.4f} "
          f"({fit.evaluations} metric evaluations)")
    if args.dry_run:
        return 0
    out = args.out or args.manifest
    prior_groups = [g for g in GROUPS if fit.choice.get(g) == "priors"]
    save_manifest(set_blend_weights(man, fit.weights_by_member(), prior_groups=prior_groups), out)
    print(f"blend weights written to {out}")
    return 0
