"""Omniglot (Lake et al. 2015) from its two zips, decoded once into a uint8 tensor.

Input: a root folder holding images_background.zip and images_evaluation.zip as distributed
(download_omniglot fetches them), or their extracted folders images_background/ and
images_evaluation/ (the same layout; where both are present the zip is read). Inside:
`images_background/<alphabet>/<characterNN>/<id>_<drawer>.png`, 30 + 20 alphabets,
964 + 659 = 1,623 characters, each drawn once by 20 drawers: 32,460 105x105 1-bit PNGs.

Output (Omniglot): images uint8 [1623, 20, H, W] (28x28 by default), characters in sorted
"alphabet/character" order, drawers 1..20 in order. Each PNG is converted to grey and resized
with LANCZOS (decode.py says why the conversion comes first), then inverted:
pixel = 255 - grey, so 0 is paper and 255 is full ink. Strokes are black on white in the PNGs;
like most MAML code (which feeds 1 - x) we want ink to be the non-zero signal, and
EpisodeSampler returns pixel / 255: float in [0, 1], 1 = ink.

The first load decodes everything (a few seconds) and writes the decode cache (cache.py);
every later load reads one file. Nothing here runs at import.
"""
from __future__ import annotations

import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import cache as _cache
from .classes import ImageClasses
from .decode import decode_many, image_size_hw
from .errors import DataError

N_DRAWERS = 20
PARTS = (("background", "images_background"), ("evaluation", "images_evaluation"))
# (alphabets, characters) of the full data set per part: checked when strict=True.
FULL_SIZES = {"background": (30, 964), "evaluation": (20, 659)}
_PNG = re.compile(r"^(images_background|images_evaluation)/([^/]+)/([^/]+)/(\d+)_(\d+)\.png$")
_LAYOUT = "<part>/<alphabet>/<character>/<id>_<drawer>.png"


@dataclass(frozen=True)
class _Part:
    origin: str   # "background" | "evaluation"
    folder: str   # "images_background" | ...
    path: Path    # the zip file or the extracted folder
    is_zip: bool


@dataclass(frozen=True, eq=False)
class Omniglot:
    """The decoded data set. images: uint8 [n_characters, 20, H, W], 255 = ink, 0 = paper.
    keys: "alphabet/character" per row, sorted. origins: "background" or "evaluation" per row.
    cache_path / cache_status: the decode cache used and what happened to it ("hit",
    "built", "rebuilt_stale", "rebuilt_corrupt")."""

    images: torch.Tensor
    keys: Tuple[str, ...]
    origins: Tuple[str, ...]
    cache_path: Optional[Path] = None
    cache_status: Optional[str] = None

    @property
    def n_characters(self) -> int:
        return len(self.keys)

    @property
    def n_images(self) -> int:
        return self.images.shape[0] * self.images.shape[1]

    def classes(self, keys: Optional[Sequence[str]] = None) -> ImageClasses:
        """These characters (default: all, in sorted order) as ImageClasses: one class per
        character, its 20 drawers as the class's images [20, 1, H, W] in drawer order."""
        H, W = self.images.shape[-2:]
        if keys is None:
            keys, rows = self.keys, self.images
        else:
            pos = {k: i for i, k in enumerate(self.keys)}
            missing = [k for k in keys if k not in pos]
            if missing:
                raise ValueError(f"{len(missing)} characters are not in this Omniglot copy, e.g. "
                                 f"{missing[:3]}: keys are 'alphabet/character' as in .keys")
            rows = self.images[torch.tensor([pos[k] for k in keys], dtype=torch.long)]
        counts = torch.full((len(keys),), self.images.shape[1], dtype=torch.long)
        return ImageClasses(rows.reshape(-1, 1, H, W), counts, tuple(keys))

    def split(self) -> Tuple[ImageClasses, ImageClasses]:
        """(meta-train, meta-test) classes of the shipped split: 1,200 and 423 characters."""
        from .split import omniglot_split

        s = omniglot_split()
        if set(self.keys) != set(s.train) | set(s.test):
            raise DataError(f"this Omniglot copy has {self.n_characters} characters but the "
                            f"shipped split covers the {len(s.train) + len(s.test)} of the full "
                            f"data set: load the complete zips, or pick your own classes with "
                            f".classes(keys)")
        return self.classes(s.train), self.classes(s.test)

    def sampler(self, split: str, n_way: int, k_shot: int, q_query: int, tasks: int, *,
                rotations: Optional[Sequence[int]] = None, **kwargs):
        """An EpisodeSampler over the meta-train or meta-test characters of the shipped split.
        rotations default: (0, 90, 180, 270) for "train" (4 x 1,200 = 4,800 classes, as in
        MAML), (0,) for "test" (the 423 characters as drawn). Other keyword arguments (device,
        dtype, seed, images_on_device) go to EpisodeSampler."""
        from .episodes import EpisodeSampler

        if split not in ("train", "test"):
            raise ValueError(f"split={split!r} is invalid: use 'train' or 'test'")
        train, test = self.split()
        if rotations is None:
            rotations = (0, 90, 180, 270) if split == "train" else (0,)
        return EpisodeSampler(train if split == "train" else test, n_way, k_shot, q_query,
                              tasks, rotations=rotations, **kwargs)


