"""synth -> io -> stage 1 -> stage 2 on real phantom DICOM: do the areas agree in patient space?

Each area is unit-tested on hand-built volumes; here they meet. Phantom studies are written
by `rsna_infer.synth.make_dataset`, read back with `discover_studies` + `load_study`, and
every step is checked against the phantom's 3-D truth (`SynthDataset.truth`):

1. label coordinates (instance, x, y) -> patient space land on the 3-D keypoints;
2. stage-1 targets, fed back as model outputs, decode onto the truth (left stays left), and
   each prepared input shows the volume where its transform says;
3. stage-2 crops are centred on the truth and show the volume's pixels there; a study without
   Sagittal T1 grades everything but the foramina, with finite outputs;
4. `finalize`: the projection fallback lands near the truth subarticular points and the
   cross-view distances of the truth are small.

Errors are split along the volume's slice normal (bounded by the slice spacing: labels and
slices are discrete) and within the slice plane (exact up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from rsna_infer.constants import (
    AXIAL_T2,
    COORD_CONDITION_TO_CONDITION,
    COORD_LEVEL_TO_LEVEL,
    LEVELS,
    N_LEVELS,
    SAG_T1,
    SAG_T2,
)
from rsna_infer.geometry import sample
from rsna_infer.imaging import CANONICAL_AXES, orient, standardise, to_unit
from rsna_infer.io import Study, Volume, discover_studies, load_study
from rsna_infer.keypoints import KeypointSet, StudyKeypoints, truth_key
from rsna_infer.models.registry import make_family
from rsna_infer.specs import ModelEntry
from rsna_infer.stage1.assemble import LATERAL_OFFSET_MM, finalize, merge_decoded
from rsna_infer.stage1.axial_level import NONE_CLASS
from rsna_infer.stage1.sag2d import FORAMEN_OFFSET_MM
from rsna_infer.stage2.crops import CropInfo, view_of
from rsna_infer.stage2.layout import points_mask
from rsna_infer.synth import CONDITION_KIND, SynthDataset, make_dataset

IMAGE_SIZE = (64, 96)
#: The realism switches that change how a series is stored but not the anatomy.
MESSY = {
    "descending_instance_rate": 1.0,
    "multi_stack_rate": 1.0,
    "mixed_slice_size_rate": 1.0,
    "transfer_syntax": "mixed",
    "flipped_axes_rate": 1.0,
    "mixed_fov_rate": 1.0,
    "parallel_block_rate": 1.0,
    "missing_spacing_rate": 1.0,
    "no_meta_rate": 0.5,
    "enhanced_rate": 0.5,
}
SERIES_OF_KIND = {"spinal": SAG_T2, "foraminal": SAG_T1, "subarticular": AXIAL_T2}
PATIENT_LEFT = np.array([1.0, 0.0, 0.0])



@dataclass
class Phantom:
    ds: SynthDataset
    studies: dict[int, Study]

    def truth_world(self, study_id: int) -> dict[str, np.ndarray]:
        return self.ds.truth[study_id].keypoints


def _phantom(tmp_path_factory: pytest.TempPathFactory, name: str, seed: int, **options) -> Phantom:
    ds = make_dataset(tmp_path_factory.mktemp(name), 3, split="train", seed=seed, image_size=IMAGE_SIZE, **options)
    studies = {ref.study_id: load_study(ref, workers=1) for ref in discover_studies(ds.root, split="train")}
    return Phantom(ds, studies)


@pytest.fixture(scope="module", params=["plain", "messy"])
def phantom(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Phantom:
    return _phantom(tmp_path_factory, request.param, seed=0, **(MESSY if request.param == "messy" else {}))


@pytest.fixture(scope="module")
def incomplete(tmp_path_factory: pytest.TempPathFactory) -> Phantom:
    """Studies that each lack one series type (seed 1: one without Axial T2, two without Sagittal T1)."""
    return _phantom(tmp_path_factory, "incomplete", seed=1, missing_series_rate=1.0)


# -- helpers -------------------------------------------------------------------------------------
def entry(
    family: str, variant: str = "default", arch: str = "test_resnet", size=(64, 64), extra=None, **inp
) -> ModelEntry:
    return ModelEntry.from_dict(
        {
            "name": f"{family}_{variant}",
            "family": family,
            "variant": variant,
            "arch": arch,
            "file": "-",
            "input": {"size": list(size), "extra": dict(extra or {}), **inp},
        }
    )


def truth_keypoints(study: Study, world: dict[str, np.ndarray], series_of_kind=SERIES_OF_KIND) -> StudyKeypoints:
    """Training truth sets from the 3-D truth: each point in the first stack of its kind's
    series type that contains it (missing where none does)."""
    kp = StudyKeypoints(study.study_id)
    for kind, series_type in series_of_kind.items():
        kp.sets[truth_key(kind)] = world_set(kind, world[kind], study.get(series_type), truth_key(kind))
    return kp


def world_set(kind: str, world: np.ndarray, volumes: list[Volume], source: str) -> KeypointSet:
    s = KeypointSet.empty(kind, source)
    w, vox, sid, stk, conf = (np.array(a) for a in (s.world, s.voxel, s.series_id, s.stack_index, s.confidence))
    for i, p in enumerate(world):
        vol = next((v for v in volumes if bool(v.contains(p))), None)
        if vol is not None:
            w[i], vox[i], sid[i], stk[i], conf[i] = (p, vol.to_voxel(p), vol.series_id, vol.stack_index, 1.0)
    return KeypointSet(kind, w, vox, sid, stk, conf, source)


def split_error(a: np.ndarray, b: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|a - b| along ``normal`` and within the plane orthogonal to it (mm)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    along = d @ normal
    return np.abs(along), np.linalg.norm(d - along[..., None] * normal, axis=-1)


def find_instance(study: Study, series_id: int, instance_number: int) -> tuple[Volume, int]:
    for vols in study.volumes.values():
        for v in vols:
            hit = np.flatnonzero(v.instance_numbers == instance_number) if v.series_id == series_id else []
            if len(hit):
                return v, int(hit[0])
    raise AssertionError(f"instance {instance_number} of series {series_id} is in no decoded stack")


def grid_sample_at(image: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Bilinear/trilinear value of ``image`` ([H, W] or [D, H, W]) at normalised model
    coordinates ``u`` ([N, 2] or [N, 3], (z,) y, x in [0, 1]; pixel centres at (i + 0.5) / n)."""
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    grid = torch.from_numpy((2.0 * u[:, ::-1] - 1.0).astype(np.float32))
    grid = grid.view(1, 1, -1, u.shape[1]) if u.shape[1] == 2 else grid.view(1, 1, 1, -1, 3)
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False).reshape(-1).numpy()


