"""Hessian alignment for domain generalization (Hemati et al., ICCV 2023) and DomainBed-style baselines.

- ``algorithms``: ``DG_ALGORITHMS`` registry (erm, oracle, irm, vrex, fishr, coral, hgp, hutchinson),
  each with ``update(minibatches) -> dict`` and ``predict(x)``;
- ``hparams_registry``: ``default_hparams(algorithm, dataset)``, ``random_hparams(algorithm, dataset, seed)``;
- ``datasets``: ``DG_DATASETS`` (colored_mnist, colored_digits and their ``_ls`` label-shift variants);
- ``penalties``: pure penalty functions; ``train``: one restart; ``cli``: ``greg dg run|table``.
See docs/DG.md.
"""

from greg.dg.algorithms import DG_ALGORITHMS, Algorithm
from greg.dg.datasets import DG_DATASETS
from greg.dg.hparams_registry import default_hparams, random_hparams

__all__ = ["DG_ALGORITHMS", "DG_DATASETS", "Algorithm", "default_hparams", "random_hparams"]
