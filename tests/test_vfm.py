"""The coherence model is any timm ViT by name: its patch grid matched to the student's, prefix tokens dropped."""
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from denserc.train.vfm import VFM

TINY_VFM = {"depth": 1, "embed_dim": 24, "num_heads": 2}


@pytest.mark.parametrize("name,patch,prefix", [
    ("vit_small_patch16_dinov3", 16, 5),        # DINOv3: /16, cls + 4 registers, RoPE
    ("vit_small_patch14_dinov2", 14, 1),        # DINOv2 without registers
    ("vit_small_patch14_reg4_dinov2", 14, 5),   # DINOv2 with registers
    ("vit_small_patch16_224", 16, 1),           # any other timm ViT
])
def test_any_timm_vit_gives_patch_features_on_the_students_grid(name, patch, prefix):
    vfm = VFM(name, pretrained=False, model_kwargs=TINY_VFM)
    assert (vfm.patch_size, vfm.model.num_prefix_tokens, vfm.width) == (patch, prefix, 24)
    pixels = torch.rand(2, 3, 80, 112)  # a /16 student's 5 x 7 grid
    features = vfm(pixels, (5, 7))
    assert features.shape == (2, 35, 24)
    resized = F.interpolate(pixels, size=(5 * patch, 7 * patch), mode="bilinear", align_corners=False,
                            antialias=True) if patch != 16 else pixels  # same patch size: the same image
    with torch.no_grad():
        tokens = vfm.model.forward_features(_imagenet_style(resized, vfm.model.pretrained_cfg))
    assert tokens.shape[1] == 35 + prefix
    torch.testing.assert_close(features, tokens[:, prefix:])


def test_a_dinov3_weights_file_loads(tmp_path):
    reference = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, **TINY_VFM)
    path = tmp_path / "dinov3_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    vfm = VFM("vit_small_patch16_dinov3", weights=path, model_kwargs=TINY_VFM)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(vfm.model.state_dict()[name], tensor), name


def test_a_model_that_is_not_a_vit_is_refused_by_name():
    with pytest.raises(ValueError, match="vfm.name: resnet18 is not a timm ViT that runs at any input size"):
        VFM("resnet18", pretrained=False)
    with pytest.raises(ValueError, match=r"unknown timm model 'dinov4'; DINOv2 and DINOv3 models include .*"
                                         r"vit_base_patch16_dinov3"):
        VFM("dinov4", pretrained=False)


def _imagenet_style(pixels, config):
    """The VFM's own normalisation, written out: (pixels - mean) / std with its pretrained_cfg."""
    mean, std = (torch.tensor(config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (pixels - mean) / std
