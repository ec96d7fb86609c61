"""A face set stored as ``root/<identity>/<image>``.

Identities are the sub-folders of ``root`` sorted by name and get labels
``0 .. N-1`` in that order. Images are the files with an image suffix
(``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.webp``; decoded with Pillow) or
``.npy`` arrays (H x W or H x W x C on the 0..255 scale; no Pillow needed).
Hidden entries are ignored. Images are not resized: store them aligned at
the backbone's input size, as InsightFace's sets are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .decode import IMAGE_SUFFIXES, check_same_shape, load_image_file, random_horizontal_flip, to_model_input


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


class ImageFolderDataset(Dataset):
    """Items are ``(image, label)``: float32 C x H x W in [-1, 1] and an int64 label.

    ``expected_shape`` (C, H, W), once set, is the shape every image must have (DataError naming the file).
    """

    expected_shape = None

    def __init__(self, root, random_flip: bool = False):
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {self.root} is not a directory")
        self.random_flip = random_flip

        identity_dirs = sorted(path for path in self.root.iterdir() if path.is_dir() and _visible(path))
        if not identity_dirs:
            raise ValueError(f"image folder {self.root} has no identity sub-folders (expected root/<identity>/<image>)")
        self.classes = [path.name for path in identity_dirs]
        self.class_to_label = {name: label for label, name in enumerate(self.classes)}

        self.samples = []
        for label, identity_dir in enumerate(identity_dirs):
            images = sorted(
                path for path in identity_dir.iterdir()
                if path.is_file() and _visible(path) and path.suffix.lower() in IMAGE_SUFFIXES
            )
            if not images:
                raise ValueError(
                    f"identity folder {identity_dir} holds no images "
                    f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            self.samples.extend((path, label) for path in images)
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = to_model_input(load_image_file(path))
        check_same_shape(image, self.expected_shape, path)
        if self.random_flip:
            image = random_horizontal_flip(image)
        return image, torch.tensor(label, dtype=torch.int64)
