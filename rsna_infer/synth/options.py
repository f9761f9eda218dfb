"""Options of the phantom generator: sizes and the realism switches (all off by default)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..validate import parse_fields

#: Transfer syntaxes the writer can produce; "mixed" draws one per series.
TRANSFER_SYNTAXES: tuple[str, ...] = ("explicit_le", "implicit", "big_endian", "rle")

#: Optional tags the ``missing_tags_rate`` switch may drop from a series (all instances).
OPTIONAL_TAGS: tuple[str, ...] = ("SpacingBetweenSlices", "SliceThickness", "SeriesDescription", "SliceLocation")


@dataclass(frozen=True)
class SynthOptions:
    """How phantom studies look. Rates are per-study probabilities unless noted.

    - ``image_size``: (min, max) rows/columns of every image (per series; square 3 times in 4).
    - ``first_study_id``: consecutive study ids from here; None draws 7-10 digit ids from the seed.
    - ``n_axial_series``: Axial T2 series in every study (the first covers L1/L2..L5/S1,
      later ones a random run of >= 2 levels).
    - ``second_axial_rate``: chance of one more axial series on top of ``n_axial_series``.
    - ``multi_stack_rate``: chance that the first axial series holds several short stacks
      tilted along the discs (different orientations in one series) instead of one block.
    - ``missing_series_rate``: chance that one series type is absent (files and CSV row).
    - ``mixed_slice_size_rate``: chance that one series mixes two matrix sizes (one stack, or
      the first third of a single stack, gets another Rows/Columns over the same field of view).
    - ``descending_instance_rate``: per series, chance that InstanceNumber decreases along the
      slice normal.
    - ``flipped_axes_rate``: per series, chance that the in-plane axes follow another scanner
      convention: columns and/or rows mirrored and/or swapped (e.g. sagittal IOP
      ``[0,-1,0,0,0,-1]``, rows running posterior). Pixel and slice order change; patient
      coordinates and labels stay true.
    - ``stir_rate``: per study, chance that "Sagittal T2/STIR" is a STIR (fat-suppressed) series.
    - ``transfer_syntax``: "explicit_le" | "implicit" | "big_endian" | "rle" | "mixed" (per series).
    - ``missing_tags_rate``: per series, chance of dropping some of `OPTIONAL_TAGS`.
    - ``truncated_file_rate``: chance that one unlabelled file of the study is cut short.
    - ``stray_file_rate``: chance of a non-DICOM ``._<n>.dcm`` file (macOS resource fork) in a
      series folder.
    - ``blank_label_rate``: train split only: per target, chance the grade is blank in
      train.csv (its coordinate row is then absent too).
    - ``mixed_fov_rate``: per series, chance that every third slice is stored with another
      field of view: whole pixels added or cut on each side at the same spacing, its IPP at the
      new first pixel (the patient grid is the same).
    - ``parallel_block_rate``: chance that one series holds a second block of the same
      orientation at the same positions along the normal, its field of view shifted in-plane
      (a repeat with a moved field of view).
    - ``missing_spacing_rate``: per series, chance that one slice lacks PixelSpacing.
    - ``no_meta_rate``: per series, chance that files are written bare: no preamble, no file
      meta, in the series' own encoding (big endian too; RLE series keep their meta).
    - ``enhanced_rate``: per series, chance that files are single-frame Enhanced MR (geometry,
      spacing and rescale in functional-group sequences).

    The last five change how series are stored, never the anatomy; they draw from their own
    random stream, so studies built without them keep their bytes.
    - ``noise``: (min, max) Rician noise sigma relative to the brightest tissue.
    """

    image_size: tuple[int, int] = (256, 512)
    first_study_id: int | None = None
    n_axial_series: int = 1
    second_axial_rate: float = 0.0
    multi_stack_rate: float = 0.0
    missing_series_rate: float = 0.0
    mixed_slice_size_rate: float = 0.0
    descending_instance_rate: float = 0.0
    flipped_axes_rate: float = 0.0
    stir_rate: float = 0.3
    transfer_syntax: str = "explicit_le"
    missing_tags_rate: float = 0.0
    truncated_file_rate: float = 0.0
    stray_file_rate: float = 0.0
    blank_label_rate: float = 0.0
    noise: tuple[float, float] = (0.015, 0.045)
    mixed_fov_rate: float = 0.0
    parallel_block_rate: float = 0.0
    missing_spacing_rate: float = 0.0
    no_meta_rate: float = 0.0
    enhanced_rate: float = 0.0

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.image_size)
        if len(size) != 2 or not 16 <= size[0] <= size[1] <= 2048:
            raise ValueError(f"image_size must be (min, max) with 16 <= min <= max <= 2048, got {self.image_size}")
        object.__setattr__(self, "image_size", size)
        for f in fields(self):
            if f.name.endswith("_rate"):
                value = float(getattr(self, f.name))
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"{f.name} must be in [0, 1], got {value}")
                object.__setattr__(self, f.name, value)
        if not 1 <= int(self.n_axial_series) <= 4:
            raise ValueError(f"n_axial_series must be 1..4, got {self.n_axial_series}")
        if self.transfer_syntax not in TRANSFER_SYNTAXES + ("mixed",):
            raise ValueError(f"transfer_syntax must be one of {TRANSFER_SYNTAXES + ('mixed',)}, got {self.transfer_syntax!r}")
        lo, hi = (float(v) for v in self.noise)
        if not 0.0 <= lo <= hi <= 0.5:
            raise ValueError(f"noise must be (min, max) with 0 <= min <= max <= 0.5, got {self.noise}")
        object.__setattr__(self, "noise", (lo, hi))
        if self.first_study_id is not None and int(self.first_study_id) < 1:
            raise ValueError(f"first_study_id must be a positive integer, got {self.first_study_id}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SynthOptions:
        """Checked options from keyword arguments or a JSON object (the demo's ``phantom.json``):
        an unknown or mistyped option is a `TypeError`, an impossible value a `ValueError`."""
        return cls(**parse_fields(cls, kwargs, "synth options", noun="synth option(s)", sep=": ", error=TypeError))


#: One line per option, for ``rsna-infer synth --help``.
OPTION_HELP: dict[str, str] = {
    "image_size": "min and max Rows/Columns of every series",
    "first_study_id": "consecutive study ids from this number (None: random 7-10 digit ids from the seed)",
    "n_axial_series": "Axial T2 series per study (1-4)",
    "second_axial_rate": "chance of one more Axial T2 series",
    "multi_stack_rate": "chance the first axial series holds several stacks tilted along the discs",
    "missing_series_rate": "chance one series type is absent",
    "mixed_slice_size_rate": "chance one series mixes two matrix sizes",
    "descending_instance_rate": "per series: InstanceNumber decreases along the slice normal",
    "flipped_axes_rate": "per series: in-plane axes mirrored and/or swapped (another scanner's IOP convention)",
    "stir_rate": "per study: Sagittal T2/STIR is a fat-suppressed STIR",
    "transfer_syntax": "file encoding; 'mixed' draws one per series",
    "missing_tags_rate": "per series: drop some of " + ", ".join(OPTIONAL_TAGS),
    "truncated_file_rate": "chance one unlabelled file of a study is cut short",
    "stray_file_rate": "chance of a non-DICOM ._<n>.dcm file in a series folder",
    "blank_label_rate": "train: per target, chance of a blank grade (and no coordinate row)",
    "noise": "min and max Rician noise sigma relative to the brightest tissue",
    "mixed_fov_rate": "per series: every third slice stored with another field of view (its own IPP, same spacing)",
    "parallel_block_rate": "chance one series holds a second, in-plane shifted block at the same slice positions",
    "missing_spacing_rate": "per series: one slice lacks PixelSpacing",
    "no_meta_rate": "per series: files without preamble and file meta, in the series' own encoding",
    "enhanced_rate": "per series: single-frame Enhanced MR files (geometry in functional groups)",
}

#: Every realism switch on at a moderate rate: what real competition data throws at a reader.
MESSY: dict[str, Any] = {
    "second_axial_rate": 0.2,
    "multi_stack_rate": 0.3,
    "missing_series_rate": 0.1,
    "mixed_slice_size_rate": 0.1,
    "descending_instance_rate": 0.2,
    "transfer_syntax": "mixed",
    "missing_tags_rate": 0.2,
    "truncated_file_rate": 0.1,
    "stray_file_rate": 0.1,
    "blank_label_rate": 0.01,
    "mixed_fov_rate": 0.1,
    "parallel_block_rate": 0.05,
    "missing_spacing_rate": 0.05,
    "no_meta_rate": 0.05,
    "enhanced_rate": 0.05,
}
