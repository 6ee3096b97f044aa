"""A linear layer that runs several HF projections sharing one input as one matmul."""

import torch
import torch.nn as nn


class MergedLinear(nn.Linear):
    """HF's q/k/v (or gate/up) projections, stacked along the output dimension.

    The checkpoint keeps them apart; each loads into its own rows through ``weight_loader``.
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(out_sizes), bias=bias)
        self.out_sizes = out_sizes
        for param in self.parameters():
            param.weight_loader = self._load_part
            param.num_shards = len(out_sizes)

    def _load_part(self, param: nn.Parameter, loaded: torch.Tensor, part: int) -> None:
        start = sum(self.out_sizes[:part])
        rows = param.data[start : start + self.out_sizes[part]]
        if rows.shape != loaded.shape:
            raise ValueError(f"checkpoint part {part} has shape {tuple(loaded.shape)}, expected {tuple(rows.shape)}")
        rows.copy_(loaded)