def normalised_truth_pixels(volume: Volume, xyz: np.ndarray, norm) -> np.ndarray:
    """The volume's intensity at patient points, normalised as the models see it."""
    return standardise(to_unit(sample(volume, xyz), norm.bounds(volume)), norm)


def crop_pixel_world(info: CropInfo, volume: Volume, out_hw: tuple[int, int], k: int) -> np.ndarray:
    """Patient position [H, W, 3] of every pixel of output slice ``k`` of a crop."""
    y0, x0, n_rows, n_cols = info.box
    r, c = np.meshgrid(np.arange(out_hw[0]), np.arange(out_hw[1]), indexing="ij")
    kz = info.orientation.to_canonical(np.array([info.slices[k], 0.0, 0.0]))[0]
    canon = np.stack([np.full(r.shape, kz, float), y0 + (r + 0.5) * n_rows / out_hw[0] - 0.5,
                      x0 + (c + 0.5) * n_cols / out_hw[1] - 0.5], axis=-1)  # fmt: skip
    return volume.to_world(info.orientation.to_source(canon))


def crop_centre_world(info: CropInfo, volume: Volume, out_hw: tuple[int, int]) -> np.ndarray:
    """Patient position of ``CropInfo.center`` (the requested point in crop coordinates)."""
    y0, x0, n_rows, n_cols = info.box
    cz, cy, cx = info.center
    k0 = info.orientation.to_canonical(np.array([info.slices[0], 0.0, 0.0]))[0]
    canon = np.array([k0 + cz, y0 + (cy + 0.5) * n_rows / out_hw[0] - 0.5, x0 + (cx + 0.5) * n_cols / out_hw[1] - 0.5])
    return volume.to_world(info.orientation.to_source(canon))


