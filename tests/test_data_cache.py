"""The decode cache and every bad Omniglot input, on tiny Omniglot-layout data written here."""
import os
import zipfile

import pytest
import torch

import imaml_fast.data.cache as cache_mod
from _data_helpers import TINY, write_tiny_omniglot
from imaml_fast.data import DataError, load_omniglot


def load(root, cache_dir, **kw):
    return load_omniglot(root, cache_dir=cache_dir, strict=False, **kw)


def test_tiny_zips_and_folders_load_identically(tmp_path):
    z = load(write_tiny_omniglot(tmp_path / "zip"), tmp_path / "c1")
    f = load(write_tiny_omniglot(tmp_path / "dir", as_zip=False), tmp_path / "c2")
    assert z.keys == f.keys == ("Alpha/character01", "Alpha/character02", "Beta/character01",
                                "Gamma/character01", "Gamma/character02")
    assert z.origins == ("background",) * 3 + ("evaluation",) * 2
    assert z.images.shape == (5, 20, 28, 28) and torch.equal(z.images, f.images)
    assert z.cache_status == f.cache_status == "built"


def test_image_size_is_a_setting_with_its_own_cache(tmp_path):
    root = write_tiny_omniglot(tmp_path / "d")
    small = load(root, tmp_path / "c", image_size=14)
    big = load(root, tmp_path / "c")
    assert small.images.shape[-2:] == (14, 14) and big.images.shape[-2:] == (28, 28)
    assert small.cache_path != big.cache_path and big.cache_status == "built"
    assert load(root, tmp_path / "c", image_size=14).cache_status == "hit"


def test_cache_rebuilt_when_the_preprocess_version_changes(tmp_path, monkeypatch):
    root = write_tiny_omniglot(tmp_path / "d")
    first = load(root, tmp_path / "c")
    assert load(root, tmp_path / "c").cache_status == "hit"
    monkeypatch.setattr(cache_mod, "PREPROCESS_VERSION", cache_mod.PREPROCESS_VERSION + 1)
    again = load(root, tmp_path / "c")
    assert again.cache_status == "rebuilt_stale" and torch.equal(again.images, first.images)
    assert load(root, tmp_path / "c").cache_status == "hit"


def test_cache_rebuilt_when_an_input_changes(tmp_path):
    root = write_tiny_omniglot(tmp_path / "d")
    first = load(root, tmp_path / "c")
    write_tiny_omniglot(root, seed=1)  # same layout, other drawings: the zips change
    again = load(root, tmp_path / "c")
    assert again.cache_status == "rebuilt_stale" and not torch.equal(again.images, first.images)
    st = os.stat(root / "images_background.zip")  # a touch alone (new mtime) also invalidates
    os.utime(root / "images_background.zip", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load(root, tmp_path / "c").cache_status == "rebuilt_stale"


@pytest.mark.parametrize("garbage", [b"", b"not a torch file at all", "truncate"])
def test_corrupt_cache_is_rebuilt(tmp_path, garbage):
    root = write_tiny_omniglot(tmp_path / "d")
    first = load(root, tmp_path / "c")
    path = first.cache_path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if garbage == "truncate" else garbage)
    again = load(root, tmp_path / "c")
    assert again.cache_status == "rebuilt_corrupt" and torch.equal(again.images, first.images)
    assert load(root, tmp_path / "c").cache_status == "hit"


def test_cache_with_wrong_tensors_is_rebuilt(tmp_path):
    root = write_tiny_omniglot(tmp_path / "d")
    first = load(root, tmp_path / "c")
    payload = torch.load(first.cache_path, weights_only=True)
    payload["images"] = payload["images"][:, :19]  # right key, inconsistent content
    torch.save(payload, first.cache_path)
    assert load(root, tmp_path / "c").cache_status == "rebuilt_corrupt"


def test_atomic_write_leaves_only_the_cache_file(tmp_path, monkeypatch):
    root = write_tiny_omniglot(tmp_path / "d")
    cache_dir = tmp_path / "c"
    data = load(root, cache_dir)
    assert sorted(os.listdir(cache_dir)) == [data.cache_path.name]
    assert sorted(os.listdir(root)) == ["images_background.zip", "images_evaluation.zip"]

    def dies_midway(obj, f, *a, **k):
        f.write(b"half a cache")
        raise KeyboardInterrupt  # a killed build

    monkeypatch.setattr(cache_mod, "PREPROCESS_VERSION", 99)
    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        load(root, cache_dir)
    assert sorted(os.listdir(cache_dir)) == [data.cache_path.name]  # no temp file left
    monkeypatch.undo()
    assert load(root, cache_dir).cache_status == "hit"  # the old cache is intact


