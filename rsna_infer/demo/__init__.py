"""``rsna-infer demo``: proof on a fresh machine that the whole pipeline works and has learned.

It writes a fresh phantom *test* set (a seed the demo weights never saw) into a temporary
folder, runs `rsna_infer.predict` on it with the packaged demo weights, and prints

- the competition metric of that submission against the phantom's ``solution.csv``, beside
  two baselines that know nothing about the images: the training-set class priors for every
  row, and uniform thirds;
- the mean and p90 distance (mm) between the predicted keypoints (``run_report.json``) and
  the phantom's true 3-D keypoints (``test_keypoints_world.csv``), per keypoint type;
- with ``--mirror``, how the grades of the same studies mirrored left/right in patient
  coordinates compare with the original's, left and right swapped and not.

No network is touched. The demo weights are trained on phantoms by ``scripts/train_demo.py``
and mean nothing on real MRI.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..constants import CLASSES, N_CLASSES, N_CONDITIONS, N_LEVELS

logger = logging.getLogger(__name__)

#: The phantom settings the demo weights were trained with, written by scripts/train_demo.py.
SETTINGS_FILE = "phantom.json"


class DemoWeightsMissing(FileNotFoundError):
    """The packaged demo weights (or their settings) are not installed."""


def demo_dir() -> Path:
    return Path(__file__).resolve().parent


def load_settings(manifest: Path) -> dict[str, Any]:
    """Phantom options and seeds the demo weights were trained with (beside the manifest)."""
    p = manifest.parent / SETTINGS_FILE
    if not p.is_file():
        raise DemoWeightsMissing(f"demo phantom settings {p} are missing; re-create the demo weights with "
                                 "`python scripts/train_demo.py`")
    return json.loads(p.read_text())


def check_demo_weights(manifest: Path | None = None) -> Path:
    """The demo manifest, with every weight file present and matching its sha256, or a loud error."""
    from ..models.manifest import ManifestError, load_manifest

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
    keypoints: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> `keypoint_stats`
    families: list[str] = field(default_factory=list)  # family/variant of every model of the ensemble
    mirror: dict[str, float] | None = None  # `mirror_figures` when run with mirror=True

    @property
    def ratio(self) -> float:
        """Model score / prior-only score (lower is better; < 1 means it learned something)."""
        return self.scores["model"]["total"] / self.scores["prior"]["total"]

    def figures(self) -> dict[str, Any]:
        """The figures as plain JSON-ready data (``rsna-infer demo --json``)."""
        return {"n_studies": self.n_studies, "seed": self.seed, "scores": self.scores, "ratio": self.ratio,
                "keypoint_mm": self.keypoint_mm, "keypoint_found": self.keypoint_found, "keypoints": self.keypoints,
                "families": self.families, "mirror": self.mirror, "seconds": self.seconds}


#: Patient axis roughly along each kind's slice normal (sagittal: x; axial: z), for the
#: through-plane part of the keypoint error.
THROUGH_AXIS = {"spinal": 0, "foraminal": 0, "subarticular": 2}


def keypoint_stats(report: dict[str, Any], truth: dict[int, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Per kind, the report's merged best keypoints (``best/<kind>``) against the true 3-D
    points: mean / p50 / p90 / max distance (mm), the mean through-plane part (``through_mm``,
    along `THROUGH_AXIS`), the fraction of true points predicted (``found``), their count and
    how many points came from each set (``origin``)."""
    out: dict[str, dict[str, Any]] = {}
    for kind, axis in THROUGH_AXIS.items():
        d: list[float] = []
        through: list[float] = []
        found: list[bool] = []
        origins: dict[str, int] = {}
        for sid, rec in report.get("studies", {}).items():
            true = truth.get(int(sid), {}).get(kind)
            if true is None:
                continue
            best = rec.get("keypoints", {}).get(f"best/{kind}")
            for i, t in enumerate(true):
                if not np.all(np.isfinite(t)):
                    continue
                w = None if best is None else best["world"][i]
                found.append(w is not None)
                if w is None:
                    continue
                diff = np.asarray(w, np.float64) - t
                d.append(float(np.linalg.norm(diff)))
                through.append(abs(float(diff[axis])))
                origin = str((best.get("origin") or [best.get("source", "")] * len(true))[i])
                origins[origin] = origins.get(origin, 0) + 1
        if not found:
            continue
        a = np.asarray(d) if d else np.full(1, np.nan)
        out[kind] = {
            "mean_mm": float(a.mean()), "p50_mm": float(np.percentile(a, 50)), "p90_mm": float(np.percentile(a, 90)),
            "max_mm": float(a.max()), "through_mm": float(np.mean(through)) if through else float("nan"),
            "found": float(np.mean(found)), "n": len(found),
            "origin": dict(sorted(origins.items(), key=lambda kv: -kv[1])),
        }
    return out


