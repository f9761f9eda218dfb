"""Device memory: the replayed figures equal a real run, the plan's decisions, residency
moves that copy nothing back, and the weight precisions."""

import numpy as np
import pytest
import torch

from rsna_infer.models.members import LoadedMember, cast_weights, is_norm_layer, module_bytes
from rsna_infer.models.random_weights import tiny_entries
from rsna_infer.models.registry import make_family
from rsna_infer.runtime.memory import LiveBytes, MemberMemory, plan_memory, run_memory, usable_bytes

MB = 2**20


@pytest.mark.parametrize("name", ["sag2d_t2", "sag3d_t2", "axial_level", "fusion", "roi_subarticular"])
def test_replayed_activations_equal_a_real_run(name):
    """Meta replays (shapes only) and the shape-only replay of the level classifier, whose
    shapes depend on its mask, count the same bytes as the real forward at the same batch."""
    entry = next(e for e in tiny_entries() if e.name == name)
    fam = make_family(entry)
    batch = fam.example_batch(3)
    if entry.family == "axial_level":
        batch = {"image": torch.rand(3, 11, *fam.spec.size), "slice_mask": torch.ones(3, 11, dtype=torch.bool)}
    run, _ = run_memory(fam, batch)
    assert run.method == ("shape-only x batch" if entry.family == "axial_level" else "meta")
    torch.manual_seed(0)
    model = fam.build().eval()
    with torch.inference_mode(), LiveBytes(decompose=False) as live:
        fam.run(model, batch, tta=True)
    assert live.peak > 0
    np.testing.assert_allclose(run.activation_bytes, live.peak, rtol=0.02)
    assert run.weight_bytes_fp32 == module_bytes(model)
    assert run.weight_bytes_half < run.weight_bytes_fp32 < 2.1 * run.weight_bytes_half


def _row(name, group, w, a, batch=32):
    return MemberMemory(name, group, int(w * MB), int(a * MB), batch, "meta")


def test_the_plan_streams_only_what_does_not_fit_and_says_what_to_change():
    rows = {"a0": _row("a0", "A", 400, 300), "a1": _row("a1", "A", 400, 300), "b": _row("b", "B", 100, 900)}
    groups = [("A", ["a0", "a1"]), ("B", ["b"])]
    assert plan_memory(rows, groups, None).mode == "resident"  # no budget: nothing to plan
    roomy = plan_memory(rows, groups, 2000 * MB)
    assert roomy.mode == "resident" and roomy.fits and roomy.resident_bytes == 1800 * MB
    tight = plan_memory(rows, groups, 1200 * MB)
    assert tight.mode == "streamed" and tight.fits and tight.units == {"A": "group", "B": "group"}
    assert tight.streamed_bytes == 1100 * MB and "streamed" in tight.reason
    tighter = plan_memory(rows, groups, 1050 * MB)
    assert tighter.units["A"] == "member" and tighter.streamed_bytes == 1000 * MB and tighter.fits
    none = plan_memory(rows, groups, 600 * MB)
    assert not none.fits and any("batch size of" in a for a in none.advice)
    forced = plan_memory(rows, groups, 2000 * MB, mode="streamed")
    assert forced.mode == "streamed"
    assert plan_memory(rows, groups, 600 * MB, mode="resident").advice[0].startswith("the resident ensemble needs")
    with pytest.raises(ValueError):
        plan_memory(rows, groups, None, mode="sometimes")
    assert usable_bytes(16e9) < 16e9


def test_half_weights_keep_norm_layers_in_fp32_and_residency_copies_nothing_back():
    entry = next(e for e in tiny_entries() if e.name == "roi_subarticular")
    fam = make_family(entry)
    model = cast_weights(fam.build().eval(), torch.float16)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            assert p.dtype == (torch.float32 if is_norm_layer(m) else torch.float16)
    member = LoadedMember(entry, fam, model, torch.device("cpu"), torch.float16, resident=False)
    before = [p.data_ptr() for p in model.parameters()]
    member.to_device()
    assert member.resident
    member.to_host()
    assert not member.resident and [p.data_ptr() for p in model.parameters()] == before
