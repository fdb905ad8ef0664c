"""ViT-ResNAS: the searched architectures, residual spatial reduction, release checkpoints (their layout and
outputs: test_release_formats), a task run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_runs import assert_trained
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from backbones import create_backbone
from backbones.vit_resnas import ViTResNAS
from backbones.weights import load_pretrained, read_checkpoint
from tasks.classification import main

MINI = {
    "embed_dims": (16, 24, 32), "num_heads": ((2,), (3,), ()), "head_dims": (8, 8, 8),
    "mlp_hidden_dims": ((32,), (40,), ()),
}

# Parameters with a 1000-class classifier (the release's ``cls_head``, without the token-labelling
# ``patch_head``) and MACs at 224² (the release's network_utils/compute_flop_mac.py, classifier included).
RELEASE_PARAMS = {"vit_resnas_tiny": 40_793_552, "vit_resnas_small": 63_724_108, "vit_resnas_medium": 96_442_672}
RELEASE_MACS = {"vit_resnas_tiny": 1_782_630_272, "vit_resnas_small": 2_845_501_856, "vit_resnas_medium": 4_513_135_936}
STEM_3X3_PARAMS = 3 * 24 * 9 + 2 * 24 * 24 * 9 + 3 * 2 * 24  # what the 40.78M / 63.71M / 96.43M leave out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RELEASE_PARAMS))
def test_parameters_and_macs_at_224_match_the_release(name: str) -> None:
    with torch.device("meta"):
        model = create_backbone(name).eval()
        x = torch.empty(1, 3, 224, 224)
    classifier = model.num_features * 1000 + 1000
    params = sum(p.numel() for p in model.parameters())
    assert params + classifier == RELEASE_PARAMS[name]
    assert round((params + classifier - STEM_3X3_PARAMS) / 1e6, 2) == {
        "vit_resnas_tiny": 40.78, "vit_resnas_small": 63.71, "vit_resnas_medium": 96.43
    }[name]
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        tokens = model.forward_tokens(x)
    assert tokens.shape == (1, 1 + 4 * 4, model.num_features)
    assert counter.get_total_flops() // 2 + model.num_features * 1000 == RELEASE_MACS[name]


def test_contract_at_112_and_stage_layout() -> None:
    model = create_backbone("vit_resnas_tiny", img_size=112, depth=1)
    assert [(i.channels, i.stride) for i in model.feature_info] == [(176, (14, 14)), (352, (28, 28)), (704, (56, 56))]
    assert [len(s.blocks) for s in model.stages] == [1, 1, 1]
    assert model.stages[0].reduce is None and model.stages[2].blocks[0].attn.qkv.out_features == 3 * 10 * 64
    x = torch.randn(2, 3, 112, 112)
    feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, 176, 8, 8), (2, 352, 4, 4), (2, 704, 2, 2)]
    assert all(torch.isfinite(f).all() for f in feats)
    sum(f.square().mean() for f in feats).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        tokens = model.forward_tokens(x)
        assert torch.allclose(model(x)[-1].flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-6)
    assert model.num_prefix_tokens == 1 and model.default_pool == "cls" and model.no_weight_decay() == {"cls_token"}


def test_other_input_sizes_and_out_indices() -> None:
    model = create_backbone("vit_resnas_tiny", img_size=112, depth=1, out_indices=(-2,)).eval()
    assert [i.stride for i in model.feature_info] == [(28, 28)]
    with torch.no_grad():
        for h, w in ((112, 112), (168, 112), (64, 224)):
            (f,) = model(torch.randn(1, 3, h, w))
            assert f.shape == (1, 352, h // 28, w // 28)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 3, 84, 112))
    with pytest.raises(TypeError, match="unknown arguments"):
        create_backbone("vit_resnas_tiny", patch=16)
    with pytest.raises(ValueError, match="must not decrease"):
        ViTResNAS(**{**MINI, "embed_dims": (16, 8, 32)})


def test_residual_spatial_reduction_pools_pads_and_projects() -> None:
    model = ViTResNAS(img_size=112, **MINI).eval()
    reduce = model.stages[1].reduce
    x = torch.randn(2, 1 + 8 * 8, 16)
    with torch.no_grad():
        for param in (reduce.conv.weight, reduce.conv.bias, reduce.token_proj.weight, reduce.token_proj.bias):
            param.zero_()
        reduce.pos_embed.fill_(0.5)
        y, grid = reduce(x, (8, 8))
        pooled = F.avg_pool2d(x[:, 1:].transpose(1, 2).reshape(2, 16, 8, 8), 2).flatten(2).transpose(1, 2)
        assert grid == (4, 4) and y.shape == (2, 1 + 16, 24)
        assert torch.equal(y[:, :1, :16], x[:, :1]) and not y[:, :1, 16:].any()  # class token: zero-padded self
        assert torch.allclose(y[:, 1:, :16], pooled + 0.5) and torch.equal(y[:, 1:, 16:], torch.full((2, 16, 8), 0.5))
        reduce.token_proj.bias.fill_(1.0)
        y2, _ = reduce(x, (8, 8))
        assert torch.allclose(y2[:, :1], y[:, :1] + 1.0)  # the class token's linear path is added to the skip


RELEASE_FILE = Path(__file__).parent / "data/releases/vit_resnas/tiny_checkpoint.pth.tar"  # the release's own code wrote it
RELEASE_TINY = {"embed_dims": (16, 24, 32), "head_dims": (8, 8, 16), "num_heads": ((2,), (3,), (2,)),
                "mlp_hidden_dims": ((32,), (40,), (48,))}


def test_release_checkpoint_from_another_resolution_is_resampled(tmp_path: Path) -> None:
    """The release's file (made at 112²) into a model at 168²: the three position embeddings are resampled; a
    distillation model's two prefix tokens are refused, naming them."""
    model = ViTResNAS(img_size=168, **RELEASE_TINY)
    report = load_pretrained(model, RELEASE_FILE)
    assert sorted(report.adapted) == [
        "backbone.pos_embed", "backbone.stages.1.reduce.pos_embed", "backbone.stages.2.reduce.pos_embed"
    ]
    assert not report.missing and not report.unexpected
    state = read_checkpoint(RELEASE_FILE)  # its ``model`` entry
    state["tokens"] = torch.zeros(1, 2, 16)
    torch.save({"model": state}, tmp_path / "distilled.pth")
    with pytest.raises(ValueError, match="distillation"):
        load_pretrained(model, tmp_path / "distilled.pth")


