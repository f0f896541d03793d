"""The Omniglot meta-train / meta-test split, shipped as data: omniglot_split.json.

1,200 meta-train and 423 meta-test characters out of the 1,623, as in MAML and iMAML. The
split is a file in the package, not a random draw at run time, so every run, machine and
library version trains and tests on exactly the same characters. (The iMAML authors' code drew
its split twice with two different seeds, for training and for testing, and so trained on 310
of its 423 test characters; loading one shipped file makes that impossible.)

How the file was made (make_omniglot_split, reproducible forever, no RNG involved): list the
1,623 "alphabet/character" keys, rank them by sha256(f"imaml_fast-omniglot-split:{seed}:{key}")
with seed 0, and take the 423 lowest as meta-test. Characters of both Omniglot parts
(background and evaluation alphabets) land on both sides, as in MAML's random split.
Regenerate it (the tests check that the shipped file matches) with

    python -m imaml_fast.data.split ../shared/data/omniglot   # a folder with the two zips
"""
from __future__ import annotations

import hashlib
import json
import sys
from importlib import resources
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple

from .errors import DataError

N_TRAIN, N_TEST, SPLIT_SEED = 1200, 423, 0
SPLIT_FILE = "omniglot_split.json"


class OmniglotSplit(NamedTuple):
    train: Tuple[str, ...]   # sorted "alphabet/character" keys
    test: Tuple[str, ...]


def keys_digest(keys: Sequence[str]) -> str:
    """sha256 of the sorted keys, one per line: identifies the character set a split covers."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def make_omniglot_split(keys: Sequence[str], n_test: int = N_TEST, seed: int = SPLIT_SEED) -> dict:
    """The split as the JSON-ready dict that omniglot_split.json holds."""
    keys = list(keys)
    if len(set(keys)) != len(keys):
        raise ValueError("keys holds duplicates: pass each 'alphabet/character' key once")
    keys = sorted(keys)
    if isinstance(n_test, bool) or not isinstance(n_test, int) or not 0 < n_test < len(keys):
        raise ValueError(f"n_test={n_test} is invalid for {len(keys)} characters: expected "
                         f"0 < n_test < {len(keys)}")

    def rank(k: str) -> str:
        return hashlib.sha256(f"imaml_fast-omniglot-split:{seed}:{k}".encode()).hexdigest()

    test = sorted(sorted(keys, key=rank)[:n_test])
    test_set = set(test)
    return {
        "description": "Omniglot meta-train/meta-test split of imaml_fast: the n_test characters "
                       "with the lowest sha256('imaml_fast-omniglot-split:<seed>:<key>')",
        "seed": seed, "n_characters": len(keys), "characters_sha256": keys_digest(keys),
        "n_train": len(keys) - n_test, "n_test": n_test,
        "train": [k for k in keys if k not in test_set], "test": test,
    }


def omniglot_split(path: Optional[Path] = None) -> OmniglotSplit:
    """Load the shipped split (or the one at `path`), checked: disjoint, sorted, the promised
    sizes, and covering the character set it was made from."""
    try:
        text = (Path(path).read_text(encoding="utf-8") if path is not None else
                resources.files(__package__).joinpath(SPLIT_FILE).read_text(encoding="utf-8"))
        raw = json.loads(text)
        train, test = tuple(raw["train"]), tuple(raw["test"])
        ok = (len(train) == raw["n_train"] and len(test) == raw["n_test"]
              and not set(train) & set(test) and list(train) == sorted(set(train))
              and list(test) == sorted(set(test))
              and keys_digest(train + test) == raw["characters_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"the Omniglot split file {path or SPLIT_FILE} cannot be read ({e}): "
                        f"reinstall imaml_fast, or regenerate it with "
                        f"python -m imaml_fast.data.split <omniglot root>") from e
    if not ok:
        raise DataError(f"the Omniglot split file {path or SPLIT_FILE} is inconsistent (sizes, "
                        f"overlap or coverage): regenerate it with "
                        f"python -m imaml_fast.data.split <omniglot root>")
    return OmniglotSplit(train, test)


def write_omniglot_split(root, path: Optional[Path] = None) -> Path:
    """Regenerate the split file from the character listing under `root` (nothing decoded)."""
    from .omniglot import omniglot_characters

    keys, _ = omniglot_characters(root, strict=True)
    path = Path(path) if path is not None else Path(__file__).with_name(SPLIT_FILE)
    path.write_text(json.dumps(make_omniglot_split(keys), indent=1) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m imaml_fast.data.split <omniglot root with the two zips>")
    print(write_omniglot_split(sys.argv[1]))
