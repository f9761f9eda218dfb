"""The metric against an independent pandas + scikit-learn reimplementation of Kaggle's code,
a hand-computed case, every validation error, and the ``rsna-infer score`` command."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from rsna_infer import metric
from rsna_infer.constants import CLASS_TO_LABEL, CLASSES, TARGETS, study_row_ids
from rsna_infer.metric import ScoringError

EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------------------------
# an independent implementation: Kaggle's steps with pandas groupby and sklearn.metrics.log_loss


def _kaggle_era_probs(p: np.ndarray) -> np.ndarray:
    """What scikit-learn 1.2-1.4 fed its log: clipped to [eps, 1-eps], then rows renormalised."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return p / p.sum(axis=1, keepdims=True)


def reference_score(solution: pd.DataFrame, submission: pd.DataFrame, scalar: float = 1.0, renormalize: bool = True) -> dict[str, float]:
    sol = solution[solution["sample_weight"] > 0].copy()
    merged = sol.merge(submission, on="row_id", suffixes=("_true", ""), validate="one_to_one")
    merged["study_id"] = merged["row_id"].str.split("_").str[0]
    merged["group"] = merged["row_id"].map(
        lambda r: next(g for g in ("spinal", "foraminal", "subarticular") if g in r)
    )
    true_cols = [f"{c}_true" for c in CLASSES]
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sklearn warns on rows that do not sum to 1
        for g in ("spinal", "foraminal", "subarticular"):
            part = merged[merged["group"] == g]
            pred = part[list(CLASSES)].to_numpy()
            out[g] = log_loss(
                part[true_cols].to_numpy(),
                _kaggle_era_probs(pred) if renormalize else pred,
                sample_weight=part["sample_weight"].to_numpy(),
            )
        spinal = merged[merged["group"] == "spinal"].groupby("study_id")
        y = spinal["severe_true"].max().to_numpy()
        w = spinal["sample_weight"].max().to_numpy()
        p = spinal["severe"].max().to_numpy()
        if renormalize:
            p = np.clip(p, EPS, 1 - EPS)
        out["any_severe_spinal"] = log_loss(y, p, sample_weight=w, labels=[0, 1])
    losses = [out[k] for k in ("spinal", "foraminal", "subarticular", "any_severe_spinal")]
    out["total"] = float(np.average(losses, weights=[1, 1, 1, scalar]))
    return out


