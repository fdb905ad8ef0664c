"""Few-shot linear evaluation (big_vision's fewshot_lsr): the closed-form solve, shot sampling, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.fewshot import BIAS_CONSTANT, ridge_accuracy, ridge_weights, sample_shots


def numpy_ridge(x: np.ndarray, y: np.ndarray, k: int, l2: float) -> np.ndarray:
    x = (x - x.mean(0)) / (x.std(0) + 1e-5)
    x = np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT)], 1)
    t = 2.0 * np.eye(k)[y] - 1.0
    return np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ t)


@pytest.mark.parametrize(("n", "d"), [(40, 8), (12, 30)])  # both branches: N >= D and D > N
def test_closed_form_equals_float64_reference(n: int, d: int) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 4, n)
    _, _, w = ridge_weights(torch.from_numpy(x), torch.from_numpy(y), 4, 1024.0)
    np.testing.assert_allclose(w.numpy(), numpy_ridge(x.astype(np.float64), y, 4, 1024.0), rtol=0, atol=1e-6)


def test_recovers_a_linear_separation() -> None:
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=gen) * 3
    y_train, y_test = torch.arange(5).repeat(10), torch.arange(5).repeat(40)
    x_train = centers[y_train] + torch.randn(50, 32, generator=gen)
    x_test = centers[y_test] + torch.randn(200, 32, generator=gen)
    assert ridge_accuracy(x_train, y_train, x_test, y_test, 5, l2_reg=1024.0) > 0.95


def test_sampling_is_reproducible_per_seed_and_names_short_classes() -> None:
    labels = np.repeat(np.arange(3), 30)
    a, b, c = sample_shots(labels, 5, 0, "abc"), sample_shots(labels, 5, 0, "abc"), sample_shots(labels, 5, 1, "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.bincount(labels[a]), [5, 5, 5])
    assert set(sample_shots(labels, 10, 0, "abc")) >= set(a)  # more shots extend fewer
    with pytest.raises(ValueError, match=r"class 'c', which has 3"):
        sample_shots(np.array([0] * 30 + [1] * 30 + [2] * 3), 5, 0, "abc")


def test_cli_on_synthetic_shapes_beats_chance(tmp_path, one_thread) -> None:
    """Frozen features of a briefly trained ViT; the evaluation images are the val split, never drawn for shots."""
    from tasks.classification import main as classification_main
    from tasks.fewshot import main as fewshot_main

    common = ["--config=configs/vit_small_patch16.yaml", "--model.backbone=vit_tiny_patch16",
              "--model.backbone_kwargs={img_size: 32, depth: 2}", "--data.image_size=32", "--data.batch_size=32",
              "--data.num_workers=0", "--data.synthetic_train_per_class=60"]
    classification_main(["fit", *common, "--trainer.max_epochs=3", "--trainer.logger=false",
                         f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=true"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    results = fewshot_main([*common, f"--ckpt_path={ckpt}", "--shots", "10", "--seeds", "2", f"--out={tmp_path / 'fs'}"])
    assert np.mean(results[10]) > 0.33  # 4 classes: chance is 0.25 (measured 0.395 after these 3 short epochs)
    assert (tmp_path / "fs" / "fewshot.csv").is_file() and (tmp_path / "fs" / "fewshot.svg").is_file()
