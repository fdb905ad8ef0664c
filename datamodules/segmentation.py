"""Semantic segmentation data in its real on-disk layouts: ADE20K, Cityscapes, or image/mask folder pairs.

    ade20k      root/images/{training,validation}/*.jpg      root/annotations/{...}/<same stem>.png
    cityscapes  root/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png
                root/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png
    folders     root/<image_dir>/<split>/<name>.<ext>          root/<mask_dir>/<split>/<name>.png

Label conventions are explicit options with each field's defaults: ``ignore_index`` 255 everywhere,
``reduce_zero_label`` (0 = "other" becomes ignored, the rest shift down by one) on for ADE20K.
With no ``root``, synthetic scenes are written in the ADE20K layout and read by the same code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from .common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CheckFiles,
    DataError,
    TaskDataModule,
    check_mode,
    list_images,
    read_image,
    run_check,
)
from .errors import listing_error
from .label_maps import CITYSCAPES_PALETTE, voc_palette, write_label_map, write_overlay
from .segmentation_transforms import eval_pipeline, train_pipeline
from .synthetic_scenes import SCENE_CLASSES, synthetic_scenes

# ADE20K SceneParsing (150 classes) and the 19 Cityscapes train ids of *_gtFine_labelTrainIds.png
ADE20K_CLASSES = tuple(
    name.strip()
    for name in """wall,building,sky,floor,tree,ceiling,road,bed,windowpane,grass,cabinet,sidewalk,person,earth,door,table,
    mountain,plant,curtain,chair,car,water,painting,sofa,shelf,house,sea,mirror,rug,field,armchair,seat,fence,
    desk,rock,wardrobe,lamp,bathtub,railing,cushion,base,box,column,signboard,chest of drawers,counter,sand,
    sink,skyscraper,fireplace,refrigerator,grandstand,path,stairs,runway,case,pool table,pillow,screen door,
    stairway,river,bridge,bookcase,blind,coffee table,toilet,flower,book,hill,bench,countertop,stove,palm,
    kitchen island,computer,swivel chair,boat,bar,arcade machine,hovel,bus,towel,light,truck,tower,chandelier,
    awning,streetlight,booth,television receiver,airplane,dirt track,apparel,pole,land,bannister,escalator,
    ottoman,bottle,buffet,poster,stage,van,ship,fountain,conveyer belt,canopy,washer,plaything,swimming pool,
    stool,barrel,basket,waterfall,tent,bag,minibike,cradle,oven,ball,food,step,tank,trade name,microwave,pot,
    animal,bicycle,lake,dishwasher,screen,blanket,sculpture,hood,sconce,vase,traffic light,tray,ashcan,fan,
    pier,crt screen,plate,monitor,bulletin board,shower,radiator,glass,clock,flag""".split(",")
)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

Layout = Literal["auto", "ade20k", "cityscapes", "folders"]
_SPLITS = {"ade20k": ("training", "validation"), "cityscapes": ("train", "val"), "folders": ("train", "val")}


def detect_layout(root: Path) -> str:
    """``cityscapes`` if ``leftImg8bit/`` exists, ``ade20k`` if ``images/`` and ``annotations/`` do, else ``folders``."""
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        return "ade20k"
    return "folders"


def find_pairs(
    root: Path, layout: str, split: str, image_dir: str = "images", mask_dir: str = "masks"
) -> list[tuple[Path, Path]]:
    """``(image, mask)`` paths of one split; an image without its mask raises a DataError naming both."""
    if layout == "cityscapes":
        folder = root / "leftImg8bit" / split
        images = sorted(folder.rglob("*_leftImg8bit.png"))
        masks = [
            root / "gtFine" / split / p.relative_to(folder).parent / p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
            for p in images
        ]
    else:
        folder = root / ("images" if layout == "ade20k" else image_dir) / split
        mask_root = root / ("annotations" if layout == "ade20k" else mask_dir) / split
        images = list_images(folder)
        masks = [mask_root / p.relative_to(folder).with_suffix(".png") for p in images]
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder} (layout {layout!r}, split {split!r})")
    if not images:
        raise DataError(f"no images under {folder} (layout {layout!r}, split {split!r})")
    missing = [f"{img}: no mask (expected {mask})" for img, mask in zip(images, masks) if not mask.is_file()]
    if missing:
        raise listing_error("image(s) without a mask", missing)
    return list(zip(images, masks))


def read_mask(path: str | Path) -> np.ndarray:
    """A label map ``[H, W]`` (uint8, or int32 for 16-bit files); colour masks are rejected."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"mask {path} is a {img.mode} image; expected a single-channel label map (L, P or 16-bit)")
            mask = np.asarray(img)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"cannot read mask {path}: {type(err).__name__}: {err}") from err
    return mask if mask.dtype == np.uint8 else mask.astype(np.int32)


