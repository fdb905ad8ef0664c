"""Every release format the suite reads, proven on files written by the release's own code.

``tests/data/releases/<name>/`` holds, per format, tiny checkpoints saved by the original repository's model code
(random weights, fixed seed) in the release's own file format and layout, that code's outputs for a fixed input, and
for the full-size presets a manifest of every key and shape of the original model's state dict; ``PROVENANCE.md``
beside them names the repository, commit, function and command (the writers are ``tools/release_fixtures/*.py``).
Here each file loads through ``pretrained=`` and must give the stored outputs, and each manifest, converted by our
format converter, must give exactly our preset's keys and shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from backbones import create_backbone
from backbones.weights import detect_format

DATA = Path(__file__).parent / "data" / "releases"


def meta_state(shapes: dict[str, list[int]], prefix: str = "") -> dict[str, torch.Tensor]:
    """A state dict of the manifest's names and shapes on the meta device (nothing allocated)."""
    return {prefix + k: torch.empty(v, device="meta") for k, v in shapes.items()}


def assert_same_layout(
    converted: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], backbone=None, adapted: tuple[str, ...] = ()
) -> None:
    """Every converted key is one of ours with our shape, and every one of ours is converted; the keys in ``adapted``
    (only those) take our shape through ``backbone.adapt_checkpoint_tensor``, as loading does."""
    assert sorted(set(ours) - set(converted)) == [], "keys of ours the release does not give"
    assert sorted(set(converted) - set(ours)) == [], "release keys with no place in ours"
    differ = sorted(k for k, v in converted.items() if v.shape != ours[k].shape)
    assert differ == sorted(adapted)
    for key in differ:
        tensor = backbone.adapt_checkpoint_tensor(key.removeprefix("backbone."), converted[key])
        assert tensor is not None and tensor.shape == ours[key].shape, key


def our_layout(backbone, head) -> dict[str, torch.Tensor]:
    ours = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    ours.update({f"head.{k}": v for k, v in head.state_dict().items()})
    return ours


# --- big_vision .npz (google-research/big_vision, big_vision/models/vit.py) ----------------------------------

BIG_VISION = DATA / "big_vision"
BV_TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 1.5,
           "mlp_act": "gelu_tanh"}


@pytest.mark.parametrize(("name", "pool"), [("vit_gap", "avg"), ("vit_tok_scan", "cls"), ("vit_map", "map")])
def test_big_vision_npz_gives_big_vision_logits(name: str, pool: str) -> None:
    from tasks.classification import ClassificationModule

    ours = ClassificationModule(
        backbone="vit_tiny_patch16", num_classes=5, pool=pool, pretrained=str(BIG_VISION / f"{name}.npz"),
        backbone_kwargs={**BV_TINY, "class_token": pool == "cls"},
    ).eval()
    report = ours.load_report
    assert report.format == "big_vision-vit" and not report.missing and not report.unexpected and not report.notes
    with torch.no_grad():
        logits = ours(torch.from_numpy(np.load(BIG_VISION / "input.npy")))
    torch.testing.assert_close(logits, torch.from_numpy(np.load(BIG_VISION / f"{name}_logits.npy")), rtol=0, atol=1e-4)


def test_big_vision_npz_with_the_exact_gelu_is_named() -> None:
    from tasks.classification import ClassificationModule

    ours = ClassificationModule(backbone="vit_tiny_patch16", num_classes=5, pool="avg",
                                pretrained=str(BIG_VISION / "vit_gap.npz"),
                                backbone_kwargs={**BV_TINY, "mlp_act": "gelu", "class_token": False})
    assert any("mlp_act: gelu_tanh" in note for note in ours.load_report.notes)


def test_big_vision_npz_with_sincos_position_embeddings_is_refused() -> None:
    """big_vision's posemb='sincos2d' models save no pos_embedding: the error names the file and the reason."""
    with pytest.raises(ValueError, match=r"vit_sincos\.npz \(format big_vision-vit\): it has no pos_embedding.*sincos2d"):
        create_backbone("vit_tiny_patch16", **{**BV_TINY, "class_token": False},
                        pretrained=str(BIG_VISION / "vit_sincos.npz"))


