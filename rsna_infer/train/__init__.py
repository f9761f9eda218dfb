"""Training: datasets from a Kaggle-layout training root, folds, one generic loop for every
model family, out-of-fold predictions and blend fitting.

Entry points: ``rsna-infer train`` (`rsna_infer.train.cli`), ``rsna-infer fit-blend``
(`rsna_infer.train.blend`) and, from Python, `train_fold` and `fit_blend`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ConfigError, TrainConfig, load_config

if TYPE_CHECKING:  # keep ``import rsna_infer.train`` torch-free
    from .trainer import TrainResult


def train_fold(*args: Any, **kwargs: Any) -> "TrainResult":
    """Train one config on one fold; see `rsna_infer.train.trainer.train_fold`."""
    from .trainer import train_fold as _train_fold

    return _train_fold(*args, **kwargs)


def fit_blend(*args: Any, **kwargs: Any) -> Any:
    """Fit per-group blend weights; see `rsna_infer.train.blend.fit_blend`."""
    from .blend import fit_blend as _fit_blend

    return _fit_blend(*args, **kwargs)


__all__ = ["ConfigError", "TrainConfig", "load_config", "train_fold", "fit_blend"]
