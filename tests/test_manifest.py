import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from predict_fakes import fake_entries, use_fake_families
from torch import nn

from rsna_infer import cli
from rsna_infer.models import manifest as mf
from rsna_infer.models.manifest import (
    Manifest,
    ManifestError,
    export_model,
    load_manifest,
    load_weights,
    manifest_from_dict,
    resolve_manifest_path,
    save_manifest,
    sha256_file,
)
from rsna_infer.models.random_weights import make_random_manifest
from rsna_infer.specs import ModelEntry


def _entry(**over):
    d = {"name": "m0", "family": "roi", "variant": "spinal", "arch": "test_resnet",
         "input": {"size": [8, 8]}, "file": "weights/m0.safetensors", "blend": {"spinal": 1.0}}
    d.update(over)
    return d


class Tiny(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.a = nn.Linear(n, 3)
        self.b = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(3)


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    entry = export_model(model, ModelEntry.from_dict(_entry(file="-")), tmp_path)
    path = save_manifest(Manifest(models=[entry], root=tmp_path, notes="n"), tmp_path / "weights_manifest.json")
    return model, path


def _write(tmp_path, data):
    p = tmp_path / "m.json"
    p.write_text(json.dumps(data))
    return p


def test_export_round_trip_and_relocation(exported, tmp_path):
    model, path = exported
    man = load_manifest(path, verify=True)
    e = man.models[0]
    assert e.file == "weights/m0.safetensors" and e.sha256 == sha256_file(man.resolve(e))
    assert man.notes == "n" and not man.priors_given and man.priors.shape == (5, 5, 3)
    # the manifest and its weights folder move together
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("elsewhere"))
    man2 = load_manifest(moved / "weights_manifest.json", verify=True)
    fresh = Tiny()
    missing, unexpected = load_weights(fresh, man2.resolve(man2.models[0]))
    assert missing == unexpected == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    assert man2.sha256 and man2.sha256 == sha256_file(moved / "weights_manifest.json")


def test_save_rewrites_files_relative_to_the_new_location(exported, tmp_path):
    _, path = exported
    man = load_manifest(path)
    out = save_manifest(man, tmp_path / "sub" / "dir" / "copy.json")
    assert json.loads(out.read_text())["models"][0]["file"] == "../../weights/m0.safetensors"
    assert load_manifest(out, verify=True).models[0].name == "m0"


def test_strict_load_names_missing_and_unexpected_keys(exported, tmp_path):
    _, path = exported
    w = load_manifest(path).resolve(load_manifest(path).models[0])

    class Other(Tiny):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(ManifestError, match=r"missing key\(s\) \['extra.bias', 'extra.weight'\]"):
        load_weights(Other(), w)
    assert load_weights(Other(), w, strict=False)[0] == ["extra.bias", "extra.weight"]
    with pytest.raises(ManifestError, match="do not fit"):
        load_weights(Tiny(n=5), w)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ManifestError, match="bad.safetensors"):
        load_weights(Tiny(), bad)


def test_tied_weights_export_and_load(tmp_path):
    m = Tiny(n=3)
    m.b.weight = nn.Parameter(torch.randn(2, 3))
    m.c = nn.Linear(3, 2)
    m.c.weight = m.b.weight  # shared tensor
    e = export_model(m, ModelEntry.from_dict(_entry(file="-")), tmp_path)
    fresh = Tiny(n=3)
    fresh.c = nn.Linear(3, 2)
    fresh.c.weight = fresh.b.weight
    load_weights(fresh, tmp_path / e.file)
    assert torch.equal(fresh.c.weight, m.b.weight)


def test_missing_weights_fail_fast_naming_the_file(exported):
    _, path = exported
    (path.parent / "weights" / "m0.safetensors").unlink()
    with pytest.raises(ManifestError, match=r"m0.*weights file not found: .*weights/m0\.safetensors"):
        load_manifest(path)
    assert load_manifest(path, check_files=False).models[0].name == "m0"


