"""Thin adapters that run imaml_fast and its peers (TorchOpt, betty, higher) as installed
packages behind one interface: impl(xs, ys, xq, yq) -> peers.common.Result.

A peer that is not installed is skipped with a message saying how to install it.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import betty_imaml, higher_maml, imaml_fast_impl, torchopt_imaml
from .common import Impl, Settings

DEFAULT = imaml_fast_impl.DEFAULT
UNCAPTURED = imaml_fast_impl.UNCAPTURED
# name -> (module, build kwargs, computes the iMAML meta-gradient)
PEERS = {
    "TorchOpt normal_cg": (torchopt_imaml, {"solver": "normal_cg"}, True),
    "TorchOpt cg": (torchopt_imaml, {"solver": "cg"}, True),
    "betty cg": (betty_imaml, {}, True),
    "higher unrolled MAML": (higher_maml, {}, False),
}


def implementations(model: torch.nn.Module, loss_fn: Callable, s: Settings,
                    names: Optional[Sequence[str]] = None, unrolled: bool = False,
                    log: Callable[[str], None] = print) -> Tuple[Dict[str, Impl], List[str]]:
    """Build every implementation that runs here ({name: impl}) and the skip messages.

    names: only these (default: imaml_fast's variants and every iMAML peer);
    unrolled: also the unrolled MAML yardstick (it computes a different quantity)."""
    variants, skipped = imaml_fast_impl.variants(model_device(model), model_dtype(model))
    impls: Dict[str, Impl] = {}
    for name, overrides in variants:
        if names is None or name in names:
            impls[name] = imaml_fast_impl.build(model, loss_fn, s, **overrides)
    for name, (module, kwargs, is_imaml) in PEERS.items():
        if names is not None and name not in names:
            continue
        if names is None and not is_imaml and not unrolled:
            continue
        why = module.why_not()
        if why:
            skipped.append(f"{name} skipped: {why}")
            continue
        impls[name] = module.build(model, loss_fn, s, **kwargs)
    for msg in skipped:
        log(msg)
    return impls, skipped


def model_device(model):
    return next(model.parameters()).device


def model_dtype(model):
    return next(model.parameters()).dtype
