"""The token-keep state (``policy``) of attention blocks, groundwork for DynamicViT token pruning."""

from __future__ import annotations

import pytest
import torch

from backbones import create_backbone
from backbones.layers import Attention, Block, softmax_with_policy
from backbones.video_blocks import DividedSpaceTimeBlock
from backbones.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")


def random_policy(batch: int, tokens: int, prefix: int = 1, keep: float = 0.5) -> torch.Tensor:
    """Keep decisions ``[B, N, 1]``: prefix tokens kept, about ``keep`` of the others."""
    policy = (torch.rand(batch, tokens, 1) < keep).float()
    policy[:, :prefix] = 1.0
    return policy


def perturb_dropped(x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """``x`` with other values at the dropped tokens."""
    return torch.where(policy.bool(), x, torch.randn_like(x))


def release_softmax_with_policy(attn: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DynamicViT's ``Attention.softmax_with_policy`` (raoyongming/DynamicViT, models/dyvit.py), retyped."""
    b, n, _ = policy.shape
    attn_policy = policy.reshape(b, 1, 1, n)
    eye = torch.eye(n, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, n, n)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = torch.max(attn, dim=-1, keepdim=True)[0]
    attn = (attn - max_att).to(torch.float32).exp_() * attn_policy.to(torch.float32)
    return ((attn + eps / n) / (attn.sum(dim=-1, keepdim=True) + eps)).type_as(max_att)


def test_softmax_with_policy_is_the_release_one_where_a_kept_key_leads() -> None:
    logits, policy = torch.randn(2, 3, 9, 9) * 4, random_policy(2, 9)
    ours, release = softmax_with_policy(logits, policy), release_softmax_with_policy(logits, policy)
    keep = (policy[:, None, None, :, 0] + torch.eye(9)).clamp(max=1.0).expand_as(logits)  # [B, H, N, N], diagonal kept
    leads = keep.gather(-1, logits.argmax(-1, keepdim=True))[..., 0].bool()  # rows whose largest logit is a kept key
    assert leads.any() and not leads.all()
    torch.testing.assert_close(ours[leads], release[leads])
    # every row, also where the release's sum falls towards eps: the softmax over the kept keys, as gathering computes
    torch.testing.assert_close(ours, logits.masked_fill(keep == 0, float("-inf")).softmax(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(softmax_with_policy(logits, policy[..., 0]), ours)


def test_policy_gradient_stays_bounded_when_a_row_rests_on_a_dropped_key() -> None:
    """The keep decisions learn through this gradient (straight-through); the release's grows as 1 / eps when a
    kept token's attention rests on a dropped key, which drowned the keep-ratio loss (predictors kept everything)."""
    logits, values = torch.zeros(1, 1, 5, 5), torch.randn(1, 1, 5, 4)
    logits[..., 1, 3] = 30.0  # token 1 attends to token 3 ...
    policy = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]])  # ... which is dropped
    grads = []
    for softmax in (softmax_with_policy, release_softmax_with_policy):
        p = policy[..., None].clone().requires_grad_()
        (softmax(logits, p) @ values).abs().sum().backward()
        grads.append(p.grad.abs().max().item())
    ours, release = grads
    assert ours < 4 * 5 * values.abs().max().item() * 2, ours  # |d out / d p_j| <= |v_j - out_i| per row and channel
    assert release > 1e4, release


@pytest.mark.parametrize("shape", ["bn1", "bn"])
def test_all_ones_policy_gives_the_dense_block(shape: str) -> None:
    block = Block(32, 4).eval()
    x = torch.randn(2, 17, 32)
    policy = torch.ones(2, 17, 1) if shape == "bn1" else torch.ones(2, 17)
    with torch.no_grad():
        torch.testing.assert_close(block(x, policy), block(x), atol=1e-5, rtol=0)


def test_dropped_tokens_influence_only_themselves() -> None:
    block = Block(32, 4).eval()
    x, policy = torch.randn(2, 17, 32), random_policy(2, 17)
    x2 = perturb_dropped(x, policy)
    with torch.no_grad():
        y, y2, dense = block(x, policy), block(x2, policy), block(x2)
    kept = policy.expand_as(x).bool()
    torch.testing.assert_close(y[kept], y2[kept], atol=1e-5, rtol=0)
    assert not torch.allclose(y2[kept], dense[kept], atol=1e-3)  # without the policy they do influence
    assert not torch.allclose(y[~kept], y2[~kept], atol=1e-3)  # a dropped token still sees itself


def test_bf16_input_runs_the_softmax_in_float32() -> None:
    logits = torch.randn(2, 3, 9, 9).bfloat16()
    attn = softmax_with_policy(logits, random_policy(2, 9).bfloat16())
    assert attn.dtype == torch.float32
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 9))

    attention = Attention(32, 4).eval()
    x, policy = torch.randn(2, 17, 32), random_policy(2, 17)
    with torch.no_grad():
        reference = attention(x, policy)
        out = attention.bfloat16()(x.bfloat16(), policy.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)


