"""DICOM reading and study discovery: everything that touches files lives here.

Typical use::

    from rsna_infer.io import discover_studies, load_study
    for ref in discover_studies("/kaggle/input/rsna-2024-...", split="test"):
        study = load_study(ref)           # Study: volumes by series type, warnings
        sag_t2 = study.first("Sagittal T2/STIR")

`read_series` decodes one folder into its stacks; `rsna_infer.geometry` maps points
between them. docs/io.md lists what the reader handles (fields of view, parallel blocks,
meta-less and enhanced files, unreadable folders, ...) and how.
"""

from .volume import Study, Volume  # noqa: I001  (first: the modules below import it)
from .dicom import DECODER_HINT, MissingDecoderError, SliceRecord, decoder_problem, read_slice
from .files import FolderListing, list_series_files, natural_key, scan_folder
from .parallel import DEFAULT_PARALLEL, PARALLEL_MODES, decode_files, default_workers, iter_decode, make_executor, usable_cpus
from .series import read_series, series_from_records
from .stacks import build_stacks
from .discovery import (
    NoStudiesError,
    SeriesRef,
    StudyRef,
    describe_no_studies,
    discover_studies,
    images_dir,
    infer_series_type,
    infer_series_type_from_folder,
)
from .study import load_study
from .writer import as_enhanced_single_frame, save_dataset, write_slice, write_volume

__all__ = [
    "DECODER_HINT",
    "DEFAULT_PARALLEL",
    "FolderListing",
    "PARALLEL_MODES",
    "MissingDecoderError",
    "NoStudiesError",
    "SeriesRef",
    "SliceRecord",
    "Study",
    "StudyRef",
    "Volume",
    "as_enhanced_single_frame",
    "build_stacks",
    "decode_files",
    "decoder_problem",
    "default_workers",
    "describe_no_studies",
    "discover_studies",
    "images_dir",
    "infer_series_type",
    "infer_series_type_from_folder",
    "iter_decode",
    "list_series_files",
    "load_study",
    "make_executor",
    "natural_key",
    "read_series",
    "read_slice",
    "save_dataset",
    "scan_folder",
    "series_from_records",
    "usable_cpus",
    "write_slice",
    "write_volume",
]
