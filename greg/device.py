"""Device selection shared by every ``greg`` command (``--device``)."""

from __future__ import annotations

import torch

from greg.errors import InputError

DEVICE_HELP = "auto (CUDA if available, else CPU), cpu, cuda or cuda:N"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU; a CUDA device on a machine without CUDA is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    return dev
