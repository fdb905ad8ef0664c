"""Linear layers in oneDNN: the same function, gradients and parameter names as ``nn.Linear``, where ``cpu_kernels``
asks for them."""

from __future__ import annotations

import pytest
import torch
from tolerances import close_to_float64
from torch import nn

from ops.onednn_linear import OneDnnLinear, use_onednn_linears


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_linear_forward_and_backward(bias):
    torch.manual_seed(0)
    exact = nn.Linear(24, 40, bias=bias).double()
    ref = nn.Linear(24, 40, bias=bias)
    model = use_onednn_linears(nn.Sequential(nn.Linear(24, 40, bias=bias)), "on")
    assert type(model[0]) is OneDnnLinear
    assert list(model.state_dict()) == [f"0.{k}" for k in exact.state_dict()]
    state = {k: v.float() for k, v in exact.state_dict().items()}
    ref.load_state_dict(state), model.load_state_dict({f"0.{k}": v for k, v in state.items()})
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    x64, x32, x_ref = x.clone().requires_grad_(), x.float().requires_grad_(), x.float().requires_grad_()
    y64, y32, y_ref = exact(x64), model(x32), ref(x_ref)
    close_to_float64(y32, y_ref, y64)
    with torch.no_grad():
        close_to_float64(model(x.float()), y_ref, y64)
    grad = torch.randn_like(y64)
    # a gradient that is not contiguous, as attention's reshapes hand back
    grad32 = grad.float().transpose(0, 1).contiguous().transpose(0, 1)
    for a, b, c in zip(torch.autograd.grad(y64, [x64, *exact.parameters()], grad),
                       torch.autograd.grad(y32, [x32, *model.parameters()], grad32),
                       torch.autograd.grad(y_ref, [x_ref, *ref.parameters()], grad32)):
        close_to_float64(b, c, a)


@pytest.mark.parametrize("cpu_kernels", ["off", "on"])
@pytest.mark.parametrize("task", ["classification", "segmentation", "medical"])
def test_every_task_runs_its_linears_in_onednn_only_when_asked(task, cpu_kernels):
    """The swap is made once for all tasks (``TaskModule``): the backbone's and the head's linear layers, UNETR's
    encoder included; ``off`` (the default) keeps ``nn.Linear``."""
    if task == "classification":
        from tasks.classification import ClassificationModule as Module

        kwargs = {"backbone": "vit_tiny_patch16", "backbone_kwargs": {"img_size": 32, "depth": 2}}
    elif task == "segmentation":
        from tasks.segmentation import SegmentationModule as Module

        kwargs = {"backbone": "mit_b0"}
    else:
        from tasks.medical import MedicalSegmentationModule as Module

        kwargs = {"backbone": "unetr_vit_base", "feature_size": 8,
                  "backbone_kwargs": {"img_size": 32, "embed_dim": 48, "depth": 4, "num_heads": 2,
                                      "out_indices": [0, 1, 2, 3]}}
    module = Module(num_classes=3, cpu_kernels=cpu_kernels, **kwargs)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    assert linears and all((type(m) is OneDnnLinear) == (cpu_kernels == "on") for m in linears)


def test_onednn_linear_output_can_be_modified_in_place_in_training():
    """SegFormer's head adds the upsampled maps into the first projection's output (a permuted view of it)."""
    from ops.onednn_linear import onednn_linear

    torch.manual_seed(0)
    x = torch.randn(2, 12, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    results = []
    for linear, dtype in ((onednn_linear, torch.float32), (torch.nn.functional.linear, torch.float32),
                          (torch.nn.functional.linear, torch.float64)):
        xd, wd = x.to(dtype), weight.to(dtype)
        y = linear(xd, wd, None).transpose(1, 2)
        y.mul_(2.0)
        results.append((y.detach(), *torch.autograd.grad(y.square().sum(), [x, weight])))
    for a, b, c in zip(*results):
        close_to_float64(a, b, c)


def test_a_compiled_onednn_linear_is_one_graph():
    """Under ``torch.compile`` the layer is plain ``F.linear``, traced without a graph break (a break per layer
    made SegFormer recompile on every train/eval switch until dynamo gave up)."""
    torch.manual_seed(0)
    layer = use_onednn_linears(nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 4)), "on")
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(3, 5, 8)
    exact = nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 4)).double()
    exact.load_state_dict(layer.state_dict())
    close_to_float64(compiled(x), layer(x), exact(x.double()))
