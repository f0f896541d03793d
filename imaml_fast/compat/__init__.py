"""Drop-in layers for other iMAML implementations' APIs.

imaml_dev: the iMAML authors' `implicit_maml` package (Rajeswaran et al., 2019), reproducing
their numerics (CG operator (1 + c) v + H v / (lam + 10), no proximal term unless asked for) with
a faster structure and a batched meta-gradient call on imaml_fast.

install_aliases() registers `implicit_maml`, `implicit_maml.learner_model`,
`implicit_maml.utils` and `implicit_maml.dataset` in sys.modules, so unchanged scripts import
these modules and pickles that reference the authors' classes load. Nothing is registered on
import; remove_aliases() undoes it.
"""
from __future__ import annotations

import sys
from typing import List

__all__ = ["install_aliases", "remove_aliases", "ALIASES"]

ALIASES = {
    "implicit_maml": "imaml_fast.compat.imaml_dev",
    "implicit_maml.learner_model": "imaml_fast.compat.imaml_dev.learner_model",
    "implicit_maml.utils": "imaml_fast.compat.imaml_dev.utils",
    "implicit_maml.dataset": "imaml_fast.compat.imaml_dev.dataset",
}


def install_aliases(force: bool = False) -> List[str]:
    """Point the `implicit_maml` module names at imaml_fast.compat.imaml_dev. Idempotent.
    If another `implicit_maml` (the authors' own package) is already imported, raises
    RuntimeError unless force=True, which replaces it in sys.modules. Returns the names set."""
    import importlib

    targets = {name: importlib.import_module(target) for name, target in ALIASES.items()}
    foreign = [n for n, m in targets.items() if sys.modules.get(n, m) is not m]
    if foreign and not force:
        raise RuntimeError(f"{', '.join(foreign)} already imported from "
                           f"{getattr(sys.modules[foreign[0]], '__file__', '?')}; "
                           f"install_aliases(force=True) replaces them in sys.modules")
    sys.modules.update(targets)
    return list(targets)


def remove_aliases() -> List[str]:
    """Remove the sys.modules entries install_aliases() made (others are left alone).
    Returns the names removed."""
    import importlib

    removed = []
    for name, target in ALIASES.items():
        if name in sys.modules and sys.modules[name] is importlib.import_module(target):
            del sys.modules[name]
            removed.append(name)
    return removed
