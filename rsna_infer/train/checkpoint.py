"""A fold run's files on disk while it trains: checkpoints every epoch and the run record.

``{out}/checkpoints/`` holds, for fold ``k``:

- ``f{k}_last.pt``: everything to continue the run after epoch ``e`` (model, EMA, optimizer,
  scheduler, AMP scaler, torch RNG, history, the best epoch so far), rewritten after every
  epoch; ``rsna-infer train --resume`` continues from it;
- ``f{k}_best.pt``: the weights that are validated and exported (EMA when on) of the best
  epoch so far;
- ``f{k}_last_oof.npz`` / ``f{k}_best_oof.npz`` (and ``_keypoints.npz`` for stage 1): the
  out-of-fold files of those epochs, copied to ``oof_f{k}.npz`` at the end.

Every file is written with `rsna_infer.output.atomic_write` (a synced temporary file renamed
into place), so a run killed at any moment leaves the previous epoch's checkpoint intact. Checkpoints are read with
``torch.load(weights_only=True)`` (no code runs).

``{out}/run_f{k}.json`` records what the run was: config name, split id and folds file,
initial-weight reports, validation plan (which keypoints), keypoint files, world size,
resumes, status and the selected epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..output import atomic_copy, atomic_write, atomic_write_text

CHECKPOINT_FORMAT = 1
#: Config fields a resumed run may change (they do not change the result).
RESUME_FREE_FIELDS = ("num_workers", "val_batch_size", "notes")


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config fields that must match for a run to be resumed."""
    return {k: v for k, v in config.items() if k not in RESUME_FREE_FIELDS}


class FoldFiles:
    """Paths of one fold run and their atomic writers/readers."""

    def __init__(self, out_dir: str | Path, fold: int) -> None:
        self.out_dir = Path(out_dir)
        self.fold = fold
        self.dir = self.out_dir / "checkpoints"
        tag = f"f{fold}" if fold >= 0 else "all"
        self.tag = tag
        self.last = self.dir / f"{tag}_last.pt"
        self.best = self.dir / f"{tag}_best.pt"
        self.record_path = self.out_dir / f"run_{tag}.json"
        self.manifest = self.out_dir / f"manifest_{tag}.json"
        self.history = self.out_dir / f"history_{tag}.json"
        self.oof = self.out_dir / f"oof_{tag}.npz"
        self.keypoints = self.out_dir / f"keypoints_oof_{tag}.npz"

    def oof_file(self, which: str) -> Path:
        return self.dir / f"{self.tag}_{which}_oof.npz"

    def keypoints_file(self, which: str) -> Path:
        return self.dir / f"{self.tag}_{which}_keypoints.npz"

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, path: Path, state: dict[str, Any]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, lambda fh: torch.save({"format": CHECKPOINT_FORMAT, **state}, fh), binary=True)

    def load(self, path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: checkpoint format {state.get('format')} != {CHECKPOINT_FORMAT}")
        return state

    def promote(self, src_which: str, dst_which: str) -> None:
        """Copy the out-of-fold files of one epoch slot to another (last -> best)."""
        for f in (self.oof_file, self.keypoints_file):
            src = f(src_which)
            if src.is_file():
                atomic_copy(src, f(dst_which))

    def publish(self, which: str) -> tuple[Path | None, Path | None]:
        """Copy slot ``which``'s out-of-fold files to their final names."""
        out: list[Path | None] = []
        for src, dst in ((self.oof_file(which), self.oof), (self.keypoints_file(which), self.keypoints)):
            if src.is_file():
                atomic_copy(src, dst)
                out.append(dst)
            else:
                out.append(None)
        return out[0], out[1]

    # -- run record -----------------------------------------------------------------------------
    def read_record(self) -> dict[str, Any]:
        try:
            return json.loads(self.record_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def write_record(self, record: dict[str, Any]) -> None:
        text = json.dumps(record, indent=1, default=str) + "\n"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.record_path, text)

    def write_history(self, history: list[dict[str, float]]) -> None:
        text = json.dumps(history, indent=1) + "\n"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.history, text)
