"""Shared by the data tests: where the real Omniglot copy is, the one decode of it per test
session, and tiny data sets written on the fly."""
import io
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from imaml_fast.data import load_omniglot

# The project's convention: the real data lives at ../shared/data/omniglot from the repo root;
# OMNIGLOT_ROOT names another folder (a copy of the repository on a machine without that one,
# as benchmarks/gpu_check.sh's OMNIGLOT_ROOT does for its training step).
REAL_OMNIGLOT = Path(os.environ.get("OMNIGLOT_ROOT")
                     or Path(__file__).resolve().parents[1].parent / "shared/data/omniglot")
_REAL = {}


def real_omniglot(tmp_path_factory):
    """The real data set, decoded ONCE per test session into a temporary cache directory
    (the data folder itself is read-only), whichever test module asks first."""
    if "data" not in _REAL:
        cache_dir = tmp_path_factory.mktemp("omniglot_cache")
        _REAL["data"] = load_omniglot(REAL_OMNIGLOT, cache_dir=cache_dir)
        _REAL["cache_dir"] = cache_dir
    return _REAL["data"], _REAL["cache_dir"]


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def stroke_image(rng: np.random.Generator, size: int = 105) -> np.ndarray:
    """A 1-bit image like Omniglot's: white paper (True) with a few black strokes."""
    img = np.ones((size, size), dtype=bool)
    for _ in range(3):
        r, c = rng.integers(5, size - 30, 2)
        h, w = rng.integers(3, 25, 2)
        img[r:r + h, c:c + w] = False
    return img


TINY = {"background": {"Alpha": 2, "Beta": 1}, "evaluation": {"Gamma": 2}}


def write_tiny_omniglot(root: Path, layout=TINY, drawers=20, as_zip=True, seed=0,
                        size=105, prefix=None) -> Path:
    """Omniglot's layout in miniature: images_<part>/<alphabet>/characterNN/<id>_<drawer>.png,
    as two zips (with directory entries, as the originals have) or as extracted folders."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ident = 1
    for part, alphabets in layout.items():
        folder = f"images_{part}"
        top = folder if prefix is None else prefix
        files = {}
        for alpha, n_chars in alphabets.items():
            for c in range(1, n_chars + 1):
                for d in (range(1, drawers + 1) if isinstance(drawers, int) else drawers):
                    name = f"{top}/{alpha}/character{c:02d}/{ident:04d}_{d:02d}.png"
                    files[name] = png_bytes(stroke_image(rng, size))
                ident += 1
        if as_zip:
            with zipfile.ZipFile(root / f"{folder}.zip", "w") as zf:
                dirs = sorted({n.rsplit("/", i)[0] + "/" for n in files for i in (1, 2, 3)})
                for d in dirs:
                    zf.writestr(d, b"")
                for name, data in files.items():
                    zf.writestr(name, data)
        else:
            for name, data in files.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
    return root