def keypoint_errors(report: dict[str, Any], truth: dict[int, dict[str, np.ndarray]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean distance (mm) per kind between the report's merged best keypoints and the truth,
    and the fraction of true points that got a prediction (see `keypoint_stats`)."""
    stats = keypoint_stats(report, truth)
    return ({k: s["mean_mm"] for k, s in stats.items() if np.isfinite(s["mean_mm"])},
            {k: s["found"] for k, s in stats.items()})


def mirror_root(src: Path, dst: Path, split: str = "test") -> None:
    """Copy the Kaggle-layout root ``src`` to ``dst`` with every study mirrored left<->right in
    patient coordinates: x -> -x of every ImagePositionPatient and of both in-plane directions
    (ImageOrientationPatient); pixels untouched, so the anatomy is the mirror image. A stray
    or broken file is copied as it is."""
    import shutil

    import pydicom

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(f"{split}_images"))
    for f in sorted((src / f"{split}_images").rglob("*.dcm")):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            ds = pydicom.dcmread(f)
            ipp = [float(v) for v in ds.ImagePositionPatient]
            iop = [float(v) for v in ds.ImageOrientationPatient]
        except Exception:
            shutil.copy2(f, out)
            continue
        ipp[0] = -ipp[0]
        iop[0], iop[3] = -iop[0], -iop[3]
        ds.ImagePositionPatient = [round(v, 6) for v in ipp]
        ds.ImageOrientationPatient = [round(v, 8) for v in iop]
        ds.save_as(out, enforce_file_format=False)


def mirror_figures(sub: pd.DataFrame, sub_mirrored: pd.DataFrame) -> dict[str, float]:
    """Mean |p_mirrored - p_original| over the sided rows (foraminal, subarticular), with the
    left and right rows swapped (0 for a model that grades the mirror as the mirror of the
    original) and unswapped (how different the two sides' grades are), their ratio, and the
    same figure over the spinal rows (which a mirror should not change)."""
    p = sub.set_index("row_id")[list(CLASSES)]
    q = sub_mirrored.set_index("row_id")[list(CLASSES)]
    sided = [r for r in p.index if "_left_" in r or "_right_" in r]
    swap = {r: r.replace("_left_", "_@_").replace("_right_", "_left_").replace("_@_", "_right_") for r in sided}
    a = p.loc[sided].to_numpy()
    same = float(np.abs(q.loc[sided].to_numpy() - a).mean())
    swapped = float(np.abs(q.loc[[swap[r] for r in sided]].to_numpy() - a).mean())
    spinal = [r for r in p.index if r not in swap]
    return {"swapped": swapped, "unswapped": same, "ratio": swapped / same if same > 0 else float("nan"),
            "spinal": float(np.abs(q.loc[spinal].to_numpy() - p.loc[spinal].to_numpy()).mean())}


def run_demo(
    n_studies: int = 20,
    seed: int | None = None,
    workdir: str | Path | None = None,
    manifest: str | Path | None = None,
    device: str | None = "cpu",
    tta: bool = True,
    num_workers: int | None = 0,
    progress: bool = True,
    mirror: bool = False,
) -> DemoResult:
    """Phantom test set -> predict with the demo weights -> scores and keypoint errors; with
    ``mirror`` also the same studies mirrored left/right (`mirror_root`, `mirror_figures`)."""
    from ..api import predict
    from ..metric import score_components
    from ..models.manifest import load_manifest
    from ..submission import prior_submission
    from ..synth import load_keypoints_world, make_dataset

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
            "prior": score_components(solution, prior_submission(ids, priors)),
            "uniform": score_components(solution, prior_submission(ids, np.full((N_CONDITIONS, N_LEVELS, N_CLASSES), 1 / 3))),
        }
        report = json.loads((root / "run_report.json").read_text())
        stats = keypoint_stats(report, load_keypoints_world(root, "test"))
        mm, found = keypoint_errors(report, load_keypoints_world(root, "test"))
        man = load_manifest(man_path, check_files=False)
        families = sorted({e.family if e.variant in ("", "default") else f"{e.family}/{e.variant}" for e in man.models})
        mirrored = None
        if mirror:
            mroot = root.parent / f"{root.name}_mirrored"
            mirror_root(root, mroot)
            sub_m = predict(mroot, out_csv=mroot / "submission.csv", manifest=man_path, device=device, tta=tta,
                            num_workers=num_workers, progress=progress)
            mirrored = mirror_figures(sub, sub_m)
            if tmp is None:
                logger.info("mirrored studies in %s", mroot)
            else:
                import shutil

                shutil.rmtree(mroot, ignore_errors=True)
        return DemoResult(n_studies, seed, scores, mm, found, {"synth": t_synth, "predict": t_pred},
                          None if tmp is not None else root, stats, families, mirrored)
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
    lines.append("keypoints: 3-D distance to the phantom's true points (mean, p90; through-plane part)")
    for kind in ("spinal", "foraminal", "subarticular"):
        if kind in res.keypoint_found:
            mm = res.keypoint_mm.get(kind, float("nan"))
            st = res.keypoints.get(kind, {})
            extra = f", p90 {st['p90_mm']:5.2f} mm, through-plane {st['through_mm']:4.2f} mm" if st else ""
            lines.append(f"  {kind:<13} {mm:6.2f} mm{extra}   ({100 * res.keypoint_found[kind]:.0f}% of points predicted)")
    if res.mirror is not None:
        m = res.mirror
        lines.append("")
        lines.append(f"mirrored left/right: mean |dp| of the sided rows to the original, left/right swapped "
                     f"{m['swapped']:.4f}, unswapped {m['unswapped']:.4f} (ratio {m['ratio']:.3f})")
    if res.families:
        lines.append("")
        lines.append("ensemble: " + ", ".join(res.families))
    lines.append("")
    lines.append(f"time: phantom {res.seconds.get('synth', 0):.1f} s, predict {res.seconds.get('predict', 0):.1f} s")
    lines.append("The demo weights are trained on phantoms: they are meaningless on real MRI.")
    return "\n".join(lines)


__all__ = ["CLASSES", "DemoResult", "DemoWeightsMissing", "check_demo_weights", "format_result", "run_demo"]
