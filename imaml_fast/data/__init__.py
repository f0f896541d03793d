"""imaml_fast.data: few-shot data sets decoded once, and episodes sampled as tensors.

    from imaml_fast.data import load_omniglot
    omniglot = load_omniglot("path/to/omniglot")     # the two zips; decodes once, then cached
    train = omniglot.sampler("train", n_way=5, k_shot=1, q_query=1, tasks=32, device="cuda")
    xs, ys, xq, yq = train.sample()                  # [32, 5, 1, 28, 28], [32, 5], ...

- load_omniglot: Omniglot from its zips or folders, uint8 [1623, 20, 28, 28] (255 = ink),
  with the shipped 1,200 / 423 character split (omniglot_split) and 90-degree rotations as
  extra meta-train classes;
- load_image_folder, load_mini_imagenet: other few-shot image sets, same cache and sampler;
- EpisodeSampler: N-way K-shot episodes for T tasks at once, on any device, resumable;
- SinusoidSampler: MAML's sinusoid regression tasks;
- download_omniglot, verify_omniglot: fetch and check the zips (sha256 pinned).

Importing this package decodes nothing, writes nothing and touches no network; Pillow is
imported only when images are decoded.
"""
from .cache import CACHE_ENV, PREPROCESS_VERSION, user_cache_dir
from .classes import ImageClasses
from .download import (OMNIGLOT_SHA256, OMNIGLOT_URLS, download_omniglot, verify_file,
                       verify_omniglot)
from .episodes import Episode, EpisodeSampler
from .errors import ChecksumError, DataError
from .folders import load_image_folder, load_mini_imagenet
from .omniglot import Omniglot, load_omniglot, omniglot_characters
from .sinusoid import SinusoidEpisode, SinusoidSampler
from .split import OmniglotSplit, make_omniglot_split, omniglot_split, write_omniglot_split

__all__ = [
    "load_omniglot", "Omniglot", "omniglot_characters", "omniglot_split", "OmniglotSplit",
    "make_omniglot_split", "write_omniglot_split", "download_omniglot", "verify_omniglot",
    "verify_file", "OMNIGLOT_URLS", "OMNIGLOT_SHA256", "load_image_folder",
    "load_mini_imagenet", "ImageClasses", "EpisodeSampler", "Episode", "SinusoidSampler",
    "SinusoidEpisode", "DataError", "ChecksumError", "PREPROCESS_VERSION", "CACHE_ENV",
    "user_cache_dir",
]
