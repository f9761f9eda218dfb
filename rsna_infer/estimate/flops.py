"""FLOPs of one model call at real input shapes, counted with torch's ``FlopCounterMode``.

Counting runs the family's own ``run`` (so flip TTA is whatever the family does) on a batch
of one sample, without doing the arithmetic:

1. **meta tensors** first: the model is built on the ``meta`` device (no weights allocated,
   no arithmetic at all; a fraction of a second even for DenseNet-161);
2. where a model needs real values (data-dependent shapes: a slice mask indexing the batch,
   ``pack_padded_sequence`` lengths), the model is built on the CPU with random weights
   (``pretrained=False``) and run on real tensors, but every operator that
   ``FlopCounterMode`` counts (convolutions, matrix products, attention) is answered with
   zeros of the right shape instead of being computed. Only the cheap element-wise work
   really runs.

Counted: convolutions, matmuls, attention (the CPU flash-attention kernel is mapped to the
same formula as the CUDA ones). Not counted: element-wise layers, normalisation, pooling,
recurrent cells where the CPU uses a fused kernel (a few MFLOP for our heads). FLOPs are
``2 x multiply-adds``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

if TYPE_CHECKING:
    from torch import nn

    from ..family import Family

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallFlops:
    """FLOPs of ``family.run(model, batch_of_one, tta=...)``: with TTA, and per model forward
    (= without TTA: the family contract is one forward per ``run`` without TTA)."""

    tta: float
    plain: float
    tta_passes: int  # model forwards in one TTA ``run``
    method: str  # "meta" | "shape-only"


def _sdpa_cpu_flops() -> dict[Any, Callable[..., int]]:
    """FLOP formula for ``aten._scaled_dot_product_flash_attention_for_cpu`` (absent from
    torch's registry; same count as the CUDA flash kernel)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:  # pragma: no cover - older torch
        return {}

    def count(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(query, key, value)

    return {op: count}


class _ShapeOnly(TorchDispatchMode):
    """Answers every FLOP-counted operator with zeros of its output shape (worked out on meta
    copies of the inputs) and runs everything else for real."""

    def __init__(self, counted: set) -> None:
        super().__init__()
        self.counted = counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in self.counted or func._overloadpacket in self.counted:
            meta_args, meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
            out = func(*meta_args, **meta_kwargs)
            return tree_map_only(torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype).as_strided(t.shape, t.stride()), out)
        return func(*args, **kwargs)


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
    custom = _sdpa_cpu_flops()
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
    counted = set(flop_registry) | set(custom)
    flops = _run_counted(family, model, batch, custom, shape_only=_ShapeOnly(counted))
    return CallFlops(*flops, method="shape-only"), _params(model), model


def _run_counted(family: "Family", model: "nn.Module", batch: dict, custom: dict,
                 shape_only: _ShapeOnly | None) -> tuple[float, float, int]:
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