def test_sha256_mismatch_fails_naming_the_file(exported):
    _, path = exported
    w = path.parent / "weights" / "m0.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    load_manifest(path)  # presence only
    with pytest.raises(ManifestError, match=r"sha256 mismatch for .*m0\.safetensors"):
        load_manifest(path, verify=True)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"models": [], "colour": 1}, r"unknown field\(s\) \['colour'\]"),
        ({"models": [_entry(), _entry()]}, r"duplicate model name\(s\) \['m0'\]"),
        ({"models": [_entry(), _entry(name="m1", weight=3)]}, r"models\[1\].*unknown field\(s\) \['weight'\]"),
        ({"models": [_entry(input={"size": [0, 8]})]}, r"models\[0\].*input.size"),
        ({"models": [_entry(family="nope")]}, "unknown family 'nope'"),
        ({"models": [_entry(blend={"spinal": -1})]}, "blend weight"),
        ({"models": [_entry(family="sag2d", variant="t2", blend={"spinal": 1.0})]}, "blend.*stage-2"),
        ({"models": [_entry(name="a/b")]}, "model name 'a/b'"),
        ({"models": [_entry(sha256="xyz")]}, "sha256 must be 64"),
        ({"models": {}}, "'models' must be a list"),
        ({"version": 2, "models": []}, "version 2 is not supported"),
        ({"version": True, "models": []}, "version True is not supported"),  # a bool is not the integer 1
        ({"models": [_entry(fold=True)]}, r"models\[0\].*fold must be an integer, got True"),
        ({"models": [_entry(fold=1.5)]}, "fold must be an integer"),
        ({"models": [_entry(arch="hf-hub:timm/resnet18.a1_in1k")]}, r"models\[0\].*'hf-hub:timm/resnet18.a1_in1k' names a model hub entry"),
        ({"models": [], "priors": [[0.5, 0.5]]}, r"priors must have shape"),
        ({"models": [], "priors": [0.5, 0.6, 0.1]}, "sum to 1"),
        ({"models": [], "priors": [0.5, np.nan, 0.5]}, "finite"),
        ([], "top level must be an object"),
    ],
)
def test_validation_errors_name_the_field(tmp_path, data, match):
    p = tmp_path / "m.json"
    p.write_text(json.dumps(data, allow_nan=True))
    with pytest.raises(ManifestError, match=match):
        load_manifest(p, check_files=False)


def test_invalid_json_says_where(tmp_path):
    p = tmp_path / "m.json"
    p.write_text('{"models": [\n  {"name": "a",}\n]}')
    with pytest.raises(ManifestError, match=r"m\.json: not valid JSON .* line 2"):
        load_manifest(p)


def test_priors_broadcast_and_are_written_back(tmp_path):
    per_condition = [[0.8, 0.15, 0.05]] * 5
    man = load_manifest(_write(tmp_path, {"models": [], "priors": per_condition}))
    assert man.priors_given and man.priors.shape == (5, 5, 3)
    np.testing.assert_allclose(man.priors[3, 2], [0.8, 0.15, 0.05])
    out = save_manifest(man, tmp_path / "out.json")
    assert np.array(json.loads(out.read_text())["priors"]).shape == (5, 5, 3)


def test_default_priors_are_the_submission_defaults(tmp_path):
    from rsna_infer.submission import resolve_priors

    man = load_manifest(_write(tmp_path, {"models": []}))
    np.testing.assert_allclose(man.priors, resolve_priors(None))
    assert "priors" not in json.loads(save_manifest(man, tmp_path / "o.json").read_text())


def test_resolution_order_argument_env_demo(tmp_path, monkeypatch):
    a = _write(tmp_path, {"models": []})
    demo = tmp_path / "demo.json"
    monkeypatch.setattr(mf, "packaged_demo_manifest", lambda: demo)
    monkeypatch.delenv(mf.MANIFEST_ENV, raising=False)
    with pytest.raises(ManifestError, match=r"pass manifest=PATH \(CLI: --manifest PATH\) or set \$RSNA_INFER_MANIFEST"):
        resolve_manifest_path(None)
    demo.write_text("{}")
    assert resolve_manifest_path(None) == (demo.resolve(), True)
    monkeypatch.setenv(mf.MANIFEST_ENV, str(a))
    assert resolve_manifest_path(None) == (a.resolve(), False)
    assert resolve_manifest_path(demo) == (demo.resolve(), True)
    monkeypatch.setenv(mf.MANIFEST_ENV, str(tmp_path / "gone.json"))
    with pytest.raises(ManifestError, match="gone.json"):
        resolve_manifest_path(None)
    with pytest.raises(ManifestError, match="nothere.json"):
        resolve_manifest_path(tmp_path / "nothere.json")