def test_policy_dropout_and_gradient() -> None:
    block = Block(32, 4, attn_drop=0.5).train()
    x, policy = torch.randn(2, 17, 32, requires_grad=True), random_policy(2, 17).requires_grad_()
    block(x, policy).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(policy.grad).all() and policy.grad.abs().sum() > 0


def test_policy_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="policy must have shape"):
        Block(32, 4)(torch.randn(2, 17, 32), torch.ones(2, 16, 1))


def test_divided_block_all_ones_policy_and_dropped_tokens() -> None:
    block = DividedSpaceTimeBlock(32, 4, num_prefix_tokens=1).eval()
    torch.nn.init.normal_(block.temporal_fc.weight, std=0.1)  # not the identity-at-start block
    x, policy = torch.randn(2, 1 + 3 * 9, 32), random_policy(2, 1 + 3 * 9)
    x2 = perturb_dropped(x, policy)
    with torch.no_grad():
        torch.testing.assert_close(block(x, 3, torch.ones(2, 28, 1)), block(x, 3), atol=1e-5, rtol=0)
        y, y2 = block(x, 3, policy), block(x2, 3, policy)
    kept = policy.expand_as(x).bool()
    torch.testing.assert_close(y[kept], y2[kept], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="policy must have shape"):
        block(x, 3, torch.ones(2, 27, 1))


def run_blocks(
    vit: VisionTransformer, x: torch.Tensor, grid: tuple[int, ...], policy: torch.Tensor | None
) -> torch.Tensor:
    for i in range(len(vit.blocks)):
        x = vit.run_block(i, x, grid, policy)
    return x


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("vit_tiny_patch16", {"img_size": 64, "depth": 3}, (2, 3, 64, 64)),
        ("timesformer_nano_patch8", {"num_frames": 2, "depth": 2}, (2, 3, 2, 32, 32)),
    ],
)
def test_vit_run_block_passes_the_policy_on(name: str, kwargs: dict, shape: tuple[int, ...]) -> None:
    """Through all blocks of a ViT: kept tokens never see what dropped tokens hold."""
    vit = create_backbone(name, **kwargs).eval()
    for block in vit.blocks:
        if isinstance(block, DividedSpaceTimeBlock):
            torch.nn.init.normal_(block.temporal_fc.weight, std=0.1)
    with torch.no_grad():
        x, grid = vit.embed(torch.randn(shape))
        policy = random_policy(x.shape[0], x.shape[1], vit.num_prefix_tokens)
        y, y2 = run_blocks(vit, x, grid, policy), run_blocks(vit, perturb_dropped(x, policy), grid, policy)
        ones, dense = run_blocks(vit, x, grid, torch.ones(x.shape[:2])), run_blocks(vit, x, grid, None)
    kept = policy.expand_as(x).bool()
    torch.testing.assert_close(y[kept], y2[kept], atol=1e-5, rtol=0)
    torch.testing.assert_close(ones, dense, atol=1e-5, rtol=0)
