"""A run killed with SIGKILL, or preempted with SIGTERM/SIGUSR1, resumes to the weights and metrics of an
uninterrupted run; ``last.ckpt`` is never left half-written; a NaN loss stops the run (or skips the step) and keeps
the last good checkpoint."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from cli_runs import TINY_VIT, read_metrics, run_task, write_shapes
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import get_worker_info

from datamodules.classification import ClassificationDataModule, ImageFolderDataset
from datamodules.errors import DiskFullError
from datamodules.io import atomic_write
from datamodules.sampling import SeededSamples
from datamodules.workers import WorkerDiedError
from engine.checkpointing import AtomicCheckpointIO, LastCheckpoint
from engine.cli import PREEMPTED_EXIT_CODE, run_cli
from tasks.classification import ClassificationModule, main
from tasks.module import NonFiniteLossError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=8, val_per_class=5)  # 3 steps of 8 per epoch


def fit_args(root: Path, out: Path) -> list[str]:
    return [
        "fit", "--seed_everything=3", "--model.backbone=vit_tiny_patch16",
        TINY_VIT.replace("}", ", drop_path_rate: 0.1}"),  # random state in the model too
        f"--data.root={root}", "--data.image_size=32", "--data.batch_size=8", "--data.num_workers=0",
        "--trainer.max_epochs=3", "--trainer.deterministic=true", "--trainer.accelerator=cpu", "--trainer.devices=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={out}",
        f"--trainer.default_root_dir={out}", "--checkpoint.every_n_train_steps=2",
    ]


@pytest.fixture(scope="module")
def uninterrupted(shapes: Path, tmp_path_factory: pytest.TempPathFactory, synthetic_cache: str) -> Path:
    """The run the interrupted ones must reproduce, through the CLI."""
    full = tmp_path_factory.mktemp("full")
    run_task("classification", fit_args(shapes, full), cache=synthetic_cache)
    return full


def assert_same_run(full: Path, resumed: Path) -> None:
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 9
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    rows = read_metrics(resumed)  # epochs 1 and 2, including the training metrics of the interrupted epoch
    assert rows == read_metrics(full)[-len(rows):] and len(rows) == 4


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights_and_metrics(
    shapes: Path, uninterrupted: Path, tmp_path: Path, synthetic_cache: str
) -> None:
    broken = tmp_path / "broken"
    kill = ["--trainer.callbacks+=tests.fault_injection.KillAtStep", "--trainer.callbacks.step=5"]
    run_task("classification", [*fit_args(shapes, broken), *kill], cache=synthetic_cache, expect_rc=-9)
    saved = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["global_step"], saved["epoch"]) == (4, 1)  # mid-epoch: 1 of the epoch's 3 batches done
    run_task("classification", [*fit_args(shapes, broken), "--ckpt_path=last"], cache=synthetic_cache)
    assert_same_run(uninterrupted, broken)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # the resume runs here, as the uninterrupted run's process does
def test_sigterm_saves_at_the_step_and_exits_to_be_requeued_then_resumes_exactly(
    shapes: Path, uninterrupted: Path, tmp_path: Path, synthetic_cache: str
) -> None:
    preempted = tmp_path / "preempted"
    term = ["--trainer.callbacks+=tests.fault_injection.SignalAtStep", "--trainer.callbacks.step=5"]
    run = run_task("classification", [*fit_args(shapes, preempted), *term], cache=synthetic_cache, expect_rc=PREEMPTED_EXIT_CODE)
    assert "resume with --ckpt_path last" in run.stdout
    saved = torch.load(preempted / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["global_step"], saved["epoch"]) == (5, 1)  # step 5 itself, 2 of the epoch's 3 batches
    main([*fit_args(shapes, preempted), "--ckpt_path=last"])  # the requeued job (in this process: quicker)
    assert_same_run(uninterrupted, preempted)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # as the uninterrupted run's process: the same sums in the same order
def test_slurm_auto_requeue_checkpoint_resumes_exactly(
    shapes: Path, uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    for key, value in slurm.items():  # Lightning detects SLURM and installs its SIGUSR1 auto-requeue handler
        monkeypatch.setenv(key, value)
    usr1 = ["--trainer.callbacks+=tests.fault_injection.SignalAtStep", "--trainer.callbacks.step=5",
            "--trainer.callbacks.signum=SIGUSR1"]
    main([*fit_args(shapes, tmp_path), *usr1])  # its `scontrol requeue` fails here; the run goes on to the end
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    assert (saved["global_step"], saved["epoch"]) == (5, 1)  # at the step boundary (Preemption deferred it)
    cli = main(fit_args(shapes, tmp_path))  # the requeued job: Lightning resumes from hpc_ckpt_1.ckpt by itself
    assert cli.trainer.global_step == 9
    a = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # as the uninterrupted run's process: the same sums in the same order
def test_sigterm_during_validation_stops_after_the_epoch_end(shapes: Path, uninterrupted: Path, tmp_path: Path) -> None:
    term = ["--trainer.callbacks+=tests.fault_injection.SignalAtStep", "--trainer.callbacks.step=6",
            "--trainer.callbacks.in_validation=true"]  # in epoch 1's validation, after its first batch
    with pytest.raises(SIGTERMException):
        main([*fit_args(shapes, tmp_path), *term])
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["global_step"], saved["epoch"]) == (6, 2)  # the validation and the epoch end were finished first
    first = read_metrics(tmp_path)
    main([*fit_args(shapes, tmp_path), "--ckpt_path=last"])
    full, rows = read_metrics(uninterrupted), read_metrics(tmp_path)
    assert first == full[: len(first)] and rows == full[len(first) :] and len(first) == 4  # none lost, none twice
    a = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigusr1_without_a_scheduler_handler_stops_like_sigterm(shapes: Path, tmp_path: Path) -> None:
    usr1 = ["--trainer.callbacks+=tests.fault_injection.SignalAtStep", "--trainer.callbacks.step=2",
            "--trainer.callbacks.signum=SIGUSR1"]
    with pytest.raises(SIGTERMException):
        main([*fit_args(shapes, tmp_path), *usr1])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_each_sample_is_augmented_from_its_own_seed(shapes: Path) -> None:
    dm = ClassificationDataModule(str(shapes), image_size=32, num_workers=0)
    dm.setup("fit")
    samples = SeededSamples(dm.datasets["train"], seed=3)
    state = torch.get_rng_state()
    first, again, later = (samples[key]["input"] for key in ((1, 5), (1, 5), (2, 5)))
    assert torch.equal(first, again) and not torch.equal(first, later)
    assert torch.equal(torch.get_rng_state(), state)  # the training process's own random stream is untouched


def test_last_checkpoint_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def killed_mid_write(obj: object, f: object) -> None:
        real_save(obj, f)
        f.truncate(100)  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    assert io.load_checkpoint(path)["step"] == 1 and os.listdir(path.parent) == ["last.ckpt"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(shapes: Path, tmp_path: Path) -> None:
    nan = ["--trainer.callbacks+=tests.fault_injection.NanInputAtStep", "--trainer.callbacks.step=3",
           "--trainer.deterministic=false"]
    with pytest.raises(NonFiniteLossError, match=r"non-finite at global step 3 \(epoch 1, rank 0\): task=nan; batch "
                       rf"files: ({shapes}/train/\w+/\d\.png(, |; )){{8}}stopped.*Last good checkpoint: .*last\.ckpt"):
        main([*fit_args(shapes, tmp_path), *nan])
    kept = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 3 and all(v.isfinite().all() for v in kept["state_dict"].values())


def test_nan_loss_step_is_skipped_and_counted_when_asked(shapes: Path, tmp_path: Path) -> None:
    nan = ["--trainer.callbacks+=tests.fault_injection.NanInputAtStep", "--trainer.callbacks.step=3",
           "--trainer.deterministic=false", "--model.nonfinite_loss=skip", "--trainer.max_epochs=2"]
    with pytest.warns(UserWarning, match=r"skipping a step whose training loss went non-finite at global step 3 .*task=nan"):
        cli = main([*fit_args(shapes, tmp_path), *nan])
    assert cli.trainer.global_step == 6  # the skipped step still counts; it has no gradients, so no update
    assert [r["train/nonfinite_steps"] for r in read_metrics(tmp_path) if "train/nonfinite_steps" in r] == [1.0]
    assert all(v.isfinite().all() for v in cli.model.state_dict().values())


def test_cli_keeps_last_checkpoint_where_ckpt_path_last_finds_it(tmp_path: Path) -> None:
    args = ["--model.backbone=vit_tiny_patch16", TINY_VIT, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    cli = run_cli(ClassificationModule, ClassificationDataModule, args=args, run=False)
    (last,) = [c for c in cli.trainer.callbacks if isinstance(c, LastCheckpoint)]
    assert last.dirpath == str(tmp_path / "checkpoints") and isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    cli = run_cli(ClassificationModule, ClassificationDataModule, args=[*args, "--trainer.enable_checkpointing=false"], run=False)
    assert not any(isinstance(c, LastCheckpoint) for c in cli.trainer.callbacks)


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path | None]]:
    """``small_disk("512k")``: a folder on a real tmpfs of that size where this process may mount one (root), else
    ``None``; unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str) -> Path | None:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
        if os.geteuid() != 0 or subprocess.run(command, capture_output=True, check=False).returncode != 0:
            return None
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_folder(
    small_disk: Callable[[str], Path | None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = small_disk("512k")
    folder = disk or tmp_path / "plain"
    io, path = AtomicCheckpointIO(), folder / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    if disk is None:  # no tmpfs here: a write that fails as torch.save does on a full disk
        real_save = torch.save

        def disk_full(obj: object, f: object) -> None:
            real_save({"partial": torch.zeros(10)}, f)
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as err:
                raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos") from err

        monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DiskFullError, match=rf"^{folder}: no space left on the device to write last\.ckpt: it needs about "
                       r"1\.0 MiB \(1048576 bytes\), .* free"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(2**18)}, path)
    assert os.listdir(folder) == ["last.ckpt"] and io.load_checkpoint(path)["step"] == 1
    if disk is not None:  # a prediction (any atomic_write) of unknown size: at least what was written
        with pytest.raises(DiskFullError, match=rf"^{folder}: no space .* predictions\.csv: it needs more than "):
            atomic_write(folder / "predictions.csv", lambda tmp: Path(tmp).write_bytes(b"x" * 2**20))
        assert os.listdir(folder) == ["last.ckpt"]


