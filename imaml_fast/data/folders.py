"""Few-shot image sets on disk other than Omniglot, through the same decode cache:

- class folders: root/<class>/<image files> (any number of images per class);
- mini-ImageNet: root/images/<files> with root/train.csv, val.csv, test.csv of rows
  `filename,label` (the Ravi & Larochelle layout; 600 84x84 images per class).

Both decode every image once to uint8 [C, H, W] (converted to `mode`, resized to image_size
with LANCZOS; see decode.py) and return an ImageClasses that EpisodeSampler samples from.
Pixel values are the image's own (0..255, no inversion, no normalisation); the sampler scales
them to [0, 1].
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import cache as _cache
from .classes import ImageClasses
from .decode import check_mode, decode_many, image_size_hw
from .errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")
MINI_IMAGENET_SPLITS = ("train", "val", "test")

ClassFiles = List[Tuple[str, List[Tuple[str, Path]]]]  # (class name, [(relative name, path)])


def load_image_folder(root, image_size, *, mode: str = "RGB", cache_dir=None,
                      num_workers: Optional[int] = None,
                      extensions: Sequence[str] = IMAGE_EXTENSIONS) -> ImageClasses:
    """A class-per-folder data set, root/<class>/<image files>, as ImageClasses.

    Classes are the sub-folders of root in sorted order (hidden ones skipped); their images
    are the files directly inside with one of `extensions` (case-insensitive), sorted by name.
    image_size: int or (H, W). mode: "RGB" or "L". cache_dir: see imaml_fast.data.cache.
    num_workers: decoding threads (None: 1; more pay off for large photos, see decode.py).
    """
    size_hw, root = image_size_hw(image_size), _existing_root(root, "root/<class>/<image files>")
    check_mode(mode)
    exts = tuple(e.lower() for e in extensions)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"no class folders in {root}: expected root/<class>/<image files>, one "
                        f"sub-folder per class")
    class_files: ClassFiles = []
    for d in class_dirs:
        files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in exts)
        if not files:
            raise DataError(f"class folder {d} holds no image files (extensions {exts}): add "
                            f"images or remove the folder")
        class_files.append((d.name, [(f"{d.name}/{p.name}", p) for p in files]))
    name = f"imaml_fast_cache_folder_{size_hw[0]}x{size_hw[1]}_{mode}.pt"
    return _cached_classes("class_folder", root, name, class_files, [], size_hw, mode,
                           cache_dir, num_workers)


def load_mini_imagenet(root, split: str, image_size=84, *, mode: str = "RGB", cache_dir=None,
                       num_workers: Optional[int] = None) -> ImageClasses:
    """One split ("train", "val" or "test") of mini-ImageNet as ImageClasses.

    Layout: root/images/<filename> and root/<split>.csv with the header `filename,label` and
    one row per image. Classes are the labels in sorted order; a class's images keep the CSV's
    order. Each split has its own cache file. Other arguments as in load_image_folder.
    """
    if split not in MINI_IMAGENET_SPLITS:
        raise ValueError(f"split={split!r} is invalid: use one of {MINI_IMAGENET_SPLITS}")
    layout = "root/images/<files> and root/{train,val,test}.csv (header filename,label)"
    size_hw, root = image_size_hw(image_size), _existing_root(root, layout)
    check_mode(mode)
    images, table = root / "images", root / f"{split}.csv"
    for p in (images, table):
        if not p.exists():
            raise DataError(f"{p} does not exist: mini-ImageNet needs {layout}")
    by_label: Dict[str, List[Tuple[str, Path]]] = {}
    seen = set()
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(f"{table} must start with the header 'filename,label', got "
                        f"{','.join(rows[0]) if rows else 'an empty file'}")
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise DataError(f"{table} line {line}: expected 'filename,label', got {row}")
        fname, label = row[0].strip(), row[1].strip()
        path = images / fname
        if fname in seen:
            raise DataError(f"{table} line {line}: {fname} is listed twice; list it once")
        if not path.is_file():
            raise DataError(f"{table} line {line}: image {path} does not exist; copy it into "
                            f"{images} or remove the row")
        seen.add(fname)
        by_label.setdefault(label, []).append((f"images/{fname}", path))
    if not by_label:
        raise DataError(f"{table} lists no images: expected rows 'filename,label'")
    class_files = [(label, by_label[label]) for label in sorted(by_label)]
    name = f"imaml_fast_cache_miniimagenet_{split}_{size_hw[0]}x{size_hw[1]}_{mode}.pt"
    return _cached_classes("mini_imagenet", root, name, class_files, [(table.name, table)],
                           size_hw, mode, cache_dir, num_workers)


def _existing_root(root, layout: str) -> Path:
    if root is None or not Path(root).expanduser().is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder: pass the folder "
                        f"that holds {layout}")
    return Path(root).expanduser()


def _cached_classes(kind: str, root: Path, filename: str, class_files: ClassFiles,
                    extra_inputs, size_hw, mode: str, cache_dir, num_workers) -> ImageClasses:
    """Load the decoded classes from the cache, or decode every file and write the cache."""
    files = [item for _, items in class_files for item in items]
    settings = {"size": list(size_hw), "mode": mode,
                "classes": [[name, len(items)] for name, items in class_files]}
    key = _cache.fingerprint(kind, settings, list(extra_inputs) + files)
    channels = check_mode(mode)

    def build() -> dict:
        images = decode_many([p for _, p in files], size_hw, mode,
                             describe=lambda i: str(files[i][1]), num_workers=num_workers)
        return {"images": images, "names": [n for n, _ in class_files],
                "counts": torch.tensor([len(items) for _, items in class_files]),
                "sources": [rel for rel, _ in files]}

    def check(p: dict) -> bool:
        im, counts = p["images"], p["counts"]
        return (im.dtype == torch.uint8 and tuple(im.shape) == (len(files), channels, *size_hw)
                and counts.tolist() == [len(items) for _, items in class_files]
                and list(p["names"]) == [n for n, _ in class_files]
                and len(p["sources"]) == len(files))

    payload, path, status = _cache.load_or_build(
        _cache.cache_candidates(root, filename, cache_dir), key, build, check,
        explicit=cache_dir is not None)
    return ImageClasses(payload["images"], payload["counts"], tuple(payload["names"]),
                        tuple(payload["sources"]), cache_path=path, cache_status=status)
