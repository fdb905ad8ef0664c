"""Token merging (ToMe, ``backbones/token_merging.py``): r = 0 is the dense model bit for bit; the merged forward equals
a slow reference written as loops over tokens; dense outputs unmerge to the full grid; divided attention merges the
same positions in every frame; the task switch works on a checkpoint trained without it; predict draws the merge
groups over images, clip frames and volume slices; and bad uses are named."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import write_shapes
from PIL import Image

from backbones import create_backbone
from backbones.token_merging import TokenMerging, _MergeState, merge_schedule, merge_units, unmerge_units
from backbones.token_reduction import reduce_tokens
from tasks.classification import ClassificationModule, main
from tasks.medical import MedicalSegmentationModule
from tasks.video import VideoClassificationModule

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"img_size": 32, "depth": 4, "embed_dim": 48, "num_heads": 2, "patch_size": 4}  # 64 patch tokens
UNETR = {"img_size": 32, "embed_dim": 48, "depth": 4, "num_heads": 2, "out_indices": [0, 1, 2, 3]}  # 8 tokens


def pair(name: str, **kwargs) -> tuple[torch.nn.Module, TokenMerging]:
    """A dense backbone and a merging copy with the same weights (r set by the caller)."""
    torch.manual_seed(0)
    dense = create_backbone(name, **kwargs).eval()
    merging = create_backbone(name, **kwargs).eval()
    merging.load_state_dict(dense.state_dict())
    return dense, reduce_tokens(merging, "tome", r=0)


CASES = {
    "vit": ("vit_tiny_patch16", TINY, (2, 3, 32, 32)),
    "deit": ("vit_tiny_patch16", {**TINY, "distilled": True}, (2, 3, 32, 32)),
    "timesformer": ("timesformer_nano_patch8", {"img_size": 32, "num_frames": 4}, (2, 3, 4, 32, 32)),
    "timesformer_joint": ("timesformer_nano_patch8", {"img_size": 32, "num_frames": 4, "attention": "joint"}, (2, 3, 4, 32, 32)),
    "unetr": ("unetr_vit_base", UNETR, (1, 1, 32, 32, 32)),
}


@pytest.mark.parametrize("case", ["vit", "timesformer", "unetr"])
def test_r_zero_is_the_dense_model_bit_for_bit(case: str) -> None:
    name, kwargs, shape = CASES[case]
    dense, merging = pair(name, **kwargs)
    x = torch.randn(shape)
    with torch.no_grad():
        for a, b in zip(dense(x), merging(x), strict=True):
            assert torch.equal(a, b)
        if case != "unetr":
            assert torch.equal(dense.forward_tokens(x), merging.forward_tokens(x))
    assert merging.merge_sizes is None and merging.token_keep_weights() is None


@pytest.mark.parametrize("case", ["vit", "deit", "timesformer", "timesformer_joint"])
def test_the_merging_blocks_without_a_merge_are_the_dense_blocks(case: str) -> None:
    """The merging path (proportional attention, sizes all 1, no merge) computes what the dense blocks compute."""
    name, kwargs, shape = CASES[case]
    dense, merging = pair(name, **kwargs)
    x = torch.randn(shape)
    with torch.no_grad():
        tokens, grid = merging.embed(x)
        frames = grid[0] if merging.attention == "divided" else 1
        state = _MergeState(merging.num_prefix_tokens, frames)
        state.start(x.shape[0], (tokens.shape[1] - merging.num_prefix_tokens) // frames, x.device)
        for i in range(len(merging.blocks)):
            tokens = merging._run_merging_block(i, tokens, grid, state)
        torch.testing.assert_close(merging.norm(tokens), dense.forward_tokens(x), atol=1e-5, rtol=1e-5)


# --- a slow reference: explicit loops over tokens ---------------------------------------------------------------


def reference_tokens(vit: TokenMerging, x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """ToMe by hand, one sample at a time: attention with an explicit softmax over logits + log(size), bipartite
    matching by loops (patch tokens alternately in A and B, each A-token's most cosine-similar B-token by the keys'
    mean over heads, the ``r`` best pairs merged), size-weighted averages by loops; prefix tokens never merge."""
    p, heads = vit.num_prefix_tokens, vit.num_heads
    embedded, _ = vit.embed(x)
    outs = []
    for sample in embedded:
        tokens, sizes = list(sample), [1.0] * sample.shape[0]
        for block, r in zip(vit.blocks, counts):
            qkv = [block.attn.qkv(block.norm1(t)).view(3, heads, -1) for t in tokens]  # [3, H, d] per token
            attended = []
            for qi in qkv:
                per_head = []
                for h in range(heads):
                    logits = [float(qi[0, h] @ kj[1, h]) / math.sqrt(qi.shape[-1]) + math.log(s) for kj, s in zip(qkv, sizes)]
                    top = max(logits)
                    weights = [math.exp(v - top) for v in logits]
                    total = sum(weights)
                    per_head.append(sum(w / total * kj[2, h] for w, kj in zip(weights, qkv)))
                attended.append(block.attn.proj(torch.cat(per_head)))
            tokens = [t + a for t, a in zip(tokens, attended)]
            keys = [kj[1].mean(0) for kj in qkv]
            if r:
                tokens, sizes = reference_merge(tokens, sizes, keys, p, r)
            tokens = [t + block.mlp(block.norm2(t)) for t in tokens]
        outs.append(vit.norm(torch.stack(tokens)))
    return outs


def reference_merge(tokens, sizes, keys, p, r):
    patches = list(range(p, len(tokens)))
    a_set, b_set = patches[0::2], patches[1::2]
    r = min(r, len(patches) // 2)
    best = []
    for i in a_set:
        sims = [float(keys[i] @ keys[j] / (keys[i].norm() * keys[j].norm())) for j in b_set]
        j = max(range(len(b_set)), key=lambda k: (sims[k], -k))  # the first of equal maxima
        best.append((sims[j], b_set[j]))
    order = sorted(range(len(a_set)), key=lambda k: -best[k][0])  # stable: the earlier of equal pairs first
    merging = set(order[:r])
    b_tokens = {j: tokens[j] * sizes[j] for j in b_set}
    b_sizes = {j: sizes[j] for j in b_set}
    for k in sorted(merging):
        i, j = a_set[k], best[k][1]
        b_tokens[j] = b_tokens[j] + tokens[i] * sizes[i]
        b_sizes[j] += sizes[i]
    kept = [a_set[k] for k in range(len(a_set)) if k not in merging]
    new_tokens = tokens[:p] + [tokens[i] for i in kept] + [b_tokens[j] / b_sizes[j] for j in b_set]
    new_sizes = sizes[:p] + [sizes[i] for i in kept] + [b_sizes[j] for j in b_set]
    return new_tokens, new_sizes


@pytest.mark.parametrize(("case", "r", "schedule"), [("vit", 3, "constant"), ("deit", 3, "decreasing"), ("vit", (5, 0, 2), "constant")])
def test_merged_forward_equals_a_reference_written_as_loops(case: str, r, schedule: str) -> None:
    name, kwargs, shape = CASES[case]
    _, merging = pair(name, **{**kwargs, "img_size": 16})  # 16 patch tokens: the loops stay quick
    merging.merge_r, merging.schedule = r, schedule
    x = torch.randn(2, *shape[1:-2], 16, 16)
    with torch.no_grad():
        ours = merging.forward_tokens(x)
        reference = reference_tokens(merging, x, merge_schedule(r, len(merging.blocks), schedule))
    assert ours.shape[1] == reference[0].shape[0] < 16
    for b in range(2):
        torch.testing.assert_close(ours[b], reference[b], atol=1e-5, rtol=1e-5)
    assert merging.merge_sizes.sum(1).tolist() == [merging.num_prefix_tokens + 16] * 2


def test_unmerge_is_the_identity_without_merges_and_copies_merged_tokens_back() -> None:
    x = torch.randn(2, 3, 6, 5)  # [B, T, U, C]
    assert torch.equal(unmerge_units(x, torch.arange(6).expand(2, -1)), x)
    step = torch.tensor([[0, 1, 0, 2, 3, 1], [0, 0, 1, 1, 2, 3]])  # where each unit goes: 4 new units
    groups = x.clone()
    for b in range(2):  # units that merge hold equal features: unmerge(merge(x)) must give x back
        for new in range(4):
            members = (step[b] == new).nonzero().flatten()
            groups[b, :, members] = groups[b, :, members[:1]]
    merged, sizes = merge_units(groups, torch.ones(2, 6), step, 4)
    assert sizes.tolist() == [[2, 2, 1, 1], [2, 2, 1, 1]]
    torch.testing.assert_close(unmerge_units(merged, step), groups)


def test_divided_attention_merges_the_same_positions_in_every_frame() -> None:
    name, kwargs, shape = CASES["timesformer"]
    _, merging = pair(name, **{**kwargs, "out_indices": [1, 3]})
    merging.merge_r = 3
    x = torch.randn(shape)
    with torch.no_grad():
        tokens = merging.forward_tokens(x)
        maps = merging(x)  # [B, C, T, h, w] on the full grid
    assert tokens.shape[1] == 1 + 4 * (16 - 3 * 4)  # 4 frames of the 16 - 3 x 4 positions left after 4 blocks
    groups = merging.token_maps(x)[0]  # [B, h, w]: one grouping for all frames
    assert groups.shape == (2, 4, 4) and not groups.is_floating_point()
    for b in range(2):
        for g in groups[b].unique():
            members = maps[-1][b][:, :, groups[b] == g]  # [C, T, members]: every frame copies its token
            assert torch.equal(members, members[..., :1].expand_as(members))
        assert groups[b].unique().numel() == 16 - 3 * 4


def test_unetr_decoder_runs_on_unmerged_maps() -> None:
    torch.manual_seed(0)
    options = {"backbone": "unetr_vit_base", "backbone_kwargs": UNETR, "num_classes": 3, "feature_size": 4}
    dense = MedicalSegmentationModule(**options).eval()
    merged = MedicalSegmentationModule(**options, token_merging=2).eval()
    merged.load_state_dict(dense.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        logits = merged(x)
        assert logits.shape == dense(x).shape == (1, 3, 32, 32, 32)
        assert not torch.equal(logits, dense(x))
    assert merged.backbone.merge_groups.unique().numel() < 8  # 8 tokens were merged


def test_training_with_merging_reaches_every_weight() -> None:
    module = ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=TINY, num_classes=3, pool="avg",
                                  token_merging={"r": 8, "schedule": "decreasing"})
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    module.compute_loss(module(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.named_parameters() if "blocks.3." in n)


def test_predict_writes_merge_maps(tmp_path: Path) -> None:
    module = ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=TINY, num_classes=3, token_merging=8,
                                  save_token_maps=True).eval()
    module.predict_output_dir = tmp_path
    batch = {"input": torch.randn(2, 3, 32, 32), "index": torch.tensor([0, 1]), "path": ["a/cat.png", "b/dog.png"]}
    with torch.no_grad():
        rows = module.predict_step(batch, 0)
    assert [Path(r["token_map"]).name for r in rows] == ["0_cat.png", "1_dog.png"]
    with Image.open(rows[0]["token_map"]) as picture:
        assert picture.height == 32 and picture.width > 2 * 32
        panel = torch.tensor(list(picture.getdata())).view(32, -1, 3)[:, -32:]
    assert len({tuple(c) for c in panel.reshape(-1, 3).tolist()}) > 4  # groups drawn in colours of their own


def patch_colours(picture: Image.Image, row: int, column: int, side: int, patch: int) -> torch.Tensor:
    """The colour at the centre of every patch ``[h, w, 3]`` of one panel of a token-map picture."""
    pixels = torch.from_numpy(np.asarray(picture.convert("RGB")).copy())
    step = side + max(2, side // 32)  # panel and gap
    centres = torch.arange(patch // 2, side, patch)
    panel = pixels[row * step : row * step + side, column * step : column * step + side]
    return panel[centres][:, centres]


def assert_groups_drawn(colours: torch.Tensor, groups: torch.Tensor, sizes: torch.Tensor) -> None:
    """Patches of merged groups share a colour exactly when they share a group (``sizes``: patches per group)."""
    merged = sizes[groups] > 1
    ids, drawn = groups[merged], colours[merged]
    assert merged.any() and torch.equal(ids[:, None] == ids[None], (drawn[:, None] == drawn[None]).all(-1))


@pytest.mark.parametrize("attention", ["divided", "joint"])
def test_video_predict_draws_merge_groups_over_the_frames(attention: str, tmp_path: Path) -> None:
    name, kwargs, _ = CASES["timesformer"]
    torch.manual_seed(0)
    module = VideoClassificationModule(backbone=name, backbone_kwargs={**kwargs, "attention": attention}, num_classes=3,
                                       token_merging=3, save_token_maps=True).eval()
    module.predict_output_dir = tmp_path
    clips = torch.randn(2, 3, 4, 32, 32)
    views = torch.stack([clips, torch.randn_like(clips)], 1)  # [B, V, C, T, H, W]: the first view is drawn
    batch = {"input": views, "index": torch.tensor([0, 1]), "path": ["a/run.mp4", "b/jump.mp4"]}
    with torch.no_grad():
        rows = module.predict_step(batch, 0)
        module(clips)
        groups = module.backbone.token_maps(clips)[0][1]  # divided [h, w]; joint [t, h, w]
    assert [Path(r["token_map"]).name for r in rows] == ["0_run.png", "1_jump.png"]
    with Image.open(rows[1]["token_map"]) as picture:
        assert picture.size == (4 * 32 + 3 * 2, 2 * 32 + 2)  # the 4 frames, and below them the same with the groups
        for t in range(4):
            cells = groups if attention == "divided" else groups[t]  # the same groups on every frame, or its own
            assert_groups_drawn(patch_colours(picture, 1, t, 32, 8), cells, torch.bincount(groups.flatten()))


def test_medical_predict_draws_the_centre_window_s_groups_on_axial_slices(tmp_path: Path) -> None:
    from datamodules.medical import MedicalDataModule
    from engine.predict import PredictionWriter

    torch.manual_seed(0)
    module = MedicalSegmentationModule(backbone="unetr_vit_base", backbone_kwargs={**UNETR, "img_size": 48},
                                       num_classes=3, feature_size=4, token_merging=4, save_token_maps=True).eval()
    module.predict_output_dir = tmp_path
    x = torch.randn(1, 1, 56, 48, 48)  # two sliding windows of 48³
    batch = {"input": x, "index": torch.tensor([0]), "path": [str(tmp_path / "case.nii.gz")],
             "affine": torch.eye(4)[None], "original_affine": torch.eye(4)[None],
             "original_shape": torch.tensor([[56, 48, 48]])}
    with torch.no_grad():
        row = module.predict_step(batch, 0)[0]
        window = x[:, :, 4:52]  # the window of the sliding window's size at the volume's centre
        module.backbone(window)
        groups = module.backbone.token_maps(window)[0][0]  # [3, 3, 3] patches of 16³
    with Image.open(row["token_map"]) as picture:
        assert picture.size == (3 * 48 + 2 * 2, 2 * 48 + 2)  # an axial slice through each layer of patches, twice
        for z in range(3):  # drawn anterior up, as the validation pictures are
            assert_groups_drawn(patch_colours(picture, 1, z, 48, 16), groups[:, :, z].rot90(), torch.bincount(groups.flatten()))
    written = MedicalDataModule(num_workers=0).write_prediction(row, tmp_path / "out")
    PredictionWriter._write_csv(tmp_path / "predictions.csv", [written])
    with open(tmp_path / "predictions.csv") as f:
        assert next(csv.DictReader(f))["token_map"] == str(tmp_path / "token_maps" / "0_case.png")


def test_save_token_maps_without_a_token_reduction_is_named() -> None:
    name, kwargs, _ = CASES["timesformer"]
    with pytest.raises(ValueError, match="save_token_maps, .* need token_pruning=true, token_merging or a token_reduction"):
        VideoClassificationModule(backbone=name, backbone_kwargs=kwargs, num_classes=3, save_token_maps=True)
    with pytest.raises(ValueError, match="save_token_maps draws the merge groups of token_merging"):
        MedicalSegmentationModule(backbone="unetr_vit_base", backbone_kwargs=UNETR, num_classes=3, feature_size=4,
                                  save_token_maps=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backbone": "mit_b0", "backbone_kwargs": {}}, "token_merging needs a ViT backbone.*bench_mit_merging"),
        ({"token_pruning": True}, "token_pruning=true and token_merging=4 both reduce tokens"),
        ({"token_reduction": {"method": "dynamicvit"}}, "token_merging=4 and token_reduction=.* both reduce tokens"),
        ({"token_merging": -1}, "whole number of tokens >= 0"),
        ({"token_merging": {"r": 4, "schedule": "increasing"}}, "schedule must be 'constant' or 'decreasing'"),
        ({"token_merging": {"ratio": 0.5}}, r"token_merging takes r or \{r: .., schedule"),
        ({"token_merging": [1, 1, 1, 1, 1]}, r"or one per block \(4 at most\)"),
        ({"token_merging": {"r": [1, 2], "schedule": "decreasing"}}, "r given per block .* takes no schedule"),
        ({"pretrained_lr_mult": 0.1}, "adds no module to the pretrained network"),
    ],
)
def test_bad_uses_are_named(options: dict, message: str) -> None:
    kwargs = {"backbone": "vit_tiny_patch16", "backbone_kwargs": TINY, "num_classes": 3, "token_merging": 4, **options}
    with pytest.raises(ValueError, match=message):
        ClassificationModule(**kwargs)


def test_space_only_video_is_refused() -> None:
    with pytest.raises(ValueError, match="token_merging needs joint or divided attention"):
        VideoClassificationModule(backbone="timesformer_nano_patch8", num_classes=3, token_merging=2,
                                  backbone_kwargs={"attention": "space_only"})


def test_validate_merges_a_checkpoint_trained_without_merging(tmp_path: Path) -> None:
    shapes = write_shapes(tmp_path / "shapes", train_per_class=2, val_per_class=2)
    data = ["--data.root", str(shapes), "--data.image_size", "32", "--data.batch_size", "3", "--data.num_workers", "0"]
    common = [*data, "--model.backbone", "vit_tiny_patch16", f"--model.backbone_kwargs={TINY}", "--model.pool", "avg",
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    fit = main(["fit", *common, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                "--trainer.default_root_dir", str(tmp_path / "fit")])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["token_merging"] is None
    dense = main(["validate", *common, "--ckpt_path", ckpt, "--trainer.default_root_dir", str(tmp_path / "v0")])
    cli = main(["validate", *common, "--ckpt_path", ckpt, "--model.token_merging", "{r: 8, schedule: decreasing}",
                "--trainer.default_root_dir", str(tmp_path / "v1")])
    backbone = cli.model.backbone
    assert isinstance(backbone, TokenMerging) and (backbone.merge_r, backbone.schedule) == (8, "decreasing")
    assert torch.equal(cli.model.state_dict()["head.fc.weight"], dense.model.state_dict()["head.fc.weight"])
    assert "val/top1" in cli.trainer.callback_metrics and backbone.merge_sizes.shape[1] < 1 + 64
    # predict's options win over the checkpoint's too (its save_token_maps: false)
    main(["predict", *common, "--ckpt_path", ckpt, "--model.token_merging", "8", "--model.save_token_maps", "true",
          "--predictions.output_dir", str(tmp_path / "preds"), "--trainer.default_root_dir", str(tmp_path / "p")])
    assert len(list((tmp_path / "preds" / "token_maps").glob("*.png"))) == 6


def test_export_merges_in_onnx_and_names_what_it_cannot(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from engine.export import export_model, inference_form

    classifier = ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=TINY, num_classes=3, token_merging=8)
    path = export_model(inference_form(classifier), "onnx", tmp_path / "c.onnx", input_size=(32, 32))  # checked there
    assert path.exists()
    unetr = MedicalSegmentationModule(backbone="unetr_vit_base", backbone_kwargs=UNETR, num_classes=3, feature_size=4,
                                      token_merging=2)
    with pytest.raises(ValueError, match="ONNX export of token merging's unmerged feature maps .* torchscript"):
        export_model(inference_form(unetr), "onnx", tmp_path / "u.onnx", input_size=(32, 32, 32))


@pytest.mark.parametrize("case", ["vit", "timesformer"])
def test_activation_checkpointing_gives_the_same_gradients(case: str) -> None:
    name, kwargs, shape = CASES[case]
    _, plain = pair(name, **kwargs)
    _, recomputed = pair(name, **kwargs)
    plain.merge_r = recomputed.merge_r = 3
    recomputed.set_activation_checkpointing(True)
    x = torch.randn(shape)
    for model in (plain, recomputed):
        model.train()
        model.forward_tokens(x).square().mean().backward()
    for (n, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)
