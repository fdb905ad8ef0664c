"""``--model.compile true``: every task's forward compiled gives the eager outputs, trains, and its checkpoints load
into an uncompiled model.

Compilation is slow on a CPU, so the per-task tests use the ``aot_eager`` backend (TorchDynamo's graph capture and
AOT autograd, which is where a task's wiring breaks) with tiny models; one test runs the default ``inductor``
backend (C++ code generation: ~100 s on a cold compile cache on the shared 2-core machine, seconds once the
inductor cache under /tmp holds its kernels).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tasks.classification import ClassificationModule
from tasks.medical import MedicalSegmentationModule
from tasks.module import TaskModule
from tasks.segmentation import SegmentationModule
from tasks.video import VideoClassificationModule

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

TASKS: dict[str, tuple[type[TaskModule], dict[str, Any], tuple[int, ...]]] = {
    "classification": (
        ClassificationModule,
        {"backbone": "vit_tiny_patch16", "backbone_kwargs": {"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2}},
        (2, 3, 32, 32),
    ),
    "video": (
        VideoClassificationModule,
        {"backbone": "timesformer_nano_patch8", "backbone_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "num_frames": 2}},
        (2, 3, 2, 16, 16),
    ),
    "segmentation": (
        SegmentationModule,
        {
            "backbone": "mit_b0", "decoder_dim": 16,
            "backbone_kwargs": {"embed_dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 4)},
        },
        (2, 3, 32, 32),
    ),
    "medical": (
        MedicalSegmentationModule,
        {
            "backbone": "unetr_vit_base", "feature_size": 4,
            "backbone_kwargs": {"img_size": 16, "embed_dim": 32, "depth": 4, "num_heads": 2, "out_indices": [0, 1, 2, 3]},
        },
        (2, 1, 16, 16, 16),
    ),
}


def build(task: str, **kwargs: Any) -> TaskModule:
    cls, args, _ = TASKS[task]
    torch.manual_seed(0)
    return cls(**args, num_classes=4, **kwargs)


def recording_backend(graphs: list[torch.fx.GraphModule]) -> Any:
    """``aot_eager`` that also records the graphs it is handed, so a test sees that something was compiled."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_compiled_forward_equals_eager(task: str) -> None:
    torch._dynamo.reset()
    graphs: list[torch.fx.GraphModule] = []
    eager = build(task).eval()
    compiled = build(task, compile=True, compile_options={"backend": recording_backend(graphs)}).eval()
    compiled.load_state_dict(eager.state_dict())  # strict: compiling in place keeps every parameter name
    x = torch.randn(TASKS[task][2])
    with torch.no_grad():
        expected, actual = eager(x), compiled(x)
    assert graphs, "nothing was compiled"
    assert not any("loss" in str(node.target) for g in graphs for node in g.graph.nodes)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_inductor_forward_and_gradients_equal_eager() -> None:
    torch._dynamo.reset()
    eager = build("classification")
    compiled = build("classification", compile=True)  # the default backend, inductor
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(TASKS["classification"][2])
    for module in (eager, compiled):
        module.train()
        module(x).square().sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), eager.eval()(x), atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_compiled_fit_checkpoint_loads_into_an_eager_model(tmp_path) -> None:
    torch._dynamo.reset()
    module = build("classification", compile=True, compile_options={"backend": "aot_eager"}, lr=1e-3)
    data = [{"input": torch.randn(3, 32, 32), "target": torch.tensor(i % 4)} for i in range(4)]
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(data, batch_size=2))
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not [k for k in state if "_orig_mod" in k]
    eager = ClassificationModule.load_from_checkpoint(path, compile=False)
    assert eager.hparams.compile is False and eager._compiled_call_impl is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(eager.eval()(x), module.eval()(x), atol=1e-4, rtol=1e-4)
