"""The decode cache: every image of a data set decoded and resized once, kept as one uint8
tensor file, so that training never opens an image file again.

Key. A cache file stores the key it was built for: a sha256 over PREPROCESS_VERSION, the
decode settings (image size, colour mode, ...) and, for every input file, its path relative
to the data root, its size and its modification time (os.stat; no file is read to compute the
key, so a cache hit costs one stat per input file and one torch.load). A cache whose key
differs (the inputs changed, the settings changed, or PREPROCESS_VERSION was raised because
the decoding itself changed) is stale, one that torch.load cannot read or whose tensors do not
have the promised shapes is corrupt; both are rebuilt and overwritten.

Location. An explicit cache_dir wins. Otherwise the cache goes beside the data, in the data
root, when that directory is writable; a directory with no write bits counts as read-only even
for root, so a shared read-only copy of the data is never written to. Else it goes to the user
cache directory ($IMAML_FAST_CACHE if set, else ~/.cache/imaml_fast), under a name that
includes a hash of the data root's absolute path, so two copies of a data set never overwrite
each other's cache.

Writes are atomic: the payload goes to a temporary file in the target directory, is flushed
to disk and then os.replace()d over the cache file, so a reader never sees a half-written
cache and a killed build leaves no temporary file behind (it is removed on any error).
Two processes building at once both write complete files; the last rename wins.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, List, Tuple

import torch

from .errors import DataError

# Raise whenever decoding changes (resampling, colour handling, pixel convention, payload
# layout): every cache built by an older version is then stale and rebuilt.
PREPROCESS_VERSION = 1
CACHE_ENV = "IMAML_FAST_CACHE"
_FORMAT = "imaml_fast.decode_cache"

# What load_or_build did: found a valid cache, built one where none was, or replaced one.
HIT, BUILT, REBUILT_STALE, REBUILT_CORRUPT = "hit", "built", "rebuilt_stale", "rebuilt_corrupt"


def user_cache_dir() -> Path:
    """$IMAML_FAST_CACHE if set, else ~/.cache/imaml_fast."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "imaml_fast"


def fingerprint(kind: str, settings: dict, files: Iterable[Tuple[str, Path]]) -> str:
    """The cache key: sha256 of PREPROCESS_VERSION, `kind`, `settings` (JSON-serialisable) and
    (relative name, size, mtime_ns) of every input file, in the order given."""
    h = hashlib.sha256()
    head = {"format": _FORMAT, "version": PREPROCESS_VERSION, "kind": kind, "settings": settings}
    h.update(json.dumps(head, sort_keys=True).encode())
    for rel, path in files:
        st = os.stat(path)
        h.update(f"\n{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_candidates(data_root: Path, filename: str, cache_dir=None) -> List[Path]:
    """Where a cache for `data_root` may live, in the order they are tried."""
    if cache_dir is not None:
        return [Path(cache_dir).expanduser() / filename]
    tag = hashlib.sha256(str(Path(data_root).resolve()).encode()).hexdigest()[:12]
    stem, dot, ext = filename.rpartition(".")
    return [Path(data_root) / filename, user_cache_dir() / f"{stem}-{tag}{dot}{ext}"]


def dir_writable(path: Path) -> bool:
    """True if `path` is a directory we may write to. A directory without any write bit is
    read-only by intent, so it is refused even where root could write to it anyway."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    if not stat.S_ISDIR(mode) or not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return False
    return os.access(path, os.W_OK)


def atomic_save(payload: dict, path: Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then os.replace over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache is as readable as the data
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read(path: Path, key: str, check: Callable[[dict], bool]):
    """(payload, None) for a valid cache with this key, else (None, why) with why one of
    None (no file), REBUILT_STALE, REBUILT_CORRUPT."""
    if not path.is_file():
        return None, None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(payload, dict) and payload.get("format") == _FORMAT
    except Exception:  # truncated, garbage, or a pickle torch refuses: all mean "corrupt"
        return None, REBUILT_CORRUPT
    if not ok:
        return None, REBUILT_CORRUPT
    if payload.get("key") != key:
        return None, REBUILT_STALE
    try:
        valid = bool(check(payload))
    except Exception:
        valid = False
    return (payload, None) if valid else (None, REBUILT_CORRUPT)


def load_or_build(candidates: List[Path], key: str, build: Callable[[], dict],
                  check: Callable[[dict], bool], explicit: bool):
    """Return (payload, cache_path or None, status) with status HIT, BUILT, REBUILT_STALE or
    REBUILT_CORRUPT. `build()` returns the payload's tensors and lists; `check(payload)` says
    whether a loaded payload is internally consistent. `explicit`: the single candidate is a
    user-given cache_dir, which is created if needed and must be writable."""
    status = BUILT
    for path in candidates:
        payload, why = _read(path, key, check)
        if payload is not None:
            return payload, path, HIT
        if why is not None and status == BUILT:
            status = why
    payload = dict(build(), format=_FORMAT, key=key, version=PREPROCESS_VERSION)
    error: object = "no writable location"
    for i, path in enumerate(candidates):
        if not explicit and i == 0 and not dir_writable(path.parent):
            continue
        try:
            atomic_save(payload, path)
            return payload, path, status
        except OSError as e:
            if explicit:
                raise DataError(f"cannot write the decode cache to cache_dir={path.parent}: {e}. "
                                f"Pass a writable cache_dir (or leave it out to use "
                                f"${CACHE_ENV} or ~/.cache/imaml_fast)") from e
            error = e
    warnings.warn(f"imaml_fast: could not write the decode cache ({error}); the images will be "
                  f"decoded again next time. Set ${CACHE_ENV} or pass cache_dir to a writable "
                  f"directory", RuntimeWarning, stacklevel=3)
    return payload, None, status