def reduce_zero(mask: np.ndarray, ignore_index: int) -> np.ndarray:
    """ADE20K's convention: 0 ("other") -> ignore, every other label -> label - 1, ignore stays ignore."""
    out = mask.astype(np.int32) - 1
    out[(mask == 0) | (mask == ignore_index)] = ignore_index
    return out.astype(mask.dtype) if ignore_index <= np.iinfo(mask.dtype).max else out


def check_pairs(
    pairs: Sequence[tuple[Path, Path]], *, num_classes: int, ignore_index: int, reduce_zero_label: bool,
    mode: CheckFiles = "full",
) -> None:
    """Every mask readable, of its image's size, with labels in ``[0, num_classes) | {ignore_index}``; the image
    decoded in full (``mode="header"``: its header read), so a truncated file fails here, not mid-epoch."""
    form = check_mode(mode)
    if form == "none":
        return

    def probe(pair: tuple[Path, Path]) -> list[str]:
        image, mask_path = pair
        try:
            with Image.open(image) as img:
                size = img.size
                if form == "full":
                    img.load()
        except Exception as err:  # PIL raises several types for corrupt or truncated files
            return [f"{image}: {type(err).__name__}: {err}"]
        try:
            mask = read_mask(mask_path)  # decodes the whole label map: its values are checked below
        except DataError as err:
            return [str(err)]
        if (mask.shape[1], mask.shape[0]) != size:
            return [f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image} is {size[0]}x{size[1]}"]
        values = np.unique(mask)
        labels = reduce_zero(values, ignore_index) if reduce_zero_label else values
        bad = values[(labels >= num_classes) & (labels != ignore_index) | (labels < 0)]
        if len(bad):
            return [
                f"mask {mask_path} has label value(s) {bad.tolist()[:8]} outside [0, {num_classes}) and ignore_index "
                f"{ignore_index}" + (" (after reduce_zero_label)" if reduce_zero_label else "")
            ]
        return []

    bad = run_check(list(pairs), probe, what="image/mask pairs", mode=form)
    if bad:
        raise listing_error("bad image/mask pair(s)", bad)


class SegmentationDataset(Dataset):
    """``(image, mask)`` pairs (mask ``None`` to predict). Training transforms both; evaluation resizes
    the image only, so metrics are computed on the label map at its own size."""

    def __init__(
        self, pairs: Sequence[tuple[Path, Path | None]], transform: Any, *, train: bool, root: Path,
        reduce_zero_label: bool, ignore_index: int,
    ) -> None:
        self.pairs, self.transform, self.train, self.root = list(pairs), transform, train, root
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, mask_path = self.pairs[index]
        image = read_image(path)
        name = str(path.relative_to(self.root).with_suffix("")) if path.is_relative_to(self.root) else path.stem
        sample = {"index": index, "path": str(path), "name": name, "size": torch.tensor(image.shape[:2])}
        if mask_path is None:
            return {**sample, "input": self.transform(image=image)["image"]}
        mask = read_mask(mask_path)
        if self.reduce_zero_label:
            mask = reduce_zero(mask, self.ignore_index)
        if self.train:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        else:
            image = self.transform(image=image)["image"]
        target = mask.long() if isinstance(mask, torch.Tensor) else torch.from_numpy(mask.astype(np.int64))
        return {**sample, "input": image, "target": target}


