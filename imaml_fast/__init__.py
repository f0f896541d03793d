"""imaml_fast: implicit-gradient meta-learning (iMAML) for many tasks at once.

Importing this package never initialises CUDA and never imports a compiled or Triton module;
those load on the path that needs them.
"""
from .backends import backend_info
from .cg import (CG_CONVERGED, CG_MAX_ITER, CG_NEGATIVE_CURVATURE, CG_NONFINITE, CGResult,
                 cg_solve)
from .config import IMAMLConfig
from .functional import FunctionalModel
from .hvp import BatchedHVP
from .implicit import MetaGradient, meta_gradient
from .trainer import IMAML, MetaStepStats

__version__ = "0.1.0"

__all__ = [
    "IMAMLConfig", "meta_gradient", "MetaGradient", "IMAML", "MetaStepStats", "cg_solve",
    "CGResult", "CG_MAX_ITER", "CG_CONVERGED", "CG_NEGATIVE_CURVATURE", "CG_NONFINITE",
    "BatchedHVP", "FunctionalModel", "backend_info", "__version__",
]
