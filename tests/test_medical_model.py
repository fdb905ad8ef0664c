"""UNETR: equality with MONAI's, parameter count, decoder shapes, and checkpoints from MONAI and timm."""

from __future__ import annotations

import pytest
import torch
from tolerances import close_to_float64
from torch import nn

from backbones import create_backbone
from backbones.unetr import conv_to_perceptron, perceptron_to_conv
from backbones.weights import load_pretrained
from heads.unetr import UnetrDecoder
from tasks.medical import MedicalSegmentationModule

TINY_VIT = dict(img_size=32, embed_dim=48, depth=4, num_heads=2, out_indices=[0, 1, 2, 3])
MONAI_UNETR_BASE_PARAMS = 92_802_478  # monai 1.6.1, incl. 12 unused cross-attention LayerNorms (18,432)
UNETR_BASE_PARAMS = 92_784_046


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_module(**kwargs) -> MedicalSegmentationModule:
    args = dict(backbone="unetr_vit_base", backbone_kwargs=TINY_VIT, num_classes=3, feature_size=4)
    return MedicalSegmentationModule(**{**args, **kwargs})


@pytest.mark.slow
def test_monai_unetr_base_checkpoint_gives_the_same_logits(tmp_path):
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    ref = UNETR(
        in_channels=1, out_channels=14, img_size=(96, 96, 96), feature_size=16, hidden_size=768, mlp_dim=3072,
        num_heads=12, proj_type="perceptron", norm_name="instance", res_block=True,
    ).eval()
    torch.save(ref.state_dict(), tmp_path / "unetr.pt")
    ours = MedicalSegmentationModule(backbone="unetr_vit_base", num_classes=14, pretrained=str(tmp_path / "unetr.pt")).eval()
    assert ours.load_report.format == "monai-unetr"
    assert not ours.load_report.missing and not ours.load_report.unexpected
    # the same file into the encoder alone: the decoder is reported as skipped
    encoder = load_pretrained(create_backbone("unetr_vit_base"), tmp_path / "unetr.pt")
    assert not encoder.missing and not encoder.unexpected and "head.out.conv.conv.weight" in encoder.skipped

    n_ref = sum(p.numel() for p in ref.parameters())
    unused = sum(p.numel() for n, p in ref.named_parameters() if "norm_cross_attn" in n)
    assert n_ref == MONAI_UNETR_BASE_PARAMS
    assert sum(p.numel() for p in ours.parameters()) == n_ref - unused == UNETR_BASE_PARAMS

    x = torch.randn(1, 1, 96, 96, 96)
    with torch.no_grad():
        diff = (ref(x) - ours(x)).abs().max().item()
    assert diff <= 1e-4, diff


def test_perceptron_patch_embedding_is_our_conv_kernel():
    from einops import rearrange

    weight = torch.randn(8, 2, 4, 4, 4)
    assert torch.equal(perceptron_to_conv(conv_to_perceptron(weight), in_chans=2), weight)
    assert perceptron_to_conv(conv_to_perceptron(weight)).shape == (8, 2, 4, 4, 4)  # 128 = 4³ x 2
    x = torch.randn(1, 2, 8, 8, 8)
    patches = rearrange(x, "b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)", p1=4, p2=4, p3=4)
    conv = torch.nn.functional.conv3d(x, weight, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patches @ conv_to_perceptron(weight).T, conv, atol=1e-5, rtol=1e-5)


def test_bare_monai_vit_checkpoint_loads_into_the_backbone(tmp_path):
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    ref = ViT(in_channels=1, img_size=32, patch_size=16, hidden_size=48, mlp_dim=192, num_layers=4, num_heads=2,
              proj_type="conv").eval()
    torch.save(ref.state_dict(), tmp_path / "vit.pt")
    ours = create_backbone("unetr_vit_base", pretrained=str(tmp_path / "vit.pt"), **TINY_VIT).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        last, hidden = ref(x)
        maps = ours(x)
    tokens = [m.flatten(2).transpose(1, 2) for m in maps]  # [B, C, 2, 2, 2] -> [B, 8, C]
    torch.testing.assert_close(tokens[-1], last, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tokens[1], hidden[1], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_unetr_vit_base_preset():
    vit = create_backbone("unetr_vit_base")
    assert vit.out_indices == [3, 6, 9, 11] and vit.num_prefix_tokens == 0
    assert [f.stride for f in vit.feature_info] == [(16, 16, 16)] * 4
    assert vit.blocks[0].attn.qkv.bias is None and vit.norm.eps == 1e-5
    with pytest.raises(TypeError, match="unknown arguments"):
        create_backbone("unetr_vit_base", hidden_size=768)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(32, 32, 32), (64, 48, 32), (48, 48, 48)])
