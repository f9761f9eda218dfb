"""Stage-1 networks: a backbone with a point-regression head, and the 2.5-D slice level
classifier (CNN per slice -> BiLSTM -> attention over slices -> per-slice level classes).

Every network takes the batch dict and returns a tensor (the family contract); the families
turn that into probabilities / normalised coordinates (`run`) and keypoints (`decode`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class PointRegressor(nn.Module):
    """Backbone -> pooled features -> ``[B, n_points, n_coords (+1 visibility logit)]``.

    Coordinates are normalised (0..1 over the input); the head's coordinate biases start at
    0.5 so an untrained model predicts the image centre rather than a corner.
    """

    def __init__(self, backbone: nn.Module, n_points: int, n_coords: int, visibility: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_points, self.n_coords, self.visibility = int(n_points), int(n_coords), bool(visibility)
        self.n_out = self.n_coords + int(self.visibility)
        self.dropout = nn.Dropout(float(dropout))
        self.head = nn.Linear(backbone.num_features, self.n_points * self.n_out)
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            bias = self.head.bias.view(self.n_points, self.n_out)
            bias.zero_()
            bias[:, : self.n_coords] = 0.5

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = self.backbone(batch["image"])
        out = self.head(self.dropout(feats))
        return out.view(out.shape[0], self.n_points, self.n_out)


class HeatmapPointRegressor(nn.Module):
    """Backbone feature maps -> one heatmap per point -> soft-argmax -> ``[B, n_points, dims (+1)]``.

    The maps at every stride the backbone returns (``create_feature_backbone``) are projected
    to ``width`` channels, upsampled to the finest one and summed (a light feature pyramid:
    the deep maps see the whole spine, the fine one resolves the point), then a 3x3 (x3)
    convolution and a 1x1 one give a heatmap per point. The coordinate on each heatmap axis is
    the softmax-weighted mean of the cell centres ``(j + 0.5) / n``, i.e. normalised like every
    point family's ``u`` (sub-cell precision, exactly mirror-equivariant). The visibility logit
    comes from the globally pooled deepest map. A zero-initialised last layer starts every point
    at the input's centre. In training mode the output also carries each heatmap's standard
    deviation per axis beyond one cell (normalised units) after the visibility: the loss keeps
    the heatmaps peaked, since the mean of a broad one is pulled toward the map's centre (as in
    DSNT), but not sharper than about a cell, which would round the mean to cell centres on a
    coarse axis (the depth of a 3-D map).
    """

    def __init__(self, backbone: nn.Module, n_points: int, dims: int, visibility: bool, width: int = 32,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.backbone, self.dims = backbone, dims
        self.n_points, self.n_coords, self.visibility = int(n_points), dims, bool(visibility)
        chans = list(backbone.feature_info.channels())
        self.lateral = nn.ModuleList(conv(c, width, 1) for c in chans)
        self.mix = nn.Sequential(conv(width, width, 3, padding=1), nn.GELU(), nn.Dropout(float(dropout)))
        self.heat = conv(width, self.n_points, 1)
        nn.init.zeros_(self.heat.weight)
        nn.init.zeros_(self.heat.bias)
        self.vis = nn.Linear(chans[-1], self.n_points) if self.visibility else None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = self.backbone(batch["image"])
        size = feats[0].shape[2:]
        mode = "bilinear" if self.dims == 2 else "trilinear"
        x = self.lateral[0](feats[0])
        for lat, f in zip(self.lateral[1:], feats[1:]):
            x = x + nn.functional.interpolate(lat(f), size=size, mode=mode, align_corners=False)
        heat = self.heat(self.mix(x)).flatten(2).float()  # [B, P, cells]
        prob = torch.softmax(heat, dim=-1).view(heat.shape[0], self.n_points, *size)
        coords, spread = [], []
        for axis, n in enumerate(size):  # marginal along each axis -> expected cell centre
            other = tuple(d for d in range(2, 2 + self.dims) if d != 2 + axis)
            marginal = prob.sum(dim=other)  # [B, P, n]
            centres = (torch.arange(n, device=heat.device, dtype=heat.dtype) + 0.5) / n
            mean = (marginal * centres).sum(-1)
            coords.append(mean)
            if self.training:  # spread beyond one cell (a peak between two cells is fine: sub-cell precision)
                var = (marginal * (centres - mean[..., None]) ** 2).sum(-1)
                spread.append(torch.relu(torch.sqrt(var + 1e-8) - 1.0 / n))
        out = torch.stack(coords, dim=-1)
        if self.vis is not None:
            pooled = feats[-1].flatten(2).mean(-1)
            out = torch.cat([out, self.vis(pooled).float()[..., None]], dim=-1)
        if spread:
            out = torch.cat([out, torch.stack(spread, dim=-1)], dim=-1)
        return out


def neighbour_channels(image: torch.Tensor, lengths: torch.Tensor, n_channels: int) -> torch.Tensor:
    """``[B, S, H, W]`` stacks -> ``[B, S, C, H, W]``: each slice with its ``C // 2`` neighbours on
    each side as channels, repeating the first/last *real* slice of each stack at its ends."""
    b, s = image.shape[:2]
    offsets = torch.arange(n_channels, device=image.device) - n_channels // 2
    pos = torch.arange(s, device=image.device)[:, None] + offsets[None, :]  # [S, C]
    hi = (lengths.to(image.device).clamp(min=1) - 1)[:, None, None]  # [B, 1, 1]
    idx = torch.minimum(pos[None].clamp(min=0), hi)  # [B, S, C]
    flat = idx.reshape(b, -1)
    gathered = torch.gather(image, 1, flat[:, :, None, None].expand(-1, -1, *image.shape[2:]))
    return gathered.view(b, s, n_channels, *image.shape[2:])


class SliceLevelNet(nn.Module):
    """2.5-D level classifier over an axial stack.

    Each slice with its neighbours (``n_channels``) goes through a 2-D backbone; the slice
    features run through a bidirectional LSTM (context along the stack), then, optionally,
    self-attention over the slices (masked to the real ones); a linear head gives logits
    ``[B, S, n_sides, n_classes]`` (classes: the 5 levels, then "none").
    """

    def __init__(
        self,
        backbone: nn.Module,
        n_channels: int,
        hidden: int = 64,
        attention: bool = True,
        heads: int = 4,
        dropout: float = 0.0,
        n_sides: int = 2,
        n_classes: int = 6,
    ) -> None:
        super().__init__()
        if attention and (2 * hidden) % heads:
            raise ValueError(f"model_kwargs: 2 * hidden ({2 * hidden}) must be divisible by heads ({heads})")
        self.backbone = backbone
        self.n_channels, self.n_sides, self.n_classes = int(n_channels), int(n_sides), int(n_classes)
        self.proj = nn.Sequential(nn.Linear(backbone.num_features, hidden), nn.GELU(), nn.Dropout(float(dropout)))
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True, bidirectional=True)
        self.attention = nn.MultiheadAttention(2 * hidden, heads, dropout=float(dropout), batch_first=True) if attention else None
        self.norm = nn.LayerNorm(2 * hidden)
        self.head = nn.Linear(2 * hidden, self.n_sides * self.n_classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        image = batch["image"]  # [B, S, H, W]
        b, s = image.shape[:2]
        mask = batch.get("slice_mask")
        if mask is None:
            mask = torch.ones(b, s, dtype=torch.bool, device=image.device)
        mask = mask.to(device=image.device, dtype=torch.bool)
        lengths = mask.sum(1)
        x = neighbour_channels(image, lengths, self.n_channels)  # [B, S, C, H, W]
        feats = self.backbone(x[mask])  # only the real slices go through the CNN
        seq = image.new_zeros(b, s, feats.shape[-1], dtype=feats.dtype)
        seq[mask] = feats
        seq = self.proj(seq)
        packed = pack_padded_sequence(seq, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=s)
        if self.attention is not None:
            att, _ = self.attention(out, out, out, key_padding_mask=~mask, need_weights=False)
            out = out + att
        out = self.norm(out)
        logits = self.head(out).view(b, s, self.n_sides, self.n_classes)
        return logits.masked_fill(~mask[:, :, None, None], 0.0)
