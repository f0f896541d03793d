"""Class-per-folder and mini-ImageNet layouts, on tiny data sets of random images written here,
through the same decode cache and EpisodeSampler as Omniglot."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from imaml_fast.data import (DataError, EpisodeSampler, load_image_folder, load_mini_imagenet)


def random_image(rng, h, w, ext):
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img if ext != ".gif" else img.convert("P")


def independent(path, size, mode="RGB"):
    with Image.open(path) as im:
        a = np.asarray(im.convert(mode).resize((size, size), Image.LANCZOS))
    return torch.from_numpy(a.copy()).reshape(size, size, -1).permute(2, 0, 1)


@pytest.fixture
def folder(tmp_path):
    """3 classes with 4, 6 and 5 images of assorted sizes and formats, plus files to ignore."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for name, n in (("zebra", 4), ("apple", 6), ("mango", 5)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            ext = (".png", ".JPG", ".gif")[i % 3]
            random_image(rng, 20 + i, 30 - i, ext).save(root / name / f"img{i}{ext}")
        (root / name / "notes.txt").write_text("not an image")
        (root / name / ".hidden.png").write_bytes(b"ignored")
    (root / "README.md").write_text("top-level files are not classes")
    (root / ".cache").mkdir()
    return root


def test_class_folder_loads_every_image_like_an_independent_decode(folder, tmp_path):
    data = load_image_folder(folder, 16, cache_dir=tmp_path / "c")
    assert data.names == ("apple", "mango", "zebra")
    assert data.counts.tolist() == [6, 5, 4]
    assert data.images.shape == (15, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.sources[:2] == ("apple/img0.png", "apple/img1.JPG")
    for i, src in enumerate(data.sources):
        assert torch.equal(data.images[i], independent(folder / src, 16)), src
    assert data.cache_status == "built"
    again = load_image_folder(folder, 16, cache_dir=tmp_path / "c")
    assert again.cache_status == "hit" and torch.equal(again.images, data.images)
    grey = load_image_folder(folder, (8, 12), mode="L", cache_dir=tmp_path / "c")
    assert grey.images.shape == (15, 1, 8, 12) and grey.cache_status == "built"


def test_class_folder_cache_beside_the_data_and_rebuilt_on_change(folder, tmp_path):
    data = load_image_folder(folder, 8)
    assert data.cache_path.parent == folder and data.cache_status == "built"
    assert load_image_folder(folder, 8).n_classes == 3  # the cache file is not a class
    Image.new("RGB", (9, 9)).save(folder / "apple" / "new.png")
    again = load_image_folder(folder, 8)
    assert again.cache_status == "rebuilt_stale" and again.counts.tolist() == [7, 5, 4]


def test_class_folder_episodes_come_from_their_own_class(folder, tmp_path):
    data = load_image_folder(folder, 8, cache_dir=tmp_path / "c")
    s = EpisodeSampler(data, 3, 2, 2, 20, seed=0)
    ep = s.sample()
    assert ep.x_support.shape == (20, 6, 3, 8, 8) and ep.x_query.shape == (20, 6, 3, 8, 8)
    owner = torch.repeat_interleave(torch.arange(3), data.counts)
    assert torch.equal(owner[ep.support_ids], ep.classes.repeat_interleave(2, dim=1))
    assert torch.equal(owner[ep.query_ids], ep.classes.repeat_interleave(2, dim=1))
    assert torch.equal(ep.x_query, data.images[ep.query_ids].float() / 255)
    with pytest.raises(ValueError, match="fewer than k_shot"):
        EpisodeSampler(data, 3, 3, 2, 1)  # zebra has only 4 images
    small = data.subset(["apple", "mango"])
    assert small.names == ("apple", "mango") and small.counts.tolist() == [6, 5]
    assert torch.equal(small.class_images("mango"), data.class_images("mango"))
    assert EpisodeSampler(small, 2, 3, 2, 1).sample().x_query.shape == (1, 4, 3, 8, 8)


def test_class_folder_errors(folder, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere", 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(empty, 8)
    (folder / "void").mkdir()
    with pytest.raises(DataError, match="void holds no image files"):
        load_image_folder(folder, 8)
    os.rmdir(folder / "void")
    (folder / "apple" / "img0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="cannot decode .*img0.png"):
        load_image_folder(folder, 8, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="image_size=0"):
        load_image_folder(folder, 0)
    with pytest.raises(ValueError, match="mode='CMYK'"):
        load_image_folder(folder, 8, mode="CMYK")


@pytest.fixture
def mini(tmp_path):
    """mini-ImageNet's layout: images/ and train/val/test CSVs; 3 + 2 + 2 classes of 5."""
    rng = np.random.default_rng(1)
    root = tmp_path / "mini"
    (root / "images").mkdir(parents=True)
    for split, labels in (("train", ["n02", "n01", "n03"]), ("val", ["n04", "n05"]),
                          ("test", ["n06", "n07"])):
        rows = []
        for label in labels:
            for i in range(5):
                name = f"{label}{i:08d}.jpg"
                random_image(rng, 40 + i, 50, ".jpg").save(root / "images" / name)
                rows.append(f"{name},{label}")
        rows = rows[1::2] + rows[::2]  # interleaved, as a real CSV need not be grouped
        (root / f"{split}.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    return root


def test_mini_imagenet_splits(mini, tmp_path):
    train = load_mini_imagenet(mini, "train", cache_dir=tmp_path / "c")
    assert train.names == ("n01", "n02", "n03") and train.counts.tolist() == [5, 5, 5]
    assert train.images.shape == (15, 3, 84, 84)
    rows = [line.split(",")[0] for line in (mini / "train.csv").read_text().split()[1:]]
    n01 = [r for r in rows if r.startswith("n01")]
    assert [s.split("/")[1] for s in train.sources[:5]] == n01  # CSV order within the class
    for i in (0, 7, 14):
        assert torch.equal(train.images[i], independent(mini / train.sources[i], 84))
    val = load_mini_imagenet(mini, "val", cache_dir=tmp_path / "c")
    assert val.names == ("n04", "n05") and val.cache_path != train.cache_path
    assert load_mini_imagenet(mini, "train", cache_dir=tmp_path / "c").cache_status == "hit"
    ep = EpisodeSampler(train, 3, 1, 4, 2, seed=0).sample()
    assert ep.x_support.shape == (2, 3, 3, 84, 84) and ep.x_query.shape == (2, 12, 3, 84, 84)


def test_mini_imagenet_errors(mini, tmp_path):
    with pytest.raises(ValueError, match="split='training'"):
        load_mini_imagenet(mini, "training")
    (mini / "test.csv").write_text("file,class\na.jpg,n06\n")
    with pytest.raises(DataError, match="header 'filename,label'"):
        load_mini_imagenet(mini, "test")
    (mini / "test.csv").write_text("filename,label\nmissing.jpg,n06\n")
    with pytest.raises(DataError, match="line 2: image .*missing.jpg does not exist"):
        load_mini_imagenet(mini, "test")
    (mini / "val.csv").unlink()
    with pytest.raises(DataError, match="val.csv does not exist"):
        load_mini_imagenet(mini, "val")
    with pytest.raises(DataError, match="does not exist"):
        load_mini_imagenet(tmp_path / "nowhere", "train")
