"""Initial weights for training: a local "pretrained" file (built here; no test downloads) is
where training starts, key by key, with the first convolution adapted as timm does and 2-D
kernels inflated for 3-D models; what was loaded, adapted, left random is reported; a file
of another architecture is refused; inference never sees any of it."""

import json

import numpy as np
import pytest
import timm
import torch
import train_toys as T
from safetensors.torch import load_file, save_file
from timm.models import adapt_input_conv
from torch import nn

from rsna_infer.models.backbones import create_backbone, find_backbones
from rsna_infer.models.family import GradingFamily, Sample
from rsna_infer.train.data import TrainingData
from rsna_infer.train.init_weights import InitError, init_backbones, load_into, read_state_dict
from rsna_infer.train.trainer import train_fold


def _imagenet_like(arch="test_resnet", seed=1):
    """A 3-channel timm model with its classifier: what a pretrained checkpoint looks like."""
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in timm.create_model(arch, pretrained=False, num_classes=7).state_dict().items()}


class BackboneGrader(GradingFamily):
    """The toy grader on a real timm backbone (1-channel 32x32 input), as the families build it."""

    name = "roi"

    def build(self):
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = create_backbone("test_resnet", dims=2, in_chans=1)
                self.head = nn.Linear(self.backbone.num_features, 75)

            def forward(self, batch):
                return self.head(self.backbone(batch["image"]))

        return Net()

    def prepare(self, study, keypoints=None, rng=None):
        _, _, img = T.centre_slice(study)
        img = np.kron(img, np.ones((1, 3, 2), np.float32))[:, :32, :32]
        img = np.pad(img, ((0, 0), (0, 32 - img.shape[1]), (0, 32 - img.shape[2])))
        mask = np.zeros((5, 5), bool)
        mask[0] = True
        return [Sample(study.study_id, {"image": img}, mask=mask)]

    def example_batch(self, batch_size=2):
        return {"image": torch.zeros(batch_size, 1, 32, 32)}

    def run(self, model, batch, tta=False):
        return model(batch).view(-1, 5, 5, 3)

    def loss(self, output, labels, mask):
        return super().loss(output.view(-1, 5, 5, 3), labels, mask)


@pytest.fixture
def backbone_family(monkeypatch):
    from rsna_infer.models import registry

    real = registry.family_class
    monkeypatch.setattr(registry, "family_class", lambda name: BackboneGrader if name == "roi" else real(name))


@pytest.fixture
def data(tmp_path):
    return TrainingData.open(T.write_toy_root(tmp_path / "root"), cache_dir=tmp_path / "cache", loader=T.toy_study)


def test_training_starts_from_a_local_pretrained_file(backbone_family, data, tmp_path):
    src = _imagenet_like()
    file = tmp_path / "imagenet_test_resnet.safetensors"
    save_file(src, str(file))
    # a tiny learning rate and one step: the exported weights are the initial ones to ~1e-8
    cfg = T.toy_config("roi", "spinal", epochs=1, lr=1e-9, pretrained=str(file))
    res = train_fold(cfg, data, 0, tmp_path / "run", progress=False, max_steps=1)
    got = load_file(str(tmp_path / "run" / res.entry.file))
    first = "backbone.conv1.0.weight"
    assert got[first].shape[1] == 1 and src["conv1.0.weight"].shape[1] == 3
    np.testing.assert_allclose(got[first], adapt_input_conv(1, src["conv1.0.weight"]), atol=1e-6)  # as timm adapts it
    loaded = [k for k in src if f"backbone.{k}" in got and k != "conv1.0.weight"]
    assert len(loaded) > 50
    stats = ("running_mean", "running_var", "num_batches_tracked")  # batch norm statistics move in any training forward
    for k in (k for k in loaded if not k.endswith(stats)):
        np.testing.assert_allclose(got[f"backbone.{k}"].float(), src[k].float(), atol=1e-6, err_msg=k)
    # ... and not by chance: a run from random weights starts elsewhere
    rand = train_fold(T.toy_config("roi", "spinal", epochs=1, lr=1e-9), data, 0, tmp_path / "rand", progress=False, max_steps=1)
    other = load_file(str(tmp_path / "rand" / rand.entry.file))
    assert not torch.allclose(other["backbone.layer1.0.conv1.weight"], src["layer1.0.conv1.weight"], atol=1e-3)
    # the run says what it did
    init = json.loads((tmp_path / "run" / "run_f0.json").read_text())["initial_weights"]
    assert len(init) == 1 and init[0]["backbone"] == "backbone" and init[0]["source"].startswith(f"file:{file}")
    assert init[0]["loaded"] == len(loaded) + 1 and init[0]["random"] == []
    assert init[0]["adapted"] == ["conv1.0.weight: 3 -> 1 input channels"]
    assert sorted(init[0]["unused"]) == ["fc.bias", "fc.weight"]
    # inference never sees the field: the exported entry is an ordinary one
    entry = json.loads((tmp_path / "run" / "manifest_f0.json").read_text())["models"][0]
    assert "pretrained" not in json.dumps(entry)