# -- 1. label coordinates ------------------------------------------------------------------------
def test_label_coordinates_map_onto_the_3d_truth(phantom: Phantom):
    coords = pd.read_csv(phantom.ds.root / "train_label_coordinates.csv")
    assert len(coords) == 25 * len(phantom.studies)
    resampled_rows = 0
    worst: dict[str, list[float]] = {k: [0.0, 0.0] for k in SERIES_OF_KIND}
    for row in coords.itertuples(index=False):
        study = phantom.studies[int(row.study_id)]
        cond = COORD_CONDITION_TO_CONDITION[row.condition]
        kind, level = CONDITION_KIND[cond], LEVELS.index(COORD_LEVEL_TO_LEVEL[row.level])
        i = level if kind == "spinal" else (1 if cond.startswith("right") else 0) * N_LEVELS + level
        vol, z = find_instance(study, int(row.series_id), int(row.instance_number))
        assert vol.series_type == SERIES_OF_KIND[kind]
        if vol.native_spacing is not None and not np.allclose(vol.native_spacing[z], vol.spacing):
            resampled_rows += 1
        world = vol.to_world(vol.pixel_to_voxel(z, row.x, row.y))
        along, inplane = split_error(world, phantom.truth_world(study.study_id)[kind][i], vol.normal)
        # the label sits on the slice nearest the 3-D point, exactly over it
        assert along <= 0.5 * vol.slice_spacing + 0.05, (row, along, vol.slice_spacing)
        assert inplane <= 0.1, (row, inplane)
        worst[kind] = [max(worst[kind][0], float(along)), max(worst[kind][1], float(inplane))]
    if phantom.ds.options.mixed_slice_size_rate == 1.0:
        assert resampled_rows > 0, "no label on a resampled slice: the mixed-size case was not exercised"
    print(f"label -> world error (along normal, in plane) mm: {worst}; labels on resampled slices: {resampled_rows}")


def test_canonical_axes_point_the_documented_patient_directions(phantom: Phantom):
    """Whatever the scanner's IOP (the messy phantom mirrors and swaps in-plane axes), the
    arrays every model and crop sees run toward the patient directions `CANONICAL_AXES` names
    (sagittal: left, inferior, posterior; axial: inferior, posterior, left)."""
    for study in phantom.studies.values():
        for vol in (v for vols in study.volumes.values() for v in vols):
            view = view_of(vol)
            assert view == ("axial" if vol.series_type == AXIAL_T2 else "sagittal")
            o = orient(vol, view)
            c0 = np.array([1.0, 2.0, 3.0])
            for axis, want in enumerate(CANONICAL_AXES[view]):
                step = vol.to_world(o.to_source(c0 + np.eye(3)[axis])) - vol.to_world(o.to_source(c0))
                assert step @ np.asarray(want) / np.linalg.norm(step) > 0.85, (vol, axis)


# -- 2. stage 1 ----------------------------------------------------------------------------------
POINT_ENTRIES = {
    "sag2d_t2": {"family": "sag2d", "variant": "t2", "n_slices": 10, "in_chans": 3},
    "sag2d_t1": {"family": "sag2d", "variant": "t1", "n_slices": 10, "in_chans": 3},
    "sag3d_t2": {"family": "sag3d", "variant": "t2", "arch": "mobilenetv2_035", "size": (16, 64, 64)},
    "sag3d_t1": {"family": "sag3d", "variant": "t1", "arch": "mobilenetv2_035", "size": (16, 64, 64)},
    "axial3d": {"family": "axial3d", "arch": "mobilenetv2_035", "size": (32, 64, 64)},
}