def test_cli_add_summary_verify(tmp_path, monkeypatch, capsys):
    use_fake_families(monkeypatch)
    src = make_random_manifest(tmp_path / "src", fake_entries())
    srcman = load_manifest(src)
    target = tmp_path / "bundle" / "weights_manifest.json"
    for e in srcman.models:
        ej = tmp_path / f"{e.name}.json"
        d = e.to_dict()
        d.pop("file"), d.pop("sha256")
        ej.write_text(json.dumps(d))
        assert cli.main(["manifest", "add", str(target), "--entry", str(ej), "--weights", str(srcman.resolve(e))]) == 0
    man = load_manifest(target, verify=True)
    assert [m.name for m in man.models] == [m.name for m in srcman.models]
    assert all(m.file == f"weights/{m.name}.safetensors" for m in man.models)
    # adding the same name again needs --replace
    assert cli.main(["manifest", "add", str(target), "--entry", str(ej), "--weights", str(srcman.resolve(e))]) == 1
    assert "already exists" in capsys.readouterr().out
    assert cli.main(["manifest", "add", str(target), "--entry", str(ej), "--weights", str(srcman.resolve(e)), "--replace"]) == 0

    capsys.readouterr()
    assert cli.main(["manifest", "summary", str(target)]) == 0
    out = capsys.readouterr().out
    assert "grade_spinal" in out and "5 model(s): 3 stage-1, 2 stage-2" in out and "w_spin" in out

    assert cli.main(["manifest", "verify", str(target)]) == 0
    assert "5/5 model(s) verified" in capsys.readouterr().out
    w = target.parent / "weights" / "grade_all.safetensors"
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    assert cli.main(["manifest", "verify", str(target)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  grade_all: sha256 mismatch" in out and "4/5 model(s) verified" in out


def test_verify_catches_an_architecture_mismatch(tmp_path, monkeypatch, capsys):
    use_fake_families(monkeypatch)
    entries = fake_entries()[:1]
    path = make_random_manifest(tmp_path, entries)
    d = json.loads(path.read_text())
    d["models"][0]["input"]["size"] = [12, 12]  # the fake net's first layer depends on the size
    path.write_text(json.dumps(d))
    assert cli.main(["manifest", "verify", str(path)]) == 1
    assert "do not fit" in capsys.readouterr().out


def test_importing_the_manifest_module_does_not_import_torch():
    code = "import sys, rsna_infer.models.manifest, rsna_infer.models.ensemble, rsna_infer.runtime.deadline; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_top_level_manifest_is_a_valid_competition_template():
    """weights_manifest.json lists the full ensemble (real archs, every fold, no weights shipped);
    tests/test_train_recipes.py checks that it is exactly what configs/ generate."""
    from pathlib import Path

    import timm
    import timm_3d

    from rsna_infer.models.ensemble import member_weights
    from rsna_infer.models.registry import make_family

    path = Path(__file__).resolve().parents[1] / "weights_manifest.json"
    man = load_manifest(path, check_files=False)
    assert "TEMPLATE" in man.notes and len(man.stage1) == 7 * 5 and len(man.stage2) >= 10 * 5
    assert {m.family for m in man.models} == {"sag2d", "sag3d", "axial3d", "axial_level", "axial_xy", "fusion", "roi"}
    assert {m.arch for m in man.stage2} >= {"pvt_v2_b1", "pvt_v2_b2", "convnext_tiny", "convnext_small", "densenet161"}
    for m in man.models:
        make_family(m)  # variant, kwargs and input spec accepted by the real family
        assert (timm_3d if m.family in ("sag3d", "axial3d") else timm).is_model(m.arch), m.arch
        assert m.file == f"weights/{m.name}.safetensors"
    assert (member_weights(man.stage2).sum(0) > 0).all()  # every condition group has members
    with pytest.raises(ManifestError, match=r"weights file not found: .*weights/sag2d_t\d_convnext_tiny_f0"):
        load_manifest(path)


def test_export_is_byte_reproducible(tmp_path):
    """Identical weights, identical file: the sha256 in a manifest identifies the weights."""
    torch.manual_seed(0)
    model = Tiny()
    entry = ModelEntry.from_dict(_entry(file="-"))
    hashes = {export_model(model, entry, tmp_path / f"run{i}").sha256 for i in range(4)}
    assert len(hashes) == 1


def _prediction_manifest(tmp_path, **over):
    entries = [_entry(name="m0", blend={"spinal": 1.0, "foraminal": 1.0, "subarticular": 1.0}, **over)]
    return manifest_from_dict({"models": entries}, root=tmp_path)


@pytest.mark.parametrize("file, match", [
    ("/abs/weights/m0.safetensors", "is an absolute path"),
    ("../other/m0.safetensors", "lies outside the manifest's folder"),
    ("weights/../../m0.safetensors", "lies outside the manifest's folder"),
])
def test_prediction_needs_the_weights_inside_the_manifest_folder(tmp_path, file, match):
    man = _prediction_manifest(tmp_path, file=file)
    with pytest.raises(ManifestError, match=match):
        man.check_for_prediction()
    _prediction_manifest(tmp_path, file="weights/sub/../m0.safetensors").check_for_prediction()  # stays inside


def test_training_manifests_may_still_reference_weights_elsewhere(exported, tmp_path):
    _, path = exported
    out = save_manifest(load_manifest(path), tmp_path / "sub" / "merged.json")
    man = load_manifest(out, verify=True)  # '../../weights/m0.safetensors': loads for training tools
    with pytest.raises(ManifestError, match="outside the manifest's folder"):
        man.check_for_prediction()


def test_a_condition_group_without_any_blend_weight_is_refused(tmp_path):
    zero = manifest_from_dict({"models": [_entry(blend={"spinal": 1.0}), _entry(name="m1", blend={"foraminal": 0.0, "spinal": 2.0})]},
                              root=tmp_path)
    with pytest.raises(ManifestError, match=r"condition group\(s\) \['foraminal', 'subarticular'\] sum to zero"):
        zero.check_blend_groups()
    manifest_from_dict({"models": [_entry(blend={})]}, root=tmp_path).check_blend_groups()  # no blend: 1 everywhere
    manifest_from_dict({"models": []}, root=tmp_path).check_blend_groups()  # no stage 2: the predictor warns instead


def test_prior_groups_allow_a_group_fitted_to_the_priors_and_nothing_else(tmp_path):
    models = [_entry(blend={"spinal": 1.0, "foraminal": 0.0, "subarticular": 1.0})]
    man = manifest_from_dict({"prior_groups": ["foraminal"], "models": models}, root=tmp_path)
    man.check_blend_groups()  # foraminal's zero weights are meant
    assert man.prior_groups == ("foraminal",) and man.to_dict()["prior_groups"] == ["foraminal"]
    with pytest.raises(ManifestError, match=r"\['foraminal'\] are listed in 'prior_groups' but stage-2 members have a positive"):
        manifest_from_dict({"prior_groups": ["foraminal"], "models": [_entry(blend={})]}, root=tmp_path).check_blend_groups()
    with pytest.raises(ManifestError, match="'prior_groups' \\['spine'\\] are not condition groups"):
        manifest_from_dict({"prior_groups": ["spine"], "models": models}, root=tmp_path)
    with pytest.raises(ManifestError, match="'prior_groups' must be a list"):
        manifest_from_dict({"prior_groups": "foraminal", "models": models}, root=tmp_path)


def test_verify_fails_a_manifest_that_cannot_predict(tmp_path, monkeypatch, capsys):
    use_fake_families(monkeypatch)
    entries = fake_entries()
    entries[3]["blend"] = entries[4]["blend"] = {"spinal": 1.0}
    path = make_random_manifest(tmp_path, entries)
    assert cli.main(["manifest", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  manifest:" in out and "sum to zero" in out and "5/5 model(s) verified" in out


def test_hub_architecture_names_never_reach_timm(monkeypatch):
    import timm

    from rsna_infer.models.backbones import create_backbone

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm was asked for a hub model"))
    with pytest.raises(ValueError, match="names a model hub entry"):
        create_backbone("hf-hub:timm/convnext_tiny.fb_in1k")
