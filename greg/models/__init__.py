"""The model zoo: ``create(name, num_classes, **kw)``, external and run checkpoints.

Every model implements ``forward == head(features)``, ``features == pool(feature_map)`` (``base.py``).
Importing this package registers all models in ``MODELS``.
"""

from greg.models import densenet, densenet121, resnet, small_cnn, wrn  # noqa: F401  (registers models)
from greg.models._registry import MODELS
from greg.models.base import FeatureModel
from greg.models.checkpoints import (
    FORMAT,
    MAX_MODEL_BYTES,
    CheckpointError,
    check_described_model,
    check_model_size,
    create,
    load_checkpoint,
    load_pretrained,
    map_pretrained_keys,
    model_bytes,
    read_checkpoint,
    save_checkpoint,
)
from greg.models.densenet import DenseNetBC
from greg.models.densenet121 import DenseNet121
from greg.models.resnet import ResNet
from greg.models.small_cnn import SmallCNN
from greg.models.wrn import WideResNet


def names() -> list[str]:
    """Registered model names."""
    return MODELS.names()


__all__ = [
    "FORMAT",
    "MAX_MODEL_BYTES",
    "MODELS",
    "CheckpointError",
    "DenseNet121",
    "DenseNetBC",
    "FeatureModel",
    "ResNet",
    "SmallCNN",
    "WideResNet",
    "check_described_model",
    "check_model_size",
    "create",
    "load_checkpoint",
    "load_pretrained",
    "map_pretrained_keys",
    "model_bytes",
    "names",
    "read_checkpoint",
    "save_checkpoint",
]
