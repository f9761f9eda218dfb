"""``rsna-infer fit-blend``: per-condition-group blend weights fitted on out-of-fold logits.

The predictor blends member logits per group with weights, renormalised over the members
that cover a target, then takes the softmax (`rsna_infer.ensemble.blend_logits`). This
module fits those weights on the stage-2 runs' out-of-fold files (``oof_f*.npz``) by
minimising the competition metric (`rsna_infer.metric.score_arrays`) of exactly that blend.

Search: the weights of a group live on the simplex over the members that predict it (the
blend is scale-free). Starting from the better of "uniform" and "best single member",
coordinate descent moves one member's share at a time (golden-section line search along
``(1 - t) * others + t * member``) until a pass gains nothing. No scipy; deterministic; the
result never scores worse than the best single member on the out-of-fold set, because that
member is one of the starting points.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..constants import GROUPS, N_CLASSES, N_CONDITIONS, N_LEVELS
from ..ensemble import blend_logits
from ..metric import COMPONENTS, score_arrays
from ..submission import priors_from_labels
from .evaluate import covered_groups

logger = logging.getLogger(__name__)

_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


@dataclass
class OofSet:
    """Out-of-fold logits of M members on the union of their S studies."""

    members: list[str]
    study_ids: np.ndarray  # [S]
    logits: np.ndarray  # [M, S, 5, 5, 3]
    masks: np.ndarray  # [M, S, 5, 5]
    labels: np.ndarray  # [S, 5, 5]


def _oof_files(paths: list[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(p.glob("oof_f*.npz"))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"out-of-fold path {p} does not exist")
    return out


def load_oof(paths: list[str | Path]) -> OofSet:
    """Read stage-2 ``oof_f*.npz`` files (or run folders holding them) and align them by study.

    Folds of one member are concatenated; a study a member never validated on is masked out
    for it. Stage-1 out-of-fold files (keypoint errors) are skipped.
    """
    per_member: dict[str, list[dict[str, np.ndarray]]] = {}
    for f in _oof_files(paths):
        with np.load(f, allow_pickle=False) as z:
            if "logits" not in z:
                logger.info("%s holds no logits (a stage-1 run); skipped", f)
                continue
            per_member.setdefault(str(z["member"]), []).append(
                {k: z[k] for k in ("study_ids", "logits", "mask", "labels")})
    if not per_member:
        raise ValueError(f"no stage-2 out-of-fold file (oof_f*.npz with logits) in {[str(p) for p in paths]}")
    members = sorted(per_member)
    labels_of: dict[int, np.ndarray] = {}
    for name in members:
        for part in per_member[name]:
            for sid, lab in zip(part["study_ids"].tolist(), part["labels"]):
                prev = labels_of.setdefault(int(sid), lab)
                if not np.array_equal(prev, lab):
                    raise ValueError(f"out-of-fold files disagree on the labels of study {sid}; were they trained on different data?")
    ids = np.array(sorted(labels_of), np.int64)
    index = {int(s): i for i, s in enumerate(ids)}
    logits = np.zeros((len(members), len(ids), N_CONDITIONS, N_LEVELS, N_CLASSES), np.float64)
    masks = np.zeros((len(members), len(ids), N_CONDITIONS, N_LEVELS), bool)
    for m, name in enumerate(members):
        for part in per_member[name]:
            rows = [index[int(s)] for s in part["study_ids"].tolist()]
            if masks[m, rows].any():
                raise ValueError(f"member {name!r}: a study appears in two of its out-of-fold files")
            logits[m, rows] = part["logits"]
            masks[m, rows] = part["mask"]
    return OofSet(members, ids, logits, masks, np.stack([labels_of[int(s)] for s in ids]))


@dataclass
class BlendFit:
    """Fitted weights and the out-of-fold scores behind them."""

    members: list[str]
    weights: np.ndarray  # [M, 3] per group, each group's column sums to 1 over its members (or 0)
    member_scores: dict[str, dict[str, float]]  # member -> metric components (priors where it predicts nothing)
    blend_score: dict[str, float]
    uniform_score: dict[str, float]
    n_studies: int = 0
    evaluations: int = 0
    history: list[str] = field(default_factory=list)

    def weights_by_member(self) -> dict[str, dict[str, float]]:
        return {m: {g: float(self.weights[i, j]) for j, g in enumerate(GROUPS)} for i, m in enumerate(self.members)}


def _coverage(oof: OofSet) -> np.ndarray:
    """[M, 3]: member predicts at least one target of the group."""
    cov = np.zeros((len(oof.members), len(GROUPS)), bool)
    for m in range(len(oof.members)):
        groups = covered_groups(oof.masks[m])
        cov[m] = [g in groups for g in GROUPS]
    return cov


def fit_blend(oof: OofSet, priors: np.ndarray | None = None, max_passes: int = 12, tol: float = 1e-7) -> BlendFit:
    """Weights [M, 3] minimising the metric of the blended out-of-fold probabilities."""
    if priors is None:
        priors = priors_from_labels(oof.labels)
    n_m = len(oof.members)
    cov = _coverage(oof)
    evaluations = 0

    def total(w: np.ndarray) -> float:
        nonlocal evaluations
        evaluations += 1
        return score_arrays(oof.labels, blend_logits(oof.logits, oof.masks, w, priors))["total"]

    uniform = np.where(cov, 1.0, 0.0)
    uniform = uniform / np.maximum(uniform.sum(0, keepdims=True), 1.0)
    w = uniform.copy()
    history = []
    for g, group in enumerate(GROUPS):
        members = np.flatnonzero(cov[:, g])
        if members.size <= 1:
            continue
        starts = [uniform[:, g]] + [np.eye(n_m)[m] for m in members]
        scores = []
        for col in starts:
            trial = w.copy()
            trial[:, g] = col
            scores.append(total(trial))
        w[:, g] = starts[int(np.argmin(scores))]
        best = float(np.min(scores))
        for _ in range(max_passes):
            gained = False
            for m in members:
                col, score = _line_search(w, g, m, members, total)
                if score < best - tol:
                    w[:, g], best, gained = col, score, True
            if not gained:
                break
        history.append(f"{group}: {best:.5f}")
    member_scores = {}
    for m, name in enumerate(oof.members):
        one = np.zeros((1, len(GROUPS)))
        one[0] = cov[m].astype(float)
        probs = blend_logits(oof.logits[m:m + 1], oof.masks[m:m + 1], one, priors)
        member_scores[name] = score_arrays(oof.labels, probs)
    final = score_arrays(oof.labels, blend_logits(oof.logits, oof.masks, w, priors))
    uni = score_arrays(oof.labels, blend_logits(oof.logits, oof.masks, uniform, priors))
    return BlendFit(oof.members, w, member_scores, final, uni, len(oof.study_ids), evaluations, history)


def _line_search(w: np.ndarray, g: int, m: int, members: np.ndarray, total) -> tuple[np.ndarray, float]:
    """Best column of group ``g`` on the segment from "``m`` removed" to "only ``m``"."""
    col = w[:, g].copy()
    rest = col.copy()
    rest[m] = 0.0
    if rest.sum() <= 0:  # m holds everything: the segment runs to uniform over the others
        rest = np.zeros_like(col)
        rest[[i for i in members if i != m]] = 1.0
    rest /= rest.sum()
    one = np.zeros_like(col)
    one[m] = 1.0

    def at(t: float) -> tuple[np.ndarray, float]:
        c = (1 - t) * rest + t * one
        trial = w.copy()
        trial[:, g] = c
        return c, total(trial)

    lo, hi = 0.0, 1.0
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    (ca, fa), (cb, fb) = at(a), at(b)
    for _ in range(14):
        if fa < fb:
            hi, b, cb, fb = b, a, ca, fa
            a = hi - _GOLDEN * (hi - lo)
            ca, fa = at(a)
        else:
            lo, a, ca, fa = a, b, cb, fb
            b = lo + _GOLDEN * (hi - lo)
            cb, fb = at(b)
    cands = [(fa, ca), (fb, cb), at(0.0)[::-1]]
    f, c = min(cands, key=lambda x: x[0])
    return c, f


def format_report(fit: BlendFit) -> str:
    """Table of CV per member and for the blend (component losses and total)."""
    cols = [*COMPONENTS, "total"]
    width = max(12, *(len(m) for m in fit.members)) + 2
    lines = [f"out-of-fold CV on {fit.n_studies} studies (targets a member does not predict get the class priors)",
             "member".ljust(width) + "".join(c[:12].rjust(13) for c in cols) + "   weights " + "/".join(GROUPS)]
    for i, m in enumerate(fit.members):
        s = fit.member_scores[m]
        lines.append(m.ljust(width) + "".join(f"{s[c]:13.4f}" for c in cols)
                     + "   " + " ".join(f"{x:.3f}" for x in fit.weights[i]))
    lines.append("uniform blend".ljust(width) + "".join(f"{fit.uniform_score[c]:13.4f}" for c in cols))
    lines.append("fitted blend".ljust(width) + "".join(f"{fit.blend_score[c]:13.4f}" for c in cols))
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("oof", nargs="+", type=Path, help="stage-2 run folders or oof_f*.npz files (all folds of every member)")
    parser.add_argument("--manifest", type=Path, required=True, help="manifest holding those members' entries")
    parser.add_argument("--out", type=Path, default=None, help="where to write the manifest with blend weights (default: in place)")
    parser.add_argument("--dry-run", action="store_true", help="print the CV table and weights, write nothing")


def run_cli(args: argparse.Namespace) -> int:
    from ..manifest import ManifestError, load_manifest, save_manifest
    from .manifests import member_name, set_blend_weights

    try:
        man = load_manifest(args.manifest, check_files=False)
        oof = load_oof(args.oof)
    except (ManifestError, ValueError, FileNotFoundError) as e:
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
    gain = min(s["total"] for s in fit.member_scores.values()) - fit.blend_score["total"]
    print(f"blend gain over the best single member: {gain:+.4f} ({fit.evaluations} metric evaluations)")
    if args.dry_run:
        return 0
    out = args.out or args.manifest
    save_manifest(set_blend_weights(man, fit.weights_by_member()), out)
    print(f"blend weights written to {out}")
    return 0