def test_default_location_is_beside_writable_data(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAML_FAST_CACHE", str(tmp_path / "user"))
    root = write_tiny_omniglot(tmp_path / "d")
    data = load_omniglot(root, strict=False)
    assert data.cache_path.parent == root and not (tmp_path / "user").exists()


def test_read_only_data_caches_in_the_user_dir(tmp_path, monkeypatch):
    user = tmp_path / "user"
    monkeypatch.setenv("IMAML_FAST_CACHE", str(user))
    root = write_tiny_omniglot(tmp_path / "d")
    os.chmod(root, 0o555)  # no write bits: read-only by intent, even for root
    try:
        data = load_omniglot(root, strict=False)
        assert data.cache_path.parent == user and data.cache_status == "built"
        assert sorted(os.listdir(root)) == ["images_background.zip", "images_evaluation.zip"]
        again = load_omniglot(root, strict=False)
        assert again.cache_status == "hit" and again.cache_path == data.cache_path
    finally:
        os.chmod(root, 0o755)


def test_unwritable_cache_dir_is_a_clear_error(tmp_path):
    root = write_tiny_omniglot(tmp_path / "d")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="cannot write the decode cache to cache_dir"):
        load(root, tmp_path / "file")


# ---- bad input: one clear DataError (a ValueError) each ----

def test_missing_root(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*download_omniglot"):
        load_omniglot(tmp_path / "nowhere")


def test_root_without_images_background(tmp_path):
    root = write_tiny_omniglot(tmp_path / "d")
    (root / "images_background.zip").unlink()
    with pytest.raises(DataError, match="neither images_background.zip nor images_background/"):
        load(root, tmp_path / "c")


def test_corrupt_zip(tmp_path):
    root = write_tiny_omniglot(tmp_path / "d")
    (root / "images_evaluation.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DataError, match="images_evaluation.zip is not a readable zip"):
        load(root, tmp_path / "c")


def test_zip_with_damaged_member_data(tmp_path):
    root = write_tiny_omniglot(tmp_path / "d")
    path = root / "images_background.zip"
    with zipfile.ZipFile(path) as zf:
        info = [i for i in zf.infolist() if i.filename.endswith(".png")][3]
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 40: start + 48] = b"\x00" * 8  # the listing is fine, the CRC check is not
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="images_background.zip is corrupt"):
        load(root, tmp_path / "c")


def test_zip_of_the_contents_instead_of_the_folder(tmp_path):
    root = write_tiny_omniglot(tmp_path / "d", prefix="Omniglot")
    with pytest.raises(DataError, match=r"holds 'Omniglot/Alpha/.*images_background/<alphabet>"):
        load(root, tmp_path / "c")


def test_wrong_number_of_characters_with_strict(tmp_path):
    root = write_tiny_omniglot(tmp_path / "d")
    with pytest.raises(DataError, match="2 alphabets and 3 characters.*30 and 964.*strict=False"):
        load_omniglot(root, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before decoding anything


@pytest.mark.parametrize("drawers", [range(1, 20), list(range(1, 20)) + [21]])
def test_wrong_drawers(tmp_path, drawers):
    root = write_tiny_omniglot(tmp_path / "d", drawers=drawers)
    with pytest.raises(DataError, match="has 19|has 20 drawers.*exactly 20"):
        load(root, tmp_path / "c")


def test_character_in_both_parts(tmp_path):
    root = write_tiny_omniglot(tmp_path / "d", layout={"background": {"Alpha": 1},
                                                       "evaluation": {"Alpha": 1}})
    with pytest.raises(DataError, match="Alpha/character01 is in both"):
        load(root, tmp_path / "c")


def test_undecodable_png(tmp_path):
    root = write_tiny_omniglot(tmp_path / "d", as_zip=False)
    bad = sorted((root / "images_evaluation" / "Gamma" / "character02").iterdir())[5]
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=f"cannot decode .*{bad.name}.*corrupt"):
        load(root, tmp_path / "c")


def test_split_refuses_a_subset(tmp_path):
    data = load(write_tiny_omniglot(tmp_path / "d", layout=TINY), tmp_path / "c")
    with pytest.raises(DataError, match="5 characters.*1623"):
        data.split()
    assert data.classes(["Gamma/character02"]).n_images == 20
    with pytest.raises(ValueError, match="not in this Omniglot copy"):
        data.classes(["Gamma/character09"])
