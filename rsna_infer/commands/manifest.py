"""``rsna-infer manifest add|verify|summary``: edit, hash-check (strict load + dummy forward)
or list a weights manifest (docs/predict.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..models.manifest import ManifestError, add_model, load_manifest, summary_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = sub.add_parser("add", help="add a model (entry JSON + weights file) to a manifest (created if absent)")
    a.add_argument("manifest", type=Path, help="manifest JSON to create or update")
    a.add_argument("--entry", type=Path, required=True, help="JSON file with one model entry (file/sha256 are filled in)")
    a.add_argument("--weights", type=Path, required=True, help="safetensors weights of that model")
    a.add_argument("--replace", action="store_true", help="replace an existing entry of the same name")
    a.add_argument("--no-copy", action="store_true", help="reference the weights where they are instead of copying them into MANIFEST_DIR/weights/")
    v = sub.add_parser("verify", help="sha256 + strict load + one dummy forward for every model")
    v.add_argument("manifest", type=Path)
    v.add_argument("--device", default="cpu", help="device for the dummy forwards (default: cpu)")
    s = sub.add_parser("summary", help="table of the models by stage/family/fold with their blend weights")
    s.add_argument("manifest", type=Path)


def run_cli(args: argparse.Namespace) -> int:
    try:
        if args.action == "add":
            entry = add_model(args.manifest, args.entry, args.weights, replace_existing=args.replace, copy=not args.no_copy)
            print(f"added {entry.name} ({entry.family}/{entry.variant}, {entry.arch}, fold {entry.fold}) -> {args.manifest}")
            return 0
        if args.action == "verify":
            return verify(args.manifest, args.device)
        if args.action == "summary":
            man = load_manifest(args.manifest, check_files=False)
            print(summary_table(man))
            return 0
    except ManifestError as e:
        print(f"error: {e}")
        return 1
    raise ValueError(f"unknown action {args.action!r}")


def verify(path: Path, device: str) -> int:
    """Check every model (sha256, strict load, one dummy forward) and print one line each;
    1 when any model or the manifest as a whole fails."""
    from ..models.members import load_member

    man = load_manifest(path, check_files=False)
    failed, whole = 0, 0
    try:
        man.check_for_prediction()
    except ManifestError as e:
        whole = 1
        print(f"FAIL  manifest: {e}")
    for m in man.models:
        try:
            p = man.check_file(m, verify=True)
            load_member(m, p, device=device, tta=True)
            print(f"ok    {m.name}")
        except Exception as e:  # report every model, not just the first failure
            failed += 1
            print(f"FAIL  {m.name}: {e}")
    print(f"{len(man.models) - failed}/{len(man.models)} model(s) verified")
    return 1 if failed or whole else 0
