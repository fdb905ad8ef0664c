"""Video data: annotation formats, up-front checks, frame sampling, views, and skipping undecodable clips."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.common import DataError
from datamodules.synthetic_videos import MOTION_CLASSES, deforming_shape_clip, write_mp4
from datamodules.video import (
    SkippedClipWarning,
    VideoDataModule,
    collate_clips,
    dense_indices,
    segment_indices,
    spatial_crops,
)

SMALL = dict(num_frames=4, sampling_rate=2, jitter_scales=(32, 40), crop_size=32, batch_size=2, num_workers=0)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 64x80 MP4 clips of 10 frames in UCF101-like folders."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for direction, motion in (("left", MOTION_CLASSES[0]), ("right", MOTION_CLASSES[1])):
        for n in range(3):
            clip = deforming_shape_clip(rng, motion, size=64, num_frames=10)
            write_mp4(root / direction / f"{direction}_{n}.mp4", np.concatenate([clip, clip[:, :, :16]], axis=2))
    return root


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_path_label_lists_with_ucf101_class_index(video_root: Path, tmp_path: Path) -> None:
    classes = write(tmp_path / "classInd.txt", "1 left\n2 right\n")
    train = write(tmp_path / "trainlist01.txt", "left/left_0.mp4 1\nright/right_0.mp4 2\nright/right_1.mp4 2\n")
    test = write(tmp_path / "testlist01.txt", "left/left_1.mp4\nright/right_2.mp4\n")  # labels from the folder
    dm = VideoDataModule(
        str(video_root), train_list=str(train), val_list=str(test), class_names=str(classes), **SMALL
    )
    assert dm.class_names == ["left", "right"] and dm.num_classes == 2
    assert [s.label for s in dm.samples("train")] == [0, 1, 1]
    assert [s.label for s in dm.samples("val")] == [0, 1]


def test_csv_with_header_gives_class_names(video_root: Path, tmp_path: Path) -> None:
    write(tmp_path / "train.csv", "label,path,split\nright,right/right_0.mp4,train\nleft,left/left_0.mp4,train\n")
    write(tmp_path / "val.csv", "path,label\nleft/left_2.mp4,left\n")
    dm = VideoDataModule(str(video_root), train_list=str(tmp_path / "train.csv"), val_list=str(tmp_path / "val.csv"), **SMALL)
    assert dm.class_names == ["left", "right"]
    assert [(s.path.name, s.label) for s in dm.samples("train")] == [("right_0.mp4", 1), ("left_0.mp4", 0)]


def test_missing_file_is_reported_with_list_and_line(video_root: Path, tmp_path: Path) -> None:
    train = write(tmp_path / "train.txt", "left/left_0.mp4 0\nleft/gone.mp4 0\nright/right_0.mp4 1\n")
    dm = VideoDataModule(str(video_root), train_list=str(train), val_list=str(train), **SMALL)
    with pytest.raises(DataError, match=r"train\.txt:2: video file not found: .*gone\.mp4"):
        dm.setup("fit")


def test_unknown_label_is_reported_with_list_and_line(video_root: Path, tmp_path: Path) -> None:
    write(tmp_path / "classes.txt", "left\nright\n")
    train = write(tmp_path / "train.txt", "left/left_0.mp4 left\nright/right_0.mp4 rigth\n")
    dm = VideoDataModule(str(video_root), train_list=str(train), val_list=str(train), class_names=str(tmp_path / "classes.txt"), **SMALL)
    with pytest.raises(DataError, match=r"train\.txt:2: unknown label 'rigth'"):
        dm.samples("train")


def test_sampling_indices() -> None:
    rng = np.random.default_rng(0)
    idx = dense_indices(300, 8, stride=32, rng=rng)
    assert len(idx) == 8 and np.all(np.diff(idx) == 32) and 0 <= idx[0] <= 300 - 225
    views = [dense_indices(300, 8, 32, rng, view=v, num_views=3) for v in range(3)]
    assert views[0][0] < views[1][0] < views[2][0] and views[2][-1] <= 299
    assert list(dense_indices(300, 8, 32, rng, view=0)) == list(range(38, 38 + 8 * 32, 32))  # one view: the centre
    assert dense_indices(20, 8, 32, rng).max() == 19  # short videos repeat their last frame
    assert np.all(np.diff(dense_indices(300, 8, 32 * 25 / 30, rng)) >= 26)  # 32 frames at 30 fps of a 25 fps video
    seg = segment_indices(80, 8, rng)
    assert np.all((seg >= np.arange(8) * 10) & (seg < np.arange(1, 9) * 10))
    assert list(segment_indices(80, 8, rng, view=0)) == list(range(5, 80, 10))


def test_only_sampled_frames_are_decoded(video_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import decord

    requested: list[list[int]] = []
    original = decord.VideoReader.get_batch
    monkeypatch.setattr(decord.VideoReader, "get_batch", lambda self, idx: requested.append(list(idx)) or original(self, idx))
    train = write(tmp_path / "train.txt", "left/left_0.mp4 0\n")
    dm = VideoDataModule(str(video_root), train_list=str(train), val_list=str(train), **SMALL)
    dm.setup("fit")
    requested.clear()  # the up-front check (check_files: full) decoded every frame; a sample reads its own only
    sample = dm.datasets["train"][0]
    assert sample["input"].shape == (3, 4, 32, 32) and sample["target"] == 0
    assert len(requested) == 1 and len(requested[0]) == 4 and np.all(np.diff(requested[0]) == 2)


def test_test_views_are_clips_times_crops(video_root: Path, tmp_path: Path) -> None:
    listing = write(tmp_path / "val.txt", "left/left_0.mp4 0\nright/right_0.mp4 1\n")
    dm = VideoDataModule(str(video_root), train_list=str(listing), val_list=str(listing), test_clips=2, test_crops=3, **SMALL)
    dm.setup("test")
    views = dm.datasets["test"][0]["input"]
    assert views.shape == (6, 3, 4, 32, 32)  # 2 clips x 3 crops
    assert not torch.equal(views[0], views[2]) and not torch.equal(views[0], views[3])
    frames = np.arange(2 * 40 * 50 * 3).reshape(2, 40, 50, 3)
    assert [c[0, 0, 0, 0] for c in spatial_crops(frames, 32, 3)] == [frames[0, 4, x, 0] for x in (0, 9, 18)]
    dm.setup("fit")
    assert dm.datasets["val"][0]["input"].shape == (3, 4, 32, 32)  # validation: one centred view


def truncated_copy(video_root: Path, tmp_path: Path) -> Path:
    data = (video_root / "left" / "left_0.mp4").read_bytes()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(data[: len(data) // 2])
    return broken


def test_truncated_mp4_is_skipped_with_one_warning(video_root: Path, tmp_path: Path) -> None:
    broken = truncated_copy(video_root, tmp_path)
    listing = write(tmp_path / "train.txt", f"left/left_0.mp4 0\n{broken} 0\nright/right_0.mp4 1\n")
    dm = VideoDataModule(str(video_root), train_list=str(listing), val_list=str(listing), check_files="none", **SMALL)
    dm.setup("fit")  # not checked up front: found when read
    dataset = dm.datasets["train"]
    with pytest.warns(SkippedClipWarning, match=r"broken\.mp4 \(listed at .*train\.txt:2\)"):
        item = dataset[1]
    assert item == {"skipped": str(broken), "index": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedClipWarning)
        dataset[1]  # warned once per file
    batch = collate_clips([dataset[0], item, dataset[2]])
    assert batch["input"].shape == (2, 3, 4, 32, 32) and batch["target"].tolist() == [0, 1]
    assert batch["skipped"] == [str(broken)] and batch["index"].tolist() == [0, 2]
    assert collate_clips([item])["input"] is None


def test_loader_workers_drop_skipped_clips(video_root: Path, tmp_path: Path) -> None:
    broken = truncated_copy(video_root, tmp_path)
    listing = write(tmp_path / "train.txt", f"{broken} 0\nleft/left_0.mp4 0\nright/right_0.mp4 1\nleft/left_1.mp4 0\n")
    dm = VideoDataModule(str(video_root), train_list=str(listing), val_list=str(listing), check_files="none",
                         **{**SMALL, "num_workers": 2})
    dm.setup("validate")  # not checked up front: found when read
    batches = list(dm.val_dataloader())
    assert sum(len(b["skipped"]) for b in batches) == 1
    assert sorted(i for b in batches for i in b["index"].tolist()) == [1, 2, 3]


def test_synthetic_classes_differ_only_in_how_the_shape_moves() -> None:
    rng = np.random.default_rng(0)
    for motion in MOTION_CLASSES:
        clip = deforming_shape_clip(rng, motion, size=64, num_frames=10)
        shape = clip.astype(int).sum(-1) > clip[:, :4, :4].astype(int).sum(-1).mean() + 100  # [T, H, W] masks
        widths, heights = shape.any(1).sum(-1), shape.any(2).sum(-1)
        changing, fixed = (widths, heights) if motion.endswith("horizontally") else (heights, widths)
        assert np.ptp(fixed) <= 1 and np.ptp(changing) > 30
        trend = np.diff(changing)
        assert np.all(trend >= 0) if motion.startswith("grow") else np.all(trend <= 0)
