"""Build a phantom competition root: DICOM files, CSVs and the 3-D truth.

Study ``k`` of a (seed, split) is generated from its own random streams, so it is the same
whatever ``n_studies`` is, and the anatomy does not change when a realism switch is
toggled (switches draw from a separate stream).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..constants import (
    AXIAL_T2,
    CLASS_TO_LABEL,
    CLASS_WEIGHTS,
    CLASSES,
    CONDITION_SERIES_TYPE,
    CONDITION_TO_COORD_CONDITION,
    CONDITIONS,
    LEVEL_TO_COORD_LEVEL,
    LEVELS,
    N_LEVELS,
    SAG_T1,
    SAG_T2,
    SERIES_TYPES,
    SIDES,
    TARGETS,
    row_id,
)
from .anatomy import Anatomy, sample_anatomy
from .dicom import StudyIds, build_dataset, write_dataset
from .grades import sample_grades
from .options import OPTIONAL_TAGS, TRANSFER_SYNTAXES, SynthOptions
from .protocol import (
    SeriesPlan,
    SlicePlan,
    add_parallel_block,
    flip_axes,
    other_field_of_view,
    plan_axial_block,
    plan_axial_per_disc,
    plan_sagittal,
    resize_slices,
)
from .render import Contrast, render_points

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "test")
_SPLIT_CODE = {"train": 0, "test": 1}
#: Kind of the keypoint (and of the stage-1 set) each condition is located by.
CONDITION_KIND: dict[str, str] = {
    "spinal_canal_stenosis": "spinal",
    "left_neural_foraminal_narrowing": "foraminal",
    "right_neural_foraminal_narrowing": "foraminal",
    "left_subarticular_stenosis": "subarticular",
    "right_subarticular_stenosis": "subarticular",
}
KEYPOINTS_WORLD_COLUMNS: tuple[str, ...] = ("study_id", "kind", "side", "level", "x", "y", "z")
_APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4070)


@dataclass
class SeriesInfo:
    """What was written for one series (and which switches touched it)."""

    series_id: int
    description: str
    weighting: str  # "T1" | "T2" | "STIR"
    n_instances: int
    n_stacks: int
    transfer_syntax: str
    dropped_tags: tuple[str, ...] = ()
    descending: bool = False
    mixed_sizes: bool = False
    flipped_axes: tuple[str, ...] = ()  # "columns" / "rows" mirrored, "swapped" (see `flip_axes`)
    mixed_fov: bool = False  # every third slice with another field of view (`other_field_of_view`)
    parallel_block: bool = False  # a second, in-plane shifted block (`add_parallel_block`)
    missing_spacing_instance: int | None = None  # the instance written without PixelSpacing
    no_meta: bool = False  # files without preamble and file meta
    enhanced: bool = False  # single-frame Enhanced MR files


@dataclass
class StudyTruth:
    """Everything known about one phantom study."""

    study_id: int
    grades: np.ndarray  # [5, 5] int, canonical order; -1 = blank in train.csv
    keypoints: dict[str, np.ndarray]  # kind -> [N, 3] patient mm (rsna_infer.keypoints layout)
    series: list[SeriesInfo] = field(default_factory=list)
    missing_series_type: str | None = None
    truncated_files: list[Path] = field(default_factory=list)
    stray_files: list[Path] = field(default_factory=list)

    def series_of(self, description: str) -> list[SeriesInfo]:
        return [s for s in self.series if s.description == description]


@dataclass
class SynthDataset:
    """A written phantom root (Kaggle layout) and its ground truth."""

    root: Path
    split: str
    seed: int
    options: SynthOptions
    study_ids: list[int]
    truth: dict[int, StudyTruth]
    seconds: float = 0.0

    @property
    def images_dir(self) -> Path:
        return self.root / f"{self.split}_images"

    @property
    def series_csv(self) -> Path:
        return self.root / f"{self.split}_series_descriptions.csv"

    @property
    def keypoints_csv(self) -> Path:
        return self.root / f"{self.split}_keypoints_world.csv"

    def files(self) -> list[Path]:
        return sorted(p for p in self.images_dir.rglob("*") if p.is_file())


def make_dataset(
    root: str | Path, n_studies: int, split: str = "train", seed: int = 0, *, progress: bool = False, **options: Any
) -> SynthDataset:
    """Write ``n_studies`` phantom studies under ``root`` in the Kaggle layout.

    ``options`` are the fields of `SynthOptions` (sizes and realism switches). Writes
    ``{split}_images/``, ``{split}_series_descriptions.csv``, ``{split}_keypoints_world.csv``,
    and ``train.csv`` + ``train_label_coordinates.csv`` (train) or ``solution.csv`` +
    ``sample_submission.csv`` (test). Existing files of the same split are overwritten.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if int(n_studies) < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies}")
    opts = SynthOptions.from_kwargs(**options)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ids = _study_ids(int(n_studies), split, int(seed), opts)
    truth: dict[int, StudyTruth] = {}
    series_rows: list[dict[str, Any]] = []
    coord_rows: list[dict[str, Any]] = []
    for k, sid in enumerate(tqdm(ids, desc=f"synth {split}", unit="study", disable=not progress)):
        st, srows, crows = _build_study(root, split, int(seed), k, sid, opts)
        truth[sid] = st
        series_rows += srows
        coord_rows += crows
    _write_csvs(root, split, ids, truth, series_rows, coord_rows)
    ds = SynthDataset(root, split, int(seed), opts, ids, truth, time.perf_counter() - t0)
    logger.info("synth: %d %s studies under %s in %.1f s", len(ids), split, root, ds.seconds)
    return ds


