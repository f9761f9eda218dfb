"""FLOPs of one model call at real input shapes, counted with torch's ``FlopCounterMode``.

Counting runs the family's own ``run`` (so flip TTA is whatever the family does) on a batch
of one sample, without doing the arithmetic:

1. **meta tensors** first: the model is built on the ``meta`` device (no weights allocated,
   no arithmetic at all; a fraction of a second even for DenseNet-161);
2. where a model needs real values (data-dependent shapes: a slice mask indexing the batch,
   ``pack_padded_sequence`` lengths), the model is built on the CPU with random weights
   (``pretrained=False``) and run on real tensors, but every operator that
   ``FlopCounterMode`` counts (convolutions, matrix products, attention), and the
   floating-point work downstream of one, is answered with zeros of the right shape instead
   of being computed (`rsna_infer.runtime.shape_only.ShapeOnly`). What decides shapes (masks,
   lengths) runs for real.

Counted: convolutions, matmuls, attention (the CPU flash-attention kernel is mapped to the
same formula as the CUDA ones). Not counted: element-wise layers, normalisation, pooling,
recurrent cells where the CPU uses a fused kernel (a few MFLOP for our heads). FLOPs are
``2 x multiply-adds``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..runtime.shape_only import ShapeOnly, cpu_attention_flops, flop_registry_ops

if TYPE_CHECKING:
    from torch import nn

    from ..models.family import Family

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallFlops:
    """FLOPs of ``family.run(model, batch_of_one, tta=...)``: with TTA, and per model forward
    (= without TTA: the family contract is one forward per ``run`` without TTA)."""

    tta: float
    plain: float
    tta_passes: int  # model forwards in one TTA ``run``
    method: str  # "meta" | "shape-only"


def _count_calls(model: "nn.Module") -> tuple[list[int], Any]:
    calls = [0]

    def hook(module: Any, args: Any) -> None:
        calls[0] += 1

    return calls, model.register_forward_pre_hook(hook)


def count_run(
    family: "Family", batch: dict[str, "torch.Tensor"], model: "nn.Module | None" = None
) -> tuple[CallFlops, int, "nn.Module | None"]:
    """FLOPs of ``family.run(model, batch, tta=True)`` (and per forward), the parameter count,
    and the CPU model when one had to be built (pass it back for the next shape of the same
    family). ``batch`` holds CPU tensors (a collated batch of one sample).

    ``model``: an already built CPU model; else the count is tried on meta tensors first and a
    CPU model with random weights is built only when the network needs real values."""
    custom = cpu_attention_flops()
    if model is None:
        try:
            with torch.device("meta"):
                meta_model = family.build().eval()
            meta_batch = {k: v.to("meta") for k, v in batch.items()}
            flops = _run_counted(family, meta_model, meta_batch, custom, shape_only=None)
            return CallFlops(*flops, method="meta"), _params(meta_model), None
        except Exception as e:  # data-dependent model: count on real tensors, arithmetic skipped
            logger.debug("%s: meta FLOP count impossible (%s: %s); counting shape-only on the CPU",
                         family.entry.name, type(e).__name__, (str(e).splitlines() or [""])[0][:120])
        model = family.build().eval()
    counted = flop_registry_ops()
    flops = _run_counted(family, model, batch, custom, shape_only=ShapeOnly(counted))
    return CallFlops(*flops, method="shape-only"), _params(model), model


def _run_counted(family: "Family", model: "nn.Module", batch: dict, custom: dict,
                 shape_only: ShapeOnly | None) -> tuple[float, float, int]:
    calls, handle = _count_calls(model)
    try:
        counter = FlopCounterMode(display=False, custom_mapping=custom)
        outer = shape_only if shape_only is not None else contextlib.nullcontext()
        # the shape-only mode sits under the counter: the counter sees each op first, then
        # the mode answers the counted ones without computing them
        with torch.inference_mode(), outer, counter:
            family.run(model, batch, tta=True)
    finally:
        handle.remove()
    total = float(counter.get_total_flops())
    passes = max(1, calls[0])
    return total, total / passes, passes


def _params(model: "nn.Module") -> int:
    return int(sum(p.numel() for p in model.parameters()))
