"""``rsna-infer demo``: proof on a fresh machine that the whole pipeline works and has learned.

It writes a fresh phantom *test* set (a seed the demo weights never saw) into a temporary
folder, runs `rsna_infer.predict` on it with the packaged demo weights, and prints

- the competition metric of that submission against the phantom's ``solution.csv``, beside
  two baselines that know nothing about the images: the training-set class priors for every
  row, and uniform thirds;
- the mean distance (mm) between the predicted keypoints (``run_report.json``) and the
  phantom's true 3-D keypoints (``test_keypoints_world.csv``), per keypoint type.

No network is touched. The demo weights are trained on phantoms by ``scripts/train_demo.py``
and mean nothing on real MRI.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .constants import CLASSES, N_CLASSES, N_CONDITIONS, N_LEVELS

logger = logging.getLogger(__name__)

#: The phantom settings the demo weights were trained with, written by scripts/train_demo.py.
SETTINGS_FILE = "phantom.json"


class DemoWeightsMissing(FileNotFoundError):
    """The packaged demo weights (or their settings) are not installed."""


def demo_dir() -> Path:
    return Path(__file__).resolve().parent / "demo"


def load_settings(manifest: Path) -> dict[str, Any]:
    """Phantom options and seeds the demo weights were trained with (beside the manifest)."""
    p = manifest.parent / SETTINGS_FILE
    if not p.is_file():
        raise DemoWeightsMissing(f"demo phantom settings {p} are missing; re-create the demo weights with "
                                 "`python scripts/train_demo.py`")
    return json.loads(p.read_text())


def check_demo_weights(manifest: Path | None = None) -> Path:
    """The demo manifest, with every weight file present and matching its sha256, or a loud error."""
    from .manifest import ManifestError, load_manifest

    path = Path(manifest) if manifest is not None else demo_dir() / "weights_manifest.json"
    hint = "re-create them with `python scripts/train_demo.py` (or reinstall rsna-infer)"
    if not path.is_file():
        raise DemoWeightsMissing(f"demo weights manifest {path} is missing; {hint}")
    try:
        man = load_manifest(path, verify=True)
    except ManifestError as e:
        raise DemoWeightsMissing(f"demo weights are unusable: {e}; {hint}") from None
    if not man.stage1 or not man.stage2:
        raise DemoWeightsMissing(f"demo manifest {path} lacks stage-1 or stage-2 models; {hint}")
    return path


@dataclass
class DemoResult:
    n_studies: int
    seed: int
    scores: dict[str, dict[str, float]]  # "model" | "prior" | "uniform" -> metric components
    keypoint_mm: dict[str, float]  # kind -> mean 3-D error
    keypoint_found: dict[str, float]  # kind -> fraction of true points predicted
    seconds: dict[str, float] = field(default_factory=dict)
    workdir: Path | None = None

    @property
    def ratio(self) -> float:
        """Model score / prior-only score (lower is better; < 1 means it learned something)."""
        return self.scores["model"]["total"] / self.scores["prior"]["total"]


def _constant_submission(study_ids: list[int], probs: np.ndarray) -> pd.DataFrame:
    from .submission import assemble_submission

    p = {int(s): np.asarray(probs, np.float64).copy() for s in study_ids}
    return assemble_submission(p, [int(s) for s in study_ids], masks=None, priors=probs).frame


def keypoint_errors(report: dict[str, Any], truth: dict[int, dict[str, np.ndarray]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean distance (mm) per kind between the report's merged best keypoints and the truth,
    and the fraction of true points that got a prediction."""
    dists: dict[str, list[float]] = {}
    found: dict[str, list[bool]] = {}
    for sid, rec in report.get("studies", {}).items():
        true = truth.get(int(sid))
        if true is None:
            continue
        for kind, pts in true.items():
            best = rec.get("keypoints", {}).get(f"best/{kind}")
            for i, t in enumerate(pts):
                if not np.all(np.isfinite(t)):
                    continue
                w = None if best is None else best["world"][i]
                found.setdefault(kind, []).append(w is not None)
                if w is not None:
                    dists.setdefault(kind, []).append(float(np.linalg.norm(np.asarray(w) - t)))
    mm = {k: float(np.mean(v)) for k, v in dists.items()}
    frac = {k: float(np.mean(v)) for k, v in found.items()}
    return mm, frac


