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
   of being computed (`ShapeOnly`). What decides shapes (masks, lengths) runs for real.

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
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

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


def _sdpa_cpu_flops() -> dict[Any, Callable[..., int]]:
    """FLOP formula for ``aten._scaled_dot_product_flash_attention_for_cpu`` (absent from
    torch's registry; same count as the CUDA flash kernel)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:  # pragma: no cover - older torch
        return {}

    def count(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(query, key, value)

    return {op: count}


class ShapeOnly(TorchDispatchMode):
    """Shapes without arithmetic, on real CPU tensors.

    Every FLOP-counted operator is answered with zeros of its output shape (worked out on meta
    copies of its inputs); those zeros are *placeholders*. A pure floating-point operator that
    reads a placeholder (activation, normalisation, pooling downstream of a convolution) is
    answered the same way, so the large activations are never computed either. Everything
    else runs for real: operators on the real inputs (masks, lengths, flags and whatever is
    derived from them), integer and boolean work, views, and anything without a meta kernel;
    a floating-point in-place update of a placeholder is a no-op. Placeholders view one shared
    zero buffer, so values downstream of a counted operator are meaningless (zeros, or what
    an in-place update left) but no shape depends on them.
    """

    def __init__(self, counted: set) -> None:
        super().__init__()
        self.counted = counted
        self.placeholders = WeakIdKeyDictionary()
        self.zeros: dict[torch.dtype, torch.Tensor] = {}  # one zero buffer per dtype, viewed by every placeholder

    def _is_placeholder(self, t: torch.Tensor) -> bool:
        return t in self.placeholders

    def _via_meta(self, func, args, kwargs):  # noqa: ANN001, ANN202
        meta_args, meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        out = func(*meta_args, **meta_kwargs)
        return tree_map_only(torch.Tensor, self._placeholder, out)

    def _placeholder(self, t: torch.Tensor) -> torch.Tensor:
        """A zero tensor shaped like meta tensor ``t``: a view into a shared zero buffer (no
        allocation, no memset per operator: that would cost more than the arithmetic saved)."""
        need = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) if t.numel() else 0
        buf = self.zeros.get(t.dtype)
        if buf is None or buf.numel() < need:
            buf = self.zeros[t.dtype] = torch.zeros(max(need, 1 << 20), dtype=t.dtype)
        z = buf.as_strided(t.shape, t.stride())
        self.placeholders[z] = True
        return z

    def _skippable(self, func, tensors_in: list[torch.Tensor]) -> bool:  # noqa: ANN001
        schema = func._schema
        if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
            return False  # in-place and view ops keep their aliasing: run them
        if not any(self._is_placeholder(t) for t in tensors_in):
            return False
        if not all(t.is_floating_point() for t in tensors_in):
            return False
        return all(r.type.kind() == "TensorType" for r in schema.returns) and len(schema.returns) > 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in self.counted or func._overloadpacket in self.counted:
            return self._via_meta(func, args, kwargs)
        tensors_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if (func._schema.is_mutable and args and isinstance(args[0], torch.Tensor) and self._is_placeholder(args[0])
                and all(t.is_floating_point() for t in tensors_in)):
            return args[0]  # an in-place update of a placeholder (x += shortcut): its values do not matter
        if self._skippable(func, tensors_in):
            try:
                out = self._via_meta(func, args, kwargs)
                if all(t.is_floating_point() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
                    return out
            except Exception:  # no meta kernel: compute it
                pass
        out = func(*args, **kwargs)
        if any(self._is_placeholder(t) for t in tensors_in):  # derived from a placeholder: zeros in spirit
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.placeholders[t] = True
        return out


def flop_registry_ops() -> set:
    """The operators `FlopCounterMode` counts (torch's registry plus the CPU attention kernel)."""
    return set(flop_registry) | set(_sdpa_cpu_flops())


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
