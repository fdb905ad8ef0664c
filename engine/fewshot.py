"""Few-shot linear evaluation as big_vision does it (``evaluators/fewshot_lsr.py``; Zhai et al., 2022).

Frozen pre-logits features (the classification head's input) are extracted once; for each number of shots and
seed, that many training images per class are drawn, each feature dimension is standardised on them, a constant
bias column is appended, and {-1, +1} one-hot targets are regressed in closed form with ridge ``l2_reg`` through the
eigendecomposition of the smaller Gram matrix. Top-1 on the evaluation split, mean ± std over seeds.

Run by ``python -m tasks.fewshot`` (``tasks/fewshot.py``) after training, and by ``FewShotEvaluator`` during it.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from datamodules.classification import ClassificationDataModule

BIAS_CONSTANT = 100.0  # big_vision's: a large constant feature, so the bias is almost unregularised


def ridge_weights(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2_reg: float) -> tuple[torch.Tensor, ...]:
    """Standardisation ``(mean, std)`` and weights ``[D + 1, K]`` of the closed-form ridge regression of
    ``2 * onehot(y) - 1`` on standardised ``x`` with a bias column, in float64: ``(XᵀX + λI)⁻¹XᵀY`` when N ≥ D,
    ``Xᵀ(XXᵀ + λI)⁻¹Y`` otherwise, both as ``lhs · diag(1 / (eigs + λ)) · rhs`` from one ``eigh``."""
    x = x.double()
    mean, std = x.mean(0, keepdim=True), x.std(0, unbiased=False, keepdim=True) + 1e-5
    x = torch.cat([(x - mean) / std, x.new_full((x.shape[0], 1), BIAS_CONSTANT)], dim=1)  # [N, D + 1]
    targets = 2.0 * nn.functional.one_hot(y, num_classes).double() - 1.0  # [N, K]
    if x.shape[0] >= x.shape[1]:
        eigs, q = torch.linalg.eigh(x.T @ x)
        lhs, rhs = q, q.T @ (x.T @ targets)
    else:
        eigs, q = torch.linalg.eigh(x @ x.T)
        lhs, rhs = x.T @ q, q.T @ targets
    return mean, std, (lhs / (eigs + l2_reg)) @ rhs


def ridge_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   num_classes: int, l2_reg: float = 1024.0) -> float:
    mean, std, w = ridge_weights(x_train, y_train, num_classes, l2_reg)
    x = (x_test.double() - mean) / std
    logits = torch.cat([x, x.new_full((x.shape[0], 1), BIAS_CONSTANT)], dim=1) @ w
    return float((logits.argmax(1) == y_test).double().mean())


def sample_shots(labels: np.ndarray, shots: int, seed: int, class_names: Sequence[str]) -> np.ndarray:
    """Indices of ``shots`` training images per class, drawn by ``seed`` (one permutation per class, so more shots
    extend fewer ones, as in big_vision). A class with fewer images raises, naming it and the counts."""
    rng = np.random.default_rng(seed)
    picked = []
    for c, name in enumerate(class_names):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise ValueError(f"{shots}-shot evaluation needs {shots} training images of class {name!r}, which has {len(members)}")
        picked.append(rng.permutation(members)[:shots])
    return np.concatenate(picked)


class PreLogits:
    """Captures the input of a classification head's ``fc`` (the pooled features) during a forward pass."""

    def __init__(self, fc: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = fc.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.value = args[0].detach()


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: Iterable[dict[str, Any]], forward: Callable[[torch.Tensor], Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logits ``[N, D]`` (float32) and labels ``[N]`` of every sample of ``loader``, on the model's device.

    ``model`` (a task module with ``head.fc``) runs in eval mode, each module's own mode restored afterwards (a
    frozen backbone stays in eval, dropout and batch-norm statistics are untouched); ``forward`` calls it another
    way (through a DDP/FSDP wrapper). Features stay on the device until the end: no per-batch synchronisation."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    device = next(model.parameters()).device
    hook = PreLogits(model.head.fc)
    feats, labels = [], []
    try:
        for batch in loader:
            (forward or model)(batch["input"].to(device, non_blocking=True))
            feats.append(hook.value)
            labels.append(batch["target"])
    finally:
        hook.handle.remove()
        for m, mode in modes.items():
            m.training = mode
    return torch.cat(feats).float(), torch.cat(labels).to(device)


def fewshot_datasets(data: ClassificationDataModule) -> tuple[Dataset, Dataset]:
    """The training images without augmentation (the shots are drawn from them) and the evaluation split."""
    hp = data.hparams
    return data._split(hp.train_dir, data.eval_transform()), data._split(hp.val_dir, data.eval_transform())


def check_shots(dataset: Dataset, shots: Sequence[int], class_names: Sequence[str]) -> None:
    """Raise before any work when a class of ``dataset`` (an ``ImageFolderDataset``) has fewer images than the
    largest number of shots, naming the class and the counts."""
    counts = np.bincount([label for _, label in dataset.samples], minlength=len(class_names))
    for name, count in zip(class_names, counts):
        if count < max(shots):
            raise ValueError(f"{max(shots)}-shot evaluation needs {max(shots)} training images of class {name!r}, which has {count}")


def fewshot_table(
    train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], class_names: Sequence[str],
    shots: Sequence[int] = (1, 5, 10, 25), seeds: Sequence[int] = (0, 1, 2), l2_reg: float = 1024.0,
) -> dict[int, list[float]]:
    """Top-1 per number of shots, one value per seed."""
    (x_train, y_train), (x_test, y_test) = train, test
    results: dict[int, list[float]] = {}
    for n in shots:
        for seed in seeds:
            idx = torch.from_numpy(sample_shots(y_train.numpy(), n, seed, class_names))
            acc = ridge_accuracy(x_train[idx], y_train[idx], x_test, y_test, len(class_names), l2_reg)
            results.setdefault(n, []).append(acc)
    return results


