"""The decoder's map pool: a buffer goes out again only once nothing holds it, and the fused blocks that draw their
maps from it give the same values and gradients whatever else is alive."""

from __future__ import annotations

import pytest
import torch

from ops import map_pool as medical_buffers
from ops.map_pool import MapPool

SHAPE = (1, 4, 8, 16, 16)


@pytest.fixture
def small_maps(monkeypatch):
    """Pool maps of any size, so that the tests' small maps take the pooled path."""
    monkeypatch.setattr(medical_buffers, "_MIN_BYTES", 0)
    medical_buffers.MAPS.clear()
    yield
    medical_buffers.MAPS.clear()


def test_a_free_map_is_reused_and_a_held_one_is_not(small_maps):
    pool, like = MapPool(), torch.empty(0)
    first = pool.empty(SHAPE, like)
    assert first.is_contiguous(memory_format=torch.channels_last_3d) and first.shape == SHAPE
    address = first.data_ptr()
    assert pool.empty(SHAPE, like).data_ptr() != address  # the caller still holds the first
    view = first[:, :1]
    del first
    assert pool.empty(SHAPE, like).data_ptr() != address  # a view of it is alive
    del view
    assert pool.empty(SHAPE, like).data_ptr() == address
    assert pool.empty(SHAPE, like, torch.contiguous_format).is_contiguous()


def test_a_map_saved_by_autograd_is_not_reused_before_backward(small_maps):
    pool, like = MapPool(), torch.empty(0)
    weight = torch.randn(SHAPE, requires_grad=True)
    out = pool.empty(SHAPE, like).copy_(torch.randn(SHAPE))
    address = out.data_ptr()
    loss = (weight * out).sum()  # autograd keeps ``out`` for the weight's gradient
    expected = out.clone()
    del out
    pool.empty(SHAPE, like).fill_(7.0)  # must not land on the saved map
    loss.backward()
    torch.testing.assert_close(weight.grad, expected)
    del loss
    assert pool.empty(SHAPE, like).data_ptr() == address


def _block_and_input():
    from monai.networks.blocks.dynunet_block import UnetResBlock

    from heads.unetr import instance_norm_as_group_norm
    from ops.unetr_blocks import FusedResBlock

    torch.manual_seed(0)
    block = FusedResBlock(instance_norm_as_group_norm(UnetResBlock(3, 32, 16, 3, 1, ("instance", {"affine": True}))))
    xs = [torch.randn(1, 32, 24, 64, 2).contiguous(memory_format=torch.channels_last_3d) for _ in range(2)]
    return block, xs


def test_fused_block_gradients_do_not_depend_on_other_live_graphs(small_maps):
    block, xs = _block_and_input()
    assert block._fusable(xs[0])
    grads = []
    for x in xs:  # one graph at a time: each backward frees the maps before the next forward
        x = x.clone().requires_grad_()
        out = block(x)
        grads.append(torch.autograd.grad(out, [x, *block.parameters()], torch.ones_like(out)))
    with torch.inference_mode():  # maps first drawn in inference mode are usable by autograd later
        block(xs[0])
    inputs = [x.clone().requires_grad_() for x in xs]
    outs = [block(x) for x in inputs]  # two graphs alive at once: their maps must be distinct
    assert outs[0].data_ptr() != outs[1].data_ptr()
    for x, out, expected in zip(inputs, outs, grads):
        for a, b in zip(torch.autograd.grad(out, [x, *block.parameters()], torch.ones_like(out)), expected):
            torch.testing.assert_close(a, b)
    with torch.no_grad():
        kept = block(xs[0])
        again = block(xs[1])  # the first output is still held: written elsewhere
        torch.testing.assert_close(kept, outs[0].detach())
        torch.testing.assert_close(again, outs[1].detach())


def test_validation_starts_without_the_training_steps_pooled_maps(small_maps):
    """A fit's validation does not carry the training step's maps into its first window batch."""
    from tasks.medical import MedicalSegmentationModule

    module = MedicalSegmentationModule(
        backbone="unetr_vit_base", num_classes=2, feature_size=4,
        backbone_kwargs=dict(img_size=16, embed_dim=24, depth=4, num_heads=2, out_indices=[0, 1, 2, 3]),
    )
    module(torch.randn(1, 1, 16, 16, 16)).sum().backward()
    assert len(medical_buffers.MAPS) > 0
    module.on_validation_epoch_start()
    assert len(medical_buffers.MAPS) == 0
