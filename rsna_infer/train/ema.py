"""Exponential moving average of a model's weights (validated and exported instead of the
raw weights when a config sets ``ema_decay``)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """Shadow copy updated as ``shadow = d * shadow + (1 - d) * weights`` after every step.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so that the first steps, when
    the shadow still holds the random initialisation, are not averaged in for long.
    Integer buffers (BatchNorm's step counter) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = model.state_dict()
        for name, shadow in self.module.state_dict().items():
            src = live[name].detach()
            if shadow.dtype.is_floating_point:
                shadow.mul_(d).add_(src.to(shadow.dtype), alpha=1.0 - d)
            else:
                shadow.copy_(src)
