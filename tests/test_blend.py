import numpy as np
import pytest

from rsna_infer.commands.fit_blend import add_arguments, run_cli
from rsna_infer.constants import GROUPS
from rsna_infer.metric import score_arrays
from rsna_infer.models.ensemble import blend_logits
from rsna_infer.models.manifest import Manifest, load_manifest, save_manifest
from rsna_infer.specs import InputSpec, ModelEntry
from rsna_infer.submission import priors_from_labels
from rsna_infer.train.blend import OofSet, fit_blend, load_oof
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
    # a is the only foraminal member: all of it, or none when the priors do better
    wa = fit.weights[0, GROUPS.index("foraminal")]
    assert wa == (0.0 if fit.choice["foraminal"] == "priors" else 1.0)


@pytest.mark.parametrize("seed", range(6))
def test_blend_is_never_worse_than_the_priors_or_any_member_in_any_group(seed):
    """A member worse than the priors in some group (noise where it has no skill, or
    confidently wrong) never drags the blend below the priors or the best member there."""
    from rsna_infer.train.blend import group_loss

    rng = np.random.default_rng(100 + seed)
    labels = _labels(rng)
    good = _member(rng, labels, {"spinal": 2.0, "foraminal": 0.0, "subarticular": 1.0})
    wrong = -3.0 * _member(rng, labels, {"spinal": 1.0, "foraminal": 1.0, "subarticular": 0.5})  # confidently wrong
    noise = rng.normal(0, 2.0, size=good.shape)
    masks = np.ones((3, S, 5, 5), bool)
    masks[2, :, 0] = False  # "noise" does not predict spinal
    oof = OofSet(["good", "noise", "wrong"], np.arange(S), np.stack([good, noise, wrong]), masks, labels)
    fit = fit_blend(oof)
    for g in GROUPS:
        gi = GROUPS.index(g)
        options = [group_loss(fit.prior_score, g)] + [group_loss(fit.member_scores[m], g)
                                                      for i, m in enumerate(oof.members) if fit.coverage[i, gi]]
        assert group_loss(fit.blend_score, g) <= min(options) + 1e-9, (g, fit.history)
    assert fit.blend_score["total"] <= min(min(s["total"] for s in fit.member_scores.values()),
                                           fit.prior_score["total"]) + 1e-9
    # the foraminal group has no member with any skill: the priors win and every weight there is 0
    assert fit.choice["foraminal"] == "priors" and np.all(fit.weights[:, GROUPS.index("foraminal")] == 0)
    # and the predictor's blend then gives exactly the priors there
    probs = blend_logits(oof.logits, oof.masks, fit.weights, priors_from_labels(labels))
    np.testing.assert_allclose(probs[:, 1:3], np.broadcast_to(priors_from_labels(labels)[1:3], probs[:, 1:3].shape))


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
    assert "fitted blend" in out and "a " in out and "class priors" in out
    assert "spinal: " in out and "foraminal: " in out and "subarticular: " in out  # what each group chose
    man = load_manifest(tmp_path / "blended.json")
    per_member = {}
    for e in man.stage2:
        for g in GROUPS:
            per_member.setdefault(member_name(e), {}).setdefault(g, 0.0)
            per_member[member_name(e)][g] += e.blend[g]
    for g in GROUPS:  # folds share their member's weight; members sum to 1 per group
        assert sum(per_member[m][g] for m in per_member) == pytest.approx(1.0, abs=1e-5)
    assert per_member["a"]["spinal"] > per_member["b"]["spinal"]
    assert man.prior_groups == ()  # every group has a member that beats the priors
    man.check_blend_groups()


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


def test_mixed_splits_are_refused(tmp_path, capsys):
    oof = _oof(5)
    for name, split in (("a", "1111111111111111"), ("b", "2222222222222222")):
        (tmp_path / name).mkdir()
        np.savez_compressed(tmp_path / name / "oof_f0.npz", member=np.array(name), fold=np.int64(0), split=np.array(split),
                            study_ids=oof.study_ids, logits=oof.logits[0], mask=oof.masks[0], labels=oof.labels)
    with pytest.raises(ValueError, match=r"1111111111111111 .*a/oof_f0.npz.* vs 2222222222222222 .*b/oof_f0.npz"):
        load_oof([tmp_path / "a", tmp_path / "b"])
    # a manifest of another split than its out-of-fold files
    entries = [_entry("a_f0", 0, tmp_path)]
    man_path = save_manifest(Manifest(models=entries, root=tmp_path, split="3333333333333333"), tmp_path / "m.json")
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run_cli(p.parse_args([str(tmp_path / "a"), "--manifest", str(man_path)])) == 2
    out = capsys.readouterr().out
    assert "3333333333333333" in out and "1111111111111111" in out
