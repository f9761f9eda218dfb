"""DICOM reading and study discovery: everything that touches files lives here."""

from .volume import Study, Volume

__all__ = ["Study", "Volume"]
