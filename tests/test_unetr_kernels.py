"""UNETR's hand-written decoder kernels (``ops/unetr_blocks.py``, ``ops/unetr_res_block.py``, ``ops/norms3d.py``):
their autograd functions guard what their backward reads, their results do not depend on other live graphs, and
the decoder's norms are PyTorch's wherever the kernels may not run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetResBlock
from tolerances import close_to_float64

from ops import norms3d
from ops.kernels import set_cpu_kernels
from ops.norms3d import InstanceNormAct
from ops.unetr_blocks import FusedOutBlock, FusedResBlock

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _block_and_inputs(cin: int = 32) -> tuple[FusedResBlock, list[torch.Tensor]]:
    torch.manual_seed(0)
    block = FusedResBlock(UnetResBlock(3, cin, 16, 3, 1, ("instance", {"affine": True})))
    xs = [torch.randn(1, cin, 24, 64, 2).contiguous(memory_format=torch.channels_last_3d) for _ in range(2)]
    return block, xs


def test_fused_block_gradients_do_not_depend_on_other_live_graphs():
    block, xs = _block_and_inputs()
    assert block._fusable(xs[0])
    grads = []
    for x in xs:  # one graph at a time
        x = x.clone().requires_grad_()
        out = block(x)
        grads.append(torch.autograd.grad(out, [x, *block.parameters()], torch.ones_like(out)))
    inputs = [x.clone().requires_grad_() for x in xs]
    outs = [block(x) for x in inputs]  # two graphs alive at once
    for x, out, expected in zip(inputs, outs, grads):
        for a, b in zip(torch.autograd.grad(out, [x, *block.parameters()], torch.ones_like(out)), expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():  # inference writes in place into its own maps, never into a kept output
        kept = block(xs[0])
        again = block(xs[1])
        torch.testing.assert_close(kept, outs[0].detach())  # the same up to the in-place forms' rounding
        torch.testing.assert_close(again, outs[1].detach())


@pytest.mark.parametrize("parameter", ["conv1.conv.weight", "conv3.conv.weight", "norm2.weight", "norm3.bias"])
def test_a_parameter_changed_in_place_before_backward_is_an_error(parameter):
    """The residual block's function saves the parameters its backward reads (``ctx.save_for_backward``): autograd's
    version counter catches an optimizer step (or any in-place change) between forward and backward, as it does for
    PyTorch's own layers, instead of a gradient silently computed with the new weights."""
    block, xs = _block_and_inputs()
    x = xs[0].requires_grad_()
    out = block(x)
    assert out.grad_fn.name().endswith("ResBlockFunctionBackward")
    with torch.no_grad():
        block.get_parameter(parameter).add_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_the_output_blocks_function_guards_its_weight_too():
    from monai.networks.blocks import UnetOutBlock

    block = FusedOutBlock(UnetOutBlock(3, 16, 5))
    x = torch.randn(2, 16, 6, 7, 8).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    out = block(x)
    assert out.grad_fn.name().endswith("OutConvFunctionBackward")
    with torch.no_grad():
        block.conv.conv.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("context", ["eager", "autocast", "other device", "off"])
def test_decoder_norms_are_pytorchs_wherever_the_kernel_may_not_run(monkeypatch, context):
    """``InstanceNormAct`` runs its exact channels-last kernel only on fp32 CPU maps in eager mode with the switch
    on; under autocast, on another device (here ``meta``, as a GPU would) and with ``off`` it is PyTorch's
    instance norm, then the LeakyReLU."""
    calls = []
    kernel = norms3d.instance_norm_act
    monkeypatch.setattr(norms3d, "instance_norm_act", lambda *args: calls.append(1) or kernel(*args))
    norm = InstanceNormAct(6, negative_slope=0.01)
    set_cpu_kernels(norm, "off" if context == "off" else "on")
    x = torch.randn(2, 6, 5, 7, 4).contiguous(memory_format=torch.channels_last_3d)
    if context == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(x)
            expected = F.leaky_relu(F.instance_norm(x, weight=norm.weight, bias=norm.bias), 0.01)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)  # PyTorch's ops, in autocast's dtypes
    elif context == "other device":
        assert norm.to("meta")(x.to("meta")).device.type == "meta"
    else:
        exact = F.leaky_relu(F.instance_norm(x.double()), 0.01)
        close_to_float64(norm(x), F.leaky_relu(F.instance_norm(x.contiguous()), 0.01), exact)
    assert bool(calls) == (context == "eager")