def run_demo(
    n_studies: int = 20,
    seed: int | None = None,
    workdir: str | Path | None = None,
    manifest: str | Path | None = None,
    device: str | None = "cpu",
    tta: bool = True,
    num_workers: int | None = 0,
    progress: bool = True,
) -> DemoResult:
    """Phantom test set -> predict with the demo weights -> scores and keypoint errors."""
    from .manifest import load_manifest
    from .metric import score_components
    from .predictor import predict
    from .synth import load_keypoints_world, make_dataset

    man_path = check_demo_weights(Path(manifest) if manifest is not None else None)
    settings = load_settings(man_path)
    seed = int(settings["test_seed"]) if seed is None else int(seed)
    if seed in settings.get("train_seeds", []):
        raise ValueError(f"seed {seed} was used to train the demo weights; pick another (e.g. {settings['test_seed']})")
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="rsna_infer_demo_")
        root = Path(tmp.name)
    else:
        root = Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        make_dataset(root, n_studies, split="test", seed=seed, progress=progress, **settings.get("synth_options", {}))
        t_synth = time.perf_counter() - t0
        t0 = time.perf_counter()
        sub = predict(root, out_csv=root / "submission.csv", manifest=man_path, device=device, tta=tta,
                      num_workers=num_workers, progress=progress)
        t_pred = time.perf_counter() - t0
        solution = pd.read_csv(root / "solution.csv")
        ids = sorted({int(r.split("_", 1)[0]) for r in solution["row_id"]})
        priors = load_manifest(man_path, check_files=False).priors
        scores = {
            "model": score_components(solution, sub),
            "prior": score_components(solution, _constant_submission(ids, priors)),
            "uniform": score_components(solution, _constant_submission(ids, np.full((N_CONDITIONS, N_LEVELS, N_CLASSES), 1 / 3))),
        }
        report = json.loads((root / "run_report.json").read_text())
        mm, found = keypoint_errors(report, load_keypoints_world(root, "test"))
        return DemoResult(n_studies, seed, scores, mm, found, {"synth": t_synth, "predict": t_pred},
                          None if tmp is not None else root)
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_result(res: DemoResult) -> str:
    comps = ("spinal", "foraminal", "subarticular", "any_severe_spinal", "total")
    lines = [f"rsna-infer demo: {res.n_studies} fresh phantom test studies (seed {res.seed}), demo weights",
             "",
             "metric (lower is better)".ljust(26) + "".join(c[:12].rjust(13) for c in comps)]
    names = {"model": "demo ensemble", "prior": "prior-only baseline", "uniform": "uniform baseline"}
    for key, label in names.items():
        lines.append(label.ljust(26) + "".join(f"{res.scores[key][c]:13.4f}" for c in comps))
    lines.append(f"ensemble / prior-only = {res.ratio:.3f}")
    lines.append("")
    lines.append("keypoints: mean 3-D distance to the phantom's true points")
    for kind in ("spinal", "foraminal", "subarticular"):
        if kind in res.keypoint_found:
            mm = res.keypoint_mm.get(kind, float("nan"))
            lines.append(f"  {kind:<13} {mm:6.2f} mm   ({100 * res.keypoint_found[kind]:.0f}% of points predicted)")
    lines.append("")
    lines.append(f"time: phantom {res.seconds.get('synth', 0):.1f} s, predict {res.seconds.get('predict', 0):.1f} s")
    lines.append("The demo weights are trained on phantoms: they are meaningless on real MRI.")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--studies", type=int, default=20, help="phantom test studies (default 20)")
    parser.add_argument("--seed", type=int, default=None, help="phantom seed (default: the demo's test seed, never used in training)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the phantom, submission and run report here (default: a temp dir)")
    parser.add_argument("--manifest", type=Path, default=None, help="demo manifest (default: the packaged one)")
    parser.add_argument("--device", default="cpu", help="device for predict (default: cpu)")
    parser.add_argument("--no-tta", action="store_true", help="no flip TTA")
    parser.add_argument("--workers", type=int, default=0, help="predict preprocessing processes (default 0: in-process)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")


def run_cli(args: argparse.Namespace) -> int:
    if args.studies < 1:
        print("error: --studies must be >= 1")
        return 2
    try:
        res = run_demo(args.studies, args.seed, args.workdir, args.manifest, args.device, not args.no_tta, args.workers)
    except DemoWeightsMissing as e:
        print(f"error: {e}")
        return 1
    except ValueError as e:
        print(f"error: {e}")
        return 2
    print(format_result(res))
    if args.json is not None:
        args.json.write_text(json.dumps({"n_studies": res.n_studies, "seed": res.seed, "scores": res.scores,
                                         "ratio": res.ratio, "keypoint_mm": res.keypoint_mm,
                                         "keypoint_found": res.keypoint_found, "seconds": res.seconds}, indent=1) + "\n")
    return 0


__all__ = ["CLASSES", "DemoResult", "DemoWeightsMissing", "check_demo_weights", "format_result", "run_demo"]
