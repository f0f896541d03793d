"""Drop-in replacement for the iMAML authors' `implicit_maml` package (modules learner_model,
utils, dataset), built on imaml_fast. Import it directly,

    from imaml_fast.compat.imaml_dev import learner_model, utils, dataset

or call imaml_fast.compat.install_aliases() so that unchanged scripts' `import implicit_maml...`
and their pickled task definitions and agents resolve to these modules. Each module's
docstring lists where it departs from the authors' code and from the paper.
"""
from . import dataset, learner_model, utils

__all__ = ["learner_model", "utils", "dataset"]
