"""Phantom lumbar-spine studies as real DICOM in the Kaggle competition layout.

No competition data exists on development machines, so tests, the demo and training use
phantoms: a 3-D spine per study (vertebrae, discs, canal, foramina, lateral recesses, with
graded narrowing) rendered through real DICOM geometry into Sagittal T1, Sagittal T2/STIR
and Axial T2 series, plus the CSVs the competition ships and the 3-D truth. ::

    from rsna_infer.synth import make_dataset
    ds = make_dataset("/tmp/phantom", 10, split="train", seed=0, image_size=(64, 96))

CLI: ``rsna-infer synth ROOT --studies N --split test --seed S [--messy] [switches]``
(`rsna_infer.commands.synth`). See docs/synth.md.
"""

from __future__ import annotations

from .anatomy import Anatomy, sample_anatomy
from .dataset import (
    CONDITION_KIND,
    KEYPOINTS_WORLD_COLUMNS,
    SPLITS,
    SeriesInfo,
    StudyTruth,
    SynthDataset,
    load_keypoints_world,
    make_dataset,
)
from .grades import GRADE_PRIORS, sample_grades
from .options import MESSY, OPTIONAL_TAGS, TRANSFER_SYNTAXES, SynthOptions

__all__ = [
    "CONDITION_KIND",
    "GRADE_PRIORS",
    "KEYPOINTS_WORLD_COLUMNS",
    "MESSY",
    "OPTIONAL_TAGS",
    "SPLITS",
    "TRANSFER_SYNTAXES",
    "Anatomy",
    "SeriesInfo",
    "StudyTruth",
    "SynthDataset",
    "SynthOptions",
    "load_keypoints_world",
    "make_dataset",
    "sample_anatomy",
    "sample_grades",
]
