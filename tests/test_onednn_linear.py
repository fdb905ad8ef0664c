"""Linear layers in oneDNN: the same function, gradients and parameter names as ``nn.Linear``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ops.onednn_linear import OneDnnLinear, use_onednn_linears


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_linear_in_float64_forward_and_backward(bias):
    torch.manual_seed(0)
    ref = nn.Linear(24, 40, bias=bias).double()
    model = use_onednn_linears(nn.Sequential(nn.Linear(24, 40, bias=bias)))
    assert type(model[0]) is OneDnnLinear
    assert list(model.state_dict()) == [f"0.{k}" for k in ref.state_dict()]
    model.load_state_dict({f"0.{k}": v.float() for k, v in ref.state_dict().items()})
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    x64, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    y64, y32 = ref(x64), model(x32)
    assert y32.shape == y64.shape and (y32 - y64).abs().max() <= 1e-5
    with torch.no_grad():
        assert (model(x.float()) - y64).abs().max() <= 1e-5
    grad = torch.randn_like(y64)
    # a gradient that is not contiguous, as attention's reshapes hand back
    grad32 = grad.float().transpose(0, 1).contiguous().transpose(0, 1)
    for a, b in zip(torch.autograd.grad(y64, [x64, *ref.parameters()], grad),
                    torch.autograd.grad(y32, [x32, *model.parameters()], grad32)):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * max(1.0, a.abs().max().item())


def test_unetr_encoder_runs_its_linears_in_onednn():
    from tasks.medical import MedicalSegmentationModule

    module = MedicalSegmentationModule(
        backbone="unetr_vit_base", num_classes=3, feature_size=8,
        backbone_kwargs=dict(img_size=32, embed_dim=48, depth=4, num_heads=2, out_indices=[0, 1, 2, 3]),
    )
    linears = [m for m in module.backbone.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is OneDnnLinear for m in linears)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_every_task_runs_its_linears_in_onednn(task):
    """The swap is made once for all tasks (``TaskModule``): the backbone's and the head's linear layers."""
    if task == "classification":
        from tasks.classification import ClassificationModule as Module

        kwargs = dict(backbone="vit_tiny_patch16", backbone_kwargs=dict(img_size=32, depth=2))
    else:
        from tasks.segmentation import SegmentationModule as Module

        kwargs = dict(backbone="mit_b0")
    module = Module(num_classes=3, **kwargs)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is OneDnnLinear for m in linears)


def test_onednn_linear_output_can_be_modified_in_place_in_training():
    """SegFormer's head adds the upsampled maps into the first projection's output (a permuted view of it)."""
    from ops.onednn_linear import onednn_linear

    torch.manual_seed(0)
    x = torch.randn(2, 12, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    results = []
    for linear in (onednn_linear, torch.nn.functional.linear):
        y = linear(x, weight, None).transpose(1, 2)
        y.mul_(2.0)
        results.append((y.detach(), *torch.autograd.grad(y.square().sum(), [x, weight])))
    for a, b in zip(*results):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())


def test_a_compiled_onednn_linear_is_one_graph():
    """Under ``torch.compile`` the layer is plain ``F.linear``, traced without a graph break (a break per layer
    made SegFormer recompile on every train/eval switch until dynamo gave up)."""
    torch.manual_seed(0)
    layer = use_onednn_linears(nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 4)))
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(3, 5, 8)
    assert (compiled(x) - layer(x)).abs().max() <= 1e-5
