"""What a run shows besides numbers: pictures at every validation, curves at the end of ``fit``, and the loggers.

- ``default_loggers``: TensorBoard and CSV writing into one run folder (``<root>/lightning_logs/version_N``), the
  CLI's default; ``--trainer.logger`` takes any other Lightning logger (Weights & Biases, MLflow).
- ``ValidationPictures``: at the end of every validation the task's figures (``TaskModule.picture_maker``, see
  ``picture_makers.py``) go to each configured logger that takes images (TensorBoard, Weights & Biases, MLflow); a
  run whose loggers take none (CSV only) collects and draws nothing. The samples come from the validation step's
  outputs (no extra forward pass), a fixed few, kept and drawn on rank 0.
- ``FinalCurves``: ``fit`` ends by writing ``curves.png`` (loss and the task's main metric, train and val, against
  the step) into the run folder, so a user without TensorBoard sees them too. The history is kept in the callback's
  checkpoint state, so a resumed run draws the whole run.

Figures are drawn with matplotlib's Agg canvas on ``Figure`` objects (no pyplot state, no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from datamodules.io import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

IMAGE_LOGGERS = (TensorBoardLogger, WandbLogger, MLFlowLogger)


def default_loggers(root: str | Path) -> list[Logger]:
    """TensorBoard and CSV in the same version folder under ``root`` (events, ``metrics.csv``, ``hparams.yaml``)."""
    tensorboard = TensorBoardLogger(save_dir=root, name="lightning_logs")
    csv = CSVLogger(save_dir=root, name="lightning_logs", version=tensorboard.version)
    _ = csv.experiment  # the folder made now, empty: made later it would hold the config and the CSV writer would warn
    return [tensorboard, csv]


def run_folder(trainer: L.Trainer) -> Path:
    """The version folder of the first TensorBoard or CSV logger, else the trainer's root folder (read on rank 0
    alone, so not through ``trainer.log_dir``, which is a collective)."""
    folders = [logger.log_dir for logger in trainer.loggers if isinstance(logger, (TensorBoardLogger, CSVLogger))]
    return Path(folders[0] if folders else trainer.default_root_dir)


def image_loggers(trainer: L.Trainer) -> list[Logger]:
    """The trainer's loggers that can take images."""
    return [logger for logger in trainer.loggers if isinstance(logger, IMAGE_LOGGERS)]


def log_image(logger: Logger, tag: str, image: np.ndarray, step: int) -> None:
    """Send an ``[H, W, 3]`` uint8 picture to ``logger`` under ``tag`` at ``step``, in that logger's own way."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, image, step, dataformats="HWC")
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=tag, images=[image], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, image, f"{tag}/step_{step:08d}.png")


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure on an Agg canvas, outside pyplot (nothing global, nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def render(figure: Figure) -> np.ndarray:
    """The figure's pixels, ``[H, W, 3]`` uint8."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def display_image(x: torch.Tensor) -> np.ndarray:
    """A normalised ``[C, H, W]`` input as ``[H, W, 3]`` floats in 0..1 for display: the 1st-99th percentile of
    its values stretched to 0..1 (the data's normalisation undone up to contrast); one channel shown in grey, more
    than three shown by their first three."""
    x = x.detach().float().cpu()
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, *x.shape[1:])
    lo, hi = torch.quantile(x.flatten()[:: max(1, x.numel() // 100_000)], torch.tensor([0.01, 0.99]))
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1).permute(1, 2, 0).numpy()


class PictureMaker:
    """What one task draws at each validation. ``update`` sees every validation step's prepared ``batch`` and
    ``output`` (on every rank: states that span the whole set, such as a confusion matrix, are synchronised by
    ``compute`` on every rank) and keeps a fixed few samples where ``keep`` (rank 0); ``figures`` draws them."""

    def reset(self, device: torch.device) -> None:
        """Forget the last validation's samples and states; states live on ``device``."""

    def update(self, batch: dict[str, Any], output: torch.Tensor, *, keep: bool) -> None:
        raise NotImplementedError

    def compute(self) -> None:
        """Reduce the states over all processes (a collective: every rank calls it)."""

    def figures(self) -> dict[str, Figure]:
        """The figures by logger tag (``val/confusion_matrix``...); called on rank 0 after ``compute``."""
        raise NotImplementedError


class ValidationPictures(L.Callback):
    """Log the task's validation figures (``TaskModule.picture_maker``) to every logger that takes images, at the
    end of every validation (not the sanity check); nothing is collected when no logger takes images."""

    def __init__(self) -> None:
        self.maker: PictureMaker | None = None
        self.active = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.maker = pl_module.picture_maker()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = self.maker is not None and not trainer.sanity_checking and bool(image_loggers(trainer))
        if self.active:
            self.maker.reset(pl_module.device)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.active and outputs is not None:
            self.maker.update(outputs["batch"], outputs["output"], keep=trainer.is_global_zero)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        self.maker.compute()
        if trainer.is_global_zero:
            for tag, figure in self.maker.figures().items():
                image = render(figure)
                for logger in image_loggers(trainer):
                    log_image(logger, tag, image, trainer.global_step)
        self.maker.reset(pl_module.device)
        self.active = False


class FinalCurves(L.Callback):
    """Keep the epoch values of the loss and the task's main metric (``TaskModule.main_metric``), train and val, and
    write them as ``curves.png`` into the run folder (``run_folder``) when ``fit`` ends. Runs without a logger
    (``logger: false``, ``fast_dev_run``) have no run folder and get no file."""

    filename = "curves.png"

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int, float]]] = {}

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        metrics = trainer.callback_metrics
        for name in dict.fromkeys(("loss", pl_module.main_metric)):
            key = next((k for k in (f"{stage}/{name}_epoch", f"{stage}/{name}") if k in metrics), None)
            if key is not None and metrics[key].numel() == 1:
                self.history.setdefault(f"{stage}/{name}", []).append((trainer.global_step, float(metrics[key])))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._record(trainer, pl_module, "val")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not trainer.loggers or trainer.fast_dev_run or not self.history:
            return
        figure = self.draw(pl_module.main_metric)
        atomic_write(run_folder(trainer) / self.filename, lambda tmp: figure.savefig(tmp, format="png"))

    def draw(self, metric: str) -> Figure:
        from matplotlib.ticker import MaxNLocator

        names = list(dict.fromkeys(("loss", metric)))
        figure = new_figure(5 * len(names), 4)
        for ax, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
            title = name
            for stage, style in (("train", "-o"), ("val", "-s")):
                points = self.history.get(f"{stage}/{name}")
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, style, markersize=3, label=stage)
                    title = f"{name} (last val {values[-1]:.4g})" if stage == "val" else title
            ax.set(title=title, xlabel="step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend()
        return figure

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: [list(p) for p in v] for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [(int(s), float(v)) for s, v in points] for k, points in state_dict.get("history", {}).items()}


def logging_callbacks() -> list[L.Callback]:
    return [ValidationPictures(), FinalCurves()]
