"""Hand-built volumes with known geometry for the stage-1 and imaging tests (no DICOM).

World layout (LPS, mm): the canal runs along z at x = 0, y = 10; the five disc levels sit at
z = 60, 40, 20, 0, -20 (L1/L2 .. L5/S1). Sagittal stacks are centred on x = 0; axial stacks
are 160 mm squares around the canal.
"""

from __future__ import annotations

import numpy as np

from rsna_infer.constants import AXIAL_T2, SAG_T1, SAG_T2
from rsna_infer.io.volume import Study, Volume
from rsna_infer.keypoints import KeypointSet, StudyKeypoints, truth_key
from rsna_infer.specs import ModelEntry

LEVEL_Z = np.array([60.0, 40.0, 20.0, 0.0, -20.0])
CANAL_XY = (0.0, 10.0)
SUBART_OFFSET = 11.0  # truth subarticular points: canal +- this along patient x


def make_volume(
    shape: tuple[int, int, int],
    row_dir,
    col_dir,
    origin,
    spacing: tuple[float, float] = (2.5, 2.5),
    slice_spacing: float = 4.0,
    description: str = SAG_T2,
    series_id: int = 10,
    stack_index: int = 0,
    pixels: np.ndarray | None = None,
) -> Volume:
    row, col = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row, col)
    pos = np.asarray(origin, float) + np.arange(shape[0])[:, None] * slice_spacing * normal
    if pixels is None:
        pixels = np.random.default_rng(series_id).random(shape).astype(np.float32) * 100
    return Volume(pixels, pos, row, col, spacing, np.arange(shape[0]) + 1, 1, series_id, description, stack_index)


def mirror_volume(vol: Volume) -> Volume:
    """``vol`` mirrored left/right in patient coordinates (x -> -x of positions and in-plane
    directions; same pixels), its slices re-sorted along the new normal as a reader would."""
    m = np.array([-1.0, 1.0, 1.0])
    pos, row, col = vol.positions * m, vol.row_dir * m, vol.col_dir * m
    pixels, inst = vol.pixels, vol.instance_numbers
    if (pos @ np.cross(row, col))[-1] < (pos @ np.cross(row, col))[0]:
        pos, pixels, inst = pos[::-1].copy(), pixels[::-1].copy(), inst[::-1].copy()
    return Volume(pixels, pos, row, col, vol.spacing, inst, vol.study_id, vol.series_id, vol.description, vol.stack_index)


def sagittal(
    shape=(15, 64, 64), series_id=10, description=SAG_T2, toward_left: bool = False, pixels=None, stack_index=0,
    slice_spacing: float = 4.0,
) -> Volume:
    """A sagittal stack centred on x = 0. Columns run posterior (+y) from y = -80; rows run
    inferior from z = +100. ``toward_left`` picks the slice order: ascending n.IPP toward
    patient left (columns then run anterior) instead of the usual toward right."""
    half = (shape[0] - 1) * slice_spacing / 2
    if toward_left:  # row_dir -y, col_dir -z -> normal +x
        return make_volume(shape, (0, -1, 0), (0, 0, -1), (-half, 77.5, 100.0), description=description,
                           series_id=series_id, pixels=pixels, stack_index=stack_index, slice_spacing=slice_spacing)
    return make_volume(shape, (0, 1, 0), (0, 0, -1), (half, -80.0, 100.0), description=description,
                       series_id=series_id, pixels=pixels, stack_index=stack_index, slice_spacing=slice_spacing)


def axial(shape=(26, 64, 64), z0: float = -30.0, series_id=20, pixels=None, stack_index=0, flipped_lr=False) -> Volume:
    """An axial stack from z = ``z0`` upward, 4 mm apart; columns toward patient left (or
    right with ``flipped_lr``), rows posterior."""
    if flipped_lr:
        return make_volume(shape, (-1, 0, 0), (0, 1, 0), (77.5, -70.0, z0 + (shape[0] - 1) * 4.0), description=AXIAL_T2,
                           series_id=series_id, pixels=pixels, stack_index=stack_index)
    return make_volume(shape, (1, 0, 0), (0, 1, 0), (-80.0, -70.0, z0), description=AXIAL_T2,
                       series_id=series_id, pixels=pixels, stack_index=stack_index)


