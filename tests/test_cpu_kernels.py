"""The one switch over the hand-written CPU kernels (``ops/kernels.py``): ``off``, ``auto`` and ``on`` give the same
models and outputs, ``auto`` chooses by its timer once per signature, and each private op runs only where the switch
and the context allow it (never off, under autocast, tracing, on another device or where this build lacks the op)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from tolerances import close_to_float64
from torch import nn

from ops import kernels, use_cpu_kernels
from ops.kernels import set_cpu_kernels
from ops.onednn_linear import OneDnnLinear

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_choices")  # one_thread: see conftest.py

TINY_VIT = {"img_size": 32, "embed_dim": 48, "depth": 2, "num_heads": 2}


@pytest.fixture
def fresh_choices() -> Iterator[None]:
    """``auto``'s table and timer as a new process has them, and again afterwards."""
    kernels.set_timer(None)
    yield
    kernels.set_timer(None)


def count_op(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """Calls of ``torch.ops.mkldnn.<name>`` (and of its overloads) from now on, the op itself still running."""
    calls: list[str] = []
    packet = getattr(torch.ops.mkldnn, name)

    class Counted:
        def __call__(self, *args: object, **kwargs: object) -> object:
            calls.append(name)
            return packet(*args, **kwargs)

        def __getattr__(self, overload: str) -> Callable[..., object]:
            op = getattr(packet, overload)

            def counted(*args: object, **kwargs: object) -> object:
                calls.append(f"{name}.{overload}")
                return op(*args, **kwargs)

            return counted

    monkeypatch.setattr(torch.ops.mkldnn, name, Counted())
    return calls


# --- the switch ---------------------------------------------------------------------------------------------------


def test_a_value_outside_the_switch_is_an_error_naming_it():
    from tasks.classification import ClassificationModule

    with pytest.raises(ValueError, match="cpu_kernels must be one of .*'fast'"):
        kernels.check_cpu_kernels("fast")
    with pytest.raises(ValueError, match="'fast'"):
        ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=TINY_VIT, num_classes=3, cpu_kernels="fast")


def _task(task: str, cpu_kernels: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if task == "classification":
        from tasks.classification import ClassificationModule

        module = ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=TINY_VIT, num_classes=3,
                                      cpu_kernels=cpu_kernels)
        return module, torch.randn(2, 3, 32, 32)
    if task == "segmentation":
        from tasks.segmentation import SegmentationModule

        return SegmentationModule(backbone="mit_b0", num_classes=3, cpu_kernels=cpu_kernels), torch.randn(2, 3, 64, 64)
    from tasks.medical import MedicalSegmentationModule

    module = MedicalSegmentationModule(
        backbone="unetr_vit_base", num_classes=3, feature_size=4, cpu_kernels=cpu_kernels,
        backbone_kwargs={"img_size": 32, "embed_dim": 48, "depth": 4, "num_heads": 2, "out_indices": [0, 1, 2, 3]},
    )
    return module, torch.randn(2, 1, 32, 32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "segmentation", "medical"])
