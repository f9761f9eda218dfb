"""``rsna-infer synth ROOT --studies N --split test --seed S [--messy] [switches]``: phantom
studies as real DICOM in the Kaggle layout (docs/synth.md). One flag per `SynthOptions` field."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from ..synth import MESSY, SPLITS, TRANSFER_SYNTAXES, SynthOptions, make_dataset
from ..synth.options import OPTION_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `SynthOptions` field (dashes for underscores)."""
    parser.add_argument("root", help="output folder (Kaggle layout is written inside it)")
    parser.add_argument("--studies", type=int, default=10, help="number of studies (default 10)")
    parser.add_argument("--split", choices=SPLITS, default="train", help="train (labels) or test (solution.csv)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--messy", action="store_true", help="turn every realism switch on at a moderate rate (MESSY)")
    for f in fields(SynthOptions):
        flag = "--" + f.name.replace("_", "-")
        text = f"{OPTION_HELP[f.name]} (default {f.default})"
        if f.name in ("image_size", "noise"):
            typ = int if f.name == "image_size" else float
            parser.add_argument(flag, type=typ, nargs=2, metavar=("MIN", "MAX"), default=None, help=text)
        elif f.name == "transfer_syntax":
            parser.add_argument(flag, choices=(*TRANSFER_SYNTAXES, "mixed"), default=None, help=text)
        elif f.name in ("first_study_id", "n_axial_series"):
            parser.add_argument(flag, type=int, default=None, metavar="N", help=text)
        else:
            parser.add_argument(flag, type=float, default=None, metavar="P", help=text)


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Option kwargs from parsed CLI args: the MESSY preset (if asked) overridden by explicit flags."""
    out: dict[str, Any] = dict(MESSY) if getattr(args, "messy", False) else {}
    for f in fields(SynthOptions):
        value = getattr(args, f.name, None)
        if value is not None:
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def run_cli(args: argparse.Namespace) -> int:
    try:
        ds = make_dataset(args.root, args.studies, split=args.split, seed=args.seed, progress=True, **options_from_args(args))
    except (TypeError, ValueError) as exc:
        print(f"rsna-infer synth: {exc}")
        return 2
    files = ds.files()
    size_mb = sum(p.stat().st_size for p in files) / 2**20
    print(
        f"wrote {len(ds.study_ids)} {ds.split} studies, {len(files)} files ({size_mb:.1f} MB) "
        f"to {ds.root} in {ds.seconds:.1f} s"
    )
    return 0
