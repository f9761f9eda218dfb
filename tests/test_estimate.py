"""`rsna-infer estimate`: FLOP counting, the projection's arithmetic, the shedding advice,
offline operation, and the calibration written by ``benchmarks/gpu_check.py --cpu-smoke``."""

from __future__ import annotations

import importlib.util
import json
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from rsna_infer.estimate import (
    Calibration,
    MemberTiming,
    StudyGeometry,
    cost_manifest,
    estimate,
    gpu_kind,
    kind_of_device_name,
    project,
)
from rsna_infer.estimate.flops import count_run
from rsna_infer.models.manifest import Manifest, save_manifest
from rsna_infer.models.random_weights import tiny_entries
from rsna_infer.runtime.deadline import build_ladder

REPO = Path(__file__).resolve().parents[1]
SMALL = StudyGeometry(sagittal_slices=10, axial_slices=16, image_px=64)


# -- FLOP counting -----------------------------------------------------------------------


class _Entry:
    name = "hand"


class _HandFamily:
    """The least a family needs for `count_run`: build, run with a flip TTA pass."""

    entry = _Entry()

    def __init__(self, masked: bool = False) -> None:
        self.masked = masked

    def build(self) -> nn.Module:
        masked = self.masked

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
                self.fc = nn.Linear(4 * 8 * 8, 3)

            def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
                x = batch["image"]
                if masked:  # data-dependent indexing: impossible on meta tensors
                    x = x[batch["keep"]]
                h = self.conv(x)
                h += torch.relu(h)  # an in-place residual update of an activation
                return self.fc(h.flatten(1))

        return Net()

    def run(self, model: nn.Module, batch: dict[str, torch.Tensor], tta: bool = False) -> torch.Tensor:
        out = model(batch)
        if tta:
            out = (out + model(dict(batch, image=batch["image"].flip(-1)))) / 2
        return out


# conv: 4 output channels x 8 x 8 positions x (2 input channels x 3 x 3) multiply-adds;
# linear: 256 x 3 multiply-adds; FLOPs = 2 x multiply-adds.
HAND_FLOPS = 2 * (4 * 8 * 8 * 2 * 3 * 3) + 2 * (256 * 3)


def test_flops_of_a_small_conv_net_match_the_hand_count() -> None:
    flops, params, model = count_run(_HandFamily(), {"image": torch.zeros(1, 2, 8, 8)})
    assert flops.plain == HAND_FLOPS
    assert flops.tta == 2 * HAND_FLOPS and flops.tta_passes == 2
    assert flops.method == "meta" and model is None
    assert params == 4 * 2 * 3 * 3 + 256 * 3 + 3


def test_a_data_dependent_model_is_counted_shape_only_with_the_same_flops() -> None:
    batch = {"image": torch.zeros(1, 2, 8, 8), "keep": torch.ones(1, dtype=torch.bool)}
    flops, _, model = count_run(_HandFamily(masked=True), batch)
    assert flops.method == "shape-only" and model is not None
    assert flops.plain == HAND_FLOPS and flops.tta == 2 * HAND_FLOPS


# -- costs and projection ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cost():
    return cost_manifest(Manifest(models=tiny_entries()), SMALL, measure_cpu=False)


def test_samples_per_study_come_from_the_families_and_the_geometry(tiny_cost) -> None:
    by_family = {e.family: tiny_cost.member(e.name) for e in tiny_cost.entries}
    # every member got real samples from the typical study (no example_batch stand-in)
    assert not [n for n in tiny_cost.notes if "decode not measured" not in n]
    assert all(s.example is not None for sc in tiny_cost.signatures.values() for s in sc.shapes)
    assert by_family["axial_level"].samples_per_study == pytest.approx(SMALL.mean_axial_series)
    assert by_family["axial3d"].samples_per_study == pytest.approx(SMALL.mean_axial_series)
    assert by_family["sag2d"].samples_per_study == pytest.approx(1.0)
    assert by_family["fusion"].samples_per_study == pytest.approx(1.0)
    # the level classifier reads every slice of the stack
    assert by_family["axial_level"].shapes[0].inputs["image"][0] == SMALL.axial_slices
    two = cost_manifest(Manifest(models=[e for e in tiny_entries() if e.family == "axial_level"]),
                        StudyGeometry(sagittal_slices=10, axial_slices=16, image_px=64, axial_series=((2, 1.0),)),
                        measure_cpu=False)
    assert two.member("axial_level").samples_per_study == pytest.approx(2.0)
    assert two.member("axial_level").flops_per_study(True) == pytest.approx(2 * by_family["axial_level"].shapes[0].flops.tta)


def test_folds_share_one_count(tiny_cost) -> None:
    e = tiny_entries()
    folds = [*e, *(replace(x, name=x.name + "_f1", fold=1) for x in e if x.stage == 2)]
    cost = cost_manifest(Manifest(models=folds), SMALL, measure_cpu=False)
    assert len(cost.signatures) == len(e)
    assert cost.member("fusion_f1") is cost.member("fusion")


