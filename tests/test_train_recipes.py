"""The competition recipes (configs/stage1, configs/stage2) and the ensemble template
(weights_manifest.json) generated from them cannot drift apart."""

import json

import pytest

from rsna_infer.models.manifest import manifest_from_dict
from rsna_infer.train.recipes import CONFIG_DIR, TEMPLATE, groups_of, load_recipes, main, template_text


def test_template_is_generated_from_the_recipes():
    assert TEMPLATE.read_text() == template_text(), "run: python -m rsna_infer.train.recipes"
    assert main(["--check"]) == 0


def test_every_template_entry_has_a_recipe_and_every_recipe_every_fold():
    recipes = {c.name: c for c in load_recipes()}
    man = manifest_from_dict(json.loads(TEMPLATE.read_text()))
    by_member: dict[str, list[int]] = {}
    for e in man.models:
        name, fold = e.name.rsplit("_f", 1)
        cfg = recipes[name]  # KeyError: a template entry without its recipe
        assert e == cfg.model_entry(int(fold)).__class__(**{**cfg.model_entry(int(fold)).__dict__, "file": e.file,
                                                            "blend": e.blend})
        by_member.setdefault(name, []).append(e.fold)
    assert set(by_member) == set(recipes)
    assert all(sorted(f) == list(range(recipes[n].n_folds)) for n, f in by_member.items())  # stage 1 too (folds averaged)


def test_recipes_start_from_pretrained_weights_and_share_one_split_setup():
    recipes = load_recipes(check_family=True)  # every family accepts its recipe and builds
    assert all(c.pretrained == "timm" for c in recipes)
    assert {c.n_folds for c in recipes} == {5} and {c.seed for c in recipes} == {42}
    stage2 = [c for c in recipes if c.stage == 2]
    assert all(c.val_keypoints == "predicted" for c in stage2)
    for g in ("spinal", "foraminal", "subarticular"):
        assert sum(g in groups_of(c) for c in stage2) >= 3
    level = next(c for c in recipes if c.family == "axial_level")
    assert 0 < int(level.input.extra["max_slices"]) <= 64  # memory-safe: see benchmarks/bench_train.py


def test_a_recipe_in_the_wrong_stage_folder_is_refused(tmp_path):
    (tmp_path / "stage1").mkdir()
    src = sorted((CONFIG_DIR / "stage2").glob("*.json"))[0]
    (tmp_path / "stage1" / src.name).write_text(src.read_text())
    with pytest.raises(ValueError, match="stage-2 recipe"):
        load_recipes(tmp_path)