def load_omniglot(root, *, image_size=28, cache_dir=None, strict: bool = True,
                  num_workers: Optional[int] = None) -> Omniglot:
    """Omniglot from `root` (see the module docstring), decoded once and cached.

    image_size: int or (H, W), 28 as in MAML/iMAML. cache_dir: where the decode cache goes
    (default: beside the data if writable, else $IMAML_FAST_CACHE or ~/.cache/imaml_fast).
    strict: require the full data set, 30 + 20 alphabets and 964 + 659 characters; pass False
    for a subset. Every character must have exactly 20 drawers either way.
    num_workers: decoding threads (None: 1; see decode.decode_many).
    Raises DataError for a missing root or part, a corrupt zip, a wrong layout or wrong counts.
    """
    size_hw = image_size_hw(image_size)
    parts = _find_parts(root)
    root = Path(root).expanduser()
    inputs = [item for part in parts for item in _inputs(part)]
    key = _cache.fingerprint("omniglot", {"size": list(size_hw), "pixels": "255-grey"}, inputs)

    def build() -> dict:
        listing: Dict[str, Tuple[str, _Part, List[str]]] = {}
        for part in parts:
            for k, members in _list_part(part).items():
                if k in listing:
                    raise DataError(f"character {k} is in both images_background and "
                                    f"images_evaluation: the two parts must not overlap")
                listing[k] = (part.origin, part, members)
        keys = sorted(listing)
        _check_counts(keys, [listing[k][0] for k in keys], strict)
        blobs: List[bytes] = []
        names: List[str] = []
        for part in parts:  # read each zip front to back, then decode in any order
            todo = [(k, i) for k in keys if listing[k][1] is part for i in range(N_DRAWERS)]
            data = _read_members(part, [listing[k][2][i] for k, i in todo])
            blobs.extend(data)
            names.extend(f"{part.path.name}:{listing[k][2][i]}" for k, i in todo)
        order = {k: n for n, k in enumerate(k for part in parts for k in keys
                                             if listing[k][1] is part)}
        flat = decode_many(blobs, size_hw, "L", describe=lambda i: names[i],
                           num_workers=num_workers)
        flat = flat.reshape(len(keys), N_DRAWERS, *size_hw)
        images = 255 - flat[torch.tensor([order[k] for k in keys], dtype=torch.long)]
        return {"images": images, "keys": keys, "origins": [listing[k][0] for k in keys]}

    def check(p: dict) -> bool:
        im, keys = p["images"], list(p["keys"])
        return (im.dtype == torch.uint8 and tuple(im.shape) == (len(keys), N_DRAWERS, *size_hw)
                and keys == sorted(set(keys)) and len(p["origins"]) == len(keys))

    payload, path, status = _cache.load_or_build(
        _cache.cache_candidates(root, f"imaml_fast_cache_omniglot_{size_hw[0]}x"
                                f"{size_hw[1]}.pt", cache_dir),
        key, build, check, explicit=cache_dir is not None)
    keys, origins = tuple(payload["keys"]), tuple(payload["origins"])
    _check_counts(keys, origins, strict)
    return Omniglot(payload["images"], keys, origins, cache_path=path, cache_status=status)


