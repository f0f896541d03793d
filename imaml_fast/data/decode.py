"""Decoding one image file to a uint8 [C, H, W] array, and many of them into one tensor.

The only place that opens an image file. It runs when a decode cache is built, never during
training. Pillow is imported here, on first use, so `import imaml_fast.data` does not need it.

Resizing: the image is converted to the target mode ("L" grey or "RGB") first and then resized
with LANCZOS, as MAML and iMAML resize Omniglot (105 -> 28) and mini-ImageNet (-> 84). The
order matters for Omniglot, whose PNGs are 1-bit (mode "1"): Pillow resizes "1" and "P" images
with NEAREST whatever resampling filter is asked for, so `Image.open(png).resize(size,
LANCZOS)` silently gives a jagged nearest-neighbour image; converting to "L" first gives the
anti-aliased grey levels LANCZOS is meant to produce. The aspect ratio is not kept: every
image is resized to exactly (H, W), as those papers do.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import DataError

MODES = {"L": 1, "RGB": 3}
Source = Union[bytes, str, Path]


def image_size_hw(image_size, name: str = "image_size") -> Tuple[int, int]:
    """An int s (-> (s, s)) or a pair (H, W) of positive ints, checked."""
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        hw = (image_size, image_size)
    elif (isinstance(image_size, (tuple, list)) and len(image_size) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)):
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"{name}={image_size!r} is invalid: expected an int (square images) or "
                         f"a pair (height, width) of ints")
    if min(hw) < 1:
        raise ValueError(f"{name}={image_size!r} is invalid: sizes must be >= 1 pixel")
    return hw


def check_mode(mode: str) -> int:
    """The number of channels of a colour mode, or a ValueError naming the allowed ones."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: use 'L' (1 grey channel) or 'RGB' "
                         f"(3 channels)")
    return MODES[mode]


def decode_image(source: Source, size_hw: Tuple[int, int], mode: str) -> np.ndarray:
    """One image (file path or the file's bytes) as a uint8 array [C, H, W]: converted to
    `mode`, then resized to size_hw = (H, W) with LANCZOS."""
    from PIL import Image

    lanczos = getattr(Image, "Resampling", Image).LANCZOS
    f = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(f) as im:
        im = im.convert(mode).resize((size_hw[1], size_hw[0]), resample=lanczos)
        a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def decode_many(sources: Sequence[Source], size_hw: Tuple[int, int], mode: str,
                describe: Callable[[int], str], num_workers: Optional[int] = None) -> torch.Tensor:
    """Decode every source into one uint8 tensor [len(sources), C, H, W], in order.
    describe(i) names source i in the error raised when it cannot be decoded.
    num_workers: decoding threads (None: 1). Pillow releases the GIL inside its C decoders and
    resampling, so threads pay off for large photos (mini-ImageNet's JPEGs); for Omniglot's
    small 1-bit PNGs the per-image Python work dominates and threads measured slower."""
    channels = check_mode(mode)
    out = np.empty((len(sources), channels, *size_hw), dtype=np.uint8)

    def work(i: int) -> None:
        try:
            out[i] = decode_image(sources[i], size_hw, mode)
        except Exception as e:
            raise DataError(f"cannot decode {describe(i)}: {type(e).__name__}: {e}. The file is "
                            f"corrupt or not an image: replace it (or delete it)") from e

    workers = 1 if num_workers is None else num_workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"num_workers={num_workers!r} is invalid: expected an int >= 1 "
                         f"(or None for 1)")
    if workers == 1 or len(sources) < 64:
        for i in range(len(sources)):
            work(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(work, range(len(sources))):
                pass
    return torch.from_numpy(out)