def test_every_switch_value_gives_the_same_model_outputs_and_gradients(task):
    """A model trained with ``on`` loads into ``off`` (and ``auto``) under the same names and gives the same logits
    and gradients (eval mode: no dropout draws), each within a few times plain PyTorch's own fp32 error against
    float64."""
    on, x = _task(task, "on")
    models = {"on": on, "off": _task(task, "off")[0], "auto": _task(task, "auto")[0]}
    for model in models.values():
        assert list(model.state_dict()) == list(on.state_dict())
        model.load_state_dict(on.state_dict())
    exact = copy.deepcopy(models["off"]).double()
    results = {}
    for name, model in {**models, "float64": exact}.items():
        model.eval()
        out = model(x.to(next(model.parameters()).dtype))
        out.square().mean().backward()
        results[name] = (out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    out64, grads64 = results.pop("float64")
    for name, (out, grads) in results.items():
        close_to_float64(out, results["off"][0], out64)
        assert grads.keys() == grads64.keys(), name
        for n, g in grads.items():
            close_to_float64(g, results["off"][1][n], grads64[n], what=f"{name} {n}")
        with torch.no_grad():  # inference: the kernels' forms without autograd
            close_to_float64(models[name](x), models["off"](x), exact(x.double()))


def test_on_runs_each_tasks_linear_layers_in_onednn_and_off_none(monkeypatch):
    for cpu_kernels in ("off", "on"):
        module, x = _task("segmentation", cpu_kernels)
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        assert linears and all(isinstance(m, OneDnnLinear) == (cpu_kernels == "on") for m in linears)
        calls = count_op(monkeypatch, "_linear_pointwise")
        with torch.no_grad():
            module.eval()(x)
        assert bool(calls) == (cpu_kernels == "on")  # the backbone's layers and SegFormer's folded head


# --- auto ---------------------------------------------------------------------------------------------------------


def test_auto_keeps_the_faster_by_its_timer_once_per_signature(monkeypatch):
    timed: list[str] = []
    faster = {"fast": 1.0, "plain": 2.0}
    kernels.set_timer(lambda path, run: timed.append(path) or faster[path])
    calls = count_op(monkeypatch, "_linear_pointwise")
    layer = use_cpu_kernels(nn.Sequential(nn.Linear(8, 6)), "auto")
    x = torch.randn(3, 5, 8)

    layer(x)
    assert set(timed) == {"fast", "plain"} and list(kernels.CHOICES.values()) == [True]
    timed.clear(), calls.clear()
    layer(x)
    assert not timed and calls  # cached: the kernel runs, nothing is timed again
    layer(torch.randn(4, 5, 8))
    assert timed and len(kernels.CHOICES) == 2  # another shape is timed apart
    timed.clear()
    with torch.no_grad():
        layer(x)
    assert timed and len(kernels.CHOICES) == 3  # and inference apart from training
    torch.set_num_threads(2)
    layer(x)
    assert len(kernels.CHOICES) == 4  # and another thread count

    faster.update(fast=3.0)
    kernels.set_timer(lambda path, run: faster[path])  # a new timer starts a new table
    layer(x)
    calls.clear()
    layer(x)
    assert list(kernels.CHOICES.values()) == [False] and not calls  # the plain path won: F.linear


def test_auto_times_real_runs_and_its_choice_gives_the_same_result():
    layer = use_cpu_kernels(nn.Sequential(nn.Linear(64, 32)), "auto")
    plain = use_cpu_kernels(copy.deepcopy(layer), "off")
    x = torch.randn(16, 64, requires_grad=True)
    y = layer(x)
    assert len(kernels.CHOICES) == 1 and layer[0].weight.grad is None  # timing leaves no gradient behind
    exact = nn.functional.linear(x.double(), layer[0].weight.double(), layer[0].bias.double())
    close_to_float64(y, plain(x), exact)


# --- where the private ops run ------------------------------------------------------------------------------------


def _linear_case() -> tuple[nn.Module, torch.Tensor, str]:
    return nn.Sequential(OneDnnLinear(8, 6)), torch.randn(3, 8), "_linear_pointwise"


def _res_block_case() -> tuple[nn.Module, torch.Tensor, str]:
    from monai.networks.blocks.dynunet_block import UnetResBlock

    from ops.unetr_blocks import FusedResBlock

    block = FusedResBlock(UnetResBlock(3, 8, 4, 3, 1, ("instance", {"affine": True})))
    return block, torch.randn(2, 8, 8, 6, 4).contiguous(memory_format=torch.channels_last_3d), "_convolution_pointwise_"


def _conv_act_case() -> tuple[nn.Module, torch.Tensor, str]:
    from backbones.efficientformer_v2_layers import ConvNorm

    layer = ConvNorm(4, 6, 3, act_layer=nn.GELU).eval()
    layer.fuse()  # the inference form: its convolution and GELU as one oneDNN call, outside autograd
    layer.requires_grad_(False)
    return layer, torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last), "_convolution_pointwise"


CASES = {"linear": _linear_case, "unetr_res_block": _res_block_case, "conv_act": _conv_act_case}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("context", ["on", "off", "autocast", "tracing", "other device", "op missing"])
def test_a_private_op_runs_only_with_on_in_eager_fp32_cpu_mode(monkeypatch, case, context):
    module, x, op = CASES[case]()
    set_cpu_kernels(module, "off" if context == "off" else "on")
    plain = set_cpu_kernels(copy.deepcopy(module), "off")
    exact = copy.deepcopy(plain).double()(x.double())
    calls = count_op(monkeypatch, op)
    if context == "op missing":
        monkeypatch.setattr(kernels, "has_op", lambda name: False)
    if context == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert module(x).dtype == torch.bfloat16
    elif context == "tracing":
        close_to_float64(torch.jit.trace(module, x, check_trace=False)(x), plain(x), exact)
    elif context == "other device":
        assert copy.deepcopy(module).to("meta")(x.to("meta")).device.type == "meta"
    else:
        close_to_float64(module(x), plain(x), exact)
    assert bool(calls) == (context == "on"), calls


def test_efficientformer_v2_fused_form_follows_the_switch_and_new_weights(monkeypatch):
    """The inference form's oneDNN convolutions (weights packed once, renewed when new weights load) only with
    ``on``; ``off`` runs plain convolutions on the same folded weights; both give the unfused network's features."""
    from backbones import create_backbone

    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    outputs = {}
    for cpu_kernels in ("off", "on"):
        a, b = (create_backbone("efficientformerv2_s0", img_size=64).eval() for _ in range(2))
        b.load_state_dict({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                           for k, v in a.state_dict().items()})
        with torch.no_grad():
            unfused = b(x)
        calls = count_op(monkeypatch, "_convolution_pointwise")
        with torch.inference_mode():
            set_cpu_kernels(a.fuse(), cpu_kernels), set_cpu_kernels(b.fuse(), cpu_kernels)
            a(x)
            a.load_state_dict(b.state_dict())
            outputs[cpu_kernels] = a(x)
        assert bool(calls) == (cpu_kernels == "on")
        for got, want in zip(outputs[cpu_kernels], unfused):
            assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
