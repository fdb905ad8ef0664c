"""A training step of each task under mixed precision equals its reference implementation's, on the same weights
and input: the logits and the input gradient of the loss, within a multiple of the reference's own mixed-precision
error (its distance from its fp32 result), so the bound holds on any processor or GPU. The CPU runs bfloat16
autocast on tiny models; the ``gpu`` tier repeats the same step on CUDA in bf16 and fp16 (skipped without one). The
pairs and the check live in ``benchmarks/reference_pairs.py``, which ``benchmarks/gpu.py`` runs at the paper sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.reference_pairs import PAIRS, check_against_reference


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_a_bfloat16_step_equals_the_reference_on_the_cpu(name: str, tmp_path: Path) -> None:
    if name == "timesformer_hf":
        pytest.importorskip("transformers")
    check_against_reference(PAIRS[name](tmp_path), "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_a_mixed_precision_step_equals_the_reference_on_a_gpu(name: str, dtype: torch.dtype, tmp_path: Path) -> None:
    if name == "timesformer_hf":
        pytest.importorskip("transformers")
    check_against_reference(PAIRS[name](tmp_path), "cuda", dtype)