@pytest.mark.parametrize("preset", json.loads((BIG_VISION / "manifests.json").read_text()))
def test_big_vision_manifest_matches_the_preset(preset: str) -> None:
    from backbones.formats.big_vision import convert_big_vision_vit
    from heads.classification import classification_head

    manifest = json.loads((BIG_VISION / "manifests.json").read_text())[preset]
    state = meta_state(manifest["keys"], prefix="params/")
    assert detect_format(state).name == "big_vision-vit"
    pool = {"gap": "avg", "map": "map"}[manifest["pool_type"]]
    with torch.device("meta"):
        backbone = create_backbone(preset, class_token=False, mlp_act="gelu_tanh", img_size=manifest["img_size"])
        head = classification_head(backbone, manifest["num_classes"], pool)
    assert_same_layout(convert_big_vision_vit(state), our_layout(backbone, head))


# --- TimeSformer .pyth (facebookresearch/TimeSformer, timesformer/models/vit.py) -------------------------------

TIMESFORMER = DATA / "timesformer"
ATTENTION = {"divided_space_time": "divided", "joint_space_time": "joint", "space_only": "space_only"}


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_timesformer_pyth_gives_the_release_logits(attention: str) -> None:
    from tasks.video import VideoClassificationModule

    ours = VideoClassificationModule(
        backbone="timesformer_nano_patch8", num_classes=5, pretrained=str(TIMESFORMER / f"{attention}.pyth"),
        backbone_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_frames": 4,
                         "attention": ATTENTION[attention]},
    ).eval()
    report = ours.load_report
    assert report.format == "timesformer-release" and not report.missing and not report.unexpected
    assert report.adapted == ["backbone.patch_embed.proj.weight"]  # the release's per-frame 2-D kernel
    with torch.no_grad():
        logits = ours(torch.from_numpy(np.load(TIMESFORMER / "input.npy")))
    expected = torch.from_numpy(np.load(TIMESFORMER / f"{attention}_logits.npy"))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("release", json.loads((TIMESFORMER / "manifests.json").read_text()))
def test_timesformer_manifest_matches_the_preset(release: str) -> None:
    from backbones.weights import _convert_timesformer_release
    from heads.classification import classification_head

    manifest = json.loads((TIMESFORMER / "manifests.json").read_text())[release]
    state = meta_state(manifest["keys"])
    assert detect_format(state).name == "timesformer-release"
    with torch.device("meta"):
        backbone = create_backbone("timesformer_base_patch16", num_frames=manifest["num_frames"],
                                   img_size=manifest["img_size"], attention=ATTENTION[manifest["attention_type"]])
        head = classification_head(backbone, manifest["num_classes"], "cls")
    assert_same_layout(_convert_timesformer_release(state), our_layout(backbone, head), backbone,
                       adapted=("backbone.patch_embed.proj.weight",))


# --- DynamicViT .pth (raoyongming/DynamicViT, models/dyvit.py VisionTransformerDiffPruning) ---------------------

DYNAMICVIT = DATA / "dynamicvit"
DEIT = {"deit-s": "vit_small_patch16", "deit-256": "vit_small_patch16", "deit-b": "vit_base_patch16"}


