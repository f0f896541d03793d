"""The real Omniglot copy (../shared/data/omniglot from the repository root), decoded once per
session, and the shipped meta-train / meta-test split. These run in CI: they never skip."""
import json
import zipfile
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image

import imaml_fast.data.decode as decode_mod
from _data_helpers import REAL_OMNIGLOT, real_omniglot
from imaml_fast.data import (load_omniglot, make_omniglot_split, omniglot_characters,
                             omniglot_split, verify_omniglot)


@pytest.fixture(scope="session")
def omniglot(tmp_path_factory):
    return real_omniglot(tmp_path_factory)[0]


def test_real_data_is_present_and_verified():
    assert REAL_OMNIGLOT.is_dir(), f"the real Omniglot copy must be at {REAL_OMNIGLOT}"
    assert set(verify_omniglot(REAL_OMNIGLOT)) == {"images_background.zip",
                                                   "images_evaluation.zip"}


def test_counts_shape_dtype(omniglot):
    assert omniglot.n_characters == 1623 and omniglot.n_images == 32_460
    assert omniglot.images.shape == (1623, 20, 28, 28) and omniglot.images.dtype == torch.uint8
    assert list(omniglot.keys) == sorted(set(omniglot.keys))
    for origin, (n_alpha, n_char) in {"background": (30, 964), "evaluation": (20, 659)}.items():
        keys = [k for k, o in zip(omniglot.keys, omniglot.origins) if o == origin]
        assert len(keys) == n_char and len({k.split("/")[0] for k in keys}) == n_alpha
    # every zip holds exactly 20 drawers of each of its characters: count the PNGs themselves
    n_png = 0
    for name in ("images_background.zip", "images_evaluation.zip"):
        with zipfile.ZipFile(REAL_OMNIGLOT / name) as zf:
            n_png += sum(n.endswith(".png") for n in zf.namelist())
    assert n_png == 32_460
    assert omniglot.cache_status == "built"


def _independent(zip_name, member):
    """PIL decode + grey + LANCZOS resize of one PNG read from the zip, then 255 - x."""
    with zipfile.ZipFile(REAL_OMNIGLOT / zip_name) as zf, zf.open(member) as f:
        grey = Image.open(f).convert("L").resize((28, 28), Image.LANCZOS)
    return 255 - torch.from_numpy(np.asarray(grey).copy())


@pytest.mark.parametrize("zip_name,key,drawer", [
    ("images_background.zip", "Tifinagh/character50", 17),
    ("images_background.zip", "Alphabet_of_the_Magi/character01", 1),
    ("images_evaluation.zip", "Tibetan/character29", 11),
    ("images_evaluation.zip", "ULOG/character26", 20),
])
def test_one_image_equals_an_independent_decode(omniglot, zip_name, key, drawer):
    with zipfile.ZipFile(REAL_OMNIGLOT / zip_name) as zf:
        part = zip_name[:-4]
        member, = [n for n in zf.namelist()
                   if n.startswith(f"{part}/{key}/") and n.endswith(f"_{drawer:02d}.png")]
    got = omniglot.images[omniglot.keys.index(key), drawer - 1]
    assert torch.equal(got, _independent(zip_name, member))
    # pixel convention: 0 = paper (the corners), 255 = full ink, anti-aliased grey between
    assert got[0, 0] == 0 and got.max() == 255 and ((got > 0) & (got < 255)).any()


def test_ink_is_the_minority(omniglot):
    mean = omniglot.images.float().mean() / 255
    assert 0.03 < mean < 0.2  # strokes cover a small part of the page: 1 = ink, not paper


def test_second_load_hits_the_cache_and_never_decodes(tmp_path_factory, monkeypatch):
    data, cache_dir = real_omniglot(tmp_path_factory)

    def no(*a, **k):
        raise AssertionError("a cache hit must not decode or open the zips")

    monkeypatch.setattr(decode_mod, "decode_image", no)
    monkeypatch.setattr(zipfile, "ZipFile", no)
    again = load_omniglot(REAL_OMNIGLOT, cache_dir=cache_dir)
    assert again.cache_status == "hit" and again.cache_path == data.cache_path
    assert torch.equal(again.images, data.images) and again.keys == data.keys


def test_shipped_split_matches_the_code_that_generates_it():
    keys, _ = omniglot_characters(REAL_OMNIGLOT)
    shipped = json.loads(resources.files("imaml_fast.data").joinpath(
        "omniglot_split.json").read_text(encoding="utf-8"))
    assert shipped == make_omniglot_split(keys)


def test_split_is_disjoint_covers_everything_and_is_stable(omniglot):
    s = omniglot_split()
    train, test = set(s.train), set(s.test)
    assert len(train) == 1200 and len(test) == 423
    assert not train & test
    assert train | test == set(omniglot.keys)
    assert omniglot_split() == s
    # both Omniglot parts are represented on both sides of a random character split
    origin = dict(zip(omniglot.keys, omniglot.origins))
    assert {origin[k] for k in test} == {origin[k] for k in train} == {"background", "evaluation"}


def test_split_classes_hold_the_right_images(omniglot):
    tr, te = omniglot.split()
    assert tr.names == omniglot_split().train and te.names == omniglot_split().test
    assert tr.images.shape == (1200 * 20, 1, 28, 28) and te.images.shape == (423 * 20, 1, 28, 28)
    for classes in (tr, te):
        for c in (0, 137, classes.n_classes - 1):
            row = omniglot.keys.index(classes.names[c])
            assert torch.equal(classes.class_images(c)[:, 0], omniglot.images[row])


def test_split_generation_is_deterministic_and_rejects_bad_input():
    keys = [f"A/character{i:02d}" for i in range(1, 31)]
    a, b = make_omniglot_split(keys, n_test=7), make_omniglot_split(list(reversed(keys)), n_test=7)
    assert a == b and len(a["test"]) == 7 and set(a["train"]) | set(a["test"]) == set(keys)
    assert make_omniglot_split(keys, n_test=7, seed=1)["test"] != a["test"]
    with pytest.raises(ValueError, match="n_test"):
        make_omniglot_split(keys, n_test=30)
    with pytest.raises(ValueError, match="duplicates"):
        make_omniglot_split(keys + keys[:1], n_test=3)


def test_a_tampered_split_file_is_refused(tmp_path):
    raw = json.loads(resources.files("imaml_fast.data").joinpath(
        "omniglot_split.json").read_text(encoding="utf-8"))
    raw["train"] = raw["train"][:-1] + raw["test"][:1]  # leak one test character into training
    path = tmp_path / "split.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="inconsistent"):
        omniglot_split(path)
