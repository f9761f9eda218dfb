"""Shape-only dispatch: run a model on real CPU tensors without doing its arithmetic.

`ShapeOnly` answers every FLOP-counted operator (and the floating-point work downstream of
one) with zeros of the right shape, while what decides shapes (masks, lengths) runs for
real. `rsna_infer.estimate.flops` counts FLOPs under it; `rsna_infer.runtime.memory` replays
a model under it (``own_storage=True``) to measure the activation memory of a batch. Torch
is imported at module import: import this module only where torch is wanted.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.flop_counter import flop_registry, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary


def cpu_attention_flops() -> dict[Any, Callable[..., int]]:
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

    def __init__(self, counted: set, own_storage: bool = False) -> None:
        super().__init__()
        self.counted = counted
        self.own_storage = own_storage
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
        allocation, no memset per operator: that would cost more than the arithmetic saved);
        with ``own_storage`` allocated but untouched memory instead (``empty``), so that a
        memory tracker sees each placeholder like the real tensor it stands for."""
        if self.own_storage:
            z = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
            self.placeholders[z] = True
            return z
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
    return set(flop_registry) | set(cpu_attention_flops())
