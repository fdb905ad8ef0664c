"""big_vision's ViT checkpoints (google-research/big_vision, ``.npz``) mapped onto ``VisionTransformer``.

big_vision saves Flax parameter trees flattened with ``/``, optionally under ``params/`` (or ``opt/target/``):
``embedding/kernel`` ``[ph, pw, in, C]``, ``pos_embedding`` ``[1, N, C]`` (patch tokens only: the ``tok`` head's
``cls`` gets no position embedding, which is what a zero class slot of our ``pos_embed`` means),
``Transformer/encoderblock_{i}/...`` (or one ``Transformer/encoderblock/...`` stacked over depth when trained with
``scan``), ``Transformer/encoder_norm``, the ``gap``/``tok`` classifier ``head`` and the ``map`` pooling
``MAPHead_0``, which maps onto the classification head's ``attn_pool`` (timm's ``AttentionPoolLatent``). Dense
kernels are ``[in, out]``; attention kernels ``[C, heads, head_dim]`` (query/key/value) and
``[heads, head_dim, C]`` (out). Its MLPs use Flax's default GELU, the tanh approximation: a backbone built with
``mlp_act: gelu_tanh`` computes as big_vision does (tested against big_vision's own code on stored files,
``tests/data/releases/big_vision``); with the exact GELU the load report says so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from einops import rearrange

from ..weights import StateDict, register_format

_PREFIXES = ("params/img/", "params/", "opt/target/", "")
_BLOCK = re.compile(r"Transformer/encoderblock(?:_(\d+))?/(.+)")


def _prefix(state: Mapping[str, torch.Tensor]) -> str | None:
    return next((p for p in _PREFIXES if f"{p}embedding/kernel" in state and f"{p}Transformer/encoder_norm/scale" in state), None)


def is_big_vision_vit(state: Mapping[str, torch.Tensor]) -> bool:
    return _prefix(state) is not None


def _dense(kernel: torch.Tensor) -> torch.Tensor:
    return kernel.T  # [in, out] -> [out, in]


def _attention(names: Mapping[str, torch.Tensor], into: str, out: StateDict, *, fused_kv: bool = False) -> None:
    """A Flax ``MultiHeadDotProductAttention`` as fused input projections and an output projection."""
    qkv = ("key", "value") if fused_kv else ("query", "key", "value")
    kernels = [rearrange(names[f"{n}/kernel"], "c h d -> (h d) c") for n in qkv]
    biases = [names[f"{n}/bias"].reshape(-1) for n in qkv]
    fused = "kv" if fused_kv else "qkv"
    out[f"{into}.{fused}.weight"], out[f"{into}.{fused}.bias"] = torch.cat(kernels), torch.cat(biases)
    if fused_kv:
        out[f"{into}.q.weight"] = rearrange(names["query/kernel"], "c h d -> (h d) c")
        out[f"{into}.q.bias"] = names["query/bias"].reshape(-1)
    out[f"{into}.proj.weight"] = rearrange(names["out/kernel"], "h d c -> c (h d)")
    out[f"{into}.proj.bias"] = names["out/bias"]


def _block(names: Mapping[str, torch.Tensor], into: str, out: StateDict) -> None:
    for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
        out[f"{into}.{ours}.weight"], out[f"{into}.{ours}.bias"] = names[f"{theirs}/scale"], names[f"{theirs}/bias"]
    _attention(_under(names, "MultiHeadDotProductAttention_0/"), f"{into}.attn", out)
    for r in range(2):
        out[f"{into}.mlp.fc{r + 1}.weight"] = _dense(names[f"MlpBlock_0/Dense_{r}/kernel"])
        out[f"{into}.mlp.fc{r + 1}.bias"] = names[f"MlpBlock_0/Dense_{r}/bias"]


def _under(names: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in names.items() if k.startswith(prefix)}


def convert_big_vision_vit(state: StateDict) -> StateDict:
    prefix = _prefix(state) or ""
    w = {k.removeprefix(prefix): v.float() for k, v in state.items() if k.startswith(prefix)}
    if "pos_embedding" not in w:
        raise ValueError(
            "it has no pos_embedding: its model added fixed sin-cos position embeddings (big_vision's "
            "posemb='sincos2d', e.g. configs/vit_s16_i1k.py), which VisionTransformer does not compute; "
            "only posemb='learn' checkpoints load"
        )
    out: StateDict = {
        "backbone.patch_embed.proj.weight": rearrange(w.pop("embedding/kernel"), "h w i o -> o i h w"),
        "backbone.patch_embed.proj.bias": w.pop("embedding/bias"),
        "backbone.pos_embed": w.pop("pos_embedding"),  # [1, N, C]; the class slot is added as zeros on loading
        "backbone.norm.weight": w.pop("Transformer/encoder_norm/scale"),
        "backbone.norm.bias": w.pop("Transformer/encoder_norm/bias"),
    }
    if "cls" in w:
        out["backbone.cls_token"] = w.pop("cls")
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for key in [k for k in w if _BLOCK.fullmatch(k)]:
        index, name = _BLOCK.fullmatch(key).groups()  # type: ignore[union-attr]
        value = w.pop(key)
        if index is None:  # scanned: one tensor stacked over all blocks
            for i, layer in enumerate(value):
                blocks.setdefault(i, {})[name] = layer
        else:
            blocks.setdefault(int(index), {})[name] = value
    for i, names in sorted(blocks.items()):
        _block(names, f"backbone.blocks.{i}", out)
    if "head/kernel" in w:
        out["head.fc.weight"], out["head.fc.bias"] = _dense(w.pop("head/kernel")), w.pop("head/bias")
    map_head = _under(w, "MAPHead_0/")
    if map_head:
        out["head.attn_pool.latent"] = map_head["probe"]
        _attention(_under(map_head, "MultiHeadDotProductAttention_0/"), "head.attn_pool", out, fused_kv=True)
        out["head.attn_pool.norm.weight"], out["head.attn_pool.norm.bias"] = map_head["LayerNorm_0/scale"], map_head["LayerNorm_0/bias"]
        for r in range(2):
            out[f"head.attn_pool.mlp.fc{r + 1}.weight"] = _dense(map_head[f"MlpBlock_0/Dense_{r}/kernel"])
            out[f"head.attn_pool.mlp.fc{r + 1}.bias"] = map_head[f"MlpBlock_0/Dense_{r}/bias"]
        w = {k: v for k, v in w.items() if not k.startswith("MAPHead_0/")}
    out.update({f"foreign.{k}": v for k, v in w.items()})  # e.g. pre_logits: reported, not loaded
    return {k: v.contiguous() for k, v in out.items()}


# Flax's nn.gelu is the tanh approximation: big_vision's MLPs (and MAPHead's) compute with it
register_format("big_vision-vit", is_big_vision_vit, convert_big_vision_vit, mlp_act="gelu_tanh")
