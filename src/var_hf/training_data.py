"""Class-labelled image data for the training recipes: image folders or `datasets` datasets, upstream transforms."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def upstream_transform(image: PIL.Image.Image, resolution: int, random_crop: bool, hflip: bool, rng: random.Random) -> torch.Tensor:
    """Shorter side to round(1.125·R) (LANCZOS), then a random (train) or centre crop of R; -> (3, R, R) in [-1, 1]."""
    image = image.convert("RGB")
    width, height = image.size
    short = round(resolution * 1.125)
    scale = short / min(width, height)
    new_w, new_h = max(short, round(width * scale)), max(short, round(height * scale))
    image = image.resize((new_w, new_h), PIL.Image.LANCZOS)
    if random_crop:
        left, top = rng.randint(0, new_w - resolution), rng.randint(0, new_h - resolution)
    else:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if hflip and rng.random() < 0.5:
        image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).mul(2).sub(1)


def scan_image_folder(root: str | Path, num_classes: int | None = None, check_images: bool = True) -> tuple[list[tuple[Path, int]], dict[int, str]]:
    """
    One sub-folder per class. Sub-folders named by integers map to those class ids; otherwise classes are numbered in
    sorted name order. Returns (path, class id) samples and id2label. Raises `ValueError` with a clear message for an
    empty or missing folder, an unreadable image, or a class id >= `num_classes`.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--train_data_dir {root} is not a folder")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{root} has no class sub-folders (expected one sub-folder of images per class)")
    if all(d.name.isdigit() for d in class_dirs):
        class_ids = {d: int(d.name) for d in class_dirs}
    else:
        class_ids = {d: i for i, d in enumerate(class_dirs)}
    id2label = {class_ids[d]: d.name for d in class_dirs}
    if num_classes is not None and max(class_ids.values()) >= num_classes:
        bad = [d.name for d in class_dirs if class_ids[d] >= num_classes]
        raise ValueError(f"class folder(s) {bad} give class ids >= the model's num_classes ({num_classes})")
    samples = []
    for class_dir in class_dirs:
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                if check_images:
                    try:
                        with PIL.Image.open(path) as image:
                            image.verify()
                    except Exception as error:  # PIL raises many types for broken files
                        raise ValueError(f"unreadable image {path}: {error}") from None
                samples.append((path, class_ids[class_dir]))
    if not samples:
        raise ValueError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return samples, id2label


class ClassImageDataset(Dataset):
    """Items `{"pixel_values": (3, R, R) in [-1, 1], "class_labels": int}` from an image folder or a `datasets` split."""

    def __init__(self, samples, resolution: int, random_crop: bool = True, hflip: bool = False, id2label: dict[int, str] | None = None, seed: int = 0):
        self.samples = samples  # list of (path, label) or a `datasets.Dataset` with image/label columns
        self.resolution = resolution
        self.random_crop = random_crop
        self.hflip = hflip
        self.id2label = id2label or {}
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Crops and flips depend on (seed, epoch, index) only, so a resumed run sees the same augmentations."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[PIL.Image.Image, int]:
        item = self.samples[index]
        if isinstance(item, tuple):
            path, label = item
            with PIL.Image.open(path) as image:
                return image.convert("RGB"), int(label)
        return item["image"], int(item["label"])

    def __getitem__(self, index: int) -> dict:
        image, label = self.load(index)
        rng = random.Random(hash((self.seed, self.epoch, index)))
        pixels = upstream_transform(image, self.resolution, self.random_crop, self.hflip, rng)
        return {"pixel_values": pixels, "class_labels": label}


def load_class_image_dataset(
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    resolution: int = 256,
    num_classes: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
    split: str = "train",
    random_crop: bool = True,
    hflip: bool = False,
    seed: int = 0,
) -> ClassImageDataset:
    """An image folder (`train_data_dir`) or a `datasets` dataset name/path (`dataset_name`) with image and label columns."""
    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError("pass exactly one of --train_data_dir or --dataset_name")
    if train_data_dir is not None:
        samples, id2label = scan_image_folder(train_data_dir, num_classes)
        return ClassImageDataset(samples, resolution, random_crop, hflip, id2label, seed)

    import datasets

    path = Path(dataset_name)
    saved_with_save_to_disk = path.is_dir() and any((path / name).exists() for name in ("state.json", "dataset_dict.json"))
    data = datasets.load_from_disk(dataset_name) if saved_with_save_to_disk else datasets.load_dataset(dataset_name, split=split)
    if isinstance(data, datasets.DatasetDict):
        data = data[split]
    for column in (image_column, label_column):
        if column not in data.column_names:
            raise ValueError(f"dataset {dataset_name} has no column {column!r} (columns: {data.column_names})")
    data = data.rename_columns({c: n for c, n in ((image_column, "image"), (label_column, "label")) if c != n})
    if len(data) == 0:
        raise ValueError(f"dataset {dataset_name} is empty")
    labels = data["label"]
    if num_classes is not None and max(labels) >= num_classes:
        raise ValueError(f"dataset labels reach {max(labels)}, >= the model's num_classes ({num_classes})")
    names = getattr(data.features.get("label"), "names", None)
    id2label = {i: n for i, n in enumerate(names)} if names else {int(i): str(i) for i in sorted(set(labels))}
    return ClassImageDataset(data, resolution, random_crop, hflip, id2label, seed)


__all__ = ["ClassImageDataset", "load_class_image_dataset", "scan_image_folder", "upstream_transform"]
