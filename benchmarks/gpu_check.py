"""GPU check: the full-size ensemble on one card, in at most ~5 minutes, and the calibration
file that makes ``rsna-infer estimate`` a measurement instead of a guess.

    python benchmarks/gpu_check.py --out gpu_calibration.json            # on a machine with a GPU
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/cal.json       # anywhere: tiny models, CPU
    rsna-infer estimate --manifest weights_manifest.json --gpu t4 --calibration gpu_calibration.json

Self-contained: it needs no weights and no data. It

1. costs the manifest (default: the template ``weights_manifest.json``; ``--cpu-smoke``: the
   tiny ensemble of every family) on a typical study, as ``rsna-infer estimate`` does;
2. times each distinct model's ``family.run`` (flip TTA; on CUDA fp16 weights under fp16
   autocast, as the predictor holds them) on a batch of the typical study's real sample
   shapes, the size a 16-study chunk gives (at most ``--batch-size``), with CUDA events:
   effective TFLOP/s per model; its peak device memory against the plan's figure
   (`rsna_infer.runtime.memory`); then, time allowing, the same with channels-last weights
   (``--channels-last`` of the predictor): the speed-up per model;
3. writes phantom test studies (384-512 px, some with two axial series) and random-init
   weights (one file per distinct model, folds share it), builds the `Predictor` and runs
   ``Predictor.run`` on them: studies/s, peak device memory, the share of the run's wall
   time the device spends inside model forwards (CUDA events around every forward), the
   per-member forward seconds;
4. runs the first studies again with members streamed (loaded group by group, as when the
   ensemble does not fit the card): the largest |Δp| against the resident run (0 expected)
   and the host-to-device rate of the weight loads; then with the fp32 weights read back
   and autocast switched off inside every forward (fp32): the largest |p_fp16 - p_fp32| of
   the blended probabilities (fp16 weights and fp16 arithmetic together);
5. writes the calibration JSON (``rsna_infer.estimate.Calibration``) and prints a
   README-ready table.

Every step checks the time left (``--time-limit``, default 290 s) and is skipped with a
note when it would not fit; what was measured is always written. Random weights make the
probabilities meaningless but the arithmetic, shapes and timings are the real ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("gpu_check")
CHUNK = 16  # studies per chunk in the predictor (rsna_infer.settings.DEFAULT_CHUNK_SIZE)


class Clock:
    """Time left before ``--time-limit``; steps ask before they start."""

    def __init__(self, limit_s: float) -> None:
        self.t0 = time.perf_counter()
        self.limit_s = float(limit_s)
        self.notes: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.limit_s - self.elapsed()

    def allow(self, what: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.notes.append(f"skipped {what}: {self.left():.0f} s left, needs ~{need_s:.0f} s")
        logger.warning(self.notes[-1])
        return False


class Stopwatch:
    """Device time of a region: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device) -> None:  # noqa: ANN001
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch
        self.spans: list[tuple[str, object, object]] = []

    def start(self) -> object:
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, name: str, begin: object) -> None:
        self.spans.append((name, begin, self.start()))

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            self.torch.cuda.synchronize()
        out: dict[str, float] = {}
        for name, a, b in self.spans:
            s = a.elapsed_time(b) / 1000.0 if self.cuda else b - a  # type: ignore[attr-defined,operator]
            out[name] = out.get(name, 0.0) + s
        return out


def _sync(device) -> None:  # noqa: ANN001
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- step 2: per-model forward throughput --------------------------------------------------


def time_models(cost, device, batch_size: int, clock: Clock, min_reps: int = 3, min_s: float = 0.5,  # noqa: ANN001
                models: dict | None = None) -> dict:
    """MemberTiming per cost signature (see module docstring, step 2); ``models`` collects
    per signature the memory check and the channels-last speed-up."""
    import torch

    from rsna_infer.models.registry import make_family

    timings = {}
    models = {} if models is None else models
    entries = {e.name: e for e in cost.entries}
    for sig, sc in cost.signatures.items():
        shape = max(sc.shapes, key=lambda s: s.per_study)
        if shape.example is None:
            clock.notes.append(f"{sig}: no typical sample to time")
            continue
        if not clock.allow(f"timing {sig}", 15.0):
            continue
        try:
            models[sig] = {}
            timings[sig] = _time_one(make_family(entries[sc.name]), sc.name, sig, shape, device, batch_size, min_reps, min_s,
                                     extra=models[sig])
        except Exception as e:  # one model that fails (out of memory, say) must not lose the others
            clock.notes.append(f"{sig}: timing failed ({type(e).__name__}: {str(e)[:200]})")
            logger.exception("timing %s failed", sig)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return timings


