"""Submission contract: building with fallbacks, validation of every defect, atomic CSV writes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rsna_infer import metric, submission as S
from rsna_infer.constants import CLASSES, TARGETS, study_row_ids
from rsna_infer.submission import SubmissionError, validate_submission, write_submission

STUDIES = [4003253, 4646740, 7143189]


def _probs(seed: int = 0, studies: list[int] = STUDIES) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s: rng.dirichlet([1.0, 1.0, 1.0], size=(5, 5)) for s in studies}


@pytest.fixture()
def frame() -> pd.DataFrame:
    return S.build_submission(_probs(), STUDIES)


# --------------------------------------------------------------------------------------------
# building


def test_build_layout_and_values() -> None:
    probs = _probs()
    out = S.build_submission(probs, STUDIES)
    assert list(out.columns) == ["row_id", *CLASSES]
    assert out["row_id"].tolist() == [r for s in STUDIES for r in study_row_ids(s)]
    np.testing.assert_allclose(out[list(CLASSES)].to_numpy().reshape(3, 5, 5, 3), np.stack([probs[s] for s in STUDIES]), rtol=1e-15)
    S.validate_submission(out, STUDIES)


def test_default_study_list_is_sorted_keys() -> None:
    probs = _probs(studies=[9, 3, 5])
    out = S.build_submission(probs)
    assert out["row_id"].iloc[::25].tolist() == [f"{s}_spinal_canal_stenosis_l1_l2" for s in (3, 5, 9)]


def test_fallback_fills_a_study_without_predictions(caplog: pytest.LogCaptureFixture) -> None:
    probs = _probs(studies=STUDIES[:2])
    with caplog.at_level(logging.WARNING, logger="rsna_infer.submission"):
        built = S.assemble_submission(probs, STUDIES)
    S.validate_submission(built.frame, STUDIES)
    rows = built.frame[built.frame["row_id"].str.startswith(f"{STUDIES[2]}_")]
    np.testing.assert_allclose(rows[list(CLASSES)].to_numpy(), S.DEFAULT_PRIORS.repeat(5, axis=0), rtol=1e-15)
    assert built.filled == {STUDIES[2]: list(TARGETS)}
    assert built.reasons[STUDIES[2]] == ["no predictions"]
    assert f"study {STUDIES[2]}: 25 target(s) from fallback priors" in caplog.text


def test_fallback_uses_given_priors() -> None:
    prior = np.array([0.6, 0.3, 0.1])
    out = S.build_submission({}, [11], priors=prior)
    np.testing.assert_allclose(out[list(CLASSES)].to_numpy(), np.tile(prior, (25, 1)))
    per_target = np.random.default_rng(1).dirichlet([1, 1, 1], size=(5, 5))
    out = S.build_submission({}, [11], priors=per_target)
    np.testing.assert_allclose(out[list(CLASSES)].to_numpy(), per_target.reshape(25, 3), rtol=1e-15)


def test_mask_fills_invalid_targets() -> None:
    probs = _probs()
    mask = np.ones((5, 5), dtype=bool)
    mask[3, :] = False  # the left subarticular view failed
    built = S.assemble_submission(probs, STUDIES, masks={STUDIES[1]: mask})
    arr = S.submission_to_arrays(built.frame)
    np.testing.assert_allclose(arr[STUDIES[1]][3], S.DEFAULT_PRIORS[3][None].repeat(5, axis=0), rtol=1e-15)
    np.testing.assert_allclose(arr[STUDIES[1]][4], probs[STUDIES[1]][4], rtol=1e-15)
    assert built.filled == {STUDIES[1]: [f"left_subarticular_stenosis_{lv}" for lv in ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")]}
    assert built.reasons[STUDIES[1]] == ["5 target(s) masked invalid"]


@pytest.mark.parametrize(
    "defect",
    [lambda p: p.__setitem__((0, 0, 1), np.nan), lambda p: p.__setitem__((0, 0, 1), -0.2), lambda p: p.__setitem__((0, 0), 0.0), lambda p: p.__setitem__((0, 0, 2), np.inf)],
    ids=["nan", "negative", "zero", "inf"],
)
def test_unusable_rows_take_the_fallback(defect) -> None:
    probs = _probs()
    defect(probs[STUDIES[0]])
    built = S.assemble_submission(probs, STUDIES)
    S.validate_submission(built.frame, STUDIES)
    np.testing.assert_allclose(S.submission_to_arrays(built.frame)[STUDIES[0]][0, 0], S.DEFAULT_PRIORS[0], rtol=1e-15)
    assert built.filled == {STUDIES[0]: [TARGETS[0]]}
    assert "non-finite, negative or all zero" in built.reasons[STUDIES[0]][0]


def test_wrong_shapes_take_the_fallback() -> None:
    probs = _probs()
    probs[STUDIES[0]] = probs[STUDIES[0]][:4]
    built = S.assemble_submission(probs, STUDIES, masks={STUDIES[1]: np.ones((5, 4), bool)})
    S.validate_submission(built.frame, STUDIES)
    assert len(built.filled[STUDIES[0]]) == 25 and "is not [5, 5, 3]" in built.reasons[STUDIES[0]][0]
    assert len(built.filled[STUDIES[1]]) == 25 and "mask shape" in built.reasons[STUDIES[1]][0]


def test_rows_are_renormalised_and_extra_studies_dropped(caplog: pytest.LogCaptureFixture) -> None:
    probs = {s: p * 3.0 for s, p in _probs().items()}
    probs[123] = np.full((5, 5, 3), 1 / 3)
    with caplog.at_level(logging.WARNING, logger="rsna_infer.submission"):
        out = S.build_submission(probs, STUDIES)
    S.validate_submission(out, STUDIES)
    np.testing.assert_allclose(out[list(CLASSES)].sum(axis=1), 1.0, rtol=0, atol=1e-15)
    assert "dropping predictions for 1 study id(s) not in the study list: [123]" in caplog.text


def test_duplicate_study_ids_rejected() -> None:
    with pytest.raises(SubmissionError, match="unique"):
        S.build_submission(_probs(), [STUDIES[0], STUDIES[0]])


# --------------------------------------------------------------------------------------------
# priors


def test_resolve_priors_shapes() -> None:
    assert S.resolve_priors().shape == (5, 5, 3)
    for level in range(5):
        np.testing.assert_allclose(S.resolve_priors()[:, level], S.DEFAULT_PRIORS, rtol=1e-15)
    np.testing.assert_allclose(S.resolve_priors([2, 1, 1])[4, 4], [0.5, 0.25, 0.25])
    per_cond = np.arange(1, 16, dtype=float).reshape(5, 3)
    np.testing.assert_allclose(S.resolve_priors(per_cond)[2, 3], per_cond[2] / per_cond[2].sum())
    np.testing.assert_allclose(S.resolve_priors(S.DEFAULT_PRIORS)[:, 0], S.DEFAULT_PRIORS)


@pytest.mark.parametrize(
    ("priors", "pattern"),
    [(np.ones((3, 3)), r"shape \[3\], \[5, 3\] or \[5, 5, 3\]"), ([0.5, np.nan, 0.5], "finite"), ([0.5, -0.1, 0.6], ">= 0"), ([0, 0, 0], "positive entry")],
)
def test_resolve_priors_rejects(priors, pattern: str) -> None:
    with pytest.raises(SubmissionError, match=pattern):
        S.resolve_priors(priors)


def test_default_priors_are_metric_optimal_for_their_frequencies() -> None:
    for c, group in enumerate(("spinal", "foraminal", "foraminal", "subarticular", "subarticular")):
        f = np.array(S.DEFAULT_CLASS_FREQUENCIES[group])
        np.testing.assert_allclose(S.DEFAULT_PRIORS[c], f * [1, 2, 4] / (f * [1, 2, 4]).sum())
    assert not S.DEFAULT_PRIORS.flags.writeable


def test_metric_priors_minimise_the_weighted_log_loss() -> None:
    rng = np.random.default_rng(3)
    labels = rng.choice(3, p=[0.7, 0.2, 0.1], size=(400, 5, 5))
    fitted = S.priors_from_labels(labels, weighted=True, smoothing=0.0)
    plain = S.priors_from_labels(labels, weighted=False, smoothing=0.0)
    best = metric.score_arrays(labels, np.broadcast_to(fitted, (400, 5, 5, 3)))
    freq = metric.score_arrays(labels, np.broadcast_to(plain, (400, 5, 5, 3)))
    for g in ("spinal", "foraminal", "subarticular"):
        assert best[g] < freq[g]
    # and no small perturbation of the fitted constant does better on its group
    for delta in ([0.01, -0.01, 0], [0, 0.01, -0.01], [-0.01, 0, 0.01]):
        moved = np.clip(fitted + np.array(delta), 1e-6, None)
        other = metric.score_arrays(labels, np.broadcast_to(moved / moved.sum(-1, keepdims=True), (400, 5, 5, 3)))
        assert best["foraminal"] <= other["foraminal"] + 1e-12


def test_priors_from_labels_counts_and_blanks() -> None:
    labels = np.full((4, 5, 5), -1)
    labels[:, 0, 0] = [0, 0, 1, 2]
    plain = S.priors_from_labels(labels, weighted=False, smoothing=1.0)
    np.testing.assert_allclose(plain[0, 0], np.array([3, 2, 2]) / 7)
    np.testing.assert_allclose(plain[1, 1], [1 / 3] * 3)  # all blank: smoothing only
    weighted = S.priors_from_labels(labels, smoothing=1.0)
    np.testing.assert_allclose(weighted[0, 0], np.array([3, 4, 8]) / 15)
    with pytest.raises(SubmissionError, match="use smoothing > 0"):
        S.priors_from_labels(labels, smoothing=0.0)
    with pytest.raises(SubmissionError, match="shape"):
        S.priors_from_labels(labels[:, :4])


# --------------------------------------------------------------------------------------------
# validation


def _raises(frame: pd.DataFrame, pattern: str, study_ids=STUDIES) -> str:
    with pytest.raises(SubmissionError, match=pattern) as info:
        S.validate_submission(frame, study_ids)
    return str(info.value)


def test_missing_row_rejected(frame: pd.DataFrame) -> None:
    msg = _raises(frame.drop(index=[30]), r"1 missing row\(s\)")
    assert frame.loc[30, "row_id"] in msg


def test_extra_row_rejected(frame: pd.DataFrame) -> None:
    extra = pd.DataFrame([["1_spinal_canal_stenosis_l1_l2", 0.5, 0.25, 0.25]], columns=frame.columns)
    msg = _raises(pd.concat([frame, extra], ignore_index=True), r"1 row\(s\) for no listed study")
    assert "1_spinal_canal_stenosis_l1_l2" in msg


def test_missing_study_rejected(frame: pd.DataFrame) -> None:
    _raises(frame, r"25 missing row\(s\): '5_spinal_canal_stenosis_l1_l2'", study_ids=[*STUDIES, 5])


def test_nan_rejected(frame: pd.DataFrame) -> None:
    bad = frame.copy()
    bad.loc[5, "moderate"] = np.nan
    msg = _raises(bad, r"1 row\(s\) with NaN or inf")
    assert frame.loc[5, "row_id"] in msg


def test_negative_rejected(frame: pd.DataFrame) -> None:
    bad = frame.copy()
    bad.loc[6, list(CLASSES)] = [1.2, -0.2, 0.0]
    msg = _raises(bad, r"1 row\(s\) with negative values")
    assert frame.loc[6, "row_id"] in msg


def test_bad_sum_rejected(frame: pd.DataFrame) -> None:
    bad = frame.copy()
    bad.loc[7, "severe"] += 1e-5
    msg = _raises(bad, r"1 row\(s\) do not sum to 1 within 1e-06 \(worst off by 1e-05\)")
    assert frame.loc[7, "row_id"] in msg
    ok = frame.copy()
    ok.loc[7, "severe"] += 5e-7
    S.validate_submission(ok, STUDIES)


def test_duplicate_and_malformed_rows_rejected(frame: pd.DataFrame) -> None:
    _raises(pd.concat([frame, frame.iloc[[0]]], ignore_index=True), r"1 duplicated row id\(s\)")
    bad = frame.copy()
    bad.loc[0, "row_id"] = "4003253_spinal_l1_l2"
    _raises(bad, r"1 malformed row id\(s\): '4003253_spinal_l1_l2'", study_ids=None)


def test_columns_and_types_rejected(frame: pd.DataFrame) -> None:
    _raises(frame[["row_id", "moderate", "normal_mild", "severe"]], "submission columns must be")
    _raises(frame.assign(extra=0), "submission columns must be")
    bad = frame.astype({"severe": object})
    bad.loc[0, "severe"] = "x"
    _raises(bad, r"non-numeric column\(s\) \['severe'\]")


def test_every_problem_is_reported_at_once(frame: pd.DataFrame) -> None:
    bad = frame.drop(index=[1]).copy()
    bad.loc[2, "severe"] = np.nan
    bad.loc[3, "normal_mild"] = -1.0
    msg = _raises(bad, "missing row")
    assert "NaN or inf" in msg and "negative values" in msg


# --------------------------------------------------------------------------------------------
# files


def test_csv_round_trip(tmp_path: Path, frame: pd.DataFrame) -> None:
    path = S.write_submission(frame, tmp_path / "sub" / "submission.csv", STUDIES)
    back = S.read_submission(path)
    pd.testing.assert_frame_equal(back, frame, check_exact=True)  # floats survive the CSV bit for bit
    S.validate_submission(back, STUDIES)
    arrays = S.submission_to_arrays(back)
    for s, p in _probs().items():
        np.testing.assert_allclose(arrays[s], p, rtol=1e-15)
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]


def test_invalid_write_leaves_existing_file(tmp_path: Path, frame: pd.DataFrame) -> None:
    path = S.write_submission(frame, tmp_path / "submission.csv")
    before = path.read_bytes()
    bad = frame.copy()
    bad.loc[0, "severe"] = np.nan
    with pytest.raises(SubmissionError, match="NaN"):
        S.write_submission(bad, path, STUDIES)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


def test_written_submission_scores(tmp_path: Path, frame: pd.DataFrame) -> None:
    path = S.write_submission(frame, tmp_path / "submission.csv", STUDIES)
    labels = pd.DataFrame([["Normal/Mild"] * 25] * 3, columns=list(TARGETS))
    labels.insert(0, "study_id", STUDIES)
    labels.loc[0, TARGETS[0]] = "Severe"
    labels.loc[1, TARGETS[7]] = "Moderate"
    labels.loc[2, TARGETS[17]] = "Severe"
    value = metric.score(metric.labels_to_solution(labels), S.read_submission(path))
    assert np.isfinite(value) and value > 0


def test_read_study_ids(tmp_path: Path) -> None:
    csv = tmp_path / "test_series_descriptions.csv"
    pd.DataFrame(
        {"study_id": [44, 7, 44, 7, 7], "series_id": [1, 2, 3, 4, 5], "series_description": ["Axial T2"] * 5}
    ).to_csv(csv, index=False)
    assert S.read_study_ids(csv) == [7, 44]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.read_study_ids(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("series_id\n1\n")
    with pytest.raises(SubmissionError, match="no study_id column"):
        S.read_study_ids(tmp_path / "bad.csv")


def test_prior_submission_is_a_valid_submission() -> None:
    from rsna_infer.submission import prior_submission, resolve_priors

    df = prior_submission(STUDIES)
    validate_submission(df, STUDIES)
    np.testing.assert_allclose(df[list(CLASSES)].to_numpy(), np.tile(resolve_priors(None).reshape(25, 3), (len(STUDIES), 1)))


def test_written_submission_has_the_umask_mode_and_leaves_no_temporary_file(frame: pd.DataFrame, tmp_path) -> None:
    from rsna_infer.output import current_umask

    path = write_submission(frame, tmp_path / "submission.csv", STUDIES)
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


def test_unreadable_series_csv_names_the_file(tmp_path) -> None:
    from rsna_infer.submission import read_study_ids

    p = tmp_path / "test_series_descriptions.csv"
    p.write_bytes(b"\xff\xfe\x00\x00garbage")
    with pytest.raises(SubmissionError, match=str(p)):
        read_study_ids(p)
