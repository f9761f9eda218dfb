import numpy as np
import pytest

from rsna_infer.specs import InputSpec, ModelEntry, NormSpec, SpecError


def _entry(**over):
    d = {
        "name": "m", "family": "roi", "variant": "spinal", "arch": "test_resnet",
        "input": {"size": [32, 32], "n_slices": 3}, "file": "w/m.safetensors",
        "blend": {"spinal": 1.0},
    }
    d.update(over)
    return d


def test_norm_clips_scales_and_standardises():
    norm = NormSpec(lo_pct=0, hi_pct=100, mean=0.5, std=0.5)
    out = norm.apply(np.array([0.0, 50.0, 100.0]))
    np.testing.assert_allclose(out, [-1.0, 0.0, 1.0])
    assert out.dtype == np.float32


def test_norm_bounds_ignore_outliers():
    arr = np.concatenate([np.linspace(0, 100, 1000), [1e6]])
    lo, hi = NormSpec(lo_pct=1, hi_pct=99).bounds(arr)
    assert 0 <= lo < 2 and 97 < hi < 101


def test_norm_constant_image_is_finite():
    out = NormSpec().apply(np.full((4, 4), 7.0))
    assert np.isfinite(out).all()


@pytest.mark.parametrize("bad", [{"lo_pct": 50, "hi_pct": 10}, {"std": 0}])
def test_norm_rejects_bad_values(bad):
    with pytest.raises(SpecError):
        NormSpec(**bad)


def test_input_spec_round_trip():
    spec = InputSpec.from_dict({"size": [16, 64, 64], "n_slices": 5, "crop_mm": 40, "norm": {"lo_pct": 2}})
    assert spec.size == (16, 64, 64) and spec.norm.lo_pct == 2
    assert InputSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "bad, field",
    [({"size": [0, 4]}, "size"), ({"size": [4]}, "size"), ({}, "size"), ({"size": [4, 4], "n_slices": 0}, "n_slices"),
     ({"size": [4, 4], "colour": 1}, "colour"), ({"size": [4, 4], "norm": {"pct": 1}}, "norm")],
)
def test_input_spec_errors_name_the_field(bad, field):
    with pytest.raises(SpecError, match=field):
        InputSpec.from_dict(bad)


def test_model_entry_round_trip_and_stage():
    e = ModelEntry.from_dict(_entry())
    assert e.stage == 2
    assert ModelEntry.from_dict(e.to_dict()).to_dict() == e.to_dict()
    assert ModelEntry.from_dict(_entry(family="sag3d", variant="t2", blend={})).stage == 1


@pytest.mark.parametrize(
    "over, msg",
    [({"family": "nope"}, "unknown family"), ({"blend": {"lumbar": 1}}, "blend group"),
     ({"blend": {"spinal": -1}}, "blend weight"), ({"extra_field": 1}, "unknown field"),
     ({"stage": 1}, "stage"), ({"input": {"size": [-1, 2]}}, "input.size")],
)
def test_model_entry_errors(over, msg):
    with pytest.raises(SpecError, match=msg):
        ModelEntry.from_dict(_entry(**over))


def test_model_entry_missing_fields_are_listed():
    d = _entry()
    del d["arch"], d["file"]
    with pytest.raises(SpecError, match=r"\['arch', 'file'\]"):
        ModelEntry.from_dict(d)