def test_a_run_whose_checkpoint_disk_fills_stops_with_the_last_one_intact(
    small_disk: Callable[[str], Path | None], shapes: Path, tmp_path: Path
) -> None:
    disk = small_disk("1200k")  # a checkpoint of this model (with AdamW's state) is about 780 KiB: one fits, not two
    if disk is None:
        pytest.skip("needs a small tmpfs (root); the write itself is tested with a patched torch.save")
    with pytest.raises(DiskFullError) as err:
        main([*fit_args(shapes, tmp_path), f"--checkpoint.dirpath={disk}"])
    assert err.value.one_line().startswith(f"{disk}: no space left on the device to write last.ckpt: it needs about")
    assert os.listdir(disk) == ["last.ckpt"]
    assert torch.load(disk / "last.ckpt", weights_only=True)["global_step"] == 2  # the first save, whole


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV], ids=["killed-in-a-run", "segfault"])
def test_a_dying_loader_worker_is_named_with_its_batch_files(
    shapes: Path, tmp_path: Path, signum: signal.Signals, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = shapes / "train" / "circle" / "5.png"
    real = ImageFolderDataset.__getitem__

    def dying(self: ImageFolderDataset, index: int) -> dict:
        if get_worker_info() is not None and self.samples[index][0] == victim:
            os.kill(os.getpid(), signum)  # the kernel's OOM killer, or a decoder's segfault
        return real(self, index)

    monkeypatch.setattr(ImageFolderDataset, "__getitem__", dying)
    how = {signal.SIGKILL: "Killed", signal.SIGSEGV: "Segmentation fault"}[signum]
    # PyTorch says how when its SIGCHLD handler is first to see the death, else only that the worker exited
    named = (rf"^loader worker [01] \(pid \d+\) (is killed by signal: {how}|exited unexpectedly) while reading "
             rf"{victim}; its batch: ([^,]+\.png, )*{victim}")
    if signum == signal.SIGKILL:  # a training run through the CLI (its workers forked from this process)
        with pytest.raises(WorkerDiedError, match=named):
            main([*fit_args(shapes, tmp_path), "--data.num_workers=2"])
        return
    dm = ClassificationDataModule(str(shapes), image_size=32, batch_size=4, num_workers=2)
    dm.setup("fit")
    with pytest.raises(WorkerDiedError, match=named):
        for _ in dm.train_dataloader():
            pass
