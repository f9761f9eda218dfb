"""``rsna-infer demo``: the packaged demo weights, end to end on fresh phantom studies."""

import json

import numpy as np
import pandas as pd
import pytest

from rsna_infer.cli import main
from rsna_infer.demo import (
    DemoWeightsMissing,
    check_demo_weights,
    demo_dir,
    keypoint_errors,
    load_settings,
)


def test_packaged_demo_weights_are_complete_and_small():
    path = check_demo_weights()  # every file present, sha256 verified, both stages
    from rsna_infer.models.manifest import load_manifest

    man = load_manifest(path)
    total = sum(man.resolve(m).stat().st_size for m in man.models)
    assert total < 8e6, f"demo weights take {total / 1e6:.1f} MB"
    assert all(m.blend for m in man.stage2), "fit-blend weights missing from the demo manifest"
    assert man.priors_given
    from rsna_infer.specs import FAMILIES

    assert {m.family for m in man.models} == set(FAMILIES), "the demo ensemble holds every family"
    assert {m.variant for m in man.models if m.family == "roi"} == {"spinal", "foraminal", "subarticular"}
    settings = load_settings(path)
    assert settings["test_seed"] not in settings["train_seeds"]


def test_missing_demo_weights_fail_loudly(tmp_path, capsys):
    with pytest.raises(DemoWeightsMissing, match="train_demo.py"):
        check_demo_weights(tmp_path / "weights_manifest.json")
    assert main(["demo", "--manifest", str(tmp_path / "weights_manifest.json")]) == 1
    assert "missing" in capsys.readouterr().out
    # a manifest whose weight file is gone is just as unusable
    src = json.loads((demo_dir() / "weights_manifest.json").read_text())
    (tmp_path / "weights_manifest.json").write_text(json.dumps(src))
    with pytest.raises(DemoWeightsMissing, match="not found"):
        check_demo_weights(tmp_path / "weights_manifest.json")


def test_demo_refuses_a_training_seed(capsys):
    seed = load_settings(demo_dir() / "weights_manifest.json")["train_seeds"][0]
    assert main(["demo", "--studies", "1", "--seed", str(seed)]) == 2
    assert "used to train" in capsys.readouterr().out


def test_keypoint_errors_from_a_report():
    truth = {7: {"spinal": np.array([[0.0, 0, 0]] * 5), "foraminal": np.full((10, 3), np.nan)}}
    world = [[3.0, 4.0, 0.0]] * 4 + [None]
    report = {"studies": {"7": {"keypoints": {"best/spinal": {"world": world}}}}, "8": {}}
    mm, found = keypoint_errors(report, truth)
    assert mm == {"spinal": 5.0} and found == {"spinal": 0.8}


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--studies", "4", "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for line in ("demo ensemble", "prior-only baseline", "uniform baseline", "spinal", "mm"):
        assert line in text
    res = json.loads(out.read_text())
    assert res["n_studies"] == 4
    model, prior = res["scores"]["model"]["total"], res["scores"]["prior"]["total"]
    assert np.isfinite(model) and model < prior  # the demo weights have learned something
    assert set(res["keypoint_mm"]) == {"spinal", "foraminal", "subarticular"}
    assert all(np.isfinite(v) for v in res["keypoint_mm"].values())
    assert (tmp_path / "w" / "submission.csv").is_file() and (tmp_path / "w" / "run_report.json").is_file()


def test_mirror_figures_swap_left_and_right_rows():
    from rsna_infer.constants import TARGETS
    from rsna_infer.demo import mirror_figures

    rows = [f"7_{t}" for t in TARGETS]
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), len(rows))
    sub = pd.DataFrame(p, columns=["normal_mild", "moderate", "severe"]).assign(row_id=rows)
    swapped_rows = [r.replace("_left_", "_@_").replace("_right_", "_left_").replace("_@_", "_right_") for r in rows]
    mirror = sub.assign(row_id=swapped_rows)  # a perfect mirror: the left grades become the right ones
    m = mirror_figures(sub, mirror)
    assert m["swapped"] == pytest.approx(0.0) and m["unswapped"] > 0.05 and m["spinal"] == pytest.approx(0.0)


def test_mirror_root_mirrors_the_anatomy_in_patient_coordinates(tmp_path):
    from rsna_infer.demo import mirror_root
    from rsna_infer.io import discover_studies, load_study
    from rsna_infer.synth import make_dataset

    root = tmp_path / "p"
    make_dataset(root, 1, split="test", seed=3, progress=False, image_size=(32, 40), flipped_axes_rate=1.0)
    mirror_root(root, tmp_path / "m")
    (a,), (b,) = discover_studies(root, split="test"), discover_studies(tmp_path / "m", split="test")
    sa, sb = load_study(a), load_study(b)
    for desc, vols in sa.volumes.items():
        for va, vb in zip(vols, sb.get(desc)):
            assert va.shape == vb.shape
            flip = vb.normal @ (va.normal * [-1, 1, 1]) < 0  # a reader re-sorts the slices along the new normal
            pix = vb.pixels[::-1] if flip else vb.pixels
            np.testing.assert_array_equal(pix, va.pixels)
            centre = np.array([(s - 1) / 2 for s in va.shape])
            zc = va.shape[0] - 1 - centre[0] if flip else centre[0]
            np.testing.assert_allclose(vb.to_world(np.r_[zc, centre[1:]]), va.to_world(centre) * [-1, 1, 1], atol=1e-3)
