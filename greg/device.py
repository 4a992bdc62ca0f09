"""Device selection shared by every ``greg`` command (``--device``), and the one eval-mode context."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from greg.cli import DEVICE_HELP  # noqa: F401 - re-exported
from greg.errors import InputError


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


class CudaUnavailableError(RuntimeError):
    """A GPU job without CUDA (exit 1: the environment, not the input, is wrong)."""

    exit_code = 1


def check_cuda(name: str, require: bool = False, command: str = "greg") -> None:
    """A job that runs on the CPU although a GPU was expected: with ``require`` (the workflow's GPU rules pass
    ``--require-cuda``) an error, else, under SLURM with ``--device auto``, a loud warning: a cluster job on
    a node without a usable GPU would otherwise train on the CPU until its time limit."""
    if name not in ("auto",) and not name.startswith("cuda") and not require:
        return  # an explicit --device cpu is what the user asked for
    if torch.cuda.is_available():
        return
    where = f"SLURM job {os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else "this machine"
    if require:
        raise CudaUnavailableError(
            f"--require-cuda: CUDA is not available in {where} (no GPU allocated, or a CPU-only torch "
            f"{torch.__version__}); request a GPU (resources gpu=1) or drop --require-cuda")
    if os.environ.get("SLURM_JOB_ID"):
        print(f"{command}: WARNING: running on the CPU in {where}: CUDA is not available (no GPU allocated, "
              f"or a CPU-only torch {torch.__version__}); pass --require-cuda to make this an error",
              file=sys.stderr)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own flag (a frozen BN stays frozen, also
    when the body raises)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def rows_per_chunk(x: torch.Tensor, pixel_budget: int, max_rows: int | None = None) -> int:
    """Rows of ``x`` per chunk so that a chunk holds at most ``pixel_budget`` pixels (``x``'s last two dims;
    rows of feature vectors count one each) and at most ``max_rows`` rows; at least 1. Bounds the activation
    memory of an eval-mode pass over many images (candidate scoring, gradient-norm diagnostics)."""
    pixels = int(x.shape[-1]) * int(x.shape[-2]) if x.dim() >= 3 else 1
    cap = int(x.shape[0]) if max_rows is None else int(max_rows)
    return max(1, min(pixel_budget // max(pixels, 1), cap))
