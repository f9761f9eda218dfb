"""Manifests of randomly initialised models: tests, benchmarks and smoke runs of the whole
pipeline without trained weights.

`make_random_manifest` builds each entry's network through its family (the real code path),
saves the random weights as safetensors and writes a manifest with sha256s, so the result
loads exactly like a trained ensemble. `tiny_entries` is a small ensemble that covers every
family with the smallest backbones (timm ``test_*`` 2-D models, timm_3d ``mobilenetv2_035``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..specs import ModelEntry
from .manifest import Manifest, export_model, save_manifest

RANDOM_NOTES = "random-init weights (rsna_infer.models.random_weights): for pipeline tests only; predictions are meaningless"


def make_random_manifest(
    out_dir: str | os.PathLike,
    entries: Sequence[ModelEntry | dict[str, Any]] | None = None,
    seed: int = 0,
    priors: np.ndarray | None = None,
    notes: str = RANDOM_NOTES,
    name: str = "weights_manifest.json",
) -> Path:
    """Write ``out_dir/name`` and ``out_dir/weights/*.safetensors`` for ``entries``
    (default `tiny_entries`), each model initialised from ``seed + i``. Returns the path."""
    import torch

    from .registry import make_family

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for i, e in enumerate(tiny_entries() if entries is None else entries):
        entry = e if isinstance(e, ModelEntry) else ModelEntry.from_dict(e)
        torch.manual_seed(seed + i)
        model = make_family(entry).build()
        done.append(export_model(model, entry, out_dir))
    man = Manifest(models=done, notes=notes, root=out_dir)
    if priors is not None:
        man.priors = np.asarray(priors, dtype=np.float64)
        man.priors_given = True
        man.__post_init__()
    return save_manifest(man, out_dir / name)


def tiny_entries(roi_heads: Sequence[str] = ("gated", "plain", "level_lstm")) -> list[ModelEntry]:
    """A tiny ensemble covering every family, with the input specs of ``configs/demo``
    (timm ``test_resnet`` / ``test_efficientnet`` and timm_3d ``mobilenetv2_035``; 32-64 px).
    The ROI graders use ``roi_heads`` in turn (spinal, foraminal, subarticular)."""

    def e(name: str, family: str, variant: str, arch: str, size: list[int], n_slices: int = 1, in_chans: int = 1,
          blend: dict[str, float] | None = None, **model_kwargs: Any) -> ModelEntry:
        d: dict[str, Any] = {"name": name, "family": family, "variant": variant, "arch": arch, "file": "-",
                             "input": {"size": size, "n_slices": n_slices, "in_chans": in_chans}}
        if blend:
            d["blend"] = blend
        if model_kwargs:
            d["model_kwargs"] = model_kwargs
        return ModelEntry.from_dict(d)

    heads = list(roi_heads) + ["gated"] * (3 - len(roi_heads))
    roi = []
    for variant, head, group in zip(("spinal", "foraminal", "subarticular"), heads, ("spinal", "foraminal", "subarticular")):
        chans = 1 if head == "slice_gru" else 3
        roi.append(e(f"roi_{variant}", "roi", variant, "test_resnet", [32, 32], 3, chans, {group: 1.0}, head=head))
    return [
        e("sag2d_t2", "sag2d", "t2", "test_resnet", [64, 64], 3, 3),
        e("sag2d_t1", "sag2d", "t1", "test_resnet", [64, 64], 3, 3),
        e("sag3d_t2", "sag3d", "t2", "mobilenetv2_035", [16, 64, 64]),
        e("sag3d_t1", "sag3d", "t1", "mobilenetv2_035", [16, 64, 64]),
        e("axial3d", "axial3d", "default", "mobilenetv2_035", [32, 64, 64]),
        e("axial_level", "axial_level", "default", "test_resnet", [48, 48], 3, 3),
        e("axial_xy", "axial_xy", "default", "test_resnet", [64, 64], 3, 3),
        e("fusion", "fusion", "default", "test_resnet", [32, 32], 3, 3, {"spinal": 1.0, "foraminal": 1.0, "subarticular": 1.0}),
        *roi,
    ]
