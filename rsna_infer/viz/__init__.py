"""See what the models see: keypoint and crop overlays, a QA page per study, a page per run.

- `rsna_infer.viz.capture.QACollector`: the observer `predict(..., qa_dir=...)` passes to
  `Predictor.run`; it captures the model inputs of the worst studies during the run.
- `rsna_infer.viz.rank`: how studies are ranked for QA.
- `rsna_infer.viz.draw`: PNGs (Pillow) of model-input slices with keypoints and crop grids.
- `rsna_infer.viz.pages`: the self-contained HTML pages (one per study, one index per run).
- ``rsna-infer show`` (`rsna_infer.commands.show`): the page of one study.

Pillow is an optional dependency (the ``[viz]`` extra; Kaggle's image has it). Importing
this package does not import it; asking for pictures without it fails fast with
`VizUnavailable`. See docs/viz.md.
"""

from __future__ import annotations

PILLOW_HINT = "QA pictures need Pillow: pip install 'rsna-infer[viz]' (or pip install pillow)"


class VizUnavailable(ImportError):
    """Pictures were asked for but Pillow is not installed."""


def require_pillow() -> None:
    """Fail fast (`VizUnavailable`, one line naming the extra) when Pillow is missing."""
    try:
        import PIL.Image  # noqa: F401
        import PIL.ImageDraw  # noqa: F401
    except ImportError as e:
        raise VizUnavailable(f"{PILLOW_HINT} ({e})") from None


__all__ = ["PILLOW_HINT", "VizUnavailable", "require_pillow"]
