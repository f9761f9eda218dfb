"""rsna_infer: offline two-stage inference and training for RSNA 2024 lumbar spine grading."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    import pandas as pd


def predict(*args: Any, **kwargs: Any) -> "pd.DataFrame":
    """Run the whole pipeline on a Kaggle-layout test root; see `rsna_infer.api.predict`."""
    from .api import predict as _predict

    return _predict(*args, **kwargs)


__all__ = ["__version__", "predict"]