def test_dynamicvit_pth_gives_the_release_pruned_logits() -> None:
    """The release's inference (top-k tokens gathered before blocks 1, 2, 3 at rho 0.7) and ours give one answer."""
    from tasks.classification import ClassificationModule

    ours = ClassificationModule(
        backbone="vit_small_patch16", num_classes=5, pretrained=str(DYNAMICVIT / "deit_tiny.pth"),
        token_pruning=True, keep_ratio=0.7, prune_at=[1, 2, 3],
        backbone_kwargs={"img_size": 56, "patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2},
    ).eval()
    report = ours.load_report
    assert report.format == "dynamicvit-release" and not report.missing and not report.unexpected
    assert "backbone.predictors.2.score.4.weight" in report.loaded
    with torch.no_grad():
        logits = ours(torch.from_numpy(np.load(DYNAMICVIT / "input.npy")))
    expected = torch.from_numpy(np.load(DYNAMICVIT / "deit_tiny_logits.npy"))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("release", list(DEIT))
def test_dynamicvit_manifest_matches_the_preset(release: str) -> None:
    from backbones.formats.dynamicvit import convert_dynamicvit_release
    from backbones.token_pruning import DynamicViT
    from heads.classification import classification_head

    manifest = json.loads((DYNAMICVIT / "manifests.json").read_text())[release]
    state = meta_state(manifest["keys"])
    assert detect_format(state).name == "dynamicvit-release"
    with torch.device("meta"):
        vit = create_backbone(DEIT[release], embed_dim=manifest["embed_dim"], num_heads=manifest["num_heads"])
        backbone = DynamicViT.from_vit(vit, keep_ratio=0.7, prune_at=manifest["pruning_loc"])
        head = classification_head(backbone, manifest["num_classes"], "cls")
    assert_same_layout(convert_dynamicvit_release(state), our_layout(backbone, head))


# --- EfficientFormerV2 .pth (snap-research/EfficientFormer, models/efficientformer_v2.py) ----------------------

EFFICIENTFORMER = DATA / "efficientformer_v2"


def test_efficientformer_v2_pth_gives_the_release_logits() -> None:
    from tasks.classification import ClassificationModule

    ours = ClassificationModule(
        backbone="efficientformerv2_s0", num_classes=5, pool="native", pretrained=str(EFFICIENTFORMER / "tiny.pth"),
        backbone_kwargs={"embed_dims": (8, 16, 24, 32), "depths": (1, 1, 2, 2), "attention_blocks": 1,
                         "mlp_ratios": (2, 2, (2, 3), (3, 2)), "img_size": 64},
    ).eval()
    report = ours.load_report
    assert report.format == "efficientformerv2-release" and not report.missing and not report.unexpected
    with torch.no_grad():
        logits = ours(torch.from_numpy(np.load(EFFICIENTFORMER / "input.npy")))
    expected = torch.from_numpy(np.load(EFFICIENTFORMER / "tiny_logits.npy"))  # logits up to 270: relative too
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("release", json.loads((EFFICIENTFORMER / "manifests.json").read_text()))
def test_efficientformer_v2_manifest_matches_the_preset(release: str) -> None:
    from backbones.formats.efficientformer_v2 import convert_efficientformerv2_release
    from heads.classification import classification_head

    manifest = json.loads((EFFICIENTFORMER / "manifests.json").read_text())[release]
    state = meta_state(manifest["keys"])
    assert detect_format(state).name == "efficientformerv2-release"
    with torch.device("meta"):
        backbone = create_backbone(release)
        head = classification_head(backbone, manifest["num_classes"], "native")
    assert_same_layout(convert_efficientformerv2_release(state), our_layout(backbone, head))


# --- ViT-ResNAS .pth.tar (yilunliao/vit-search, nets/vit_sr_supernet.py FlexibleDistillVisionTransformerSR) --------

VIT_RESNAS = DATA / "vit_resnas"
PATCH_HEAD = ["patch_head.bias", "patch_head.weight"]  # token labelling's per-patch classifier: no counterpart


def test_vit_resnas_checkpoint_gives_the_release_logits() -> None:
    """The release's training checkpoint as main.py writes it (``model``, ``optimizer``, ``lr_scheduler``, ``epoch``,
    ``args``: an ``argparse.Namespace``, ``model_ema``), read with ``weights_only=True``."""
    from tasks.classification import ClassificationModule

    ours = ClassificationModule(
        backbone="vit_resnas", num_classes=5, pretrained=str(VIT_RESNAS / "tiny_checkpoint.pth.tar"),
        backbone_kwargs={"img_size": 112, "embed_dims": (16, 24, 32), "head_dims": (8, 8, 16),
                         "num_heads": ((2,), (3,), (2,)), "mlp_hidden_dims": ((32,), (40,), (48,))},
    ).eval()
    report = ours.load_report
    assert report.format == "vit-resnas-release" and not report.missing
    assert sorted(report.unexpected) == [f"{k} (no head key map for format vit-resnas-release)" for k in PATCH_HEAD]
    with torch.no_grad():
        logits = ours(torch.from_numpy(np.load(VIT_RESNAS / "input.npy")))
    torch.testing.assert_close(logits, torch.from_numpy(np.load(VIT_RESNAS / "tiny_logits.npy")), rtol=0, atol=1e-4)


@pytest.mark.parametrize("preset", json.loads((VIT_RESNAS / "manifests.json").read_text()))
def test_vit_resnas_manifest_matches_the_preset(preset: str) -> None:
    from backbones.formats.vit_resnas import convert_vit_resnas_release
    from heads.classification import classification_head

    manifest = json.loads((VIT_RESNAS / "manifests.json").read_text())[preset]
    state = meta_state(manifest["keys"])
    assert detect_format(state).name == "vit-resnas-release"
    with torch.device("meta"):
        backbone = create_backbone(preset, img_size=manifest["img_size"])
        head = classification_head(backbone, manifest["num_classes"], "cls")
    converted = convert_vit_resnas_release(state)
    assert sorted(k for k in converted if k.startswith("foreign.")) == [f"foreign.{k}" for k in PATCH_HEAD]
    converted = {k: v for k, v in converted.items() if not k.startswith("foreign.")}
    assert_same_layout(converted, our_layout(backbone, head))


# --- SegFormer .pth (NVlabs/SegFormer: mmseg/models/backbones/mix_transformer.py, decode_heads/segformer_head.py) -

SEGFORMER = DATA / "segformer"
MIT_TINY = {"embed_dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 3, 4)}


def test_segformer_nvlabs_checkpoint_gives_the_release_logits() -> None:
    """A full mmseg checkpoint (``meta`` + ``state_dict``: ``backbone.`` and ``decode_head.``) through
    ``pretrained=``: the release's whole-image inference, logits resized to the input without aligned corners."""
    from tasks.segmentation import SegmentationModule

    ours = SegmentationModule(backbone="mit_b0", backbone_kwargs=MIT_TINY, num_classes=5, decoder_dim=16,
                              pretrained=str(SEGFORMER / "segformer_tiny.pth")).eval()
    report = ours.load_report
    assert report.format == "segformer-nvlabs" and not report.missing and not report.unexpected
    assert ours.hparams.align_corners is False  # the format's convention, taken as the config leaves it unset
    with torch.no_grad():
        logits = ours(torch.from_numpy(np.load(SEGFORMER / "input.npy")))
    expected = torch.from_numpy(np.load(SEGFORMER / "segformer_tiny_logits.npy"))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_segformer_nvlabs_checkpoint_into_the_encoder_alone_skips_the_decoder() -> None:
    from backbones.weights import load_pretrained

    report = load_pretrained(create_backbone("mit_b0", **MIT_TINY), SEGFORMER / "segformer_tiny.pth")
    assert not report.missing and not report.unexpected
    assert {"head.linear.0.weight", "head.fuse.weight", "head.classifier.weight"} <= set(report.skipped)


def test_mit_imagenet_file_gives_the_release_maps(tmp_path: Path) -> None:
    """A bare MiT state dict (the released ``mit_b*.pth`` layout) into the backbone: the four maps of the release.
    The ImageNet files also hold the classifier ``head`` of the classification code (not in the NVlabs repository):
    into a backbone it is skipped."""
    from backbones.weights import load_pretrained

    backbone = create_backbone("mit_b0", pretrained=str(SEGFORMER / "mit_tiny.pth"), **MIT_TINY).eval()
    state = torch.load(SEGFORMER / "mit_tiny.pth", weights_only=True)
    torch.save({**state, "head.weight": torch.zeros(1000, 32), "head.bias": torch.zeros(1000)}, tmp_path / "mit.pth")
    report = load_pretrained(create_backbone("mit_b0", **MIT_TINY), tmp_path / "mit.pth")
    assert sorted(report.skipped) == ["head.fc.bias", "head.fc.weight"] and not report.missing
    with torch.no_grad():
        maps = backbone(torch.from_numpy(np.load(SEGFORMER / "input.npy")))
    with np.load(SEGFORMER / "mit_tiny_maps.npz") as expected:
        assert len(maps) == len(expected.files) == 4
        for ours, name in zip(maps, expected.files):
            torch.testing.assert_close(ours, torch.from_numpy(expected[name]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("release", json.loads((SEGFORMER / "manifests.json").read_text()))
def test_segformer_manifest_matches_the_preset(release: str) -> None:
    """``mit_b*``: the encoder's keys; ``segformer.b*``: a whole ADE20K model's, whose decoder maps onto
    ``SegFormerHead`` (the unused ``decode_head.conv_seg`` of mmseg's ``BaseDecodeHead`` is left out)."""
    from backbones.weights import _HEAD_MAPS
    from heads.segformer import SegFormerHead

    manifest = json.loads((SEGFORMER / "manifests.json").read_text())[release]
    state = meta_state(manifest["keys"])
    fmt = detect_format(state)
    assert fmt.name == "segformer-nvlabs"
    converted = fmt.convert(state)
    foreign = {k.removeprefix("foreign."): v for k, v in converted.items() if k.startswith("foreign.")}
    converted = {k: v for k, v in converted.items() if not k.startswith("foreign.")}
    with torch.device("meta"):
        backbone = create_backbone(manifest.get("encoder", release))
        ours = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
        if foreign:
            head = SegFormerHead([f.channels for f in backbone.feature_info], manifest["num_classes"],
                                 embed_dim=manifest["decoder_dim"])
            ours.update({f"head.{k}": v for k, v in head.state_dict().items()})
            mapped = _HEAD_MAPS[fmt.name](foreign)
            used = [k for k in foreign if not k.startswith("decode_head.conv_seg.")]
            assert len(mapped) == len(used), "decoder keys the head map leaves out"
            converted.update({f"head.{k}": v for k, v in mapped.items()})
    assert_same_layout(converted, ours)
