"""Network building blocks shared by the stage-2 graders."""

from __future__ import annotations

import torch
from torch import nn

from ..constants import N_CONDITIONS, N_LEVELS


class ConditionGate(nn.Module):
    """Condition-gated features: ``f * sigmoid(E_cond[c] + E_level[l])``.

    One backbone reads every crop; the gate lets each condition (and level) pick the feature
    channels it needs. Embeddings start at zero, i.e. a uniform 0.5 gate.
    """

    def __init__(self, dim: int, n_conditions: int = N_CONDITIONS, n_levels: int = N_LEVELS) -> None:
        super().__init__()
        self.cond = nn.Embedding(n_conditions, dim)
        self.level = nn.Embedding(n_levels, dim)
        nn.init.zeros_(self.cond.weight)
        nn.init.zeros_(self.level.weight)

    def forward(self, feats: torch.Tensor, cond: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """``feats [N, D]``, ``cond``/``level`` int64 ``[N]`` -> gated ``[N, D]``."""
        return feats * torch.sigmoid(self.cond(cond) + self.level(level))


class SliceSequenceEncoder(nn.Module):
    """Each slice through a 1-channel 2-D backbone, a bidirectional GRU across the slices,
    mean-pooled: ``[N, S, H, W] -> [N, 2 * hidden]``."""

    def __init__(self, backbone: nn.Module, hidden: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.gru = nn.GRU(int(backbone.num_features), hidden, batch_first=True, bidirectional=True)
        self.out_dim = 2 * hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s = x.shape[:2]
        f = self.backbone(x.reshape(n * s, 1, *x.shape[2:])).reshape(n, s, -1)
        seq, _ = self.gru(f)
        return seq.mean(dim=1)


class SliceStackEncoder(nn.Module):
    """2.5-D: the slices are the backbone's channels: ``[N, S, H, W] -> [N, F]``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_dim = int(backbone.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def level_index(n_points: int, batch: int, device: torch.device) -> torch.Tensor:
    """Level of each of ``batch * n_points`` flattened points (point ``i`` is level ``i % 5``)."""
    return (torch.arange(n_points, device=device) % N_LEVELS).repeat(batch)