def test_output_matches_the_input_for_several_roi_sizes(size):
    module = tiny_module()
    x = torch.randn(1, 1, *size)
    out = module(x)
    assert out.shape == (1, 3, *size) and torch.isfinite(out).all()
    out.sum().backward()
    assert module.backbone.pos_embed.grad is not None


def test_multichannel_input_and_decoder_widths():
    module = tiny_module(in_channels=4)
    assert module.backbone.in_chans == 4
    assert module.head.input_block.layer.conv1.conv.in_channels == 4
    widths = [b.conv_block.conv2.conv.out_channels for b in module.head.up_blocks]
    assert widths == [32, 16, 8, 4]  # feature_size * 2**level, deepest first
    assert module(torch.randn(2, 4, 32, 32, 32)).shape == (2, 3, 32, 32, 32)


def test_patch_8_uses_three_levels():
    module = tiny_module(backbone_kwargs={**TINY_VIT, "patch_size": 8, "out_indices": [1, 2, 3]})
    assert len(module.head.up_blocks) == 3 and len(module.head.skip_blocks) == 2
    assert module(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_decoder_rejects_features_that_do_not_match_the_patch():
    vit = create_backbone("unetr_vit_base", **{**TINY_VIT, "out_indices": [1, 3]})
    with pytest.raises(ValueError, match="needs 2 feature maps at one isotropic stride 2\\*\\*2"):
        UnetrDecoder(vit.feature_info, in_chans=1, num_classes=2)


def test_image_vit_checkpoint_initialises_the_3d_encoder_by_inflation(tmp_path):
    import timm

    image_vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    torch.save(image_vit.state_dict(), tmp_path / "vit_tiny.pth")
    kwargs = dict(img_size=32, embed_dim=192, depth=12, num_heads=3, out_indices=[3, 6, 9, 11])
    module = MedicalSegmentationModule(
        backbone="unetr_vit_base", backbone_kwargs=kwargs, num_classes=3, feature_size=4,
        pretrained=str(tmp_path / "vit_tiny.pth"),
    )
    report = module.load_report
    assert {"backbone.patch_embed.proj.weight", "backbone.pos_embed"} <= set(report.adapted)
    assert "backbone.blocks.11.mlp.fc2.weight" in report.loaded
    kernel_2d = image_vit.patch_embed.proj.weight.detach()  # [192, 3, 16, 16]
    kernel_3d = module.backbone.patch_embed.proj.weight.detach()  # [192, 1, 16, 16, 16]
    torch.testing.assert_close(kernel_3d.sum(2), kernel_2d.sum(1, keepdim=True), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(module.backbone.blocks[5].attn.qkv.weight, image_vit.blocks[5].attn.qkv.weight)
    out = module(torch.randn(1, 1, 32, 32, 32))
    assert out.shape == (1, 3, 32, 32, 32) and torch.isfinite(out).all()


@pytest.mark.slow
def test_channels_last_instance_norm_is_exact_on_a_full_resolution_map():
    """Over a 96³ map the kernel's statistics stay as exact as PyTorch's contiguous instance norm (the norm's
    outputs within a few times that kernel's own error against float64), without copying the map out of its
    channels-last layout."""
    from ops.norms3d import instance_norm_act

    torch.manual_seed(0)
    x = torch.randn(1, 32, 96, 96, 96) * 3 + 5  # UNETR's widest full-resolution map, off-centre
    weight, bias = torch.rand(32) + 0.5, torch.rand(32) * 2 - 1
    with torch.no_grad():
        exact = torch.nn.functional.instance_norm(x.double(), weight=weight.double(), bias=bias.double())
        contiguous = torch.nn.functional.instance_norm(x, weight=weight, bias=bias)  # PyTorch's exact kernel
        out = instance_norm_act(x.contiguous(memory_format=torch.channels_last_3d), weight, bias)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    close_to_float64(out, contiguous, exact)


@pytest.mark.parametrize("channels_last", [True, False])
def test_instance_norm_act_gradients_match_autograd_in_float64(channels_last):
    from ops.norms3d import instance_norm_act

    x = (torch.randn(2, 6, 5, 7, 4, dtype=torch.float64) * 2 + 3).requires_grad_()
    weight, bias = torch.randn(6, dtype=torch.float64).requires_grad_(), torch.randn(6, dtype=torch.float64).requires_grad_()
    grad = torch.randn(2, 6, 5, 7, 4, dtype=torch.float64)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    for slope in (0.01, 1.0):
        ours = instance_norm_act(x.contiguous(memory_format=layout), weight, bias, 1e-5, slope)
        expected = torch.nn.functional.leaky_relu(torch.nn.functional.instance_norm(x, weight=weight, bias=bias), slope)
        torch.testing.assert_close(ours, expected)
        torch.testing.assert_close(torch.autograd.grad(ours, (x, weight, bias), grad),
                                   torch.autograd.grad(expected, (x, weight, bias), grad))


@pytest.mark.slow
def test_channels_last_decoder_keeps_names_outputs_and_gradients():
    """The fused channels-last decoder has MONAI's parameter names (NCDHW or not), and its logits and gradients are
    within a few times those of MONAI's blocks in the same layout (``cpu_kernels: off``) from float64."""
    from ops.unetr_blocks import FusedOutBlock, FusedResBlock

    torch.manual_seed(0)
    ncdhw, fused = tiny_module(channels_last=False), tiny_module(channels_last=True, cpu_kernels="on")
    plain, exact = tiny_module(channels_last=True), tiny_module(channels_last=False).double()
    assert list(fused.state_dict()) == list(ncdhw.state_dict()) == list(plain.state_dict())
    for module in (fused, plain, exact):
        module.load_state_dict(ncdhw.state_dict())
    assert isinstance(fused.head.up_blocks[0].conv_block, FusedResBlock) and isinstance(fused.head.out, FusedOutBlock)
    x = torch.randn(2, 1, 32, 32, 32)
    out_plain, out_fused, out_exact = plain(x), fused(x), exact(x.double())
    close_to_float64(out_fused, out_plain, out_exact)
    for out in (out_plain, out_fused, out_exact):
        out.square().mean().backward()
    grads, exact_grads = dict(plain.named_parameters()), dict(exact.named_parameters())
    for name, p in fused.named_parameters():
        close_to_float64(p.grad, grads[name].grad, exact_grads[name].grad, what=name)


def test_output_block_returns_a_channels_last_input_gradient():
    from monai.networks.blocks import UnetOutBlock

    from ops.unetr_blocks import FusedOutBlock

    torch.manual_seed(0)
    ref = UnetOutBlock(3, 16, 5)
    fused = FusedOutBlock(UnetOutBlock(3, 16, 5))
    fused.load_state_dict(ref.state_dict())
    exact = UnetOutBlock(3, 16, 5).double()
    exact.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 6, 7, 8).contiguous(memory_format=torch.channels_last_3d)
    x_ref, x_fused, x_exact = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    out_ref, out_fused, out_exact = ref(x_ref), fused(x_fused), exact(x_exact)
    assert out_fused.is_contiguous()  # NCDHW logits for the loss
    close_to_float64(out_fused, out_ref, out_exact)
    grad = torch.randn_like(out_ref)
    expected = torch.autograd.grad(out_ref, [x_ref, *ref.parameters()], grad)
    got = torch.autograd.grad(out_fused, [x_fused, *fused.parameters()], grad)
    exact_grads = torch.autograd.grad(out_exact, [x_exact, *exact.parameters()], grad.double())
    # the next block's backward reads it with its own channels-last maps: one layout, no strided pass
    assert got[0].is_contiguous(memory_format=torch.channels_last_3d)
    for a, b, c in zip(got, expected, exact_grads):
        close_to_float64(a, b, c)


def test_batch_one_convolution_as_two_halves_equals_the_convolution():
    from ops.unetr_blocks import pointwise

    conv = torch.nn.Conv3d(32, 16, 3, padding=1)
    exact = torch.nn.Conv3d(32, 16, 3, padding=1).double()
    exact.load_state_dict(conv.state_dict())
    x = torch.randn(1, 32, 12, 10, 8).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    out = pointwise(conv, x)  # 32 x 12 x 10 <= 20480: PyTorch's native kernel; here a batch of two halves
    expected, out64 = conv(x), exact(x64)
    close_to_float64(out, expected, out64)
    grad = torch.randn_like(expected)
    for a, b, c in zip(torch.autograd.grad(out, (x, conv.weight, conv.bias), grad),
                       torch.autograd.grad(expected, (x, conv.weight, conv.bias), grad),
                       torch.autograd.grad(out64, (x64, exact.weight, exact.bias), grad.double())):
        close_to_float64(a, b, c)


# projected residual / identity with affine norms / UNETR's first block (1-channel input: its own weight gradient)
@pytest.mark.parametrize("cin,affine", [(32, False), (16, True), (1, False)])
def test_fused_residual_block_equals_monai_forward_and_backward(cin, affine):
    from monai.networks.blocks.dynunet_block import UnetResBlock

    from ops.unetr_blocks import FusedResBlock

    torch.manual_seed(0)
    norm = ("instance", {"affine": affine})
    ref = UnetResBlock(3, cin, 16, 3, 1, norm).double()
    for m in ref.modules():
        if isinstance(m, torch.nn.InstanceNorm3d) and affine:
            torch.nn.init.uniform_(m.weight, 0.5, 1.5), torch.nn.init.uniform_(m.bias, -1, 1)
    fused = FusedResBlock(UnetResBlock(3, cin, 16, 3, 1, norm))
    fused.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    ref32 = UnetResBlock(3, cin, 16, 3, 1, norm)  # MONAI in fp32: the rounding error to stay within
    ref32.load_state_dict(fused.state_dict())
    # 16 x 24 x 64 > 20480: no convolution here gets PyTorch's native kernel, so the fused function runs
    x = (torch.randn(1, cin, 24, 64, 4) * 2 + 1).contiguous(memory_format=torch.channels_last_3d)
    x64, x32, x_ref32 = x.double().requires_grad_(cin > 1), x.clone().requires_grad_(cin > 1), x.clone().requires_grad_(cin > 1)
    assert fused._fusable(x32)
    expected, out, out_ref32 = ref(x64), fused(x32), ref32(x_ref32)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    close_to_float64(out, out_ref32, expected)
    with torch.no_grad():  # inference: in place, the same values
        close_to_float64(fused(x), out_ref32, expected)
    grad = torch.randn_like(expected)
    inputs = ([x64], [x32], [x_ref32]) if cin > 1 else ([], [], [])
    for a, b, c in zip(torch.autograd.grad(expected, [*inputs[0], *ref.parameters()], grad),
                       torch.autograd.grad(out, [*inputs[1], *fused.parameters()], grad.float()),
                       torch.autograd.grad(out_ref32, [*inputs[2], *ref32.parameters()], grad.float())):
        close_to_float64(b, c, a)


def test_fused_up_block_joins_the_skip_without_concatenating():
    from monai.networks.blocks import UnetrUpBlock

    from ops.unetr_blocks import FusedUpBlock, fuse_decoder_blocks

    torch.manual_seed(0)
    args = dict(spatial_dims=3, in_channels=32, out_channels=16, kernel_size=3, upsample_kernel_size=2,
                norm_name="instance", res_block=True)
    ref = UnetrUpBlock(**args).double()
    holder = fuse_decoder_blocks(nn.ModuleList([UnetrUpBlock(**args)]), "on")
    fused = holder[0]
    assert isinstance(fused, FusedUpBlock)
    fused.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    ref32 = UnetrUpBlock(**args)
    ref32.load_state_dict(fused.state_dict())
    cl = torch.channels_last_3d
    inp = torch.randn(1, 32, 12, 32, 2).contiguous(memory_format=cl)
    skip = (torch.randn(1, 16, 24, 64, 4) + 1).contiguous(memory_format=cl)
    ins64 = [t.double().requires_grad_() for t in (inp, skip)]
    ins32 = [t.clone().requires_grad_() for t in (inp, skip)]
    ins_ref32 = [t.clone().requires_grad_() for t in (inp, skip)]
    expected, out, out_ref32 = ref(*ins64), fused(*ins32), ref32(*ins_ref32)
    close_to_float64(out, out_ref32, expected)
    with torch.no_grad():
        close_to_float64(fused(inp, skip), out_ref32, expected)
    grad = torch.randn_like(expected)
    for a, b, c in zip(torch.autograd.grad(expected, [*ins64, *ref.parameters()], grad),
                       torch.autograd.grad(out, [*ins32, *fused.parameters()], grad.float()),
                       torch.autograd.grad(out_ref32, [*ins_ref32, *ref32.parameters()], grad.float())):
        close_to_float64(b, c, a)
