"""Batches across studies: grouped by shape, collated and copied to the device once, run
through every member of a preparation group, split in halves when they fail.

Samples are batched by shape (a family's ``length_axis`` by `length_bucket`), at most the
batch size per batch; each batch is collated and copied to the device once and run through
every member of the group (`BatchRunner.run_batch`). A failing batch is retried in halves for
the member that failed it, so one bad study costs only its own output; CUDA out-of-memory is
handled the same way, after the cache is emptied. A device fault
(`rsna_infer.runtime.devices.is_device_fault`) is not the studies' doing: it propagates, and
the chunk is re-run on another replica.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..runtime.devices import is_device_fault, is_out_of_memory
from ..runtime.memory import MemoryProbe
from .chunk import ChunkOutput, FailureLog

if TYPE_CHECKING:
    import torch

    from ..models.family import Family, Sample
    from ..models.members import LoadedMember

logger = logging.getLogger(__name__)

#: Outputs of each member of a group for every sample (None where it failed).
Results = list[list["np.ndarray | None"]]


def length_bucket(n: int) -> int:
    """The length a stack of ``n`` is padded to along a family's ``length_axis``: the next of
    8, 12, 16, 24, 32, 48, 64, 96, ... (each at most 1.5x the one before), so stacks of
    different lengths share batches and the model sees a few shapes, not one per length."""
    b = 8
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return b


def length_of(family: "Family") -> tuple[str, int] | None:
    """A family's ``length_axis``: (input key, axis of the sample) whose length may differ
    between the samples of one batch (see `rsna_infer.models.family.Family.length_axis`)."""
    return getattr(family, "length_axis", None)


def pad_length(family: "Family", samples: Sequence["Sample"], idx: list[int]) -> int | None:
    """The bucketed length the samples ``idx`` are padded to (None: the family has no length axis)."""
    length = length_of(family)
    if length is None:
        return None
    return length_bucket(max(samples[i].inputs[length[0]].shape[length[1]] for i in idx))


def batches_by_shape(family: "Family", samples: Sequence["Sample"], batch_size: int) -> list[list[int]]:
    """Indices of ``samples`` in batches of at most ``batch_size`` that can be collated
    together: equal shapes and dtypes, a ``length_axis`` compared by `length_bucket` (the
    family pads it and masks the padding). Batches follow the samples' order, so they are
    the same whatever the timing of the run."""
    length = length_of(family)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        sig = []
        for k, v in sorted(s.inputs.items()):
            shape = list(v.shape)
            if length is not None and k == length[0]:
                shape[length[1]] = length_bucket(shape[length[1]])
            sig.append((k, tuple(shape), str(v.dtype)))
        groups.setdefault(tuple(sig), []).append(i)
    return [idx[k : k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


def to_device(member: "LoadedMember", samples: list["Sample"], pad_to: int | None) -> dict[str, "torch.Tensor"]:
    """Collate ``samples`` and copy the batch to the member's device (through pinned host
    memory on CUDA, so the copy is asynchronous)."""
    family = member.family
    batch = family.collate(samples) if pad_to is None else family.collate(samples, pad_to=pad_to)  # type: ignore[call-arg]
    if member.device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(member.device, non_blocking=True) for k, v in batch.items()}


def run_on_device(member: "LoadedMember", batch: dict[str, "torch.Tensor"], tta: bool) -> np.ndarray:
    """One forward of ``member`` on a collated batch, in its precision; float32 on the host."""
    import torch

    with torch.inference_mode(), member.autocast():
        y = member.family.run(member.model, batch, tta=tta)
    return y.float().cpu().numpy()


def release_cuda_cache(member: "LoadedMember", collect: bool = False) -> None:
    """Give cached device memory back (after out-of-memory, also collect garbage cycles)."""
    if collect:
        import gc

        gc.collect()
    if member.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


@dataclass
class BatchRunner:
    """Runs the members of a group on a chunk's samples, batch by batch (see the module
    docstring). ``clock``: the deadline guard's clock (member seconds); ``probe_cpu_memory``:
    measure forwards on the CPU too (a device budget stands in for a card)."""

    batch_size: int
    clock: Callable[[], float]
    probe_cpu_memory: bool
    failed: FailureLog

    def batches(self, family: "Family", samples: Sequence["Sample"]) -> list[list[int]]:
        return batches_by_shape(family, samples, self.batch_size)

    def run_batch(self, members: Sequence["LoadedMember"], which: list[int], samples: list["Sample"], idx: list[int],
                  tta: bool, out: ChunkOutput, sids: list[int], results: Results) -> None:
        """Run ``members[which]`` on the samples ``idx`` (one collate and device copy for all)
        into ``results``; a batch that fails is split in halves for the members it failed."""
        lead = members[which[0]]
        t = time.perf_counter()
        failed: dict[int, bool] = {}  # member position -> out of memory (split in halves)
        batch = None
        try:
            batch = to_device(lead, [samples[i] for i in idx], pad_length(lead.family, samples, idx))
        except Exception as e:
            if is_device_fault(e):
                raise
            failed = {w: False for w in which}
            self._note_failure([members[w] for w in which], idx, sids, e, out)
        out.timings.add(f"stage{lead.entry.stage}/collate", time.perf_counter() - t)
        for w in which if batch is not None else []:
            oom = self._run_member(members[w], batch, samples, idx, tta, out, sids, results[w])
            if oom is not None:
                failed[w] = oom
        del batch
        if failed and len(idx) > 1:
            # Split outside the except blocks: a live traceback still holds the failed attempt's
            # frames (its batch, its activations), which no empty_cache frees.
            oom_members = [w for w, o in failed.items() if o]
            for w in oom_members:
                out.oom_retries += 1
                logger.warning("%s: out of memory on a batch of %d on %s; cache emptied, retrying in halves",
                               members[w].name, len(idx), members[w].device)
            release_cuda_cache(lead, collect=bool(oom_members))
            half = len(idx) // 2
            again = sorted(failed)
            self.run_batch(members, again, samples, idx[:half], tta, out, sids, results)
            self.run_batch(members, again, samples, idx[half:], tta, out, sids, results)

    def _run_member(self, m: "LoadedMember", batch: dict[str, "torch.Tensor"], samples: list["Sample"], idx: list[int],
                    tta: bool, out: ChunkOutput, sids: list[int], into: list["np.ndarray | None"]) -> bool | None:
        """One member on one batch, its finite outputs into ``into``. None when it ran;
        when it failed (recorded here, inside the except block, so that nothing keeps the
        failed attempt alive), whether it ran out of memory."""
        c0, t0 = self.clock(), time.perf_counter()
        try:
            with MemoryProbe(m.device, cpu=self.probe_cpu_memory) as probe:
                arr = run_on_device(m, batch, tta)
            if probe.bytes:
                used = probe.bytes + sum(v.numel() * v.element_size() for v in batch.values())
                out.memory[m.name] = max(out.memory.get(m.name, 0), used)
            if arr.shape[0] != len(idx):
                raise RuntimeError(f"{m.name}: run returned {arr.shape[0]} outputs for {len(idx)} samples")
        except Exception as e:
            if is_device_fault(e):
                raise
            self._note_failure([m], idx, sids, e, out)
            return is_out_of_memory(e)
        finally:
            out.member_s[m.name] = out.member_s.get(m.name, 0.0) + (self.clock() - c0)
            out.timings.add(f"stage{m.entry.stage}/{m.name}/run", time.perf_counter() - t0)
        length = length_of(m.family)
        for j, i in enumerate(idx):
            o = arr[j] if length is None else arr[j][: samples[i].inputs[length[0]].shape[length[1]]]
            if np.all(np.isfinite(o)):
                into[i] = o
            else:
                out.records[sids[i]].warn(f"model {m.name}: non-finite output dropped")
        return None

    def _note_failure(self, members: Sequence["LoadedMember"], idx: list[int], sids: list[int], exc: BaseException,
                      out: ChunkOutput) -> None:
        """A batch of one that failed costs its study those members' output (larger ones are split)."""
        if len(idx) != 1:
            return
        for m in members:
            self.failed.record(out, f"run {m.name}", sids[idx[0]], exc)
