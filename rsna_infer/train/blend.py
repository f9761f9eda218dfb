"""``rsna-infer fit-blend``: per-condition-group blend weights fitted on out-of-fold logits.

The predictor blends member logits per group with weights, renormalised over the members
that cover a target, then takes the softmax (`rsna_infer.models.ensemble.blend_logits`). This
module fits those weights on the stage-2 runs' out-of-fold files (``oof_f*.npz``) by
minimising the competition metric (`rsna_infer.metric.score_arrays`) of exactly that blend.

Search, group by group (a group's weights change only its own metric components: spinal
with any_severe_spinal, foraminal, subarticular): the weights live on the simplex over the
members that predict the group (the blend is scale-free). Starting from the best of
"uniform" and each single member, coordinate descent moves one member's share at a time
(golden-section line search along ``(1 - t) * others + t * member``) until a pass gains
nothing; then the class priors alone (every weight 0: the predictor falls back to them) are
the last candidate. No scipy; deterministic. Because every single member and the priors
are candidates, the fitted blend never scores worse, on the out-of-fold set and in any group,
than the best single member or the priors (spinal counted with any_severe_spinal), and so
neither in total.

The out-of-fold files must come from one fold split (their recorded ids, and the manifest's,
are checked; `rsna_infer.train.folds.SplitError` names two that differ).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..constants import GROUPS, N_CLASSES, N_CONDITIONS, N_LEVELS
from ..metric import COMPONENTS, score_arrays
from ..models.ensemble import blend_logits
from ..submission import priors_from_labels
from .evaluate import covered_groups
from .folds import check_same_split

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
    split: str = ""  # fold split id of the runs ("" when unrecorded)


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
    splits: list[tuple[str, str]] = []
    for f in _oof_files(paths):
        with np.load(f, allow_pickle=False) as z:
            if "logits" not in z:
                logger.info("%s holds no logits (a stage-1 run); skipped", f)
                continue
            per_member.setdefault(str(z["member"]), []).append(
                {k: z[k] for k in ("study_ids", "logits", "mask", "labels")})
            splits.append((str(z["split"]) if "split" in z.files else "", str(f)))
    split = check_same_split(splits, "out-of-fold files")
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
    return OofSet(members, ids, logits, masks, np.stack([labels_of[int(s)] for s in ids]), split)


@dataclass
class BlendFit:
    """Fitted weights and the out-of-fold scores behind them."""

    members: list[str]
    weights: np.ndarray  # [M, 3] per group, each group's column sums to 1 over its members (or 0)
    member_scores: dict[str, dict[str, float]]  # member -> metric components (priors where it predicts nothing)
    blend_score: dict[str, float]
    uniform_score: dict[str, float]
    prior_score: dict[str, float] = field(default_factory=dict)  # the class priors alone
    coverage: np.ndarray | None = None  # [M, 3] member predicts something of the group
    choice: dict[str, str] = field(default_factory=dict)  # group -> "blend" | member | "priors"
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


#: Metric components each group's weights move (any_severe_spinal is computed from the spinal rows).
GROUP_COMPONENTS: dict[str, tuple[str, ...]] = {"spinal": ("spinal", "any_severe_spinal"),
                                               "foraminal": ("foraminal",), "subarticular": ("subarticular",)}


def group_loss(scores: dict[str, float], group: str) -> float:
    """The part of the metric total that ``group``'s weights decide (sum of its components)."""
    return float(sum(scores[c] for c in GROUP_COMPONENTS[group]))