def omniglot_characters(root, *, strict: bool = True) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(keys, origins) of every character under root, sorted, from the file listing alone
    (nothing is decoded). Used to (re)generate the shipped split."""
    listing = {}
    for part in _find_parts(root):
        listing.update({k: part.origin for k in _list_part(part)})
    keys = tuple(sorted(listing))
    origins = tuple(listing[k] for k in keys)
    _check_counts(keys, origins, strict)
    return keys, origins


def _find_parts(root) -> List[_Part]:
    fix = ("pass the folder that holds images_background.zip and images_evaluation.zip (or "
           "their extracted folders), or fetch them with imaml_fast.data.download_omniglot(root)")
    if root is None or not Path(root).expanduser().is_dir():
        raise DataError(f"Omniglot root {root} does not exist or is not a folder: {fix}")
    root = Path(root).expanduser()
    parts = []
    for origin, folder in PARTS:
        z, d = root / f"{folder}.zip", root / folder
        if z.is_file():
            parts.append(_Part(origin, folder, z, True))
        elif d.is_dir():
            parts.append(_Part(origin, folder, d, False))
        else:
            raise DataError(f"Omniglot root {root} has neither {folder}.zip nor {folder}/: {fix}")
    return parts


def _inputs(part: _Part) -> List[Tuple[str, Path]]:
    """The files the cache key depends on: the zip, or every PNG of an extracted folder."""
    if part.is_zip:
        return [(part.path.name, part.path)]
    found = []
    for dirpath, dirnames, filenames in os.walk(part.path):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(".png"):
                p = Path(dirpath) / name
                found.append((p.relative_to(part.path.parent).as_posix(), p))
    return found


def _list_part(part: _Part) -> Dict[str, List[str]]:
    """{"alphabet/character": its 20 member names in drawer order}, layout checked."""
    if part.is_zip:
        try:
            with zipfile.ZipFile(part.path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{part.path} is not a readable zip file ({e}): it is corrupt or "
                            f"truncated; delete it and download it again "
                            f"(imaml_fast.data.download_omniglot)") from e
    else:
        names = [rel for rel, _ in _inputs(part)]
    where = part.path.name
    drawers: Dict[str, Dict[int, str]] = {}
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if name.endswith("/") or base.startswith(".") or "__MACOSX/" in name \
                or not base.lower().endswith(".png"):
            continue
        m = _PNG.match(name)
        if m is None or m.group(1) != part.folder:
            raise DataError(f"{where} holds {name!r}, but Omniglot's layout is "
                            f"{_LAYOUT.replace('<part>', part.folder)}: is this the right "
                            f"{part.folder} (a zip of the folder itself, not of its contents)?")
        k, drawer = f"{m.group(2)}/{m.group(3)}", int(m.group(5))
        if drawer in drawers.setdefault(k, {}):
            raise DataError(f"{where}: character {k} has drawer {drawer} twice "
                            f"({drawers[k][drawer]!r} and {name!r}): keep one")
        drawers[k][drawer] = name
    if not drawers:
        raise DataError(f"{where} holds no Omniglot images: expected "
                        f"{_LAYOUT.replace('<part>', part.folder)}")
    listing = {}
    for k, d in drawers.items():
        if sorted(d) != list(range(1, N_DRAWERS + 1)):
            raise DataError(f"{where}: character {k} has {len(d)} drawers {sorted(d)}, but every "
                            f"Omniglot character has exactly {N_DRAWERS} (files <id>_01.png .. "
                            f"<id>_{N_DRAWERS}.png): the data is incomplete; re-download it")
        listing[k] = [d[i] for i in range(1, N_DRAWERS + 1)]
    return listing


def _read_members(part: _Part, members: List[str]) -> List[bytes]:
    if not part.is_zip:
        return [(part.path.parent / m).read_bytes() for m in members]
    try:
        with zipfile.ZipFile(part.path) as zf:
            return [zf.read(m) for m in members]
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise DataError(f"{part.path} is corrupt ({type(e).__name__}: {e}): delete it and "
                        f"download it again (imaml_fast.data.download_omniglot)") from e


def _check_counts(keys: Sequence[str], origins: Sequence[str], strict: bool) -> None:
    if not strict:
        return
    for origin, (n_alpha, n_char) in FULL_SIZES.items():
        chars = [k for k, o in zip(keys, origins) if o == origin]
        alphas = {k.split("/", 1)[0] for k in chars}
        if (len(alphas), len(chars)) != (n_alpha, n_char):
            raise DataError(f"images_{origin} has {len(alphas)} alphabets and {len(chars)} "
                            f"characters, but Omniglot's has {n_alpha} and {n_char}: the data "
                            f"is incomplete or not Omniglot; re-download it "
                            f"(imaml_fast.data.download_omniglot), or pass strict=False to use "
                            f"a subset")