def time_channels_last(cost, device, batch_size: int, clock: Clock, timings: dict, models: dict,  # noqa: ANN001
                       min_reps: int = 3, min_s: float = 0.5) -> None:
    """The predictor's ``channels_last`` option per model, time allowing: speed-up over
    the default memory format (> 1: faster), into ``models[signature]``."""
    import torch

    from rsna_infer.models.registry import make_family

    entries = {e.name: e for e in cost.entries}
    for sig, t in list(timings.items()):
        sc = cost.signatures[sig]
        if not clock.allow(f"channels-last timing of {sig}", 15.0):
            break
        try:
            cl = _time_one(make_family(entries[sc.name]), sc.name, sig, max(sc.shapes, key=lambda s: s.per_study), device,
                           batch_size, min_reps, min_s, channels_last=True)
            models.setdefault(sig, {})["channels_last_speedup"] = round(t.seconds_per_call / cl.seconds_per_call, 3)
        except Exception as e:
            models.setdefault(sig, {})["channels_last_speedup"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _time_one(family, name: str, sig: str, shape, device, batch_size: int, min_reps: int, min_s: float,  # noqa: ANN001, ANN202
              channels_last: bool = False, extra: dict | None = None):
    import torch

    from rsna_infer.estimate import MemberTiming
    from rsna_infer.models.members import autocast_for, cast_weights, to_channels_last
    from rsna_infer.runtime.memory import batch_bytes, member_memory, run_memory

    model = family.build().eval()
    if device.type == "cuda":
        cast_weights(model, torch.float16)  # as the predictor holds it
    if channels_last:
        to_channels_last(model)
    model.to(device)
    b = int(max(1, min(batch_size, round(CHUNK * shape.per_study))))
    cpu_batch = family.collate([shape.example] * b)
    batch = {k: v.to(device) for k, v in cpu_batch.items()}
    sw = Stopwatch(device)

    def call() -> None:
        with torch.inference_mode(), autocast_for(device):
            family.run(model, batch, tta=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    call()  # warm-up: cudnn autotuning, lazy init
    _sync(device)
    if extra is not None and device.type == "cuda":  # the plan's figure against the allocator's peak
        measured = torch.cuda.max_memory_allocated(device) - base + batch_bytes(cpu_batch)
        run, _ = run_memory(family, cpu_batch)
        planned = member_memory(name, "", run, b, batch_bytes(cpu_batch), "fp16", autocast=True).activation_bytes
        extra.update({"batch": b, "activation_mb_planned": round(planned / 2**20, 1),
                      "activation_mb_measured": round(measured / 2**20, 1),
                      "planned_over_measured": round(planned / measured, 3) if measured > 0 else None})
    reps, t = 0, time.perf_counter()
    while reps < min_reps or (time.perf_counter() - t < min_s and reps < 50):
        begin = sw.start()
        call()
        sw.stop("call", begin)
        _sync(device)  # the loop's own clock must see the device finish (kernels run asynchronously)
        reps += 1
    seconds = sw.seconds()["call"] / reps
    timing = MemberTiming(sig, name, b, b * shape.flops.tta, seconds)
    logger.info("%-48s batch %3d  %8.1f ms/call  %6.2f TFLOP/s", sig, b, 1000 * seconds, timing.effective_tflops)
    return timing


def ensemble_tflops(cost, timings: dict) -> float:  # noqa: ANN001
    """Effective TFLOP/s of the whole ensemble on a typical study: its FLOPs over the sum of
    its members' forward times (members without a timing are left out)."""
    flops = secs = 0.0
    for e in cost.entries:
        sig = cost.member_signature[e.name]
        t = timings.get(sig)
        if t is None or t.effective_tflops <= 0:
            continue
        f = cost.signatures[sig].flops_per_study(True)
        flops += f
        secs += f / (t.effective_tflops * 1e12)
    return flops / secs / 1e12 if secs > 0 else 0.0


# -- steps 3-4: the predictor end to end ---------------------------------------------------


def random_manifest(entries, out_dir: Path):  # noqa: ANN001
    """A `Manifest` of random-init weights, one file per distinct model (folds share it)."""
    import torch

    from rsna_infer.estimate import cost_signature
    from rsna_infer.models.manifest import Manifest, export_model
    from rsna_infer.models.registry import make_family

    written: dict[str, object] = {}
    models = []
    for i, e in enumerate(entries):
        sig = cost_signature(e)
        if sig not in written:
            torch.manual_seed(i)
            written[sig] = export_model(make_family(e).build(), replace(e, name=f"w{len(written)}"), out_dir)
        first = written[sig]
        models.append(replace(e, file=first.file, sha256=first.sha256))  # type: ignore[attr-defined]
    return Manifest(models=models, root=out_dir, notes="gpu_check: random-init weights")


class ForwardProbe:
    """Forward hooks on every model of a predictor: device time per member, and (when
    ``fp32``) autocast switched off inside each forward."""

    def __init__(self, predictor, device) -> None:  # noqa: ANN001
        self.sw = Stopwatch(device)
        self.fp32 = False
        self.device_type = device.type
        self.handles = []
        self.dtypes: set[str] = set()
        self.open: dict[str, list] = {}
        replica = predictor.replicas[0]  # one replica per device; the check uses one device
        for name, member in replica.items():
            self.handles.append(member.model.register_forward_pre_hook(self._pre(name)))
            self.handles.append(member.model.register_forward_hook(self._post(name)))

    def _set_autocast(self, enabled: bool) -> None:
        import torch

        try:
            torch.set_autocast_enabled(self.device_type, enabled)
        except TypeError:  # pragma: no cover - torch < 2.4
            torch.set_autocast_enabled(enabled)

    def _pre(self, name: str):  # noqa: ANN202
        def hook(module, args) -> None:  # noqa: ANN001
            if self.fp32 and self.device_type == "cuda":
                self._set_autocast(False)
            self.open.setdefault(name, []).append(self.sw.start())

        return hook

    def _post(self, name: str):  # noqa: ANN202
        def hook(module, args, out) -> None:  # noqa: ANN001
            self.sw.stop(name, self.open[name].pop())
            if hasattr(out, "dtype"):
                self.dtypes.add(str(out.dtype).replace("torch.", ""))
            if self.fp32 and self.device_type == "cuda":
                self._set_autocast(True)

        return hook

    def reset(self, fp32: bool) -> None:
        self.sw.spans.clear()
        self.dtypes.clear()
        self.fp32 = fp32

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def run_predictor(entries, device, n_studies: int, image_size: tuple[int, int], fp32_studies: int, clock: Clock,  # noqa: ANN001
                  work: Path, batch_size: int | None) -> dict:
    """Steps 3 and 4; returns the end-to-end figures."""
    import numpy as np
    import torch

    from rsna_infer.inference.engine import Predictor
    from rsna_infer.io import discover_studies
    from rsna_infer.synth import make_dataset

    out: dict[str, object] = {}
    t = time.perf_counter()
    ds = make_dataset(work / "phantom", n_studies, split="test", seed=3, image_size=image_size, second_axial_rate=0.3)
    refs = discover_studies(ds.root, split="test")
    out["phantom_s"] = round(time.perf_counter() - t, 1)
    out["dicom_mb"] = round(sum(p.stat().st_size for p in ds.files()) / 1e6, 1)
    t = time.perf_counter()
    man = random_manifest(entries, work / "weights")
    out["random_weights_s"] = round(time.perf_counter() - t, 1)
    if not clock.allow("the predictor run", 60.0):
        return out
    t = time.perf_counter()
    predictor = Predictor(man, device=str(device), tta=True, batch_size=batch_size, verify=False)
    out["setup_s"] = round(time.perf_counter() - t, 1)
    probe = ForwardProbe(predictor, device)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        probe.reset(fp32=False)
        _sync(device)
        t = time.perf_counter()
        res16 = predictor.run(refs, progress=False)
        _sync(device)
        wall = time.perf_counter() - t
        busy = probe.sw.seconds()
        out.update({
            "studies": len(refs), "wall_s": round(wall, 2), "studies_per_s": round(len(refs) / wall, 3),
            "device_busy_share": round(sum(busy.values()) / wall, 3) if wall > 0 else None,
            "forward_s_per_member": {k: round(v, 4) for k, v in sorted(busy.items())},
            "forward_dtypes": sorted(probe.dtypes),
            "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
            "studies_with_fallbacks": sum(1 for r in res16.records.values() if r.status != "ok"),
        })
        logger.info("predictor: %d studies in %.1f s (%.2f studies/s), device busy %.0f%% of the wall time", len(refs), wall,
                    len(refs) / wall, 100 * (out["device_busy_share"] or 0))
        out["memory"] = {k: v for k, v in res16.memory.items() if k != "plan"}
        out["memory_plan"] = (res16.memory.get("plan") or {}).get("reason")
        k = min(fp32_studies, len(refs))
        if clock.allow("the streamed comparison", 3.0 * wall * k / max(len(refs), 1) + 20.0):
            predictor.set_streaming(True)
            t = time.perf_counter()
            res_s = predictor.run(refs[:k], progress=False)
            out["streamed_wall_s"] = round(time.perf_counter() - t, 2)
            common = [s for s in res_s.probs if s in res16.probs]
            out["streamed_vs_resident_max_abs_dp"] = max(
                (float(np.max(np.abs(res16.probs[s] - res_s.probs[s]))) for s in common), default=None)
            load_s = res_s.memory.get("load_s") or 0.0
            loaded = sum(m.weight_bytes for m in predictor.replicas[0].values()) * max(1, -(-k // CHUNK))
            out["streamed_loads"] = res_s.memory.get("loads")
            out["h2d_gbps"] = round(loaded / load_s / 1e9, 2) if load_s > 0 else None
            predictor.set_streaming(False)
        if device.type != "cuda":
            out["fp16_vs_fp32_max_abs_dp"] = None
            clock.notes.append("fp16 vs fp32: not measured on the CPU (inference there is fp32 only)")
        elif clock.allow("the fp32 comparison", 8.0 * wall * k / max(len(refs), 1) + 20.0):
            from rsna_infer.models.manifest import load_weights

            for e in man.models:  # the fp32 weights back, as they are in the files
                m = predictor.replicas[0][e.name]
                load_weights(m.model.float(), man.resolve(e), strict=True)
                m.weight_dtype = torch.float32
            probe.reset(fp32=True)
            res32 = predictor.run(refs[:k], progress=False)
            common = [s for s in res32.probs if s in res16.probs]
            dp = max((float(np.max(np.abs(res16.probs[s] - res32.probs[s]))) for s in common), default=None)
            out["fp16_vs_fp32_max_abs_dp"] = dp
            out["fp16_vs_fp32_studies"] = len(common)
            out["fp32_forward_dtypes"] = sorted(probe.dtypes)
            if "float16" in probe.dtypes:
                clock.notes.append("fp32 pass still produced float16 outputs: autocast was not switched off; Δp is not valid")
    finally:
        probe.close()
    return out


# -- report --------------------------------------------------------------------------------


def table(cost, timings: dict, cal_overall: float, e2e: dict, device_name: str, precision: str) -> str:  # noqa: ANN001
    """README-ready markdown."""
    counts: dict[str, int] = {}
    for e in cost.entries:
        counts[cost.member_signature[e.name]] = counts.get(cost.member_signature[e.name], 0) + 1
    lines = [f"GPU check on {device_name}: per distinct model (flip TTA, {precision}), batch = a 16-study chunk's samples",
             "", "| model | members | batch | GFLOP/call | ms/call | TFLOP/s |", "|---|---:|---:|---:|---:|---:|"]
    for sig, t in timings.items():
        lines.append(f"| `{sig.split('#')[0]}` | {counts.get(sig, 0)} | {t.batch} | {t.flops_per_call / 1e9:,.1f} | "
                     f"{1000 * t.seconds_per_call:,.1f} | {t.effective_tflops:.2f} |")
    lines += ["", f"- ensemble effective throughput on a typical study: **{cal_overall:.3g} TFLOP/s**"]
    checks = e2e.get("models") or {}
    ratios = [v["planned_over_measured"] for v in checks.values() if isinstance(v.get("planned_over_measured"), float)]
    if ratios:
        lines.append(f"- device memory plan / measured activation peak per model: {min(ratios):.2f}-{max(ratios):.2f}")
    speed = {k.split('#')[0]: v["channels_last_speedup"] for k, v in checks.items() if isinstance(v.get("channels_last_speedup"), float)}
    if speed:
        lines.append("- channels-last speed-up per model: " + ", ".join(f"`{k}` {v:.2f}x" for k, v in speed.items()))
    if "studies_per_s" in e2e:
        mem = e2e.get("peak_memory_mb")
        dp = e2e.get("fp16_vs_fp32_max_abs_dp")
        lines += [
            f"- predictor on {e2e['studies']} phantom studies ({e2e.get('dicom_mb')} MB): {e2e['studies_per_s']} studies/s, "
            f"device inside model forwards {100 * (e2e.get('device_busy_share') or 0):.0f}% of the wall time, setup {e2e.get('setup_s')} s",
            f"- peak device memory: {'n/a (CPU)' if mem is None else f'{mem:,.0f} MB'}"
            + (f"; plan: {e2e.get('memory_plan')}" if e2e.get("memory_plan") else ""),
            f"- streamed members vs resident, max |Δp|: {e2e.get('streamed_vs_resident_max_abs_dp')}, weight loads at "
            f"{e2e.get('h2d_gbps')} GB/s",
            f"- fp16 vs fp32, max |Δp| of the blended probabilities: {'n/a' if dp is None else f'{dp:.2e}'}"
            + (f" ({e2e.get('fp16_vs_fp32_studies')} studies)" if dp is not None else ""),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, default=None, help="manifest to check (weights not needed; default: the template)")
    p.add_argument("--out", type=Path, default=Path("gpu_calibration.json"), help="calibration JSON to write")
    p.add_argument("--studies", type=int, default=None, help="phantom studies for the predictor run (default 6; smoke 2)")
    p.add_argument("--fp32-studies", type=int, default=2, help="studies re-run in fp32 for the agreement check")
    p.add_argument("--batch-size", type=int, default=32, help="largest batch (the predictor's CUDA default)")
    p.add_argument("--time-limit", type=float, default=290.0, help="seconds for the whole check (default 290)")
    p.add_argument("--device", default=None, help="default cuda:0 (cpu with --cpu-smoke)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny ensemble, tiny phantoms, CPU: checks the script end to end")
    p.add_argument("--json", action="store_true", help="print the calibration JSON instead of the table")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    clock = Clock(args.time_limit)

    import torch

    from rsna_infer.estimate import Calibration, StudyGeometry, cost_manifest, kind_of_device_name
    from rsna_infer.models.manifest import Manifest, load_manifest
    from rsna_infer.models.random_weights import tiny_entries

    if args.device is None:
        args.device = "cpu" if args.cpu_smoke else "cuda:0"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible: run on a GPU machine, or pass --cpu-smoke (or --device cpu)")
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
        kind = kind_of_device_name(name)
    else:
        name, kind = "CPU", "cpu"
    if args.manifest is not None:
        man = load_manifest(args.manifest, check_files=False)
    elif args.cpu_smoke:
        man = Manifest(models=tiny_entries())
    else:
        man = load_manifest(REPO / "weights_manifest.json", check_files=False)
    if args.cpu_smoke:  # everything small: the point is to run every step, not to measure
        torch.set_num_threads(1)
        geometry = StudyGeometry(sagittal_slices=10, axial_slices=16, image_px=64)
        n_studies, image_size, reps, min_s = args.studies or 1, (64, 96), 1, 0.0
        args.batch_size = min(args.batch_size, 2)
    else:
        geometry = StudyGeometry()
        n_studies, image_size, reps, min_s = args.studies or 6, (384, 512), 3, 0.5
    logger.info("device %s (%s), torch %s, %d models", name, kind, torch.__version__, len(man.models))

    cost = cost_manifest(man, geometry, measure_cpu=False, memory_batch=None)  # memory: per model in step 2
    logger.info("costed %d distinct models in %.1f s: %.2f TFLOP per typical study with TTA", len(cost.signatures),
                cost.seconds, sum(cost.member(e.name).flops_per_study(True) for e in cost.entries) / 1e12)
    models: dict[str, dict] = {}
    timings = time_models(cost, device, args.batch_size, clock, min_reps=reps, min_s=min_s, models=models)
    overall = ensemble_tflops(cost, timings)
    e2e: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        try:
            e2e = run_predictor(man.models, device, n_studies, image_size, args.fp32_studies, clock, Path(tmp), args.batch_size)
        except Exception as e:  # the calibration above is still worth writing
            logger.exception("predictor run failed")
            clock.notes.append(f"predictor run failed: {type(e).__name__}: {e}")
    time_channels_last(cost, device, args.batch_size, clock, timings, models, min_reps=reps, min_s=min_s)
    e2e["models"] = models
    e2e["elapsed_s"] = round(clock.elapsed(), 1)
    e2e["notes"] = clock.notes
    precision = "fp16 weights, fp16 autocast" if device.type == "cuda" else "fp32 (CPU)"
    cal = Calibration(
        device_name=name, kind=kind, overall_tflops=overall if overall > 0 else 1e-9, members=timings,
        torch_version=torch.__version__, precision=precision,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"), extra=e2e,
    )
    path = cal.save(args.out)
    print(json.dumps(cal.to_dict(), indent=1) if args.json else table(cost, timings, overall, e2e, name, precision))
    for n in clock.notes:
        print(f"note: {n}")
    print(f"calibration written to {path} ({clock.elapsed():.0f} s); use: rsna-infer estimate --calibration {path}")
    return 0 if timings else 1


if __name__ == "__main__":
    sys.exit(main())
