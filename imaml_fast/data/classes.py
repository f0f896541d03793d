"""ImageClasses: a few-shot image data set held as one uint8 tensor, grouped by class.

Every loader (Omniglot, class folders, mini-ImageNet) returns one, and EpisodeSampler samples
from any of them. The images of class c are the contiguous rows
images[offsets[c] : offsets[c] + counts[c]], so a whole episode is one advanced-indexing
gather; classes may hold different numbers of images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch


@dataclass(frozen=True, eq=False)
class ImageClasses:
    """images: uint8 [M, C, H, W], class-major (all of class 0, then class 1, ...), on the CPU.
    counts: int64 [n_classes], images per class (each >= 1; they sum to M).
    names: one name per class ("alphabet/character" for Omniglot, the folder or label
        otherwise).
    sources: optionally, where each image came from (a path relative to the data root).
    cache_path, cache_status: for a loader's result, the decode cache file it used (None if
        none could be written) and what happened to it: "hit", "built", "rebuilt_stale" or
        "rebuilt_corrupt" (see imaml_fast.data.cache).
    """

    images: torch.Tensor
    counts: torch.Tensor
    names: Tuple[str, ...]
    sources: Optional[Tuple[str, ...]] = None
    cache_path: Optional[Path] = None
    cache_status: Optional[str] = None

    def __post_init__(self):
        im, counts = self.images, self.counts
        if not isinstance(im, torch.Tensor) or im.dtype != torch.uint8 or im.dim() != 4:
            raise ValueError(f"ImageClasses.images must be a uint8 tensor [M, C, H, W], got "
                             f"{getattr(im, 'dtype', type(im).__name__)} "
                             f"{tuple(getattr(im, 'shape', ()))}")
        if (not isinstance(counts, torch.Tensor) or counts.dtype != torch.long
                or counts.dim() != 1):
            raise ValueError("ImageClasses.counts must be an int64 tensor [n_classes]")
        if len(counts) == 0 or bool((counts < 1).any()) or int(counts.sum()) != im.shape[0]:
            raise ValueError(f"ImageClasses.counts must be >= 1 per class and sum to the "
                             f"{im.shape[0]} images, got {counts.tolist()[:10]}...")
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "_position", {n: i for i, n in enumerate(self.names)})
        if len(self.names) != len(counts) or len(self._position) != len(self.names):
            raise ValueError(f"ImageClasses.names must hold {len(counts)} distinct names, one "
                             f"per class, got {len(self.names)} ({len(set(self.names))} distinct)")
        if self.sources is not None:
            object.__setattr__(self, "sources", tuple(self.sources))
            if len(self.sources) != im.shape[0]:
                raise ValueError(f"ImageClasses.sources must name all {im.shape[0]} images, "
                                 f"got {len(self.sources)}")

    @property
    def n_classes(self) -> int:
        return len(self.counts)

    @property
    def n_images(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])

    @property
    def offsets(self) -> torch.Tensor:
        """int64 [n_classes]: the row of each class's first image."""
        return torch.cumsum(self.counts, 0) - self.counts

    def __len__(self) -> int:
        return self.n_classes

    def index(self, cls: Union[int, str]) -> int:
        """The index of a class given by index or name."""
        if isinstance(cls, str):
            if cls not in self._position:
                raise ValueError(f"no class named {cls!r} (there are {self.n_classes} classes, "
                                 f"e.g. {self.names[:3]})")
            return self._position[cls]
        n = self.n_classes
        if isinstance(cls, bool) or not isinstance(cls, int) or not -n <= cls < n:
            raise ValueError(f"class index {cls!r} is out of range for {self.n_classes} classes")
        return cls % self.n_classes

    def class_images(self, cls: Union[int, str]) -> torch.Tensor:
        """uint8 [counts[c], C, H, W]: all images of one class (a view)."""
        c = self.index(cls)
        start = int(self.offsets[c])
        return self.images[start:start + int(self.counts[c])]

    def subset(self, classes: Sequence[Union[int, str]]) -> "ImageClasses":
        """A new ImageClasses with these classes (indices or names), in the order given; the
        images are copied, so the subset owns exactly its own classes."""
        idx = [self.index(c) for c in classes]
        if not idx:
            raise ValueError("subset needs at least one class")
        if len(set(idx)) != len(idx):
            raise ValueError("subset got the same class twice: pass each class once")
        offsets, counts = self.offsets, self.counts
        rows = torch.cat([torch.arange(int(offsets[c]), int(offsets[c] + counts[c])) for c in idx])
        sources = None if self.sources is None else tuple(self.sources[int(r)] for r in rows)
        return ImageClasses(self.images[rows], counts[idx].clone(),
                            tuple(self.names[c] for c in idx), sources)
