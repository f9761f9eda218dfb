"""Training: datasets from a Kaggle-layout training root, one fold split for the ensemble,
one generic loop for every model family (pretrained starts, checkpoints and resume, torchrun),
out-of-fold predictions, blend fitting and the bundle-ready merge.

Entry points: ``rsna-infer cache``, ``folds``, ``train`` and ``fit-blend`` (their modules in
`rsna_infer.commands`, over `rsna_infer.train.cache`, `.folds`, `.trainer` and `.blend`) and,
from Python, `train_fold`, `train_folds` and `fit_blend`. docs/train.md walks the whole path from the competition data to a Kaggle bundle.
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


def train_folds(*args: Any, **kwargs: Any) -> "list[TrainResult]":
    """Train one config on several folds in one process group; see `rsna_infer.train.trainer.train_folds`."""
    from .trainer import train_folds as _train_folds

    return _train_folds(*args, **kwargs)


def fit_blend(*args: Any, **kwargs: Any) -> Any:
    """Fit per-group blend weights; see `rsna_infer.train.blend.fit_blend`."""
    from .blend import fit_blend as _fit_blend

    return _fit_blend(*args, **kwargs)


__all__ = ["ConfigError", "TrainConfig", "load_config", "train_fold", "train_folds", "fit_blend"]