# -- ids and streams ----------------------------------------------------------------------------
def _rng(seed: int, split: str, k: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODE[split], k, stream])


def _study_ids(n: int, split: str, seed: int, opts: SynthOptions) -> list[int]:
    if opts.first_study_id is not None:
        return [int(opts.first_study_id) + k for k in range(n)]
    ids: list[int] = []
    for k in range(n):
        sid = int(_rng(seed, split, k, 5).integers(1_000_000, 4_290_000_000))
        while sid in ids:
            sid += 1
        ids.append(sid)
    return ids


# -- one study ----------------------------------------------------------------------------------
def _plan_series(
    rng: np.random.Generator, sw: np.random.Generator, anat: Anatomy, opts: SynthOptions
) -> list[SeriesPlan]:
    """The study's series (before switches that only change how they are written)."""
    size = opts.image_size
    used: set[int] = set()

    def new_id() -> int:
        while True:
            sid = int(rng.integers(1_000_000, 4_290_000_000))
            if sid not in used:
                used.add(sid)
                return sid

    def series(desc: str, weighting: str, plan: tuple) -> SeriesPlan:
        slices, thickness, spacing = plan[:3]
        sp = SeriesPlan(
            series_id=new_id(),
            description=desc,
            contrast=Contrast.sample(weighting, rng),
            slices=slices,
            slice_thickness=thickness,
            spacing_between=spacing,
            scale=float(rng.uniform(500.0, 3000.0)),
            noise=float(rng.uniform(*opts.noise)),
            acquisition_matrix=int(rng.integers(192, 289)),
        )
        if len(plan) > 3:
            sp.stack_spacing = plan[3]
        return sp

    t2_weighting = "STIR" if sw.random() < opts.stir_rate else "T2"
    multi = sw.random() < opts.multi_stack_rate
    n_axial = int(opts.n_axial_series) + int(sw.random() < opts.second_axial_rate)
    plans = [
        series(SAG_T1, "T1", plan_sagittal(rng, anat, "T1", size)),
        series(SAG_T2, t2_weighting, plan_sagittal(rng, anat, "T2", size)),
    ]
    all_levels = list(range(N_LEVELS))
    axial_plan = plan_axial_per_disc(rng, anat, all_levels, size) if multi else plan_axial_block(rng, anat, all_levels, size)
    plans.append(series(AXIAL_T2, "T2", axial_plan))
    for _ in range(n_axial - 1):
        start = int(rng.integers(0, N_LEVELS - 1))
        stop = int(rng.integers(start + 2, N_LEVELS + 1))
        plans.append(series(AXIAL_T2, "T2", plan_axial_block(rng, anat, list(range(start, stop)), size)))
    return plans


