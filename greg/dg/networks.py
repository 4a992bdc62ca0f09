"""The IRM Colored-MNIST MLP as ``features`` + ``head`` (the head is the only part the Hessian terms see)."""

from __future__ import annotations

import math

import torch
from torch import nn


class DGNetwork(nn.Module):
    """``forward(x) = head(features(x))``; ``features`` = flatten -> [Linear-ReLU] x (depth-1).

    Matches ``MLP`` of the IRM script: xavier-uniform weights, zero biases, single logit for binary tasks.
    ``grayscale=True`` sums the colour channels first (the IRM "grayscale model" oracle).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_outputs: int,
        width: int = 390,
        depth: int = 3,
        grayscale: bool = False,
    ):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.grayscale = grayscale
        n_in = math.prod(self.input_shape[1:]) if grayscale else math.prod(self.input_shape)
        layers: list[nn.Module] = []
        for _ in range(max(depth - 1, 0)):
            lin = nn.Linear(n_in, width)
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.ReLU()]
            n_in = width
        self.featurizer = nn.Sequential(*layers)
        self.head = nn.Linear(n_in, num_outputs)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.n_features = n_in

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grayscale:
            x = x.sum(dim=1)
        return self.featurizer(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