def test_json_has_projected_hours_and_member_rows(tiny_cost) -> None:
    d = project(tiny_cost, 100, gpu_kind("t4")).to_dict()
    d = json.loads(json.dumps(d))  # plain JSON all the way down
    assert d["projected_hours"] > 0 and d["verdict"] in ("fits", "does not fit")
    assert [m["name"] for m in d["members"]] == [e.name for e in tiny_entries()]
    for m in d["members"]:
        assert m["gflop_per_study"] > 0 and m["device_hours"] > 0 and m["samples_per_study"] > 0 and m["params"] > 0
    assert {"device_s", "loader_s", "main_prepare_s", "per_study_s"} <= set(d["per_study_s"])


def test_rows_scale_linearly_with_the_number_of_studies(tiny_cost) -> None:
    a, b = project(tiny_cost, 100, gpu_kind("t4")), project(tiny_cost, 300, gpu_kind("t4"))
    for ra, rb in zip(a.members, b.members):
        assert rb.device_hours == pytest.approx(3 * ra.device_hours, rel=1e-9)
    setup_h = a.setup_s / 3600
    assert b.projected_hours - setup_h == pytest.approx(3 * (a.projected_hours - setup_h), rel=1e-9)


def test_no_tta_halves_the_device_time_of_tta_members(tiny_cost) -> None:
    on, off = project(tiny_cost, 100, gpu_kind("t4")), project(tiny_cost, 100, gpu_kind("t4"), tta=False)
    flipped = [(a, b) for a, b in zip(on.members, off.members) if a.tta_passes == 2]
    assert flipped  # every tiny family flips once
    for a, b in flipped:
        assert b.device_s_per_study == pytest.approx(a.device_s_per_study / 2, rel=1e-9)
        assert b.tta_passes == 1


def test_two_gpus_halve_the_device_time(tiny_cost) -> None:
    one, two = project(tiny_cost, 100, gpu_kind("p100")), project(tiny_cost, 100, gpu_kind("p100"), gpus=2)
    for a, b in zip(one.members, two.members):
        assert b.device_hours == pytest.approx(a.device_hours / 2, rel=1e-9)
    assert two.paths.device_path_s == pytest.approx(one.paths.device_path_s / 2, rel=1e-9)


def test_faster_cards_project_shorter_device_time(tiny_cost) -> None:
    hours = [sum(m.device_hours for m in project(tiny_cost, 100, gpu_kind(k)).members) for k in ("p100", "t4", "a100", "h100")]
    assert hours == sorted(hours, reverse=True)


def _budget_for(usable_hours: float) -> float:
    """Budget (h) whose usable part after the deadline guard's reserve is ``usable_hours``."""
    from rsna_infer.runtime.deadline import default_reserve_s

    b = usable_hours
    for _ in range(50):
        b = usable_hours + default_reserve_s(b * 3600) / 3600
    return b


def test_a_manifest_that_does_not_fit_gets_the_guards_shedding_order(tiny_cost) -> None:
    n = 2_000_000  # tiny models, but enough studies to overrun
    full = project(tiny_cost, n, gpu_kind("t4"), budget_hours=9.0)
    labels = [p.label for p in build_ladder(tiny_cost.entries, True)]
    assert [s.label for s in full.ladder] == labels
    hours = [s.projected_hours for s in full.ladder]
    assert hours == sorted(hours, reverse=True)
    k = next(i for i in range(2, len(hours)) if hours[i] < hours[i - 1])  # a member drop that saves time
    budget = _budget_for((hours[k] + hours[k - 1]) / 2)
    est = project(tiny_cost, n, gpu_kind("t4"), budget_hours=budget, limit_hours=max(9.0, budget))
    assert not est.fits and est.verdict == "does not fit"
    assert [s.fits for s in est.ladder][: k + 1] == [False] * k + [True]
    advice = est.advice[0]
    positions = [advice.index(label) for label in labels[1 : k + 1]]
    assert positions == sorted(positions)  # the guard's order
    assert labels[k + 1] not in advice if k + 1 < len(labels) else True


def test_nothing_fits_says_how_many_studies_would_get_priors(tiny_cost) -> None:
    est = project(tiny_cost, 10_000_000, gpu_kind("t4"), budget_hours=0.1)
    assert not est.fits and not any(s.fits for s in est.ladder)
    assert "does not fit even after every shedding step" in est.advice[0] and "prior rows" in est.advice[0]


def test_calibration_replaces_the_prior(tmp_path: Path, tiny_cost) -> None:
    sig = tiny_cost.member_signature["fusion"]
    timing = MemberTiming(sig, "fusion", 16, 16 * 1e9, 16 * 1e9 / 2e12)  # 2 TFLOP/s measured
    cal = Calibration("Tesla T4", "t4", overall_tflops=4.0, members={sig: timing})
    path = cal.save(tmp_path / "cal.json")
    loaded = Calibration.load(path)
    assert loaded.members[sig].effective_tflops == pytest.approx(2.0)
    rows = {m.name: m for m in project(tiny_cost, 100, gpu_kind("t4"), calibration=loaded).members}
    assert rows["fusion"].tflops == pytest.approx(2.0) and "member measured" in rows["fusion"].throughput_source
    assert rows["roi_spinal"].tflops == pytest.approx(4.0) and "ensemble" in rows["roi_spinal"].throughput_source
    # another card: only the member's speed relative to the ensemble transfers
    p100 = {m.name: m for m in project(tiny_cost, 100, gpu_kind("p100"), calibration=loaded).members}
    assert p100["fusion"].tflops == pytest.approx(gpu_kind("p100").effective_tflops * 0.5)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="version"):
        Calibration.load(tmp_path / "bad.json")


