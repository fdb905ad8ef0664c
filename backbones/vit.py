"""VisionTransformer: one ViT for images (2-D), volumes (3-D patches) and videos (TimeSformer).

Images ``[B, C, H, W]``, volumes ``[B, C, D, H, W]`` and videos ``[B, C, T, H, W]`` are cut into patches,
given learned position embeddings (interpolated on the fly when the input grid differs from the one the
model was built for) and passed through pre-norm blocks. A video model (``num_frames`` set) has a spatial
``pos_embed`` shared by all frames plus a temporal ``time_embed``, and attends jointly over space-time,
divided (temporal then spatial, TimeSformer) or per frame only. ``forward`` returns the tokens of the
blocks in ``out_indices`` as channel-first maps; the last block's output is the final-normalised one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
from einops import rearrange
from torch import nn

from .registry import build_preset, register
from .base import Backbone, FeatureInfo
from .layers import Block, PatchEmbed, resample_pos_embed, run_checkpointed, to_tuple
from .video_blocks import DividedSpaceTimeBlock, VideoAttention, frames_to_clip


_MLP_ACTS = {"gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh")}


class VisionTransformer(Backbone):
    """Plain ViT (Dosovitskiy et al., 2021) over 2-D or 3-D patches, and its video form (TimeSformer).

    Args:
        img_size: input size the position embeddings are built for (int or one entry per spatial dim;
            for a video, the frame size); other sizes divisible by the patch size work through interpolation.
        patch_size: patch side(s); a tuple gives anisotropic patches, e.g. ``(16, 16, 16)``, or for a
            video ``(1, 16, 16)`` (an int ``p`` means ``(1, p, p)`` there).
        in_chans: input channels.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer's size.
        class_token: prepend a learned class token (``False`` for UNETR-style encoders).
        distilled: also prepend DeiT's learned distillation token (Touvron et al., 2021) after the class
            token, so there are two prefix tokens; a distilled classification head reads both. Needs
            ``class_token``.
        spatial_dims: 2 for images, 3 for volumes.
        out_indices: block indices whose outputs ``forward`` returns, shallow to deep; negative counts
            from the end. Defaults to the last block.
        drop_rate, attn_drop_rate, drop_path_rate: dropout after embeddings/projections, in attention,
            and the stochastic-depth rate reached by the last block (linearly increasing).
        init_values: LayerScale initial value, ``None`` for none.
        patch_bias: bias on the patch projection.
        norm_eps: LayerNorm epsilon (1e-6 in timm/Google ViTs, 1e-5 in MONAI's).
        mlp_act: the MLPs' GELU: ``gelu`` (exact, timm's and PyTorch's) or ``gelu_tanh`` (the tanh approximation,
            Flax's ``nn.gelu`` default: big_vision's ViTs compute with it).
        num_frames: makes this a video model for ``[B, C, T, H, W]`` clips (with ``spatial_dims=3``): the
            clip length ``time_embed`` is built for; other lengths work through interpolation.
        attention: for videos, ``joint`` (all space-time tokens attend to each other), ``divided``
            (TimeSformer: temporal then spatial attention in every block) or ``space_only`` (frames are
            encoded separately, class tokens averaged over frames; no temporal embedding). Images and
            volumes use ``joint``.
        time_embed_std: standard deviation of the random initial temporal embedding. A model inflated from
            an image checkpoint starts from zero instead, as the TimeSformer release does; from scratch, a
            larger value (0.5) breaks the frame-order symmetry much sooner on small data.
    """

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        distilled: bool = False,
        spatial_dims: Literal[2, 3] = 2,
        out_indices: Sequence[int] | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        patch_bias: bool = True,
        norm_eps: float = 1e-6,
        mlp_act: Literal["gelu", "gelu_tanh"] = "gelu",
        num_frames: int | None = None,
        attention: VideoAttention = "joint",
        time_embed_std: float = 0.02,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if attention not in ("joint", "divided", "space_only"):
            raise ValueError(f"attention must be 'joint', 'divided' or 'space_only', got {attention!r}")
        self.video = num_frames is not None
        if self.video and spatial_dims != 3:
            raise ValueError(f"a video model (num_frames={num_frames}) needs spatial_dims=3, got {spatial_dims}")
        if not self.video and attention != "joint":
            raise ValueError(f"attention={attention!r} needs a video model: set num_frames")
        if distilled and not class_token:
            raise ValueError("distilled=True puts a distillation token after the class token; set class_token=True")
        if attention == "divided" and init_values:
            raise ValueError("LayerScale (init_values) is not supported with divided attention")
        if mlp_act not in _MLP_ACTS:
            raise ValueError(f"mlp_act must be one of {', '.join(_MLP_ACTS)}, got {mlp_act!r}")
        self.attention = attention
        self.mlp_act = mlp_act
        self.time_embed_std = time_embed_std
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.num_features = self.embed_dim = embed_dim
        self.num_heads, self.mlp_ratio = num_heads, mlp_ratio
        self.distilled = distilled
        self.num_prefix_tokens = int(class_token) + int(distilled)
        self.default_pool = "cls" if class_token else "avg"
        if self.video and isinstance(patch_size, int):
            patch_size = (1, patch_size, patch_size)
        self.patch_embed = PatchEmbed(
            patch_size=to_tuple(patch_size, spatial_dims, "patch_size"),
            in_chans=in_chans,
            embed_dim=embed_dim,
            spatial_dims=spatial_dims,
            bias=patch_bias,
        )
        if self.video:
            self.img_size = (num_frames, *to_tuple(img_size, 2, "img_size"))
        else:
            self.img_size = to_tuple(img_size, spatial_dims, "img_size")
        self.grid = self.patch_embed.grid(self.img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_grid = self.grid[1:] if self.video else self.grid  # what pos_embed covers
        num_pos = self.num_prefix_tokens + math.prod(self.pos_grid)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim))
        has_time = self.video and attention != "space_only"
        self.time_embed = nn.Parameter(torch.zeros(1, self.grid[0], embed_dim)) if has_time else None
        self.pos_drop = nn.Dropout(drop_rate)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        common = {
            "mlp_ratio": mlp_ratio, "qkv_bias": qkv_bias, "proj_drop": drop_rate, "attn_drop": attn_drop_rate,
            "act_layer": _MLP_ACTS[mlp_act],
        }
        if attention == "divided":
            blocks: list[nn.Module] = [
                DividedSpaceTimeBlock(
                    embed_dim, num_heads, **common, drop_path=rate,
                    num_prefix_tokens=self.num_prefix_tokens, norm_layer=norm_layer,
                )
                for rate in rates
            ]
        else:
            blocks = [
                Block(embed_dim, num_heads, **common, drop_path=rate, init_values=init_values, norm_layer=norm_layer)
                for rate in rates
            ]
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm_layer(embed_dim)
        indices = [depth - 1] if out_indices is None else [i % depth if -depth <= i < depth else i for i in out_indices]
        if any(not 0 <= i < depth for i in indices) or sorted(set(indices)) != indices:
            raise ValueError(f"out_indices must be increasing block indices in [-{depth}, {depth}), got {out_indices}")
        self.out_indices = indices
        stride = self.patch_embed.patch_size
        self.feature_info = [FeatureInfo(channels=embed_dim, stride=stride) for _ in indices]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.time_embed is not None:
            std = self.time_embed_std
            nn.init.trunc_normal_(self.time_embed, std=std, a=-2 * std, b=2 * std)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, DividedSpaceTimeBlock):
                m.reset_temporal()

    def adapt_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """Make a checkpoint tensor of another shape fit: position embeddings are resampled to our grid
        (2-D grids are inflated over depth for 3-D models), the class-token slot is added or dropped,
        patch kernels are adapted to our input channels and inflated from 2-D to 3-D."""
        if name == "pos_embed":
            return self._adapt_pos_embed(tensor)
        if name == "time_embed" and self.time_embed is not None and tensor.ndim == 3:
            return resample_pos_embed(tensor, tensor.shape[1:2], self.grid[:1])
        if name == "patch_embed.proj.weight":
            return self._adapt_patch_kernel(tensor)
        return None

    def derive_checkpoint_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights this model has but an image checkpoint lacks, made the way TimeSformer inflates ImageNet
        weights: each block's temporal attention and norm start as copies of its spatial ones, and
        ``time_embed`` at zero (``temporal_fc`` is zero-initialised), so the video model starts out
        scoring a clip of identical frames as the image model scores one."""
        derived = {}
        if self.time_embed is not None and "time_embed" not in state and "pos_embed" in state:
            derived["time_embed"] = torch.zeros_like(self.time_embed)
        for name in self.state_dict():
            if ".temporal_attn." in name or ".temporal_norm1." in name:
                source = name.replace(".temporal_attn.", ".attn.").replace(".temporal_norm1.", ".norm1.")
                if name not in state and source in state:
                    derived[name] = state[source]
        return derived

    def _adapt_pos_embed(self, pos: torch.Tensor) -> torch.Tensor | None:
        """A checkpoint's position embedding with 0, 1 or 2 prefix slots (class, distillation token) on our
        grid: the slots we share are copied in order, ours it lacks start at zero, extra ones are dropped."""
        p = self.num_prefix_tokens
        ours = self.pos_embed.shape[1] - p
        for prefix in dict.fromkeys((p, 0, 1, 2)):  # our own prefix count first
            n = pos.shape[1] - prefix
            if n <= 0:
                continue
            side3, side2 = round(n ** (1 / 3)), math.isqrt(n)
            if self.spatial_dims == 3 and not self.video and side3**3 == n:
                grid = resample_pos_embed(pos[:, prefix:], (side3,) * 3, self.grid)
            elif side2 * side2 == n:
                plane = resample_pos_embed(pos[:, prefix:], (side2, side2), self.grid[-2:])
                depth = self.grid[0] if self.spatial_dims == 3 and not self.video else 1
                grid = plane.repeat(1, depth, 1)  # the same 2-D embedding on every slice: [1, D*H*W, C]
            else:
                continue
            if grid.shape[1] != ours:
                return None
            shared = pos[:, : min(prefix, p)]
            return torch.cat([shared, pos.new_zeros(1, p - shared.shape[1], pos.shape[2]), grid], dim=1)
        return None

    def _adapt_patch_kernel(self, weight: torch.Tensor) -> torch.Tensor | None:
        target = self.patch_embed.proj.weight.shape  # [C, in_chans, *patch]
        if weight.shape[1] != self.in_chans:
            from timm.models import adapt_input_conv

            flat = weight.reshape(*weight.shape[:3], -1)  # [O, I, a, b(*c)]: timm adapts 4-D kernels
            weight = adapt_input_conv(self.in_chans, flat).reshape(weight.shape[0], self.in_chans, *weight.shape[2:])
        if weight.ndim == 4 and len(target) == 5:
            depth = target[2]
            if tuple(weight.shape[2:]) != tuple(target[3:]):
                return None
            weight = weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth  # average inflation (I3D)
        elif weight.ndim == 4 and tuple(weight.shape[2:]) != tuple(target[2:]):
            from timm.layers import resample_patch_embed

            weight = resample_patch_embed(weight, list(target[2:]))
        return weight

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token", "time_embed"}

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Patch tokens with prefix tokens and position embeddings: ``[B, prefix + N, C]`` and the grid.
        Under space-only attention the frames become batch entries: ``[(B T), prefix + H*W, C]``."""
        self.check_input(x)
        x, grid = self.patch_embed(x)
        p = self.num_prefix_tokens
        pos = resample_pos_embed(self.pos_embed, self.pos_grid, grid[1:] if self.video else grid, p)
        if self.video:
            x = rearrange(x, "b (t n) c -> b t n c", t=grid[0]) + pos[:, None, p:]
            if self.time_embed is not None:
                x = x + resample_pos_embed(self.time_embed, self.grid[:1], grid[:1])[:, :, None]  # [1, T, 1, C]
            pattern = "b t n c -> (b t) n c" if self.attention == "space_only" else "b t n c -> b (t n) c"
            x = rearrange(x, pattern)
            pos = pos[:, :p]
        else:
            x = x + pos[:, p:]
        if p:
            prefix = self.cls_token if self.dist_token is None else torch.cat([self.cls_token, self.dist_token], 1)
            x = torch.cat([(prefix + pos[:, :p]).expand(x.shape[0], -1, -1), x], dim=1)  # [B, p + N, C]
        return self.pos_drop(x), grid

    def run_block(
        self, index: int, x: torch.Tensor, grid: Sequence[int], policy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Block ``index`` on the tokens from ``embed``; ``policy`` is an optional token-keep state
        ``[B, tokens, 1]`` (1 kept, 0 dropped; prefix tokens 1) for token pruning (DynamicViT)."""
        args = (x, grid[0], policy) if self.attention == "divided" else (x, policy)
        return run_checkpointed(self.blocks[index], *args, enabled=self.activation_checkpointing)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block (joint or divided space-time) in the backward pass; every path runs its blocks
        through ``run_block``, so intermediate outputs (``out_indices``) and token pruning compose with it."""
        self.activation_checkpointing = bool(enabled)

    def sharding_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def clip_tokens(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Block outputs as one sequence per sample (folds space-only frames back into clips)."""
        return frames_to_clip(x, grid[0], self.num_prefix_tokens) if self.attention == "space_only" else x

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self.embed(x)
        for i in range(len(self.blocks)):
            x = self.run_block(i, x, grid)
        return self.norm(self.clip_tokens(x, grid))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, grid = self.embed(x)
        outs = []
        for i in range(self.out_indices[-1] + 1):
            x = self.run_block(i, x, grid)
            if i in self.out_indices:
                y = self.clip_tokens(x, grid)
                y = self.norm(y) if i == len(self.blocks) - 1 else y
                outs.append(self.tokens_to_map(y, grid))
        return outs

    def tokens_to_map(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Drop prefix tokens and fold the rest into a channel-first map ``[B, C, *grid]``."""
        tokens = tokens[:, self.num_prefix_tokens :]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


def _vit(overrides: dict[str, Any], **arch: Any) -> VisionTransformer:
    return build_preset(VisionTransformer, arch, overrides)  # type: ignore[return-value]


@register
def vit_tiny_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16: 192 wide, 12 blocks, 3 heads."""
    return _vit(kwargs, patch_size=16, embed_dim=192, depth=12, num_heads=3)


@register
def vit_small_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-S/16: 384 wide, 12 blocks, 6 heads."""
    return _vit(kwargs, patch_size=16, embed_dim=384, depth=12, num_heads=6)


@register
def vit_base_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-B/16: 768 wide, 12 blocks, 12 heads."""
    return _vit(kwargs, patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register
def vit_large_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-L/16: 1024 wide, 24 blocks, 16 heads."""
    return _vit(kwargs, patch_size=16, embed_dim=1024, depth=24, num_heads=16)


@register
def vit_tiny_patch32(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/32."""
    return _vit(kwargs, patch_size=32, embed_dim=192, depth=12, num_heads=3)


@register
def vit_small_patch32(**kwargs: Any) -> VisionTransformer:
    """ViT-S/32."""
    return _vit(kwargs, patch_size=32, embed_dim=384, depth=12, num_heads=6)


@register
def vit_base_patch32(**kwargs: Any) -> VisionTransformer:
    """ViT-B/32."""
    return _vit(kwargs, patch_size=32, embed_dim=768, depth=12, num_heads=12)


@register
def vit_large_patch32(**kwargs: Any) -> VisionTransformer:
    """ViT-L/32."""
    return _vit(kwargs, patch_size=32, embed_dim=1024, depth=24, num_heads=16)


@register
def vit_giant_patch14(**kwargs: Any) -> VisionTransformer:
    """ViT-g/14 (Zhai et al., 2022): 1408 wide, 40 blocks, MLP 6144, 16 heads; no class token (pools by avg/map)."""
    return _vit(kwargs, patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408, class_token=False)


@register
def vit_gigantic_patch14(**kwargs: Any) -> VisionTransformer:
    """ViT-G/14 (Zhai et al., 2022): 1664 wide, 48 blocks, MLP 8192, 16 heads; no class token (pools by avg/map)."""
    return _vit(kwargs, patch_size=14, embed_dim=1664, depth=48, num_heads=16, mlp_ratio=8192 / 1664, class_token=False)


@register
def timesformer_base_patch16(**kwargs: Any) -> VisionTransformer:
    """TimeSformer-B (Bertasius et al., 2021): ViT-B/16 over 8 frames of 224², divided space-time attention."""
    return _vit(
        kwargs, patch_size=(1, 16, 16), embed_dim=768, depth=12, num_heads=12,
        spatial_dims=3, num_frames=8, attention="divided",
    )


@register
def timesformer_small_patch16(**kwargs: Any) -> VisionTransformer:
    """TimeSformer on ViT-S/16 (384 wide, 12 blocks, 6 heads), 8 frames of 224²."""
    return _vit(
        kwargs, patch_size=(1, 16, 16), embed_dim=384, depth=12, num_heads=6,
        spatial_dims=3, num_frames=8, attention="divided",
    )


@register
def timesformer_nano_patch8(**kwargs: Any) -> VisionTransformer:
    """A 4-block, 96-wide TimeSformer over 8 frames of 32² in 8² patches: for tests and CPU demos."""
    return _vit(
        kwargs, img_size=32, patch_size=(1, 8, 8), embed_dim=96, depth=4, num_heads=4,
        spatial_dims=3, num_frames=8, attention="divided",
    )
