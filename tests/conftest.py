"""Shared session fixtures: tiny phantom competition roots (built once per test session).

- ``phantom_train`` / ``phantom_train_root``: 6 train studies, 64-96 px images, seed 0
  (train.csv, train_label_coordinates.csv, train_series_descriptions.csv, train_images/,
  train_keypoints_world.csv).
- ``phantom_test`` / ``phantom_test_root``: 4 test studies, seed 1 (test_series_descriptions.csv,
  test_images/, solution.csv, sample_submission.csv, test_keypoints_world.csv).

The ``*_root`` fixtures are the folder (a `pathlib.Path`); the others are the
`rsna_infer.synth.SynthDataset` with the 3-D truth. Treat both as read-only.

Torch runs on one thread for the whole session: the tests use tiny models on a shared 2-core
machine, where more threads only oversubscribe the cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rsna_infer.synth import SynthDataset, make_dataset

PHANTOM_IMAGE_SIZE = (64, 96)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def phantom_train(tmp_path_factory: pytest.TempPathFactory) -> SynthDataset:
    return make_dataset(tmp_path_factory.mktemp("phantom_train"), 6, split="train", seed=0, image_size=PHANTOM_IMAGE_SIZE)


@pytest.fixture(scope="session")
def phantom_train_root(phantom_train: SynthDataset) -> Path:
    return phantom_train.root


@pytest.fixture(scope="session")
def phantom_test(tmp_path_factory: pytest.TempPathFactory) -> SynthDataset:
    return make_dataset(tmp_path_factory.mktemp("phantom_test"), 4, split="test", seed=1, image_size=PHANTOM_IMAGE_SIZE)


@pytest.fixture(scope="session")
def phantom_test_root(phantom_test: SynthDataset) -> Path:
    return phantom_test.root
