"""ViT at scale (Zhai et al., 2022): the giant presets, the big_vision recipe (Adafactor, rsqrt schedule, decoupled
weight decay, sigmoid loss), attention-pooling checkpoints and activation checkpointing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backbones import create_backbone
from engine.optimization import build_optimizer, build_schedule, parameter_groups


def vit_params(width: int, depth: int, mlp: int, patch: int, tokens: int, in_chans: int = 3) -> int:
    """Parameters of a class-token-free ViT without head: patch kernel, position embeddings, blocks, final norm."""
    block = 4 * width * width + 4 * width + 2 * width * mlp + mlp + width + 4 * width  # attn, mlp, two norms
    return patch * patch * in_chans * width + width + tokens * width + depth * block + 2 * width


@pytest.mark.parametrize(
    ("name", "width", "depth", "mlp", "paper_millions"),
    [("vit_giant_patch14", 1408, 40, 6144, 1011), ("vit_gigantic_patch14", 1664, 48, 8192, 1843)],
)
def test_giant_presets_match_the_paper(name: str, width: int, depth: int, mlp: int, paper_millions: int) -> None:
    with torch.device("meta"):  # 4-7 GB of fp32 weights: counted, never allocated
        model = create_backbone(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == vit_params(width, depth, mlp, patch=14, tokens=(224 // 14) ** 2)
    assert round(count / 1e6) == paper_millions  # Table 2 of the paper, head excluded
    assert model.num_prefix_tokens == 0 and model.default_pool == "avg"
    assert model.blocks[0].mlp.fc1.out_features == mlp


# --- the recipe -----------------------------------------------------------------------------------------------


def big_vision_rsqrt(step: int, *, total: int, warmup: int, cooldown: int, timescale: int, base: float) -> float:
    """``big_vision.utils.create_learning_rate_schedule(decay_type="rsqrt")`` with shift 0, in numpy terms."""
    lr = base / np.sqrt(1 + (step - warmup) / timescale) if warmup <= step else base
    lr = lr * min(1.0, step / warmup) if warmup else lr
    return lr * min(1.0, (total - step) / cooldown) if cooldown else lr


def test_rsqrt_schedule_equals_big_vision() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=8e-4)
    total, warmup, cooldown, timescale = 1000, 100, 300, 50
    sched = build_schedule(opt, total_steps=total, warmup_steps=warmup, schedule="rsqrt", warmup_start_ratio=0.0,
                           timescale=timescale, cooldown_steps=cooldown)
    seen = {}
    for step in range(total + 1):
        seen[step] = opt.param_groups[0]["lr"]  # the lr the optimizer step number ``step`` (from 0) uses
        opt.step()
        sched.step()
    for step in (0, 1, 50, 99, 100, 101, 400, 699, 700, 701, 850, 999, 1000):
        expected = big_vision_rsqrt(step, total=total, warmup=warmup, cooldown=cooldown, timescale=timescale, base=8e-4)
        assert seen[step] == pytest.approx(expected, rel=1e-12, abs=1e-15), step


def reference_adafactor(grads: list[np.ndarray], lr: float, momentum: float = 0.9) -> np.ndarray:
    """big_vision's ``scale_by_adafactor`` (optax ``scale_by_factored_rms`` + ``ema``) on a 2-D weight, float64,
    the update direction summed over ``grads``; returns the total parameter change."""
    rows = np.zeros((grads[0].shape[0],))
    cols = np.zeros((grads[0].shape[1],))
    ema = np.zeros_like(grads[0])
    change = np.zeros_like(grads[0])
    for i, g in enumerate(grads):
        beta2 = min(0.999, 1.0 - (i + 1.0) ** -0.8)
        g2 = g**2 + 1e-30
        rows = beta2 * rows + (1 - beta2) * g2.mean(1)
        cols = beta2 * cols + (1 - beta2) * g2.mean(0)
        update = g / np.sqrt(rows / rows.mean())[:, None] / np.sqrt(cols)[None, :]
        ema = momentum * ema + (1 - momentum) * update
        change -= lr * ema
    return change


def test_adafactor_bv_state_is_factored_and_matches_big_vision() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    groups = parameter_groups([("body", layer, 1e-2, 0.0)])
    opt = build_optimizer("adafactor_bv", groups, lr=1e-2, momentum=0.9, betas=(0.9, 0.999))
    start = layer.weight.detach().double().clone()
    grads = [torch.randn(48, 64) for _ in range(3)]
    for g in grads:
        layer.weight.grad, layer.bias.grad = g.clone(), torch.randn(48)
        opt.step()
    state = opt.state[layer.weight]
    assert "exp_avg_sq" not in state  # factored: a row and a column statistic, not a full [48, 64] one
    assert sorted(state["exp_avg_sq_r"].shape) == [1, 48] and sorted(state["exp_avg_sq_c"].shape) == [1, 64]
    assert state["exp_avg"].dtype == torch.bfloat16  # momentum kept in bfloat16, as big_vision
    assert opt.state[layer.bias]["exp_avg_sq"].shape == (48,)  # 1-D: not factored
    expected = reference_adafactor([g.double().numpy() for g in grads], lr=1e-2)
    change = (layer.weight.detach().double() - start).numpy()
    # bfloat16 momentum: a relative rounding of up to 2^-8 on each of the three momentum values summed here
    np.testing.assert_allclose(change, expected, rtol=1e-2, atol=5e-3 * np.abs(expected).max())


def test_decoupled_weight_decay_follows_the_schedule_per_group() -> None:
    """big_vision decays a kernel by ``wd * mult * schedule(t)``, its config giving ``wd = 0.03 * lr`` and the head
    a 100x multiplier: per step ``lr_t * 0.03`` for the body and ``lr_t * 3.0`` for the head."""
    body, head = torch.nn.Linear(40, 40, bias=False), torch.nn.Linear(40, 8, bias=False)
    groups = parameter_groups([("body", body, 8e-4, 0.03), ("head", head, 8e-4, 3.0)])
    opt = build_optimizer("adafactor_bv", groups, lr=8e-4, momentum=0.9, betas=(0.9, 0.999))
    sched = build_schedule(opt, total_steps=20, warmup_steps=5, schedule="rsqrt", warmup_start_ratio=0.0,
                           timescale=3, cooldown_steps=5)
    start = {"body": body.weight.detach().clone(), "head": head.weight.detach().clone()}
    keep = {"body": 1.0, "head": 1.0}
    for step in range(20):
        lr = big_vision_rsqrt(step, total=20, warmup=5, cooldown=5, timescale=3, base=8e-4)
        keep = {"body": keep["body"] * (1 - 0.03 * lr), "head": keep["head"] * (1 - 3.0 * lr)}
        body.weight.grad, head.weight.grad = torch.zeros_like(body.weight), torch.zeros_like(head.weight)
        opt.step()  # zero gradients: the weights change by the decay alone
        sched.step()
    torch.testing.assert_close(body.weight.detach(), start["body"] * keep["body"], rtol=1e-6, atol=0)
    torch.testing.assert_close(head.weight.detach(), start["head"] * keep["head"], rtol=1e-6, atol=0)
    assert keep["head"] < 0.99 < keep["body"]


def test_sigmoid_loss_and_head_bias() -> None:
    from tasks.classification import ClassificationModule

    model = ClassificationModule(
        backbone="vit_tiny_patch16", backbone_kwargs={"img_size": 32, "depth": 1}, num_classes=5, loss="sigmoid"
    )
    assert torch.all(model.head.fc.bias == -10.0)
    logits, target = torch.randn(4, 5), torch.tensor([0, 3, 4, 1])
    onehot = torch.nn.functional.one_hot(target, 5).float()
    expected = -(onehot * torch.nn.functional.logsigmoid(logits) + (1 - onehot) * torch.nn.functional.logsigmoid(-logits))
    torch.testing.assert_close(model.compute_loss(logits, target), expected.sum(-1).mean())
    softmax = ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs={"img_size": 32, "depth": 1}, num_classes=5)
    assert torch.all(softmax.head.fc.bias > -1.0)


# --- attention-pooling checkpoints (big_vision's own .npz files: tests/test_release_formats.py) -----------------


def test_timm_map_head_file_gives_timm_logits(tmp_path) -> None:
    """A timm ViT with attention pooling (``global_pool='map'``, SigLIP's head) saved as a state dict."""
    import timm.models.vision_transformer as timm_vit

    from tasks.classification import ClassificationModule

    size = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 3.0}
    reference = timm_vit.VisionTransformer(**size, num_classes=5, class_token=False, global_pool="map").eval()
    for p in reference.parameters():  # away from timm's zero/one initial values, so every tensor matters
        p.data.add_(torch.randn_like(p) * 0.1)
    torch.save(reference.state_dict(), tmp_path / "timm_map.pth")
    ours = ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs={**size, "class_token": False}, num_classes=5,
                                pool="map", pretrained=str(tmp_path / "timm_map.pth")).eval()
    assert not ours.load_report.missing and not ours.load_report.unexpected
    assert ours.head.attn_pool.num_heads == 4 and ours.head.attn_pool.mlp.fc1.out_features == 192
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


def test_map_head_of_the_old_layout_is_refused(tmp_path) -> None:
    """A ``pool: map`` checkpoint saved before the head had its LayerNorm (and the backbone's head count) would
    load and compute something else: loading it names the file and the missing keys."""
    from tasks.classification import ClassificationModule

    kwargs = {"backbone": "vit_tiny_patch16", "backbone_kwargs": {"img_size": 32, "depth": 1}, "num_classes": 3, "pool": "map"}
    state = ClassificationModule(**kwargs).state_dict()
    old = {k: v for k, v in state.items() if not k.startswith("head.attn_pool.norm.")}
    torch.save({"state_dict": old}, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match=r"old\.ckpt.*old layout, without head\.attn_pool\.norm\.weight, head\.attn_pool\.norm\.bias"):
        ClassificationModule(**kwargs, pretrained=str(tmp_path / "old.ckpt"))
    with pytest.raises(ValueError, match="old layout"):  # Lightning's resume and load_from_checkpoint load strictly
        ClassificationModule(**kwargs).load_state_dict(old)
    reused = ClassificationModule(**{**kwargs, "pool": "avg"}, pretrained=str(tmp_path / "old.ckpt"))  # its backbone still loads
    assert "backbone.pos_embed" in reused.load_report.loaded
