import numpy as np
import pytest

from rsna_infer.constants import GROUPS
from rsna_infer.ensemble import blend_logits
from rsna_infer.manifest import Manifest, load_manifest, save_manifest
from rsna_infer.metric import score_arrays
from rsna_infer.specs import InputSpec, ModelEntry
from rsna_infer.submission import priors_from_labels
from rsna_infer.train.blend import OofSet, add_arguments, fit_blend, load_oof, run_cli
from rsna_infer.train.manifests import member_name, set_blend_weights

S = 240


def _labels(rng):
    p = np.array([0.7, 0.2, 0.1])
    return rng.choice(3, size=(S, 5, 5), p=p)


def _member(rng, labels, skill_by_group):
    """Logits that are informative with strength ``skill`` per condition group, plus noise."""
    skill = np.array([skill_by_group[g] for g in ("spinal", "foraminal", "foraminal", "subarticular", "subarticular")])
    onehot = np.eye(3)[labels]
    logits = skill[None, :, None, None] * onehot + rng.normal(0, 1.0, size=onehot.shape)
    return logits


def _oof(seed=0):
    rng = np.random.default_rng(seed)
    labels = _labels(rng)
    a = _member(rng, labels, {"spinal": 3.0, "foraminal": 0.3, "subarticular": 1.5})
    b = _member(rng, labels, {"spinal": 0.3, "foraminal": 3.0, "subarticular": 1.5})
    masks = np.ones((2, S, 5, 5), bool)
    return OofSet(["a", "b"], np.arange(S), np.stack([a, b]), masks, labels)


def test_fit_blend_beats_best_single_member():
    oof = _oof()
    fit = fit_blend(oof)
    best_single = min(s["total"] for s in fit.member_scores.values())
    assert fit.blend_score["total"] < best_single - 0.05
    assert fit.blend_score["total"] <= fit.uniform_score["total"] + 1e-9
    w = fit.weights
    assert np.all(w >= 0) and np.allclose(w.sum(0), 1.0)
    # each member dominates the group it is good at
    assert w[0, GROUPS.index("spinal")] > 0.7 and w[1, GROUPS.index("foraminal")] > 0.7


def test_fit_blend_reports_what_the_predictor_would_score():
    oof = _oof(1)
    fit = fit_blend(oof)
    # same blend code as the predictor: the score recomputed from the weights matches
    probs = blend_logits(oof.logits, oof.masks, fit.weights, priors_from_labels(oof.labels))
    assert score_arrays(oof.labels, probs)["total"] == pytest.approx(fit.blend_score["total"])


def test_member_covering_one_group_only_gets_weight_there():
    oof = _oof(2)
    masks = oof.masks.copy()
    masks[1, :, 1:] = False  # member b predicts spinal only
    oof = OofSet(oof.members, oof.study_ids, oof.logits, masks, oof.labels)
    fit = fit_blend(oof)
    assert fit.weights[1, GROUPS.index("foraminal")] == 0 and fit.weights[1, GROUPS.index("subarticular")] == 0
    assert fit.weights[0, GROUPS.index("foraminal")] == 1


def _write_oof(path, member, fold, ids, logits, mask, labels):
    np.savez_compressed(path, member=np.array(member), fold=np.int64(fold), study_ids=np.asarray(ids),
                        logits=logits.astype(np.float32), mask=mask, labels=labels)


def _entry(name, fold, tmp_path):
    (tmp_path / "weights").mkdir(exist_ok=True)
    (tmp_path / "weights" / f"{name}.safetensors").write_bytes(b"x")
    return ModelEntry(name=name, family="roi", variant="spinal", arch="test_resnet",
                      input=InputSpec(size=(32, 32)),
                      file=f"weights/{name}.safetensors", fold=fold)


def test_cli_aligns_folds_and_writes_weights(tmp_path, capsys):
    oof = _oof(3)
    half = S // 2
    runs = {}
    for m, name in enumerate(oof.members):
        d = tmp_path / name
        d.mkdir()
        for k, rows in enumerate((slice(0, half), slice(half, S))):
            _write_oof(d / f"oof_f{k}.npz", name, k, oof.study_ids[rows], oof.logits[m, rows], oof.masks[m, rows], oof.labels[rows])
        runs[name] = d
    loaded = load_oof(list(runs.values()))
    assert loaded.members == ["a", "b"] and loaded.logits.shape == (2, S, 5, 5, 3)
    np.testing.assert_allclose(loaded.logits, oof.logits, atol=1e-5)

    entries = [_entry(f"{n}_f{k}", k, tmp_path) for n in ("a", "b") for k in (0, 1)]
    man_path = save_manifest(Manifest(models=entries, root=tmp_path), tmp_path / "m.json")
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(runs["a"]), str(runs["b"]), "--manifest", str(man_path), "--out", str(tmp_path / "blended.json")])
    assert run_cli(args) == 0
    out = capsys.readouterr().out
    assert "fitted blend" in out and "a " in out
    man = load_manifest(tmp_path / "blended.json")
    per_member = {}
    for e in man.stage2:
        for g in GROUPS:
            per_member.setdefault(member_name(e), {}).setdefault(g, 0.0)
            per_member[member_name(e)][g] += e.blend[g]
    for g in GROUPS:  # folds share their member's weight; members sum to 1 per group
        assert sum(per_member[m][g] for m in per_member) == pytest.approx(1.0, abs=1e-5)
    assert per_member["a"]["spinal"] > per_member["b"]["spinal"]


def test_set_blend_weights_rejects_unknown_member(tmp_path):
    man = Manifest(models=[_entry("a_f0", 0, tmp_path)], root=tmp_path)
    with pytest.raises(ValueError, match="zzz"):
        set_blend_weights(man, {"zzz": {"spinal": 1.0}})


def test_load_oof_rejects_conflicting_labels(tmp_path):
    oof = _oof(4)
    _write_oof(tmp_path / "oof_f0.npz", "a", 0, oof.study_ids, oof.logits[0], oof.masks[0], oof.labels)
    (tmp_path / "b").mkdir()
    bad = oof.labels.copy()
    bad[0, 0, 0] = (bad[0, 0, 0] + 1) % 3
    _write_oof(tmp_path / "b" / "oof_f0.npz", "b", 0, oof.study_ids, oof.logits[1], oof.masks[1], bad)
    with pytest.raises(ValueError, match="disagree"):
        load_oof([tmp_path / "oof_f0.npz", tmp_path / "b"])