def test_device_names_map_to_kinds() -> None:
    assert kind_of_device_name("Tesla T4") == "t4"
    assert kind_of_device_name("Tesla P100-PCIE-16GB") == "p100"
    assert kind_of_device_name("NVIDIA H200") == "h100"
    assert kind_of_device_name("NVIDIA GeForce RTX 4090") is None
    with pytest.raises(ValueError, match="unknown GPU kind"):
        gpu_kind("v100")


# -- offline, end to end ----------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("estimate tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_estimate_runs_offline_with_the_decode_measurement(no_network) -> None:
    est = estimate(Manifest(models=tiny_entries()), 50, gpu="t4", gpus=2, geometry=SMALL,
                   cpu_studies=1, cpu_image_size=(64, 96))
    assert est.cost.decode is not None and est.cost.decode.mb > 0 and est.cost.decode.cpu_s_per_mb > 0
    assert est.paths.decode_s > 0 and est.projected_hours > 0


def test_cli_json_offline(no_network, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from rsna_infer.cli import main

    path = save_manifest(Manifest(models=tiny_entries(), root=tmp_path), tmp_path / "m.json")
    small = ["--sagittal-slices", "10", "--axial-slices", "16", "--image-px", "64", "--no-cpu-measure"]
    assert main(["estimate", "--manifest", str(path), "--studies", "40", "--gpu", "p100", "--no-tta", "--json", *small]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["n_studies"] == 40 and d["tta"] is False and d["gpu"]["kind"] == "p100" and len(d["members"]) == 11
    assert d["costs"]["geometry"]["axial_slices"] == 16
    assert main(["estimate", "--manifest", str(path), "--studies", "40", *small]) == 0
    text = capsys.readouterr().out
    assert "PROJECTED" in text and "sag2d_t2" in text


def test_gpu_check_cpu_smoke_writes_a_calibration_that_estimate_reads(tmp_path: Path, tiny_cost) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "cal.json"
    assert module.main(["--cpu-smoke", "--out", str(out), "--time-limit", "240"]) == 0
    cal = Calibration.load(out)
    assert cal.kind == "cpu" and cal.overall_tflops > 0
    assert set(cal.members) == set(tiny_cost.signatures)  # every distinct tiny model was timed
    assert cal.extra["studies"] >= 1 and cal.extra["studies_per_s"] > 0
    assert 0 < cal.extra["device_busy_share"] <= 1.5  # forwards timed on the CPU clock: a share, with slack
    est = project(tiny_cost, 100, gpu_kind("t4"), calibration=cal)
    assert all("relative speed measured on CPU" in m.throughput_source for m in est.members)
    assert est.projected_hours > 0


def _notebook_cell(cell_id: str) -> str:
    nb = json.loads((REPO / "notebooks" / "kaggle_submission.ipynb").read_text())
    return "".join(next(c for c in nb["cells"] if c.get("id") == cell_id)["source"])


def test_the_notebook_prints_the_estimate_before_predicting_and_never_fails(
    no_network, tmp_path: Path, phantom_test_root: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    import rsna_infer.estimate

    # the cell's own defaults (full typical study, 384-512 px phantom) are covered above; small here for speed
    monkeypatch.setattr(rsna_infer.estimate, "cost_manifest",
                        functools.partial(cost_manifest, geometry=SMALL, cpu_image_size=(64, 96)))
    nb = json.loads((REPO / "notebooks" / "kaggle_submission.ipynb").read_text())
    ids = [c.get("id") for c in nb["cells"]]
    code = "\n".join("".join(nb["cells"][i]["source"]) for i in range(len(ids)))
    assert ids.index("estimate") < next(i for i, c in enumerate(nb["cells"]) if "rsna_infer.predict(" in "".join(c["source"]))
    assert "rsna_infer.estimate" in code
    cell = _notebook_cell("estimate")
    manifest = save_manifest(Manifest(models=tiny_entries(), root=tmp_path), tmp_path / "m.json")
    env = {"torch": torch, "COMP_ROOT": phantom_test_root, "MANIFEST": manifest, "TIME_BUDGET_S": 8.5 * 3600}
    exec(compile(cell, "estimate-cell", "exec"), dict(env))
    out = capsys.readouterr().out
    assert "projected" in out and "PROJECTED" in out and "estimate skipped" not in out
    assert "2000 studies" in out  # the hidden test set's size is projected too
    exec(compile(cell, "estimate-cell", "exec"), {**env, "MANIFEST": tmp_path / "missing.json"})
    assert "estimate skipped (ManifestError" in capsys.readouterr().out