def _apply_switches(
    sw: np.random.Generator, plans: list[SeriesPlan], opts: SynthOptions, flip: np.random.Generator | None = None
) -> tuple[list[SeriesPlan], str | None, set[int]]:
    """Realism switches on the planned series: drop a type, mix matrix sizes, flip axes,
    instance order, transfer syntax, missing tags. Returns (plans, missing type, mixed series
    ids). ``flip`` (its own stream, so that datasets without the switch keep their bytes)
    draws the axis flips."""
    missing: str | None = None
    if sw.random() < opts.missing_series_rate:
        missing = str(sw.choice(SERIES_TYPES))
        plans = [p for p in plans if p.description != missing]
    mixed: set[int] = set()
    if plans and sw.random() < opts.mixed_slice_size_rate:
        p = plans[int(sw.integers(len(plans)))]
        factor = float(sw.choice([0.75, 1.25]))
        if p.n_stacks > 1:
            resize_slices(p.stack(int(sw.integers(p.n_stacks))), factor)
        else:
            order = sorted(p.slices, key=lambda sl: float(sl.position @ sl.normal))
            resize_slices(order[: max(1, len(order) // 3)], factor)
        mixed.add(p.series_id)
    if flip is not None and opts.flipped_axes_rate > 0:
        for p in plans:
            if flip.random() < opts.flipped_axes_rate:
                flip_axes(p, flip)
    for number, p in enumerate(plans, start=1):
        p.series_number = number
        p.descending = bool(sw.random() < opts.descending_instance_rate)
        p.transfer_syntax = (
            str(sw.choice(TRANSFER_SYNTAXES)) if opts.transfer_syntax == "mixed" else opts.transfer_syntax
        )
        if sw.random() < opts.missing_tags_rate:
            drop = [t for t in OPTIONAL_TAGS if sw.random() < 0.5] or [str(sw.choice(OPTIONAL_TAGS))]
            p.dropped_tags = tuple(drop)
        p.number_instances()
    return plans, missing, mixed


def _apply_storage_switches(rng: np.random.Generator, plans: list[SeriesPlan], opts: SynthOptions) -> None:
    """Switches that change how series are stored, never the anatomy (in place): another
    field of view on some slices, a parallel block, a slice without PixelSpacing, files
    without meta, enhanced files. ``rng`` is their own stream: with every rate 0 nothing is
    drawn that another switch sees, and the study keeps its bytes."""
    if plans and rng.random() < opts.parallel_block_rate:
        add_parallel_block(plans[int(rng.integers(len(plans)))], rng)
    for p in plans:
        if rng.random() < opts.mixed_fov_rate:
            other_field_of_view(p, rng)
        p.number_instances()  # the parallel block's instances follow the first block's
        if rng.random() < opts.missing_spacing_rate:  # a slice of the series' usual grid, as on scanners
            grids = Counter((sl.rows, sl.cols, sl.spacing) for sl in p.slices)
            usual = [sl for sl in p.slices if (sl.rows, sl.cols, sl.spacing) == grids.most_common(1)[0][0]]
            p.missing_spacing_instance = int(usual[int(rng.integers(len(usual)))].instance_number)
        p.no_meta = bool(rng.random() < opts.no_meta_rate) and p.transfer_syntax != "rle"  # RLE needs its meta
        p.enhanced = bool(rng.random() < opts.enhanced_rate)


def _locate(point: np.ndarray, plans: list[SeriesPlan], nearest_only: bool) -> tuple[SeriesPlan, SlicePlan, float, float] | None:
    """The slice a reader would label ``point`` on: the nearest slice (along its normal) whose
    image contains the point. With ``nearest_only`` False (axial), only stacks that actually
    cover the point (within half a slice spacing) qualify; earlier series win ties."""
    best: tuple[float, int, SeriesPlan, SlicePlan, float, float] | None = None
    for order, p in enumerate(plans):
        for sl in p.slices:
            x, y, dist = sl.project(point)
            if not sl.contains_inplane(x, y):
                continue
            if not nearest_only:
                stack_spacing = p.stack_spacing.get(sl.stack_index, p.spacing_between)
                if abs(dist) > 0.5 * stack_spacing + 0.25:
                    continue
            key = (abs(dist), order)
            if best is None or key < best[:2]:
                best = (abs(dist), order, p, sl, x, y)
    return None if best is None else best[2:]


def _label_rows(study_id: int, grades: np.ndarray, keypoints: dict[str, np.ndarray], plans: list[SeriesPlan]) -> list[dict[str, Any]]:
    rows = []
    for c, cond in enumerate(CONDITIONS):
        desc = CONDITION_SERIES_TYPE[cond]
        candidates = [p for p in plans if p.description == desc]
        if desc != AXIAL_T2:
            candidates = candidates[:1]  # readers label the (first) sagittal series of that type
        if not candidates:
            continue
        kind = CONDITION_KIND[cond]
        side = 1 if cond.startswith("right") else 0
        for lv, level in enumerate(LEVELS):
            if grades[c, lv] < 0:
                continue
            idx = lv if kind == "spinal" else side * N_LEVELS + lv
            hit = _locate(keypoints[kind][idx], candidates, nearest_only=desc != AXIAL_T2)
            if hit is None:
                logger.warning("study %d: no %s slice covers %s %s; no coordinate row", study_id, desc, cond, level)
                continue
            p, sl, x, y = hit
            rows.append(
                {
                    "study_id": study_id,
                    "series_id": p.series_id,
                    "instance_number": sl.instance_number,
                    "condition": CONDITION_TO_COORD_CONDITION[cond],
                    "level": LEVEL_TO_COORD_LEVEL[level],
                    "x": round(x, 4),
                    "y": round(y, 4),
                }
            )
    return rows


#: Finest in-plane resolution rendered (mm); finer stored matrices are interpolated, as on scanners.
_MIN_ACQUIRED_PIXEL = 0.75


def _acquired(sl: SlicePlan, matrix: int) -> SlicePlan:
    """The slice as acquired: same plane and field of view, at most ``matrix`` pixels a side
    and pixels no finer than `_MIN_ACQUIRED_PIXEL`."""
    fov = max(sl.rows * sl.spacing[0], sl.cols * sl.spacing[1])
    matrix = min(matrix, int(fov / _MIN_ACQUIRED_PIXEL))
    factor = min(1.0, matrix / max(sl.rows, sl.cols))
    rows, cols = max(8, round(sl.rows * factor)), max(8, round(sl.cols * factor))
    spacing = (sl.rows * sl.spacing[0] / rows, sl.cols * sl.spacing[1] / cols)
    return replace(sl, spacing=spacing, rows=rows, cols=cols)


def _upsample(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear interpolation of a centred grid onto a finer one with the same field of view
    (what a scanner does when it reconstructs a 320 acquisition into a 512 matrix)."""
    if img.shape == (rows, cols):
        return img

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.minimum(pos.astype(np.int64), n_in - 2) if n_in > 1 else np.zeros(n_out, np.int64)
        return i0, np.minimum(i0 + 1, n_in - 1), (pos - i0).astype(np.float32)

    r0, r1, fr = axis(rows, img.shape[0])
    c0, c1, fc = axis(cols, img.shape[1])
    top = img[r0][:, c0] * (1 - fc) + img[r0][:, c1] * fc
    bot = img[r1][:, c0] * (1 - fc) + img[r1][:, c1] * fc
    return top * (1 - fr[:, None]) + bot * fr[:, None]


def _render_series(anat: Anatomy, p: SeriesPlan, rng: np.random.Generator, chunk: int = 1_000_000) -> list[np.ndarray]:
    """uint16 pixels of every slice of ``p`` (same order as ``p.slices``).

    Slices are rendered at the acquisition matrix (``p.acquisition_matrix``), get Rician
    noise there, and are interpolated to the stored matrix. Slices are rendered together
    in chunks of about ``chunk`` pixels: few, large numpy calls.
    """
    acquired = [_acquired(sl, p.acquisition_matrix) for sl in p.slices]
    signals: list[np.ndarray] = []
    batch: list[SlicePlan] = []

    def flush() -> None:
        if not batch:
            return
        soft = max(0.5, 0.75 * min(min(sl.spacing) for sl in batch))
        flat = render_points(anat, np.concatenate([sl.pixel_positions() for sl in batch]), p.contrast, soft)
        bounds = np.cumsum([0] + [sl.rows * sl.cols for sl in batch])
        signals.extend(flat[a:b].reshape(sl.rows, sl.cols) for a, b, sl in zip(bounds[:-1], bounds[1:], batch))
        batch.clear()

    n = 0
    for sl in acquired:
        if batch and n + sl.rows * sl.cols > chunk:
            flush()
            n = 0
        batch.append(sl)
        n += sl.rows * sl.cols
    flush()
    out = []
    for signal, sl in zip(signals, p.slices):
        noisy = np.hypot(signal + p.noise * rng.standard_normal(signal.shape, dtype=np.float32),
                         p.noise * rng.standard_normal(signal.shape, dtype=np.float32))  # fmt: skip
        stored = _upsample(noisy, sl.rows, sl.cols)
        out.append(np.clip(np.rint(stored * p.scale), 0, 65535).astype(np.uint16))
    return out


def _build_study(
    root: Path, split: str, seed: int, k: int, study_id: int, opts: SynthOptions
) -> tuple[StudyTruth, list[dict[str, Any]], list[dict[str, Any]]]:
    grades = sample_grades(_rng(seed, split, k, 0))
    anat = sample_anatomy(_rng(seed, split, k, 1), grades)
    sw = _rng(seed, split, k, 3)
    plans = _plan_series(_rng(seed, split, k, 2), sw, anat, opts)
    plans, missing, mixed = _apply_switches(sw, plans, opts, _rng(seed, split, k, 6))
    _apply_storage_switches(_rng(seed, split, k, 7), plans, opts)
    keypoints = anat.keypoints()

    shown = grades.copy()
    if split == "train" and opts.blank_label_rate > 0:
        shown[sw.random(grades.shape) < opts.blank_label_rate] = -1
    coord_rows = _label_rows(study_id, shown, keypoints, plans) if split == "train" else []

    ids = StudyIds(seed, split, study_id)
    study_dir = root / f"{split}_images" / str(study_id)
    truth = StudyTruth(study_id, shown, keypoints, missing_series_type=missing)
    labelled = {(r["series_id"], r["instance_number"]) for r in coord_rows}
    written: list[tuple[int, Path]] = []
    for i, p in enumerate(plans):
        pixels = _render_series(anat, p, _rng(seed, split, k, 10 + i))
        order = sw.permutation(len(p.slices))  # file systems list files in no useful order
        for j in order:
            sl = p.slices[int(j)]
            path = study_dir / str(p.series_id) / f"{sl.instance_number}.dcm"
            write_dataset(path, build_dataset(ids, p, sl, pixels[int(j)]), bare=p.no_meta)
            if (p.series_id, sl.instance_number) not in labelled:
                written.append((p.series_id, path))
        truth.series.append(
            SeriesInfo(
                p.series_id, p.description, p.contrast.name, len(p.slices), p.n_stacks, p.transfer_syntax,
                p.dropped_tags, p.descending, p.series_id in mixed, p.flipped_axes, p.mixed_fov, p.parallel_block,
                p.missing_spacing_instance, p.no_meta, p.enhanced,
            )
        )  # fmt: skip
    if written and sw.random() < opts.truncated_file_rate:
        _, path = written[int(sw.integers(len(written)))]
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * sw.uniform(0.3, 0.8))])
        truth.truncated_files.append(path)
    if plans and sw.random() < opts.stray_file_rate:
        p = plans[int(sw.integers(len(plans)))]
        stray = study_dir / str(p.series_id) / f"._{int(sw.integers(1, len(p.slices) + 1))}.dcm"
        stray.write_bytes(_APPLEDOUBLE)
        truth.stray_files.append(stray)
    series_rows = [
        {"study_id": study_id, "series_id": p.series_id, "series_description": p.description}
        for p in sorted(plans, key=lambda p: p.series_id)
    ]
    return truth, series_rows, coord_rows


# -- CSVs ---------------------------------------------------------------------------------------
def _write_csvs(
    root: Path,
    split: str,
    ids: list[int],
    truth: dict[int, StudyTruth],
    series_rows: list[dict[str, Any]],
    coord_rows: list[dict[str, Any]],
) -> None:
    pd.DataFrame(series_rows, columns=["study_id", "series_id", "series_description"]).to_csv(
        root / f"{split}_series_descriptions.csv", index=False
    )
    kp_rows = []
    for sid in ids:
        for kind, pts in truth[sid].keypoints.items():
            for i, xyz in enumerate(pts):
                side = "" if kind == "spinal" else SIDES[i // N_LEVELS]
                level = LEVEL_TO_COORD_LEVEL[LEVELS[i % N_LEVELS]]
                kp_rows.append(dict(zip(KEYPOINTS_WORLD_COLUMNS, (sid, kind, side, level, *np.round(xyz, 4)))))
    pd.DataFrame(kp_rows, columns=list(KEYPOINTS_WORLD_COLUMNS)).to_csv(root / f"{split}_keypoints_world.csv", index=False)
    if split == "train":
        table = []
        for sid in ids:
            g = truth[sid].grades.reshape(-1)
            table.append([sid] + [CLASS_TO_LABEL[v] if v >= 0 else "" for v in g])
        pd.DataFrame(table, columns=["study_id", *TARGETS]).to_csv(root / "train.csv", index=False)
        cols = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
        pd.DataFrame(coord_rows, columns=cols).to_csv(root / "train_label_coordinates.csv", index=False)
    else:
        sol, sub = [], []
        for sid in ids:
            g = truth[sid].grades
            for c, cond in enumerate(CONDITIONS):
                for lv, level in enumerate(LEVELS):
                    onehot = [int(g[c, lv] == i) for i in range(len(CLASSES))]
                    sol.append([row_id(sid, cond, level), *onehot, CLASS_WEIGHTS[g[c, lv]]])
                    sub.append([row_id(sid, cond, level), 1 / 3, 1 / 3, 1 / 3])
        pd.DataFrame(sol, columns=["row_id", *CLASSES, "sample_weight"]).to_csv(root / "solution.csv", index=False)
        pd.DataFrame(sub, columns=["row_id", *CLASSES]).to_csv(root / "sample_submission.csv", index=False)


def load_keypoints_world(root: str | Path, split: str = "train") -> dict[int, dict[str, np.ndarray]]:
    """Read ``{split}_keypoints_world.csv`` -> ``{study_id: {kind: [N, 3] patient mm}}`` in the
    `rsna_infer.keypoints` layout (spinal [5, 3]; foraminal/subarticular [10, 3],
    index side * 5 + level, left first)."""
    from ..constants import COORD_LEVEL_TO_LEVEL
    from ..keypoints import POINT_KINDS, point_index

    df = pd.read_csv(Path(root) / f"{split}_keypoints_world.csv", keep_default_na=False)
    out: dict[int, dict[str, np.ndarray]] = {}
    for r in df.itertuples(index=False):
        sets = out.setdefault(int(r.study_id), {k: np.full((n, 3), np.nan) for k, n in POINT_KINDS.items()})
        lv = LEVELS.index(COORD_LEVEL_TO_LEVEL[r.level])
        side = None if r.kind == "spinal" else SIDES.index(r.side)
        sets[r.kind][point_index(r.kind, lv, side)] = (r.x, r.y, r.z)
    return out
