"""download_omniglot / verify_omniglot without the network: the fetch function is replaced."""
import os
import shutil
import subprocess
import sys
import urllib.error

import pytest

import imaml_fast.data as data_pkg
import imaml_fast.data.download as dl
from _data_helpers import REAL_OMNIGLOT
from imaml_fast.data import (ChecksumError, DataError, OMNIGLOT_SHA256, OMNIGLOT_URLS,
                             download_omniglot, verify_file, verify_omniglot)


@pytest.fixture
def fetched(monkeypatch):
    """Replace the network by a copy of the real zips; record every URL asked for."""
    calls = []

    def fake_fetch(url, dest, timeout):
        calls.append(url)
        shutil.copyfile(REAL_OMNIGLOT / url.rsplit("/", 1)[1], dest)

    monkeypatch.setattr(dl, "_fetch", fake_fetch)
    return calls


def test_urls_are_the_distribution_s_own():
    for name, url in OMNIGLOT_URLS.items():
        assert url.startswith("https://") and "brendenlake/omniglot" in url
        assert url.endswith(f"/python/{name}")


def test_download_verifies_and_keeps_good_files(tmp_path, fetched):
    root = download_omniglot(tmp_path / "omniglot")
    assert sorted(os.listdir(root)) == ["images_background.zip", "images_evaluation.zip"]
    assert verify_omniglot(root) == OMNIGLOT_SHA256
    assert sorted(fetched) == sorted(OMNIGLOT_URLS.values())
    download_omniglot(root)  # already there and verified: nothing is fetched
    assert len(fetched) == 2
    download_omniglot(root, force=True)
    assert len(fetched) == 4


def test_a_corrupt_local_file_is_downloaded_again(tmp_path, fetched):
    root = tmp_path / "o"
    root.mkdir()
    (root / "images_background.zip").write_bytes(b"truncated")
    shutil.copyfile(REAL_OMNIGLOT / "images_evaluation.zip", root / "images_evaluation.zip")
    download_omniglot(root)
    assert fetched == [OMNIGLOT_URLS["images_background.zip"]]
    verify_omniglot(root)


def test_a_download_with_the_wrong_checksum_is_refused_and_removed(tmp_path, monkeypatch):
    def bad_fetch(url, dest, timeout):
        dest.write_bytes(b"<html>a captive portal</html>")

    monkeypatch.setattr(dl, "_fetch", bad_fetch)
    with pytest.raises(ChecksumError, match="sha256 .* but the published file has a7f4ef"):
        download_omniglot(tmp_path / "o")
    assert os.listdir(tmp_path / "o") == []  # neither a bad zip nor a partial file


def test_offline_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    def offline(url, dest, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(dl, "_fetch", offline)
    root = tmp_path / "o"
    with pytest.raises(DataError) as info:
        download_omniglot(root)
    msg = str(info.value)
    assert "could not download" in msg and str(root) in msg
    assert all(url in msg for url in OMNIGLOT_URLS.values())
    assert "images_background.zip and images_evaluation.zip" in msg
    assert os.listdir(root) == []


def test_verify_checksum_mismatch_and_missing_file(tmp_path):
    assert verify_file(REAL_OMNIGLOT / "images_evaluation.zip",
                       OMNIGLOT_SHA256["images_evaluation.zip"]) == OMNIGLOT_SHA256[
        "images_evaluation.zip"]
    fake = tmp_path / "images_background.zip"
    fake.write_bytes(b"x" * 100)
    with pytest.raises(ChecksumError, match="images_background.zip has sha256 .*delete it"):
        verify_file(fake, OMNIGLOT_SHA256["images_background.zip"])
    with pytest.raises(ChecksumError):
        verify_omniglot(tmp_path)
    fake.unlink()
    with pytest.raises(DataError, match="images_background.zip does not exist"):
        verify_omniglot(tmp_path)
    assert issubclass(ChecksumError, DataError) and issubclass(DataError, ValueError)


def test_import_decodes_nothing_and_touches_no_network(tmp_path):
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise AssertionError('network touched at import')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "import imaml_fast.data as d\n"
        "assert 'PIL' not in sys.modules, 'Pillow imported at import time'\n"
        "missing = [n for n in d.__all__ if not hasattr(d, n)]\n"
        "assert not missing, missing\n"
    )
    env = dict(os.environ, IMAML_FAST_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == []  # nothing written, no cache made
    assert len(data_pkg.__all__) == len(set(data_pkg.__all__))
