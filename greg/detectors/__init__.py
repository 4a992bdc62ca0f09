"""Post-hoc OOD detectors (``DETECTORS`` registry); interface in :mod:`greg.detectors.base`.

``greg.detectors.create("react", percentile=90)``; every score is oriented higher = more OOD.
"""

from __future__ import annotations

from typing import Any

from greg.detectors.base import DETECTORS, Detector, FeatureDetector, collect_features
from greg.registry import import_package_modules

import_package_modules(__name__, __path__)  # each detector module registers itself
from greg.detectors.dice import DICE
from greg.detectors.line import LINe
from greg.detectors.logit import MSP, AbsentClass, Energy, MaxLogit
from greg.detectors.mahalanobis import Mahalanobis
from greg.detectors.odin import ODIN
from greg.detectors.rankfeat import RankFeat, remove_rank1
from greg.detectors.react import ReAct


def create(name: str, **kwargs: Any) -> Detector:
    """Instantiate a registered detector; unknown keyword arguments fail with the detector's name."""
    factory = DETECTORS.get(name)
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise TypeError(f"detector {name!r}: bad arguments {sorted(kwargs)}: {e}") from e


def names() -> list[str]:
    return DETECTORS.names()


__all__ = [
    "DETECTORS",
    "DICE",
    "MSP",
    "ODIN",
    "AbsentClass",
    "Detector",
    "Energy",
    "FeatureDetector",
    "LINe",
    "Mahalanobis",
    "MaxLogit",
    "RankFeat",
    "ReAct",
    "collect_features",
    "create",
    "names",
    "remove_rank1",
]