def study_of(*volumes: Volume, study_id: int = 1) -> Study:
    by_type: dict[str, list[Volume]] = {}
    for v in volumes:
        by_type.setdefault(v.description, []).append(v)
    return Study(study_id, by_type)


def world_set(kind: str, world: np.ndarray, vol: Volume, valid=None, source: str = "") -> KeypointSet:
    """A set of ``kind`` with the given world points placed in ``vol``."""
    world = np.asarray(world, float)
    n = len(world)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    return KeypointSet(
        kind,
        np.where(valid[:, None], world, np.nan),
        np.where(valid[:, None], vol.to_voxel(world), np.nan),
        np.where(valid, vol.series_id, -1),
        np.full(n, vol.stack_index),
        valid.astype(float),
        source or truth_key(kind),
    )


def spinal_world(dx: float = 0.0) -> np.ndarray:
    return np.stack([np.full(5, CANAL_XY[0] + dx), np.full(5, CANAL_XY[1]), LEVEL_Z], axis=1)


def foraminal_world(offset: float = 16.0) -> np.ndarray:
    """Left 5 then right 5, ``offset`` mm from the midline, slightly anterior of the canal."""
    left = np.stack([np.full(5, offset), np.full(5, 0.0), LEVEL_Z], axis=1)
    right = left * np.array([-1.0, 1.0, 1.0])
    return np.concatenate([left, right])


def subarticular_world(offset: float = SUBART_OFFSET) -> np.ndarray:
    left = np.stack([np.full(5, offset), np.full(5, CANAL_XY[1] - 3.0), LEVEL_Z], axis=1)
    right = left * np.array([-1.0, 1.0, 1.0])
    return np.concatenate([left, right])


def truth_for(study: Study) -> StudyKeypoints:
    """Ground-truth sets of the phantom anatomy, each placed in its series type's first stack."""
    kp = StudyKeypoints(study.study_id)
    for kind, series_type, world in (("spinal", SAG_T2, spinal_world()), ("foraminal", SAG_T1, foraminal_world()),
                                     ("subarticular", AXIAL_T2, subarticular_world())):
        vol = study.first(series_type)
        if vol is not None:
            kp.sets[truth_key(kind)] = world_set(kind, world, vol)
    return kp


def entry(family: str, variant: str = "default", arch: str = "test_resnet", size=(64, 64), model_kwargs=None,
          fold: int = 0, **input_kw) -> ModelEntry:
    return ModelEntry.from_dict({
        "name": f"{family}_{variant}_{arch}_f{fold}", "family": family, "variant": variant, "arch": arch,
        "input": {"size": list(size), **input_kw}, "file": "unused.safetensors", "fold": fold,
        "model_kwargs": dict(model_kwargs or {}),
    })


def blob_volume(vol: Volume, world_points: np.ndarray, sigma_mm: float = 4.0, background: float = 10.0) -> Volume:
    """``vol`` with its pixels replaced by Gaussian blobs at ``world_points`` (same geometry)."""
    z, h, w = vol.shape
    zz, yy, xx = np.meshgrid(np.arange(z), np.arange(h), np.arange(w), indexing="ij")
    world = vol.to_world(np.stack([zz, yy, xx], -1).astype(float))
    pix = np.full(vol.shape, background, np.float32)
    for p in np.asarray(world_points, float):
        d2 = ((world - p) ** 2).sum(-1)
        pix += (1000.0 * np.exp(-d2 / (2 * sigma_mm**2))).astype(np.float32)
    return Volume(pix, vol.positions, vol.row_dir, vol.col_dir, vol.spacing, vol.instance_numbers,
                  vol.study_id, vol.series_id, vol.description, vol.stack_index)