@pytest.mark.parametrize("key", list(POINT_ENTRIES))
def test_stage1_targets_decode_onto_the_truth(phantom: Phantom, key: str):
    fam = make_family(entry(**POINT_ENTRIES[key]))
    worst_along, worst_inplane, n_points = 0.0, 0.0, 0
    for sid, study in phantom.studies.items():
        world = phantom.truth_world(sid)
        truth = truth_keypoints(study, world)
        samples = fam.prepare(study)
        assert samples, f"{key}: nothing prepared for study {sid}"
        decoded = []
        for s in samples:
            t = fam.targets(s, study, truth)
            out = np.concatenate([t["coords"], t["vis"][:, None]], axis=1)  # the perfect model
            got = fam.decode(out, s, study)
            decoded.append(got)
            vol = fam.find_volume(s, study)
            inside = t["coord_mask"] > 0
            if key == "sag2d_t1":  # one (x, y) per level, copied to both sides
                inside = np.concatenate([inside, inside])
            assert np.all(got.valid[inside])
            along, inplane = split_error(got.world, world[fam.kind], vol.normal)
            if fam.name == "sag2d":
                # xy regressed on the centre slice: exact in plane; z is the centre slice
                # (t2) or the centre slice moved FORAMEN_OFFSET_MM to each side (t1)
                assert np.all(inplane[inside] <= (1.5 if fam.kind == "foraminal" else 0.1)), inplane
                centre_plane = (
                    vol.to_world(s.meta["transform"].to_voxel(np.array([s.meta["u_fill"][0], 0.5, 0.5]))) @ vol.normal
                )
                if fam.kind == "spinal":
                    np.testing.assert_allclose(got.world[inside] @ vol.normal, centre_plane, atol=1e-6)
                else:
                    shift = (got.world[inside] @ vol.normal - centre_plane) * np.sign(PATIENT_LEFT @ vol.normal)
                    sides = np.where(np.arange(10)[inside] < N_LEVELS, 1.0, -1.0)
                    clipped = (got.voxel[inside, 0] <= 0) | (got.voxel[inside, 0] >= vol.shape[0] - 1)
                    expected = FORAMEN_OFFSET_MM * abs(PATIENT_LEFT @ vol.normal)
                    np.testing.assert_allclose((shift * sides)[~clipped], expected, atol=1e-6)
                    assert np.all(along[inside] <= 2.0 * vol.slice_spacing + 3.0), along
            else:
                assert np.all(along[inside] <= 0.5) and np.all(inplane[inside] <= 0.5), (along, inplane)
            worst_along = max(worst_along, float(along[inside].max(initial=0)))
            worst_inplane = max(worst_inplane, float(inplane[inside].max(initial=0)))
            n_points += int(inside.sum())
        merged = fam.merge_sets(decoded)
        if fam.kind != "spinal":  # left stays left: larger patient x, nearer the left truth
            both = merged.valid[:N_LEVELS] & merged.valid[N_LEVELS:]
            assert both.any()
            left, right = merged.world[:N_LEVELS][both], merged.world[N_LEVELS:][both]
            assert np.all(left[:, 0] > right[:, 0])
            tl, tr = world[fam.kind][:N_LEVELS][both], world[fam.kind][N_LEVELS:][both]
            assert np.all(np.linalg.norm(left - tl, axis=1) < np.linalg.norm(left - tr, axis=1))
            assert np.all(np.linalg.norm(right - tr, axis=1) < np.linalg.norm(right - tl, axis=1))
    assert n_points >= 5 * len(phantom.studies)
    print(f"{key}: {n_points} points, worst error along normal {worst_along:.2f} mm, in plane {worst_inplane:.2f} mm")


def test_axial_level_then_xy_decode_onto_the_truth(phantom: Phantom):
    level = make_family(entry("axial_level", size=(48, 48), n_slices=3, in_chans=3))
    xy = make_family(entry("axial_xy", size=(64, 64), n_slices=3, in_chans=3))
    for sid, study in phantom.studies.items():
        world = phantom.truth_world(sid)["subarticular"]
        truth = truth_keypoints(study, phantom.truth_world(sid))
        samples = level.prepare(study)
        sets = []
        for s in samples:
            cls = level.targets(s, study, truth)["cls"]
            probs = np.zeros((len(cls), 2, NONE_CLASS + 1))
            for side in range(2):  # the perfect classifier ("none" where the target is ignored)
                probs[np.arange(len(cls)), side, np.where(cls[:, side] >= 0, cls[:, side], NONE_CLASS)] = 1.0
            sets.append(level.decode(probs, s, study))
        kp = merge_decoded(level, sets, StudyKeypoints(sid))
        levels = kp.get("axial_level")
        assert levels.valid.all() and np.all(levels.confidence == 1.0)
        xy_samples = xy.prepare(study, kp)
        refined = [xy.decode(xy.targets(s, study, truth)["coords"], s, study) for s in xy_samples]
        final = merge_decoded(xy, refined, kp).get("axial_level")
        for k in range(2 * N_LEVELS):
            vol = study.find(int(final.series_id[k]), int(final.stack_index[k]))
            along, inplane = split_error(final.world[k], world[k], vol.normal)
            assert along <= 0.5 * vol.slice_spacing + 0.05 and inplane <= 0.5, (k, along, inplane)
        assert np.all(final.world[:N_LEVELS, 0] > final.world[N_LEVELS:, 0])  # left stays left


