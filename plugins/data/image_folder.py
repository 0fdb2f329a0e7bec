"""A folder of images, one sub-folder per class (the torchvision ImageFolder layout)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fedge.errors import DataError
from fedge.plugins.data.base import ArrayDataset, SplitConfig, split_train_test
from fedge.registry import plugin

_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@plugin("dataset", "image-folder")
class ImageFolder:
    """Images under ROOT/<class>/*.png|jpg, resized to a fixed size; class ids in sorted folder order."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(SplitConfig):
        path: Path
        """Root folder with one sub-folder per class."""
        size: int = 32
        """Images are resized to size x size."""
        mode: Literal["L", "RGB"] = "L"
        """L: one grey channel; RGB: three channels."""

        def __post_init__(self) -> None:
            SplitConfig.__post_init__(self)  # zero-argument super() fails in a slots dataclass
            if self.size < 1:
                raise ValueError(f"size must be >= 1, got {self.size}")

    @staticmethod
    def load(config: Config) -> ArrayDataset:
        from PIL import Image, UnidentifiedImageError

        if not config.path.is_dir():
            raise DataError(
                f"image folder {str(config.path)!r} not found; set [dataset_options] path to a folder of class folders"
            )
        classes = sorted(p.name for p in config.path.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{str(config.path)!r} has no class sub-folders (expected ROOT/<class>/<image>)")
        xs, ys = [], []
        for label, cls in enumerate(classes):
            for file in sorted((config.path / cls).iterdir()):
                if file.suffix.lower() not in _SUFFIXES:
                    continue
                try:
                    with Image.open(file) as img:
                        arr = np.asarray(img.convert(config.mode).resize((config.size, config.size)), dtype=np.float32)
                except (OSError, UnidentifiedImageError) as err:
                    raise DataError(f"cannot read image {str(file)!r}: {err}") from err
                xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
                ys.append(label)
        if not xs:
            raise DataError(f"no images ({', '.join(sorted(_SUFFIXES))}) found under {str(config.path)!r}")
        return split_train_test(
            "image-folder", np.stack(xs) / 255.0, np.asarray(ys), test_fraction=config.test_fraction, seed=config.seed
        )
