"""Each kind of stage-1 loss (point regression, level CE) is learnable: enough optimisation
steps on a fixed batch bring it far below the untrained model's (a wide margin, so that it
holds on any CPU; a few steps and a thin margin would be float noise)."""

import numpy as np
import torch
from stage1_fixtures import (
    axial,
    blob_volume,
    entry,
    sagittal,
    spinal_world,
    study_of,
    subarticular_world,
    world_set,
)

from rsna_infer.keypoints import StudyKeypoints, truth_key
from rsna_infer.models.registry import make_family


def _train(fam, items, steps=12, lr=3e-3):
    """``items``: (study, truth) pairs. Returns the loss on the fixed batch before and after."""
    torch.manual_seed(0)
    model = fam.build().train()
    samples, targets = [], []
    rng = np.random.default_rng(0)
    for study, truth in items:
        for s in fam.prepare(study, truth, rng=rng):
            t = fam.targets(s, study, truth)
            if t is not None:
                samples.append(s)
                targets.append(t)
    batch, tb = fam.collate(samples), fam.collate_targets(targets)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = fam.loss(model(batch), tb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        final = float(fam.loss(model(batch), tb))
    return losses[0], final


def _sag_item(i: int, rng: np.random.Generator):
    shift = np.array([0.0, rng.uniform(-25, 25), rng.uniform(-15, 15)])
    pts = spinal_world() + shift
    vol = blob_volume(sagittal(shape=(7, 48, 48), series_id=100 + i, slice_spacing=6.0), pts)
    truth = StudyKeypoints(i, {truth_key("spinal"): world_set("spinal", pts, vol)})
    return study_of(vol, study_id=i), truth


def test_sag2d_point_loss_is_learnable():
    rng = np.random.default_rng(1)
    items = [_sag_item(i, rng) for i in range(6)]
    fam = make_family(entry("sag2d", "t2", size=(48, 48), n_slices=5))
    first, last = _train(fam, items, steps=40)
    assert last < 0.4 * first, (first, last)


def test_heatmap_head_loss_is_learnable_and_keeps_heatmaps_peaked():
    rng = np.random.default_rng(1)
    items = [_sag_item(i, rng) for i in range(6)]
    fam = make_family(entry("sag2d", "t2", size=(48, 48), n_slices=1, in_chans=1, model_kwargs={"head": "heatmap"}))
    net = fam.build().train()
    batch = fam.collate([s for st, t in items for s in fam.prepare(st, t)])
    assert net(batch).shape[-1] == 2 + 1 + 2  # (y, x), visibility, spread per axis: training only
    assert net.eval()(batch).shape[-1] == 3
    first, last = _train(fam, items, steps=40)
    assert last < 0.4 * first, (first, last)


def test_axial_level_loss_is_learnable():
    items = []
    for i in range(3):
        vol = axial((12, 32, 32), z0=-26.0 + 8 * i, series_id=200 + i)
        vol = blob_volume(vol, subarticular_world())
        truth = StudyKeypoints(i, {truth_key("subarticular"): world_set("subarticular", subarticular_world(), vol)})
        items.append((study_of(vol, study_id=i), truth))
    fam = make_family(entry("axial_level", size=(32, 32), n_slices=3, in_chans=3, model_kwargs={"hidden": 16, "heads": 2}))
    first, last = _train(fam, items, steps=40)
    assert last < 0.25 * first, (first, last)
