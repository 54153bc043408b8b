"""The training images, checked, and laid out the way kohya's train_data_dir wants them for the recipe.

kohya reads TRAIN_DATA_DIR/<repeats>_<caption>/*.png and makes <caption> the caption of every image
that has no caption file. The recipe wants no caption, so the folder is named by the repeat count
alone ("5"), and only image files are copied: a caption file beside a user's image never comes along.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from copylora.errors import CopyloraError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # what kohya's dataset loader lists
MARKER = ".copylora-dataset"  # marks a folder copylora made, and may therefore empty


@dataclass(frozen=True)
class Image:
    path: Path
    width: int
    height: int
    sha256: str


def find_images(path: Path) -> list[Path]:
    """One image file, or the images directly inside a folder (sorted)."""
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise CopyloraError(f"{path}: not an image kohya reads ({', '.join(IMAGE_SUFFIXES)})")
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise CopyloraError(f"{path}: no images in this folder ({', '.join(IMAGE_SUFFIXES)})")
        return found
    raise CopyloraError(f"{path}: no such image or folder")


def check_images(paths: list[Path]) -> list[Image]:
    """Open and decode every image, so a broken file stops us before kohya loads a model."""
    try:
        from PIL import Image as PILImage, UnidentifiedImageError
    except ImportError as exc:
        raise CopyloraError(f"{paths[0]}: checking images needs Pillow in this Python (pip install pillow)") from exc
    names: dict[str, Path] = {}
    images = []
    for path in paths:
        if path.name in names:
            raise CopyloraError(f"{path}: same file name as {names[path.name]}; they would overwrite each other")
        names[path.name] = path
        try:
            with PILImage.open(path) as handle:
                handle.load()
                width, height = handle.size
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise CopyloraError(f"{path}: cannot open this image ({exc})") from exc
        images.append(Image(path, width, height, hashlib.sha256(path.read_bytes()).hexdigest()))
    return images


def subset_dir(train_data_dir: Path, num_repeats: int) -> Path:
    return train_data_dir / str(num_repeats)  # "5", not "5_xxx": no caption


def lay_out(images: list[Image], train_data_dir: Path, num_repeats: int) -> Path:
    """Fill train_data_dir/<num_repeats>/ with copies of the images, and nothing else."""
    if train_data_dir.exists():
        if not (train_data_dir / MARKER).is_file():
            if any(train_data_dir.iterdir()):
                raise CopyloraError(f"{train_data_dir}: exists and was not made by copylora; move it away")
        else:
            shutil.rmtree(train_data_dir)  # a previous layout: its images may not be today's
    target = subset_dir(train_data_dir, num_repeats)
    target.mkdir(parents=True, exist_ok=True)
    (train_data_dir / MARKER).write_text("made by copylora; emptied and refilled on every run\n", encoding="utf-8")
    for image in images:
        shutil.copyfile(image.path, target / image.path.name)
    return target
