"""``image_folder``: ``root/class_name/*.jpg`` → ``(image, label)``, decoded lazily with Pillow.

Classes are the sorted sub-folder names and files are listed in sorted order,
as torchvision's ``ImageFolder`` does, so labels and indices match it. Start-up
reads only the file listing; each image is opened and decoded when its item is
asked for. Paths live in one numpy byte buffer with offsets, not a list of
Python strings: a list is touched (and so copied, page by page) by every
worker that reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from batchwire.server.config import Table

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_images(root: Path, extensions: tuple[str, ...]) -> tuple[list[str], list[str], list[int]]:
    """``(classes, paths, labels)`` in torchvision ``ImageFolder`` order."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(extensions):
                    paths.append(os.path.join(folder, file))
                    labels.append(label)
    return classes, paths, labels


class ImageFolderDataset:
    """Item i is ``(PIL image, label)``; add ``ToTensor`` to the image's transforms."""

    field_names = ("image", "label")

    def __init__(self, classes: list[str], paths: list[str], labels: list[int], mode: str) -> None:
        encoded = [path.encode() for path in paths]
        self._offsets = np.cumsum([0, *map(len, encoded)], dtype=np.int64)
        self._paths = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.targets = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(classes)
        self.mode = mode

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._paths[start:end].tobytes().decode()

    def __getitem__(self, index: int) -> tuple[object, int]:
        from PIL import Image

        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        with Image.open(self.path(index)) as image:
            return image.convert(self.mode), int(self.targets[index])

    def field_array(self, name: str) -> np.ndarray | None:
        """Per-sample values of a field that need no decoding (for samplers)."""
        return self.targets if name == "label" else None


def build(table: Table) -> ImageFolderDataset:
    table.reject_unknown({"root", "extensions", "mode"})
    root = table.path("root", must_exist=False)
    if not root.is_dir():
        raise table.error("root", f"folder not found: {root}")
    extensions = table.get("extensions", list, list(DEFAULT_EXTENSIONS))
    if not extensions or not all(isinstance(e, str) and e.startswith(".") for e in extensions):
        raise table.error(
            "extensions", f'expected an array like [".jpg", ".png"], got {extensions!r}'
        )
    mode = table.choice("mode", ["RGB", "L", "RGBA"], "RGB")
    classes, paths, labels = find_images(root, tuple(e.lower() for e in extensions))
    if not classes:
        raise table.error(
            "root", f"no class folders in {root}; expected root/CLASS_NAME/image files"
        )
    if not paths:
        raise table.error(
            "root", f"no images with extensions {', '.join(extensions)} under {root}/*/"
        )
    return ImageFolderDataset(classes, paths, labels, mode)