def write_results(results: dict[int, list[float]], out: Path) -> str:
    """Table (returned), ``fewshot.csv`` and ``fewshot.svg`` (top-1 against shots, ± std) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["shots  top-1 mean  std     seeds"]
    with open(out / "fewshot.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["shots", "top1_mean", "top1_std", *[f"seed{i}" for i in range(len(next(iter(results.values()))))]])
        for n, accs in results.items():
            writer.writerow([n, f"{np.mean(accs):.6f}", f"{np.std(accs):.6f}", *[f"{a:.6f}" for a in accs]])
            lines.append(f"{n:5d}  {np.mean(accs):10.4f}  {np.std(accs):.4f}  {len(accs)}")
    (out / "fewshot.svg").write_text(_svg_plot(results))
    return "\n".join(lines)


def _svg_plot(results: dict[int, list[float]], width: int = 360, height: int = 240, pad: int = 40) -> str:
    """Top-1 (mean, ± std bars) against log shots as a self-contained SVG (no plotting library needed)."""
    shots = list(results)
    logs = np.log(shots)
    span = max(float(logs.max() - logs.min()), 1e-9)
    px = lambda n: pad + (np.log(n) - logs.min()) / span * (width - 2 * pad)  # noqa: E731
    py = lambda a: height - pad - a * (height - 2 * pad)  # noqa: E731  (top-1 in [0, 1])
    means = {n: float(np.mean(a)) for n, a in results.items()}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{py(0)}" x2="{width - pad}" y2="{py(0)}" stroke="black"/>',
             f'<line x1="{pad}" y1="{py(0)}" x2="{pad}" y2="{py(1)}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">images per class</text>',
             f'<text x="4" y="{pad - 10}">top-1</text>',
             '<polyline fill="none" stroke="steelblue" stroke-width="2" points="'
             + " ".join(f"{px(n):.1f},{py(m):.1f}" for n, m in means.items()) + '"/>']
    for n, accs in results.items():
        x, m, s = px(n), means[n], float(np.std(accs))
        parts += [f'<line x1="{x:.1f}" y1="{py(m - s):.1f}" x2="{x:.1f}" y2="{py(m + s):.1f}" stroke="steelblue"/>',
                  f'<circle cx="{x:.1f}" cy="{py(m):.1f}" r="3" fill="steelblue"/>',
                  f'<text x="{x:.1f}" y="{py(0) + 14}" text-anchor="middle">{n}</text>',
                  f'<text x="{x:.1f}" y="{py(m) - 8:.1f}" text-anchor="middle">{m:.3f}</text>']
    return "\n".join([*parts, "</svg>"]) + "\n"