STAGE1_INPUTS = {
    "sag2d_t1": entry(
        "sag2d", "t1", n_slices=10, in_chans=3, extra={"aug": {"ap_flip": 1.0, "scale": 0.2, "intensity": 0.0}}
    ),
    "sag3d_t1": entry(
        "sag3d",
        "t1",
        "mobilenetv2_035",
        (16, 64, 64),
        extra={"aug": {"ap_flip": 1.0, "lr_flip": 1.0, "scale": 0.2, "intensity": 0.0}},
    ),
    "axial3d": entry(
        "axial3d", "default", "mobilenetv2_035", (32, 64, 64), extra={"aug": {"lr_flip": 1.0, "intensity": 0.0}}
    ),
    "axial_level": entry(
        "axial_level", size=(48, 48), n_slices=3, in_chans=3, extra={"aug": {"lr_flip": 1.0, "intensity": 0.0}}
    ),
}


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("key", list(STAGE1_INPUTS))
def test_stage1_inputs_show_the_volume_where_the_transform_says(phantom: Phantom, key: str, augment: bool):
    """The prepared image at a point's normalised coordinate equals the volume at that point
    (orientation, resize, augmentation and the recorded transform agree)."""
    fam = make_family(STAGE1_INPUTS[key])
    rng = np.random.default_rng(7)
    for study in phantom.studies.values():
        for s in fam.prepare(study, rng=np.random.default_rng(1) if augment else None):
            vol, tr, img = (fam.find_volume(s, study), s.meta["transform"], s.inputs["image"])
            assert not augment or key == "sag2d_t1" or tr.lr_swapped  # the L/R mirror really happened
            n = 1500
            pts = rng.uniform(0, 1, (n, 3)) * (np.array(vol.shape) - 1)
            if fam.name == "sag2d":  # the centre channel is the centre slice
                pts[:, 0] = tr.to_voxel(np.array([s.meta["u_fill"][0], 0.5, 0.5]))[0]
            elif fam.name == "axial_level":  # every slice is an input slice
                pts[:, 0] = np.rint(pts[:, 0])
            u = tr.to_norm(pts)
            inplane_ok = np.all((u[:, 1:] > 0.03) & (u[:, 1:] < 0.97), axis=1)
            if fam.name == "sag2d":
                got = grid_sample_at(img[fam.spec.in_chans // 2], u[:, 1:])
            elif fam.name == "axial_level":  # [S, H, W]: sampled on each point's own slice
                got = grid_sample_at(img, u)
            else:
                got = grid_sample_at(img[0], u)
                inplane_ok &= (u[:, 0] > 0.03) & (u[:, 0] < 0.97)
            want = normalised_truth_pixels(vol, vol.to_world(pts), fam.spec.norm)
            corr = np.corrcoef(got[inplane_ok], want[inplane_ok])[0, 1]
            assert inplane_ok.sum() > n // 3 and corr > 0.93, (key, study.study_id, corr)


# -- 3. stage 2 ----------------------------------------------------------------------------------
def stage2_families():
    fusion = make_family(entry("fusion", size=(32, 32), n_slices=3, in_chans=3))
    rois = [
        make_family(entry("roi", v, size=(32, 32), n_slices=3, in_chans=3))
        for v in ("spinal", "foraminal", "subarticular")
    ]
    return fusion, rois


def expected_crop_points(fam, world: dict[str, np.ndarray]) -> dict[str, list]:
    """Where each crop of ``fam`` should be centred (patient mm), in `Sample.meta['crops']` layout."""
    if fam.name == "roi":
        out = {"crops": list(world[fam.kind])}
        if fam.companion:
            out["sag"] = list(world[fam.kind])
        return out
    sub = world["subarticular"]
    sag = [list(world["spinal"]), list(world["foraminal"][:N_LEVELS]), list(world["foraminal"][N_LEVELS:]),
           list(sub[:N_LEVELS]), list(sub[N_LEVELS:])]  # fmt: skip
    return {"sag": sag, "axial": list(0.5 * (sub[:N_LEVELS] + sub[N_LEVELS:]))}


def test_stage2_crops_are_centred_on_the_truth_and_show_it(phantom: Phantom):
    fusion, rois = stage2_families()
    brightness: dict[str, list[float]] = {"spinal": [], "foraminal": [], "subarticular": []}
    worst = 0.0
    for sid, study in phantom.studies.items():
        world = phantom.truth_world(sid)
        truth = truth_keypoints(study, world)
        for fam in (fusion, *rois):
            (s,) = fam.prepare(study, truth)
            expected_mask = (
                np.ones((5, 5), bool)
                if fam.name == "fusion"
                else points_mask(fam.kind, np.ones(len(world[fam.kind]), bool))
            )
            np.testing.assert_array_equal(s.mask, expected_mask)
            for key, want in expected_crop_points(fam, world).items():
                infos = s.meta["crops"][key]
                flat_infos = [x for row in infos for x in row] if key == "sag" and fam.name == "fusion" else infos
                flat_want = [x for row in want for x in row] if key == "sag" and fam.name == "fusion" else want
                crops = s.inputs[key].reshape(-1, *s.inputs[key].shape[-3:])
                assert len(flat_infos) == len(flat_want) == len(crops)
                for info, point, crop in zip(flat_infos, flat_want, crops):
                    assert info is not None, (fam.entry.name, key)
                    vol = study.find(info.series_id, info.stack_index)
                    centre = crop_centre_world(info, vol, crop.shape[1:])
                    err = float(np.linalg.norm(centre - point))
                    assert err <= 0.5, (fam.entry.name, key, err)
                    worst = max(worst, err)
                    assert crop.std() > 0.1  # not empty, not constant
                    for k in range(crop.shape[0]):  # the crop shows the volume's pixels there
                        want_px = normalised_truth_pixels(
                            vol, crop_pixel_world(info, vol, crop.shape[1:], k), fam.spec.norm
                        )
                        assert np.abs(crop[k] - want_px).mean() < 0.1, (fam.entry.name, key, k)
                    if fam.name == "roi" and key == "crops":
                        k, r, c = (round(v) for v in info.center)
                        brightness[fam.kind].append(float(crop[k, r, c] - np.median(crop[k])))
    # canal CSF (T2/STIR), foraminal fat (T1) and recess CSF (axial T2) are brighter than their surroundings
    assert all(np.mean(v) > 0.3 for v in brightness.values()), {k: np.round(v, 2) for k, v in brightness.items()}
    print(
        f"stage-2 crop centre error <= {worst:.3f} mm; centre minus crop median: "
        f"{ {k: round(float(np.mean(v)), 2) for k, v in brightness.items()} }"
    )


def test_study_without_sagittal_t1_grades_all_but_the_foramina(incomplete: Phantom):
    sids = [sid for sid, t in incomplete.ds.truth.items() if t.missing_series_type == SAG_T1]
    assert sids, "the incomplete phantom has no study without Sagittal T1"
    study = incomplete.studies[sids[0]]
    assert not study.get(SAG_T1) and study.get(SAG_T2) and study.get(AXIAL_T2)
    # foraminal truth placed in the T2 stack: it exists, but there is no T1 to crop it from
    truth = truth_keypoints(study, incomplete.truth_world(sids[0]), {**SERIES_OF_KIND, "foraminal": SAG_T2})
    assert truth.get(truth_key("foraminal")).valid.any()
    fusion, (roi_spinal, roi_foraminal, roi_sub) = stage2_families()
    assert roi_foraminal.prepare(study, truth) == []
    torch.manual_seed(0)
    for fam in (fusion, roi_spinal, roi_sub):
        samples = fam.prepare(study, truth)
        assert len(samples) == 1
        mask = samples[0].mask
        assert not mask[1:3].any()  # left/right neural foraminal narrowing
        assert mask[0].all() == (fam.name == "fusion" or fam.kind == "spinal")
        assert mask[3:].all() == (fam.name == "fusion" or fam.kind == "subarticular")
        with torch.inference_mode():
            logits = fam.run(fam.build().eval(), fam.collate(samples), tta=True)
        assert logits.shape == (1, 5, 5, 3) and torch.isfinite(logits).all()
    for fam in (
        make_family(entry("sag2d", "t1", n_slices=10, in_chans=3)),
        make_family(entry("sag3d", "t1", "mobilenetv2_035", (16, 64, 64))),
    ):
        assert fam.prepare(study) == []


# -- 4. cross-view check and projection fallback -------------------------------------------------
def check_projection(study: Study, world: dict[str, np.ndarray], proj: KeypointSet) -> np.ndarray:
    """Projected subarticular points: on their side, LATERAL_OFFSET_MM from the canal (in the
    axial slice plane), within half that of the truth (plus half a slice where the fallback
    snaps the shift onto a sagittal slice). Returns the errors (mm)."""
    assert proj.valid.all()
    canal = np.concatenate([world["spinal"], world["spinal"]])
    err = np.linalg.norm(proj.world - world["subarticular"], axis=1)
    snap = [
        0.0 if v.series_type == AXIAL_T2 else 0.5 * v.slice_spacing
        for v in (study.find(int(s), int(k)) for s, k in zip(proj.series_id, proj.stack_index))
    ]
    assert np.all(err <= 0.5 * LATERAL_OFFSET_MM + np.array(snap)), err
    other = np.concatenate([world["subarticular"][N_LEVELS:], world["subarticular"][:N_LEVELS]])
    assert np.all(err < np.linalg.norm(proj.world - other, axis=1))
    assert np.all(proj.world[:N_LEVELS, 0] > proj.world[N_LEVELS:, 0])  # left stays left
    for k in range(2 * N_LEVELS):
        vol = study.find(int(proj.series_id[k]), int(proj.stack_index[k]))
        _, lateral = split_error(proj.world[k], canal[k], vol.normal)
        if vol.series_type == AXIAL_T2:  # shifted within the slice plane
            assert abs(lateral - LATERAL_OFFSET_MM) <= 0.5, lateral
    return err


def test_finalize_projection_and_cross_view_on_the_truth(phantom: Phantom):
    errors = []
    for sid, study in phantom.studies.items():
        world = phantom.truth_world(sid)
        kp = StudyKeypoints(
            sid,
            {
                "sag3d_t2": world_set("spinal", world["spinal"], study.get(SAG_T2), "sag3d_t2"),
                "axial_level": world_set("subarticular", world["subarticular"], study.get(AXIAL_T2), "axial_level"),
            },
        )
        out = finalize(study, kp)
        report = out.report["cross_view"]
        assert report["projection_points"] == 10 and report["projection_points_sagittal"] == 0
        assert "replaced" not in report
        cross = report["axial_level"]
        assert cross["n"] == 10 and cross["median_mm"] <= 1.0 and cross["max_mm"] <= 2.0, cross
        errors.append(check_projection(study, world, out.get("projection")))
        best = out.best("subarticular", prefer=("axial_level", "axial3d", "projection"))
        np.testing.assert_allclose(best.world, world["subarticular"])
    errors = np.concatenate(errors)
    print(f"projection fallback error: median {np.median(errors):.1f} mm, max {errors.max():.1f} mm")


def test_finalize_without_axial_series_projects_within_the_sagittal_stack(incomplete: Phantom):
    sids = [sid for sid, t in incomplete.ds.truth.items() if t.missing_series_type == AXIAL_T2]
    assert sids
    study, world = incomplete.studies[sids[0]], incomplete.truth_world(sids[0])
    kp = StudyKeypoints(sids[0], {"sag3d_t2": world_set("spinal", world["spinal"], study.get(SAG_T2), "sag3d_t2")})
    out = finalize(study, kp)
    assert out.report["cross_view"]["projection_points_sagittal"] == 10
    assert out.report["cross_view"]["axial_source"] == "projection"
    err = check_projection(study, world, out.get("projection"))
    print(f"sagittal projection fallback error: median {np.median(err):.1f} mm, max {err.max():.1f} mm")