def fit_blend(oof: OofSet, priors: np.ndarray | None = None, max_passes: int = 12, tol: float = 1e-7) -> BlendFit:
    """Weights [M, 3] minimising the metric of the blended out-of-fold probabilities; a group
    whose best option is the class priors gets weight 0 for every member."""
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
    choice: dict[str, str] = {}
    for g, group in enumerate(GROUPS):
        members = np.flatnonzero(cov[:, g])
        if members.size == 0:
            choice[group] = "priors"
            continue
        starts = [uniform[:, g]] + [np.eye(n_m)[m] for m in members]
        scores = []
        for col in starts:
            trial = w.copy()
            trial[:, g] = col
            scores.append(total(trial))
        w[:, g] = starts[int(np.argmin(scores))]
        best = float(np.min(scores))
        if members.size > 1:
            for _ in range(max_passes):
                gained = False
                for m in members:
                    col, score = _line_search(w, g, m, members, total)
                    if score < best - tol:
                        w[:, g], best, gained = col, score, True
                if not gained:
                    break
        trial = w.copy()
        trial[:, g] = 0.0  # the class priors alone
        prior_total = total(trial)
        if prior_total <= best:
            w, best = trial, prior_total
            choice[group] = "priors"
        else:
            used = np.flatnonzero(w[:, g] > 0)
            choice[group] = oof.members[int(used[0])] if used.size == 1 else "blend"
        history.append(f"{group}: {best:.5f} ({choice[group]})")
    member_scores = {}
    for m, name in enumerate(oof.members):
        one = np.zeros((1, len(GROUPS)))
        one[0] = cov[m].astype(float)
        probs = blend_logits(oof.logits[m:m + 1], oof.masks[m:m + 1], one, priors)
        member_scores[name] = score_arrays(oof.labels, probs)
    final = score_arrays(oof.labels, blend_logits(oof.logits, oof.masks, w, priors))
    uni = score_arrays(oof.labels, blend_logits(oof.logits, oof.masks, uniform, priors))
    prior = score_arrays(oof.labels, np.broadcast_to(priors, oof.labels.shape + (N_CLASSES,)))
    return BlendFit(oof.members, w, member_scores, final, uni, prior, cov, choice, len(oof.study_ids), evaluations, history)


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
    """Out-of-fold CV of the priors, every member, the uniform and the fitted blend (metric
    components and total), the fitted weights, and per group what the blend chose."""
    cols = [*COMPONENTS, "total"]
    col_group = {"spinal": 0, "any_severe_spinal": 0, "foraminal": 1, "subarticular": 2}
    width = max(14, *(len(m) for m in fit.members)) + 2
    lines = [f"out-of-fold CV on {fit.n_studies} studies (lower is better; '-': the member predicts nothing there, "
             "those targets get the class priors)",
             "".ljust(width) + "".join(c[:12].rjust(13) for c in cols) + "   weights " + "/".join(GROUPS)]

    def row(name: str, s: dict[str, float], covered: np.ndarray | None = None, weights: np.ndarray | None = None) -> str:
        cells = "".join((f"{s[c]:13.4f}" if covered is None or c == "total" or covered[col_group[c]] else "-".rjust(13))
                        for c in cols)
        return name.ljust(width) + cells + ("" if weights is None else "   " + " ".join(f"{x:.3f}" for x in weights))

    if fit.prior_score:
        lines.append(row("class priors", fit.prior_score))
    for i, m in enumerate(fit.members):
        lines.append(row(m, fit.member_scores[m], None if fit.coverage is None else fit.coverage[i], fit.weights[i]))
    lines.append(row("uniform blend", fit.uniform_score))
    lines.append(row("fitted blend", fit.blend_score))
    for g in GROUPS:
        c = fit.choice.get(g, "blend")
        cands = {m: group_loss(fit.member_scores[m], g) for i, m in enumerate(fit.members)
                 if fit.coverage is None or fit.coverage[i, GROUPS.index(g)]}
        best = min(cands.items(), key=lambda kv: kv[1]) if cands else None
        what = {"priors": "the class priors (no member beats them)", "blend": "a blend"}.get(c, f"{c} alone")
        lines.append(f"  {g}: {what}; {'+'.join(GROUP_COMPONENTS[g])} {group_loss(fit.blend_score, g):.4f}"
                     + (f" vs best single member {best[0]} {best[1]:.4f}" if best else "")
                     + (f", priors {group_loss(fit.prior_score, g):.4f}" if fit.prior_score else ""))
    return "\n".join(lines)
