"""Loader ``image_folder``: ``<root>/<site>/<class>/<image>.{png,jpg,jpeg,bmp}``; the site of
every image is kept (:attr:`~securefed.data.datasets.ImageDataset.sites`), grayscale when every
file is, resized to ``data.image_size`` when the sizes differ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from securefed.config import DataConfig
from securefed.data.loaders.base import DatasetError, _Raw, _require_root, _resize

__all__: list[str] = []


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def _pil_to_array(path: Path, gray: bool) -> np.ndarray:
    """One image file -> float32 ``[C, H, W]`` in ``[0, 1]`` (C = 1 if ``gray`` else 3)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            wide = np.asarray(im, dtype=np.float64)
            hi = 65535.0 if im.mode.startswith("I;16") or wide.max() > 255 else 255.0
            if im.mode == "F":
                hi = max(1.0, float(wide.max()))
            wide = np.clip(wide / hi, 0.0, 1.0)[None]
            return (wide if gray else np.repeat(wide, 3, axis=0)).astype(np.float32)
        conv = im.convert("L" if gray else "RGB")
        a = np.asarray(conv, dtype=np.float32) / 255.0
    return a[None] if gray else a.transpose(2, 0, 1)


def _load_image_folder(cfg: DataConfig) -> _Raw:
    root = _require_root(cfg)
    layout = "data.root must hold one folder per site, each with one folder per class of images"
    if not root.is_dir():
        raise DatasetError(f"data.root: image folder not found: {root} ({layout})")

    def subdirs(p: Path) -> list[Path]:
        return sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))

    def images_in(p: Path) -> list[Path]:
        return sorted(
            c
            for c in p.iterdir()
            if c.is_file() and not c.name.startswith(".") and c.suffix.lower() in _IMAGE_SUFFIXES
        )

    site_dirs = subdirs(root)
    if not site_dirs:
        raise DatasetError(f"data.root: {root} has no site folders ({layout})")
    if images_in(root):
        raise DatasetError(f"data.root: {root} holds image files directly ({layout})")
    entries: list[tuple[int, str, Path]] = []  # (site index, class name, file)
    for s, site in enumerate(site_dirs):
        class_dirs = subdirs(site)
        if images_in(site):
            raise DatasetError(
                f"data.root: site folder {site} holds image files directly; put them in one "
                f"sub-folder per class ({layout})"
            )
        if not class_dirs:
            raise DatasetError(f"data.root: site folder {site} has no class folders ({layout})")
        for cdir in class_dirs:
            files = images_in(cdir)
            if not files:
                raise DatasetError(
                    f"data.root: class folder {cdir} holds no images "
                    f"({', '.join(_IMAGE_SUFFIXES)}); add images or remove the folder"
                )
            entries.extend((s, cdir.name, f) for f in files)
    class_names = tuple(sorted({c for _, c, _ in entries}))
    class_index = {c: i for i, c in enumerate(class_names)}

    sizes: list[tuple[int, int]] = []
    gray = True
    for _, _, f in entries:
        try:
            with Image.open(f) as im:
                sizes.append((im.height, im.width))
                gray = gray and im.mode in _GRAY_MODES
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"data.root: cannot read image {f}: {exc}") from exc
    if len(set(sizes)) > 1 and cfg.image_size is None:
        raise DatasetError(
            f"data.image_size: images under {root} have different sizes (e.g. "
            f"{sorted(set(sizes))[:3]} as (H, W)); set data.image_size to resize them all"
        )
    target = None if len(set(sizes)) == 1 else cfg.image_size
    arrays = []
    for _, _, f in entries:
        try:
            a = _pil_to_array(f, gray)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"data.root: cannot read image {f}: {exc}") from exc
        if target is not None:
            a = _resize(torch.from_numpy(a)[None], target).clamp_(0.0, 1.0)[0].numpy()
        arrays.append(a)
    return _Raw(
        np.stack(arrays),
        1.0,
        np.array([class_index[c] for _, c, _ in entries], dtype=np.int64),
        class_names,
        np.array([s for s, _, _ in entries], dtype=np.int64),
        tuple(d.name for d in site_dirs),
    )
