import json

import pytest

from rsna_infer.train.config import (
    ConfigError,
    TrainConfig,
    load_config,
    parse_override,
)

BASE = {
    "name": "roi_spinal_demo", "family": "roi", "variant": "spinal", "arch": "test_resnet",
    "input": {"size": [32, 32], "n_slices": 3}, "epochs": 2, "lr": 1e-3, "batch_size": 4,
}


def _cfg(**over):
    return TrainConfig.from_dict({**BASE, **over}, check_family=False)


def test_valid_config_round_trips():
    cfg = _cfg(ema_decay=0.99)
    assert cfg.stage == 2 and cfg.entry_name(3) == "roi_spinal_demo_f3" and cfg.entry_name(-1) == "roi_spinal_demo_all"
    again = TrainConfig.from_dict(cfg.to_dict(), check_family=False)
    assert again == cfg
    entry = cfg.model_entry(2)
    assert entry.fold == 2 and entry.family == "roi" and entry.file.endswith("roi_spinal_demo_f2.safetensors")


@pytest.mark.parametrize(
    "over, field",
    [
        ({"epocs": 3}, "epocs"),
        ({"family": "unet"}, "family"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": "ten"}, "epochs"),
        ({"lr": 2.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"ema_decay": 1.5}, "ema_decay"),
        ({"select": "median"}, "select"),
        ({"keypoints": "oracle"}, "keypoints"),
        ({"name": "a b"}, "name"),
        ({"input": {"size": [32]}}, "input"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"val_keypoints": "oracle"}, "val_keypoints"),
        ({"missing_keypoints": "ignore"}, "missing_keypoints"),
        ({"pretrained": "/no/such/weights.safetensors"}, "does not exist"),
        ({"pretrained": "timm:"}, "needs a tag"),
        ({"pretrained": 3}, "pretrained"),
        ({"export_dtype": "int8"}, "export_dtype"),
    ],
)
def test_invalid_fields_are_named(over, field):
    with pytest.raises(ConfigError, match=field):
        _cfg(**over)


def test_missing_required_field_is_named():
    d = dict(BASE)
    del d["lr"]
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig.from_dict(d, check_family=False)


def test_predicted_keypoints_only_for_stage2():
    with pytest.raises(ConfigError, match="stage-2"):
        _cfg(family="sag2d", variant="t2", keypoints="predicted")


def test_load_config_with_overrides(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(BASE))
    cfg = load_config(p, check_family=False, overrides=dict([parse_override("epochs=5"), parse_override("notes=hello")]))
    assert cfg.epochs == 5 and cfg.notes == "hello"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(ConfigError):
        parse_override("epochs")


def test_every_shipped_config_is_valid():
    """configs/ (competition recipes) and configs/demo/: each loads and its family builds."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(p for p in root.rglob("*.json") if p.name != "plan.json")
    assert len(paths) >= 10
    names = set()
    for p in paths:
        cfg = load_config(p)
        assert cfg.name not in names, f"{p}: duplicate member name {cfg.name!r}"
        names.add(cfg.name)