@pytest.mark.slow
def test_classification_fast_dev_run(tmp_path: Path) -> None:
    cli = main([
        "fit", "--config=configs/vit_resnas_tiny.yaml", "--trainer.fast_dev_run=2", "--data.num_workers=0",
        (
            "--model.backbone_kwargs={img_size: 112, stem_channels: 8, embed_dims: [16, 24, 32], "
            "head_dims: [8, 8, 8], num_heads: [[2], [3], [4]], mlp_hidden_dims: [[32], [48], [64]]}"
        ),
        "--data.batch_size=4", f"--trainer.default_root_dir={tmp_path}", "--data.synthetic_train_per_class=8",
    ])
    assert_trained(cli)


@pytest.mark.slow
def test_segmentation_fast_dev_run_over_the_three_maps(tmp_path: Path) -> None:
    from tasks.segmentation import main as segmentation_main

    cli = segmentation_main([
        "fit", "--config=configs/segformer_b0.yaml", "--model.backbone=vit_resnas_tiny", "--trainer.fast_dev_run=2",
        (
            "--model.backbone_kwargs={img_size: 112, stem_channels: 8, embed_dims: [16, 24, 32], "
            "head_dims: [8, 8, 8], num_heads: [[2], [3], [4]], mlp_hidden_dims: [[32], [48], [64]]}"
        ),
        "--model.decoder_dim=16", "--data.synthetic_size=112", "--data.crop_size=[112, 112]", "--data.synthetic_train=4",
        "--data.synthetic_val=2", "--data.batch_size=2", "--data.val_batch_size=2", "--data.num_workers=0",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu",
    ])
    assert_trained(cli)
    assert len(cli.model.head.linear) == 3  # the decoder reads the three stage maps
