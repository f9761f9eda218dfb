#!/usr/bin/env python
"""Train the demo weights that ship inside the package (``rsna_infer/demo/``), on CPU.

    python scripts/train_demo.py                 # everything, into rsna_infer/demo/
    python scripts/train_demo.py --work /tmp/w   # keep the phantom, cache and runs there

What it does (``configs/demo/plan.json`` sets the numbers), the workflow of docs/train.md in
miniature:

0. loads and validates every config of the plan (with ``--set`` overrides) before anything
   else, so that a bad field fails in seconds, not after the phantom is built;
1. writes a phantom training set (``train_seed``; the demo's test seed is another one);
2. writes one study-level split (``folds.csv``, ``n_folds``) that every run shares (each
   records its id), and trains every stage-1 config of the plan on all folds but
   ``val_fold`` (the held-out fold picks the best epoch);
3. runs the stage-1 chain (folds averaged, cross-view fallback) on the held-out studies:
   their *predicted* keypoints;
4. trains every stage-2 config (crops from jittered true keypoints), validating on crops
   from those predicted keypoints, so the out-of-fold logits look like test time;
5. merges everything into one manifest with the weights copied beside it, fits the
   per-group blend weights on the out-of-fold logits (the metric itself), and writes
   ``phantom.json`` (phantom options, seeds, CV figures) for ``rsna-infer demo``.

Reproducible: same plan and configs, same weights (CPU, fixed seeds, single-process data).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("train_demo")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", type=Path, default=REPO / "configs" / "demo" / "plan.json")
    p.add_argument("--configs", type=Path, default=None, help="folder of the plan's configs (default: the plan's folder)")
    p.add_argument("--out", type=Path, default=REPO / "rsna_infer" / "demo", help="where the manifest and weights go")
    p.add_argument("--work", type=Path, default=None, help="working folder (phantom, cache, runs); default: a temp dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every config (e.g. epochs=1 for a smoke run; then also pass --out "
                        "elsewhere, or the packaged demo is overwritten)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="with --work: keep finished stage-1 runs of an unchanged config, continue interrupted ones "
                        "from their checkpoints (stage 2 always retrains)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import torch

    plan = json.loads(args.plan.read_text())
    torch.set_num_threads(int(plan.get("threads", 2)))
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="rsna_demo_train_")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(plan, args.configs or args.plan.parent, args.out, work, args.overrides, not args.no_progress, args.resume)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(plan: dict, config_dir: Path, out: Path, work: Path, overrides: list[str], progress: bool, resume: bool) -> int:
    from rsna_infer.models.manifest import load_manifest, save_manifest
    from rsna_infer.synth import make_dataset
    from rsna_infer.train.blend import fit_blend, format_report, load_oof
    from rsna_infer.train.config import load_config, parse_override
    from rsna_infer.train.data import TrainingData
    from rsna_infer.train.folds import make_folds, save_folds, split_id
    from rsna_infer.train.keypoint_store import save_keypoints
    from rsna_infer.train.manifests import merge_manifests, set_blend_weights
    from rsna_infer.train.oof_keypoints import predict_oof_keypoints
    from rsna_infer.train.trainer import train_fold

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if int(plan["test_seed"]) == int(plan["train_seed"]):
        raise SystemExit("plan: test_seed must differ from train_seed")
    over = dict(parse_override(o) for o in overrides)
    configs = {name: load_config(config_dir / f"{name}.json", overrides={**over, "n_folds": int(plan["n_folds"])})
               for name in plan["stage1"] + plan["stage2"]}  # every config checked before the phantom is built

    root = work / "phantom_train"
    stamp = root / "plan.json"
    spec = {k: plan[k] for k in ("synth_options", "train_seed", "n_train")}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == spec):
        t = time.perf_counter()
        if root.exists():
            shutil.rmtree(root)
        make_dataset(root, int(plan["n_train"]), split="train", seed=int(plan["train_seed"]), progress=progress,
                     **plan["synth_options"])
        stamp.write_text(json.dumps(spec))
        timings["phantom"] = time.perf_counter() - t
    data = TrainingData.open(root, cache_dir=work / "cache")
    t = time.perf_counter()
    data.cache.ensure(data.study_ids, progress=progress)
    timings["decode"] = time.perf_counter() - t
    folds = make_folds(data.study_ids, data.label_array(data.study_ids), int(plan["n_folds"]), int(plan["train_seed"]))
    folds_csv = save_folds(folds, work / "folds.csv")
    k = int(plan["val_fold"])

    def train(name: str, **kw) -> Path:
        # --resume: the trainer keeps a finished stage-1 run of the same config and split, and
        # continues an interrupted one from its checkpoint; stage 2 (kw: new keypoints) retrains
        t0 = time.perf_counter()
        res = train_fold(configs[name], data, k, work / "runs" / name, folds_csv=folds_csv, progress=progress,
                         resume=resume and not kw, **kw)
        timings[name] = time.perf_counter() - t0
        logger.info("%s: epoch %d, val_metric %.4f, %.0f s", name, res.best_epoch, res.best_metric or float("nan"), timings[name])
        return res.manifest_path

    stage1 = [train(name) for name in plan["stage1"]]
    t = time.perf_counter()
    kps = predict_oof_keypoints(stage1, data, folds_csv, device="cpu", progress=progress)
    kp_file = save_keypoints(work / "keypoints_oof.npz", kps, split=split_id(folds))
    timings["oof_keypoints"] = time.perf_counter() - t
    stage2 = [train(name, keypoints_files=[kp_file]) for name in plan["stage2"]]

    # -- package: weights beside the manifest, blend weights, phantom settings ------------------
    if (out / "weights").exists():
        shutil.rmtree(out / "weights")
    notes = ("DEMO weights trained on synthetic phantom studies by scripts/train_demo.py "
             f"(plan {plan.get('notes', '')!r}); meaningless on real MRI.")
    man_path = merge_manifests(stage1 + stage2, out / "weights_manifest.json", copy_weights=True, notes=notes)
    man = load_manifest(man_path)
    fit = fit_blend(load_oof([work / "runs" / name for name in plan["stage2"]]), priors=man.priors)
    print(format_report(fit))
    save_manifest(set_blend_weights(man, fit.weights_by_member()), man_path)
    load_manifest(man_path, verify=True)

    kp_err = {}
    for name in plan["stage1"]:
        hist = json.loads((work / "runs" / name / f"history_f{k}.json").read_text())
        best = min(hist, key=lambda r: r["val_metric"])
        kp_err[name] = {key: round(v, 3) for key, v in best.items() if key.startswith("val_err")}
    timings["total"] = time.perf_counter() - t_start
    settings = {
        "synth_options": plan["synth_options"],
        "train_seeds": [int(plan["train_seed"])],
        "test_seed": int(plan["test_seed"]),
        "n_train": int(plan["n_train"]),
        "n_folds": int(plan["n_folds"]),
        "val_fold": k,
        "cv": {"blend": {c: round(v, 4) for c, v in fit.blend_score.items()},
               "members": {m: round(s["total"], 4) for m, s in fit.member_scores.items()},
               "keypoints_val": kp_err},
        "seconds": {n: round(v, 1) for n, v in timings.items()},
        "torch_threads": int(plan.get("threads", 2)),
    }
    (out / "phantom.json").write_text(json.dumps(settings, indent=2) + "\n")
    size = sum(f.stat().st_size for f in (out / "weights").glob("*.safetensors"))
    print(f"demo weights: {len(man.models)} models, {size / 1e6:.2f} MB in {out / 'weights'}; "
          f"total {timings['total'] / 60:.1f} min")
    print(json.dumps(settings["seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
