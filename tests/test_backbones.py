import pytest
import torch

from rsna_infer.models.backbones import create_backbone


def test_2d_backbone_is_headless_with_features():
    m = create_backbone("test_resnet", dims=2, in_chans=3).eval()
    with torch.no_grad():
        y = m(torch.zeros(2, 3, 32, 32))
    assert y.shape == (2, m.num_features)


def test_3d_backbone():
    m = create_backbone("mobilenetv2_035", dims=3, in_chans=1).eval()
    with torch.no_grad():
        y = m(torch.zeros(1, 1, 16, 32, 32))
    assert y.shape == (1, m.num_features)


@pytest.mark.parametrize("kw", ["pretrained", "num_classes", "checkpoint_path"])
def test_network_or_head_kwargs_refused(kw):
    with pytest.raises(ValueError, match=kw):
        create_backbone("test_resnet", **{kw: True})


def test_unknown_arch_and_dims():
    with pytest.raises(ValueError, match="no_such_net"):
        create_backbone("no_such_net")
    with pytest.raises(ValueError, match="dims"):
        create_backbone("test_resnet", dims=4)


@pytest.mark.parametrize("arch", ["mobilenetv3_small_050", "lcnet_050"])
def test_num_features_is_the_pooled_width_for_pre_logits_heads(arch):
    m = create_backbone(arch, dims=2, in_chans=1).eval()
    with torch.no_grad():
        y = m(torch.zeros(1, 1, 64, 64))
    assert y.shape == (1, m.num_features)