def test_torch_state_dict_files_load_with_weights_only(tmp_path):
    src = _imagenet_like()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.items()}}, path)  # DDP-saved, wrapped
    assert set(read_state_dict(path)) == {f"module.{k}" for k in src}
    bb = create_backbone("test_resnet", dims=2, in_chans=3)
    (report,) = init_backbones(bb, str(path))
    assert not report.random and not report.adapted
    assert torch.equal(bb.state_dict()["layer2.0.conv1.weight"], src["layer2.0.conv1.weight"])
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": print}, evil)  # would need code to unpickle
    with pytest.raises(InitError, match="weights_only"):
        read_state_dict(evil)


def test_2d_weights_inflate_into_a_3d_backbone():
    torch.manual_seed(2)
    src = {k: v.contiguous() for k, v in timm.create_model("mobilenetv2_035", pretrained=False).state_dict().items()}
    bb = create_backbone("mobilenetv2_035", dims=3, in_chans=1)
    rep = load_into(bb, src, arch="mobilenetv2_035", description="test")
    assert not rep.random and any("inflated to 3-D" in a for a in rep.adapted)
    # k copies along the new axis, divided by k: on an input constant along that axis the 3-D
    # kernel responds like the 2-D one
    w3, w2 = bb.state_dict()["blocks.0.0.conv_dw.weight"], src["blocks.0.0.conv_dw.weight"]
    assert w3.shape == (*w2.shape, w2.shape[-1])
    np.testing.assert_allclose(w3.sum(-1), w2, atol=1e-6)
    stem = bb.state_dict()["conv_stem.weight"]  # 3 -> 1 channel first, then inflated
    assert stem.shape[1] == 1
    np.testing.assert_allclose(stem.sum(-1), adapt_input_conv(1, src["conv_stem.weight"]), atol=1e-5)


def test_weights_of_another_architecture_are_refused():
    bb = create_backbone("test_resnet", dims=2, in_chans=1)
    with pytest.raises(InitError, match=r"test_efficientnet.*test_resnet|nothing fits|random"):
        load_into(bb, _imagenet_like("test_efficientnet"), arch="test_resnet", description="timm:test_efficientnet")


def test_timm_tag_fetches_through_timm_on_the_training_machine(monkeypatch):
    """``"timm"`` / ``"timm:TAG"`` go through timm's own pretrained loading (the download is
    replaced here by a local model: no test touches the network)."""
    calls = []
    real = timm.create_model

    def fake(name, pretrained=False, **kw):
        calls.append((name, pretrained))
        torch.manual_seed(5)
        return real(name.split(".")[0], pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", fake)
    model = nn.Module()
    model.backbone = create_backbone("test_resnet", dims=2, in_chans=3)
    model.axial = create_backbone("test_efficientnet", dims=2, in_chans=1)
    reports = init_backbones(model, {"test_resnet": "timm:r160_in1k", "test_efficientnet": "timm"})
    assert ("test_resnet.r160_in1k", True) in calls and ("test_efficientnet", True) in calls
    assert [r.backbone for r in reports] == ["backbone", "axial"] and all(not r.random for r in reports)
    assert [p for p, _, _ in find_backbones(model)] == ["backbone", "axial"]


def test_inference_builds_never_pretrained(monkeypatch):
    """The predictor's builds go through create_backbone, which always says pretrained=False."""
    seen = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: seen.append(k.get("pretrained")) or real(*a, **k))
    create_backbone("test_resnet", dims=2, in_chans=1)
    assert seen == [False]


@pytest.mark.parametrize("arch", ["test_convnext", "test_resnet"])
def test_feature_map_backbone_starts_from_the_full_model_s_weights(arch):
    """The heatmap head's backbone (timm ``features_only``, module names flattened with '_'
    in place of the nesting dots) is found and loaded from a full model's checkpoint."""
    from rsna_infer.models.backbones import create_feature_backbone

    source = _imagenet_like(arch)
    net = nn.Sequential()
    net.add_module("backbone", create_feature_backbone(arch, dims=2, in_chans=1, min_stride=4))
    assert [p for p, _, _ in find_backbones(net)] == ["backbone"]
    report = load_into(net.backbone, source, path="backbone", arch=arch)
    assert report.random_share == 0.0 and report.loaded, report.summary()
    assert any("input channels" in a for a in report.adapted)