def collate_eval(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack evaluation samples, or say why not: images of different sizes need ``val_batch_size: 1``."""
    for key in ("input", "target"):
        sizes = {tuple(s[key].shape[-2:]) for s in samples if key in s}
        if len(sizes) > 1:
            raise DataError(f"evaluation images in one batch differ in size ({sorted(sizes)[:4]}); set data.val_batch_size: 1")
    return default_collate(samples)


class SegmentationDataModule(TaskDataModule):
    """Segmentation data in ADE20K, Cityscapes or folder layout with the SegFormer augmentation recipe.

    Args:
        root: data folder; ``None`` writes and uses the built-in synthetic scenes (ADE20K layout).
        layout: folder layout; ``auto`` detects it from the folders under ``root``.
        num_classes: classes in the label maps; defaults to 150 (ADE20K), 19 (Cityscapes train ids) or
            ``len(class_names)``; the ``folders`` layout needs one of them.
        class_names: names for per-class IoU and outputs.
        reduce_zero_label: map label 0 to ``ignore_index`` and shift the rest down; ``None`` = on for ADE20K.
        ignore_index: label value left out of the loss and the metrics.
        train_split, val_split, test_split: split folder names (``None``: the layout's; test uses val).
        predict_dir: folder of images to predict (any layout); ``None`` predicts the val split's images.
        image_dir, mask_dir: top folders of the ``folders`` layout.
        crop_size: training crop (height, width); smaller images are padded with ignore.
        scale: (long, short) base size of the random rescale (mmseg ``img_scale``: ADE20K 2048x512,
            Cityscapes 2048x1024); ``None`` rescales relative to each image's own size.
        ratio_range: random rescale ratios.
        cat_max_ratio: a training crop is redrawn (up to 10 times) while one class covers this share of it.
        hflip: horizontal flip probability.
        photometric: brightness/contrast/saturation/hue distortion in training.
        eval_scale: (long, short) size the image is resized to fit for validation/test/predict; ``None``
            keeps it. Label maps keep their size either way.
        mean, std: normalisation in 0..1 units.
        batch_size: training batch per process (the effective batch is ``batch_size * devices * accumulate``).
        val_batch_size: evaluation batch; 1 unless all images share one size.
        num_workers: loader processes.
        check_files: check every pair up front (mask present, same size, labels in range); ``true``/``full``
            also decodes every image (in threads, timed), so a truncated file fails at setup; ``header`` reads
            image headers only (fast, misses truncated images); ``false``/``none`` skips the check.
        synthetic_size, synthetic_train, synthetic_val: the default scenes' side and counts.
    """

    def __init__(
        self,
        root: str | None = None,
        *,
        layout: Layout = "auto",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        reduce_zero_label: bool | None = None,
        ignore_index: int = 255,
        train_split: str | None = None,
        val_split: str | None = None,
        test_split: str | None = None,
        predict_dir: str | None = None,
        image_dir: str = "images",
        mask_dir: str = "masks",
        crop_size: tuple[int, int] = (512, 512),
        scale: tuple[int, int] | None = None,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        eval_scale: tuple[int, int] | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int | None = None,
        check_files: CheckFiles = True,
        synthetic_size: int = 128,
        synthetic_train: int = 400,
        synthetic_val: int = 100,
    ) -> None:
        super().__init__(root, num_workers)
        self.save_hyperparameters(ignore=["num_classes"])  # the model records the resolved count
        if self.root is not None and not self.root.is_dir():
            raise DataError(f"data root not found: {self.root}")
        self.layout = "ade20k" if self.root is None else detect_layout(self.root) if layout == "auto" else layout
        defaults = {"ade20k": ADE20K_CLASSES, "cityscapes": CITYSCAPES_CLASSES}.get(self.layout)
        if self.root is None:
            defaults = SCENE_CLASSES
        names = class_names or (defaults if num_classes in (None, len(defaults or ())) else None)
        if names is None and num_classes is None:
            raise DataError(f"layout {self.layout!r} at {self.root} needs data.num_classes (or data.class_names)")
        self.class_names = list(names) if names else [str(i) for i in range(num_classes)]
        if num_classes is not None and num_classes != len(self.class_names):
            raise DataError(f"num_classes={num_classes} but {len(self.class_names)} class_names were given")
        self.reduce_zero_label = self.layout == "ade20k" if reduce_zero_label is None else reduce_zero_label
        self.ignore_index = ignore_index  # linked into the model by the CLI
        self.palette = CITYSCAPES_PALETTE if names is CITYSCAPES_CLASSES else voc_palette(max(256, len(self.class_names)))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def write_prediction(self, row: dict[str, Any], output_dir: Path) -> dict[str, Any]:
        """Write a predicted ``label`` map (0-based classes) as ``masks/<name>.png``, a palette PNG in this data's
        label convention (class + 1 under ``reduce_zero_label``, as ADE20K's annotations), and with ``save_overlay``
        its colours over the image as ``overlays/<name>.jpg``. The row is rewritten in place to the CSV's columns,
        so predictions the trainer keeps hold the file paths, not the arrays."""
        if "label" not in row:
            return row
        label = row["label"].astype(np.int32) + int(self.reduce_zero_label)  # ADE20K files: class + 1, 0 = other
        mask = write_label_map(Path(output_dir) / "masks" / f"{row['name']}.png", label, self.palette)
        written = {"index": row["index"], "path": row["path"], "mask": str(mask), "height": row["height"],
                   "width": row["width"]}
        if row.get("save_overlay"):
            overlay = Path(output_dir) / "overlays" / f"{row['name']}.jpg"
            written["overlay"] = str(write_overlay(overlay, row["path"], label, self.palette))
        row.clear()
        row.update(written)
        return row

    def input_size(self) -> tuple[int, int]:
        return tuple(self.hparams.crop_size)

    def synthetic_root(self) -> Path:
        hp = self.hparams
        return synthetic_scenes(hp.synthetic_size, hp.synthetic_train, hp.synthetic_val)

    def split_name(self, which: Literal["train", "val", "test"]) -> str:
        hp = self.hparams
        train, val = _SPLITS[self.layout]
        names = {"train": hp.train_split or train, "val": hp.val_split or val, "test": hp.test_split or hp.val_split or val}
        return names[which]

    def _dataset(self, which: Literal["train", "val", "test"]) -> SegmentationDataset:
        hp, root = self.hparams, self.data_root()
        pairs = find_pairs(root, self.layout, self.split_name(which), hp.image_dir, hp.mask_dir)
        check_pairs(
            pairs, num_classes=self.num_classes, ignore_index=hp.ignore_index, reduce_zero_label=self.reduce_zero_label,
            mode=hp.check_files,
        )
        if which == "train":
            transform = train_pipeline(
                crop_size=hp.crop_size, scale=hp.scale, ratio_range=hp.ratio_range, cat_max_ratio=hp.cat_max_ratio,
                hflip=hp.hflip, photometric=hp.photometric, mean=hp.mean, std=hp.std, ignore_index=hp.ignore_index,
            )
        else:
            transform = eval_pipeline(scale=hp.eval_scale, mean=hp.mean, std=hp.std)
        return SegmentationDataset(
            pairs, transform, train=which == "train", root=root, reduce_zero_label=self.reduce_zero_label,
            ignore_index=hp.ignore_index,
        )

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "fit":
            self.datasets["train"], self.datasets["val"] = self._dataset("train"), self._dataset("val")
        elif stage in ("validate", "test"):
            which = "val" if stage == "validate" else "test"
            self.datasets[which] = self._dataset(which)
        elif stage == "predict":
            if hp.predict_dir:
                folder = Path(hp.predict_dir)
                images = list_images(folder)
            else:
                pairs = find_pairs(self.data_root(), self.layout, self.split_name("val"), hp.image_dir, hp.mask_dir)
                images = [p for p, _ in pairs]
                folder = Path(os.path.commonpath([p.parent for p in images]))
            if not images:
                raise DataError(f"no image files under {folder} to predict")
            self.datasets["predict"] = SegmentationDataset(
                [(p, None) for p in images], eval_pipeline(scale=hp.eval_scale, mean=hp.mean, std=hp.std), train=False,
                root=folder, reduce_zero_label=False, ignore_index=hp.ignore_index,
            )

    def sample_files(self, split: str, index: int) -> list[str]:
        return [str(p) for p in self.datasets[split].pairs[index] if p is not None]

    def split_batch_size(self, split: str) -> int:
        return self.hparams.batch_size if split == "train" else self.hparams.val_batch_size

    def collate(self, split: str) -> Callable[[list[Any]], Any] | None:
        return None if split == "train" else collate_eval  # evaluation keeps each image at its own size
