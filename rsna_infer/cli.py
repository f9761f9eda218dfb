"""``rsna-infer`` command line: a thin dispatcher.

Each command lives beside the code it drives: the module named in `COMMANDS` defines
``add_arguments(parser)`` and ``run_cli(args) -> int``. Only the chosen command's module is
imported, so ``rsna-infer --help`` and ``rsna-infer score`` start without torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("rsna_infer.demo", "phantom test set -> predict with the demo weights -> score vs baselines"),
    "predict": ("rsna_infer.commands.predict", "write submission.csv for a Kaggle-layout test root"),
    "show": ("rsna_infer.viz.show", "QA page of one study: model inputs with keypoints, crops, probabilities"),
    "score": ("rsna_infer.metric", "score a submission CSV against train.csv-style labels"),
    "synth": ("rsna_infer.synth", "write phantom lumbar-spine studies in the Kaggle layout"),
    "manifest": ("rsna_infer.models.manifest", "add, verify or summarise a weights manifest"),
    "estimate": ("rsna_infer.estimate", "project a manifest's run time per GPU kind; what to shed to fit 9 h"),
    "cache": ("rsna_infer.train.cache", "decode every training study into the training cache (in parallel)"),
    "folds": ("rsna_infer.train.folds", "write the one study-level fold split every model of the ensemble shares"),
    "train": ("rsna_infer.train.cli", "train one model on some folds; merge manifests; out-of-fold keypoints"),
    "fit-blend": ("rsna_infer.train.blend", "fit per-group blend weights on out-of-fold logits"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rsna-infer",
        description="Offline RSNA 2024 lumbar spine grading: predict, train, score.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {c:<10} {h}" for c, (_, h) in COMMANDS.items()),
    )
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    p.add_argument("--version", action="version", version=_version())
    return p


def _version() -> str:
    from . import __version__

    return f"rsna-infer {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv or ["--help"])
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        top.parse_args([cmd])  # argparse prints the valid choices and exits 2
    module_name, help_line = COMMANDS[cmd]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"rsna-infer {cmd}", description=help_line)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return int(module.run_cli(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
