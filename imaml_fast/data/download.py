"""Fetch and verify the two Omniglot zips of the dataset's own distribution.

The files are python/images_background.zip and python/images_evaluation.zip of the
brendenlake/omniglot GitHub repository; their sha256 are pinned below, and a file is only put
in place (atomically: downloaded beside its final name, verified, then renamed) when its
checksum matches. Nothing here runs at import and nothing else touches the network.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Dict

from .errors import ChecksumError, DataError

_BASE = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
OMNIGLOT_FILES = ("images_background.zip", "images_evaluation.zip")
OMNIGLOT_URLS = {name: _BASE + name for name in OMNIGLOT_FILES}
OMNIGLOT_SHA256 = {
    "images_background.zip": "a7f4efadbbbcfc74263406e08d62d994c0e9715793c775d578de551f12095bb4",
    "images_evaluation.zip": "849838e661013c583ac8ab745b326b358aa6014372016e071917ab3e1299882d",
}


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Copy `url` to the file `dest`. The one function that touches the network."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f)


def verify_file(path, expected_sha256: str) -> str:
    """Raise ChecksumError unless sha256(path) == expected_sha256; return the digest."""
    got = sha256_file(path)
    if got != expected_sha256:
        raise ChecksumError(f"{path} has sha256 {got}, but the published file has "
                            f"{expected_sha256}: it is corrupt, truncated or a different file; "
                            f"delete it and download it again (download_omniglot)")
    return got


def verify_omniglot(root) -> Dict[str, str]:
    """Check both zips under `root` against the published sha256; return {name: sha256}.
    Raises DataError for a missing file and ChecksumError for a mismatch."""
    root = Path(root).expanduser()
    out = {}
    for name in OMNIGLOT_FILES:
        path = root / name
        if not path.is_file():
            raise DataError(f"{path} does not exist: download it with "
                            f"download_omniglot({str(root)!r}) or from {OMNIGLOT_URLS[name]}")
        out[name] = verify_file(path, OMNIGLOT_SHA256[name])
    return out


def download_omniglot(root, *, force: bool = False, timeout: float = 60.0) -> Path:
    """Put both Omniglot zips in `root` (created if needed), verified; return root.

    A zip already there with the right checksum is kept (force=True downloads it again); one
    with a wrong checksum is replaced. Without network access this raises DataError saying
    which files to fetch by hand and where to put them; a download whose checksum does not
    match raises ChecksumError and leaves nothing behind.
    """
    root = Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the Omniglot root {root}: {e}; pass a writable "
                        f"folder") from e
    for name in OMNIGLOT_FILES:
        path, url = root / name, OMNIGLOT_URLS[name]
        if not force and path.is_file() and sha256_file(path) == OMNIGLOT_SHA256[name]:
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=root)
        os.close(fd)
        try:
            try:
                _fetch(url, Path(tmp), timeout)
            except OSError as e:  # URLError, timeouts and refused connections are OSErrors
                manual = " and ".join(OMNIGLOT_URLS.values())
                raise DataError(f"could not download {url} ({e}). Without internet access, "
                                f"download {manual} on another machine and put "
                                f"{' and '.join(OMNIGLOT_FILES)} in {root}") from e
            got = sha256_file(tmp)
            if got != OMNIGLOT_SHA256[name]:
                raise ChecksumError(f"the download of {url} has sha256 {got}, but the published "
                                    f"file has {OMNIGLOT_SHA256[name]}: the transfer was "
                                    f"corrupted or a proxy altered it; try again, or fetch the "
                                    f"file by hand and put it in {root}")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return root