def random_case(seed: int, n_studies: int = 30, normalised: bool = True):
    """A train.csv-style label table and a shuffled submission for it."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([-1, 0, 0, 0, 0, 1, 1, 2], size=(n_studies, 25))
    labels[0, :5] = 0  # a study with no severe spinal level
    labels[1, :5] = [2, -1, 0, 1, 0]  # severe with an unscored level
    labels[2, :5] = -1  # a study with no scored spinal level
    study_ids = rng.choice(np.arange(10_000, 99_999), size=n_studies, replace=False)
    table = pd.DataFrame(
        [[CLASS_TO_LABEL[k] if k >= 0 else np.nan for k in row] for row in labels], columns=list(TARGETS)
    )
    table.insert(0, "study_id", study_ids)
    probs = rng.dirichlet([0.6, 0.6, 0.6], size=n_studies * 25)
    if not normalised:
        probs = probs * rng.uniform(0.5, 1.0, size=(len(probs), 1))
    probs[rng.random(len(probs)) < 0.02, 2] = 0.0  # exact zeros exercise the clipping
    sub = pd.DataFrame(probs, columns=list(CLASSES))
    sub.insert(0, "row_id", [r for s in study_ids for r in study_row_ids(s)])
    sub = sub.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return table, sub


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_on_random_cases(seed: int) -> None:
    table, sub = random_case(seed)
    solution = metric.labels_to_solution(table).sample(frac=1.0, random_state=seed + 100)
    got = metric.score_components(solution, sub)
    want = reference_score(solution, sub)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), k
    assert metric.score(solution, sub) == got["total"]


@pytest.mark.parametrize("seed", range(3))
def test_rows_not_summing_to_one_are_renormalised(seed: int) -> None:
    table, sub = random_case(seed, normalised=False)
    solution = metric.labels_to_solution(table)
    got = metric.score_components(solution, sub)
    want = reference_score(solution, sub)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    # scikit-learn >= 1.5 semantics: no renormalisation; matches today's sklearn directly
    raw = metric.score_components(solution, sub, renormalize=False)
    want_raw = reference_score(solution, sub, renormalize=False)
    for k in want_raw:
        assert raw[k] == pytest.approx(want_raw[k], rel=1e-12), k
    assert raw["total"] > got["total"]  # rows summing to < 1 are penalised without renormalisation


def test_any_severe_scalar_weights_the_fourth_loss() -> None:
    table, sub = random_case(7)
    solution = metric.labels_to_solution(table)
    comps = metric.score_components(solution, sub, any_severe_scalar=2.5)
    assert comps == pytest.approx(reference_score(solution, sub, scalar=2.5), rel=1e-12)
    expected = (comps["spinal"] + comps["foraminal"] + comps["subarticular"] + 2.5 * comps["any_severe_spinal"]) / 5.5
    assert comps["total"] == pytest.approx(expected, rel=1e-14)
    with pytest.raises(ScoringError, match="any_severe_scalar"):
        metric.score(solution, sub, any_severe_scalar=float("nan"))


def test_inputs_are_not_modified_and_order_does_not_matter() -> None:
    table, sub = random_case(3)
    solution = metric.labels_to_solution(table)
    sol_copy, sub_copy = solution.copy(), sub.copy()
    a = metric.score(solution, sub)
    pd.testing.assert_frame_equal(solution, sol_copy)
    pd.testing.assert_frame_equal(sub, sub_copy)
    b = metric.score(solution.iloc[::-1], sub.sort_values("row_id"))
    assert a == pytest.approx(b, rel=1e-13)
    # an arbitrary index on the inputs changes nothing
    c = metric.score(solution.set_axis(np.arange(len(solution)) * 7 + 3), sub.set_axis(np.arange(len(sub))[::-1]))
    assert a == pytest.approx(c, rel=1e-13)


def _one_study(labels: list[int], probs: np.ndarray, study_id: int = 1):
    table = pd.DataFrame([[CLASS_TO_LABEL[k] if k >= 0 else None for k in labels]], columns=list(TARGETS))
    table.insert(0, "study_id", [study_id])
    sub = pd.DataFrame(probs, columns=list(CLASSES))
    sub.insert(0, "row_id", study_row_ids(study_id))
    return metric.labels_to_solution(table), sub


def test_hand_computed_case() -> None:
    labels = [2, 0, 0, 0, 0] + [0] * 10 + [1] + [0] * 9
    probs = np.array([[0.5, 0.25, 0.25]] * 25)
    probs[0] = [0.2, 0.3, 0.5]
    probs[1:5] = [0.8, 0.1, 0.1]
    solution, sub = _one_study(labels, probs)
    got = metric.score_components(solution, sub)
    spinal = (4 * -math.log(0.5) + 4 * -math.log(0.8)) / 8  # one severe (w 4), four normal (w 1)
    foraminal = math.log(2)
    subarticular = (2 * math.log(4) + 9 * math.log(2)) / 11
    any_severe = math.log(2)  # label 1, prediction max severe = 0.5, weight 4
    assert got["spinal"] == pytest.approx(spinal, rel=1e-14)
    assert got["foraminal"] == pytest.approx(foraminal, rel=1e-14)
    assert got["subarticular"] == pytest.approx(subarticular, rel=1e-14)
    assert got["any_severe_spinal"] == pytest.approx(any_severe, rel=1e-14)
    assert got["total"] == pytest.approx((spinal + foraminal + subarticular + any_severe) / 4, rel=1e-14)


def test_perfect_and_hopeless_predictions_hit_the_clip_bounds() -> None:
    labels = [0] * 25
    perfect = np.tile([1.0, 0.0, 0.0], (25, 1))
    solution, sub = _one_study(labels, perfect)
    got = metric.score_components(solution, sub)
    # -log(1 - eps) per row (after renormalising [1-eps, eps, eps]) is about 2 eps
    assert 0 <= got["total"] < 1e-14
    hopeless = np.tile([0.0, 0.0, 1.0], (25, 1))
    solution, sub = _one_study(labels, hopeless)
    got = metric.score_components(solution, sub)
    assert got["spinal"] == pytest.approx(-math.log(EPS), rel=1e-6)  # about 36.04
    assert got["any_severe_spinal"] == pytest.approx(-math.log(EPS), rel=1e-6)


def test_unscored_rows_are_excluded_everywhere() -> None:
    labels = [0, -1, 0, 1, 0] + [0, 1, 2, 0, 0] * 4
    probs = np.tile([0.7, 0.2, 0.1], (25, 1))
    probs[1] = [0.0, 0.0, 1.0]  # a confident severe on the unscored spinal level
    solution, sub = _one_study(labels, probs)
    assert solution.loc[1, "sample_weight"] == 0 and solution.loc[1, list(CLASSES)].sum() == 0
    got = metric.score_components(solution, sub)
    keep = solution["sample_weight"] > 0
    dropped = metric.score_components(solution[keep], sub[keep.to_numpy()])
    assert got == dropped
    # the unscored level's 1.0 severe did not enter the any_severe maximum
    assert got["any_severe_spinal"] == pytest.approx(-math.log(0.9), rel=1e-12)


def test_score_arrays_matches_frames() -> None:
    table, sub = random_case(11)
    ids, labels = metric.labels_to_array(table)
    arr = sub.set_index("row_id").loc[[r for s in ids for r in study_row_ids(s)], list(CLASSES)].to_numpy()
    got = metric.score_arrays(labels, arr.reshape(len(ids), 5, 5, 3))
    assert got == pytest.approx(metric.score_components(metric.labels_to_solution(table), sub), rel=1e-13)


def test_labels_to_solution() -> None:
    table, _ = random_case(2, n_studies=4)
    solution = metric.labels_to_solution(table)
    assert list(solution.columns) == ["row_id", *CLASSES, "sample_weight"]
    assert len(solution) == 100
    assert solution["row_id"].tolist() == [r for s in table["study_id"] for r in study_row_ids(s)]
    blank = table[list(TARGETS)].isna().to_numpy().reshape(-1)
    assert (solution["sample_weight"].to_numpy()[blank] == 0).all()
    assert (solution[list(CLASSES)].to_numpy()[blank] == 0).all()
    scored = solution[~blank]
    cls = scored[list(CLASSES)].to_numpy().argmax(axis=1)
    assert (scored["sample_weight"].to_numpy() == np.array([1.0, 2.0, 4.0])[cls]).all()
    subset = metric.labels_to_solution(table, study_ids=[table["study_id"].iloc[2]])
    assert subset["row_id"].tolist() == study_row_ids(table["study_id"].iloc[2])


def test_labels_table_errors() -> None:
    table, _ = random_case(2, n_studies=3)
    with pytest.raises(ScoringError, match="lacks 1 column"):
        metric.labels_to_solution(table.drop(columns=[TARGETS[4]]))
    bad = table.copy()
    bad.loc[1, TARGETS[3]] = "Mild"
    with pytest.raises(ScoringError, match=rf"study {bad.loc[1, 'study_id']}, column {TARGETS[3]}: unknown label 'Mild'"):
        metric.labels_to_solution(bad)
    dup = pd.concat([table, table.iloc[:1]])
    with pytest.raises(ScoringError, match="duplicate study ids"):
        metric.labels_to_solution(dup)
    with pytest.raises(ScoringError, match="not in the label table: 5"):
        metric.labels_to_solution(table, study_ids=[5])


# --------------------------------------------------------------------------------------------
# validation errors


@pytest.fixture()
def case() -> tuple[pd.DataFrame, pd.DataFrame]:
    table, sub = random_case(5, n_studies=6)
    return metric.labels_to_solution(table), sub


def _err(solution: pd.DataFrame, submission: pd.DataFrame, pattern: str) -> str:
    with pytest.raises(ScoringError, match=pattern) as info:
        metric.score(solution, submission)
    return str(info.value)


def test_submission_missing_row_id_column(case) -> None:
    sol, sub = case
    _err(sol, sub.rename(columns={"row_id": "id"}), "submission has no 'row_id' column")


def test_custom_row_id_column_name(case) -> None:
    sol, sub = case
    assert metric.score(sol.rename(columns={"row_id": "rid"}), sub.rename(columns={"row_id": "rid"}), "rid") == metric.score(sol, sub)


def test_submission_missing_and_extra_columns(case) -> None:
    sol, sub = case
    _err(sol, sub.drop(columns=["moderate"]), r"missing \['moderate'\]")
    _err(sol, sub.assign(extra=1.0), r"unexpected \['extra'\]")


def test_submission_non_numeric(case) -> None:
    sol, sub = case
    bad = sub.astype({"severe": object})
    bad.loc[4, "severe"] = "high"
    msg = _err(sol, bad, "column 'severe' must be numeric")
    assert sub.loc[4, "row_id"] in msg
    _err(sol, sub.assign(severe=True), "got booleans")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_submission_not_finite(case, value: float) -> None:
    sol, sub = case
    bad = sub.copy()
    bad.loc[7, "moderate"] = value
    msg = _err(sol, bad, "must be finite; NaN or inf at 1 row")
    assert sub.loc[7, "row_id"] in msg


def test_submission_negative(case) -> None:
    sol, sub = case
    bad = sub.copy()
    bad.loc[3, "normal_mild"] = -0.1
    msg = _err(sol, bad, "must be >= 0; negative at 1 row")
    assert sub.loc[3, "row_id"] in msg


def test_submission_duplicate_rows(case) -> None:
    sol, sub = case
    bad = pd.concat([sub, sub.iloc[[9]]])
    msg = _err(sol, bad, "submission has 1 duplicated row id")
    assert sub.loc[9, "row_id"] in msg


def test_submission_missing_rows(case) -> None:
    sol, sub = case
    msg = _err(sol, sub.drop(index=[0, 1]), "2 solution row\\(s\\) missing from the submission")
    assert sub.loc[0, "row_id"] in msg and sub.loc[1, "row_id"] in msg


def test_submission_extra_rows(case) -> None:
    sol, sub = case
    extra = pd.DataFrame([["123_spinal_canal_stenosis_l1_l2", 0.5, 0.3, 0.2]], columns=sub.columns)
    msg = _err(sol, pd.concat([sub, extra]), "1 submission row\\(s\\) not in the solution")
    assert "123_spinal_canal_stenosis_l1_l2" in msg


def test_many_missing_rows_are_summarised(case) -> None:
    sol, sub = case
    _err(sol, sub.iloc[:10], r"missing from the submission: .* \(\+\d+ more\)")


def test_submission_not_a_frame(case) -> None:
    sol, sub = case
    _err(sol, sub.to_numpy(), "must be a pandas DataFrame")


def test_solution_errors(case) -> None:
    sol, sub = case
    _err(sol.drop(columns=["sample_weight"]), sub, r"solution lacks column\(s\) \['sample_weight'\]")
    bad = sol.copy()
    bad.loc[2, "moderate"] = 0.5
    _err(bad, sub, "one-hot 0/1")
    bad = sol.copy()
    bad.loc[bad["sample_weight"] > 0, "sample_weight"] = -1.0
    _err(bad, sub, "negative sample weights")
    bad = sol.copy()
    scored = bad.index[bad["sample_weight"] > 0][0]
    bad.loc[scored, list(CLASSES)] = 0.0
    msg = _err(bad, sub, "need exactly one true class")
    assert sol.loc[scored, "row_id"] in msg
    bad = sol.copy()
    bad.loc[0, "row_id"] = "x_spinal_canal_stenosis_l1_l2"
    _err(bad, sub, "solution has malformed row ids")
    _err(pd.concat([sol, sol.iloc[[0]]]), sub, "solution has 1 duplicated row id")
    bad = sol.copy()
    bad.loc[0, "sample_weight"] = np.nan
    _err(bad, sub, "solution has non-finite values")


def test_group_without_scored_rows(case) -> None:
    sol, sub = case
    bad = sol.copy()
    bad.loc[bad["row_id"].str.contains("subarticular"), "sample_weight"] = 0.0
    _err(bad, sub, "no scored rows in the subarticular group")


def test_score_arrays_errors() -> None:
    labels = np.zeros((2, 5, 5), dtype=int)
    probs = np.full((2, 5, 5, 3), 1 / 3)
    with pytest.raises(ScoringError, match="labels must have shape"):
        metric.score_arrays(labels[:, :4], probs)
    with pytest.raises(ScoringError, match="probs must have shape"):
        metric.score_arrays(labels, probs[..., :2])
    with pytest.raises(ScoringError, match="class indices"):
        metric.score_arrays(labels + 3, probs)
    with pytest.raises(ScoringError, match="finite"):
        metric.score_arrays(labels, np.where(probs > 0, np.nan, probs))
    with pytest.raises(ScoringError, match=">= 0"):
        metric.score_arrays(labels, -probs)


def test_import_is_torch_free() -> None:
    code = "import sys, rsna_infer.metric; assert 'torch' not in sys.modules and 'sklearn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# the command line


def _cli() -> list[str]:
    exe = shutil.which("rsna-infer")
    return [exe] if exe else [sys.executable, "-m", "rsna_infer.cli"]


def test_cli_scores_against_labels_and_solution(tmp_path: Path) -> None:
    table, sub = random_case(9, n_studies=8)
    labels_csv, sub_csv, sol_csv = tmp_path / "train.csv", tmp_path / "sub.csv", tmp_path / "solution.csv"
    table.to_csv(labels_csv, index=False)
    sub.to_csv(sub_csv, index=False)
    solution = metric.labels_to_solution(table)
    solution.to_csv(sol_csv, index=False)
    want = metric.score_components(solution, pd.read_csv(sub_csv))

    out = subprocess.run([*_cli(), "score", "--labels", str(labels_csv), str(sub_csv)], capture_output=True, text=True, check=True)
    lines = {ln.split()[0]: float(ln.split()[1]) for ln in out.stdout.splitlines()[1:]}
    assert set(lines) == {*metric.COMPONENTS, "total"}
    for k, v in lines.items():
        assert v == pytest.approx(want[k], abs=1e-6)
    assert "8 of 8 studies" in out.stdout

    out = subprocess.run([*_cli(), "score", "--solution", str(sol_csv), str(sub_csv), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == pytest.approx(want, rel=1e-12)


def test_cli_scores_a_subset_of_labelled_studies(tmp_path: Path) -> None:
    table, sub = random_case(10, n_studies=8)
    (tmp_path / "train.csv").write_text(table.to_csv(index=False))
    keep = table["study_id"].iloc[3:8].tolist()
    part = sub[sub["row_id"].str.split("_").str[0].astype(int).isin(keep)]
    part.to_csv(tmp_path / "sub.csv", index=False)
    cmd = [*_cli(), "score", "--labels", str(tmp_path / "train.csv"), str(tmp_path / "sub.csv")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "5 of 8 studies" in out.stdout
    want = metric.score(metric.labels_to_solution(table, keep), part)
    assert float(out.stdout.splitlines()[-1].split()[1]) == pytest.approx(want, abs=1e-6)
    strict = subprocess.run([*cmd, "--all-studies"], capture_output=True, text=True)
    assert strict.returncode == 2 and "missing from the submission" in strict.stderr


def test_cli_reports_bad_submission(tmp_path: Path) -> None:
    table, sub = random_case(12, n_studies=3)
    table.to_csv(tmp_path / "train.csv", index=False)
    bad = sub.copy()
    bad.loc[0, "severe"] = np.nan
    bad.to_csv(tmp_path / "sub.csv", index=False)
    out = subprocess.run(
        [*_cli(), "score", "--labels", str(tmp_path / "train.csv"), str(tmp_path / "sub.csv")], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "must be finite" in out.stderr and sub.loc[0, "row_id"] in out.stderr
    missing = subprocess.run([*_cli(), "score", "--labels", str(tmp_path / "nope.csv"), str(tmp_path / "sub.csv")], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
