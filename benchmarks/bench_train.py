"""Full-size training steps of every competition recipe: time and peak memory per study, and
the projected peak on a 16 GB GPU at the recipe's batch size.

    python benchmarks/bench_train.py                       # every recipe in configs/stage1, configs/stage2
    python benchmarks/bench_train.py --only axial_level_convnext_tiny --steps 3

For each recipe, in a fresh subprocess (so that its peak RSS is its own): one phantom training
study (`rsna_infer.synth`, real-size images) is prepared by the recipe's family exactly as in
training (``prepare`` with augmentation, ``targets``, ``collate``): one study's samples at the
recipe's full input size, i.e. one unit of ``batch_size``. The axial level classifier, whose
sample is a whole axial stack, is padded to its ``input.extra.max_slices`` cap, its worst case.
Then a warm-up step and ``--steps`` timed steps of forward, loss, backward, clip and AdamW, in
fp32 on CPU.

Measured per study: step time (CPU, ``--threads``), the process's peak RSS growth during the
steps, and the bytes of tensors autograd keeps for the backward pass (`saved_tensors_hooks`,
unique storages, parameters excluded): the activation memory, which grows linearly with the
batch. Projected for a 16 GB card, at the recipe's ``batch_size`` with fp16 AMP::

    params x 20 B (fp32 weights 4 + grads 4 + AdamW moments 8 + EMA 4)
    + 0.6 x activations(fp32) x batch_size     (fp16 under autocast; norms, softmax and
                                                the loss stay fp32, hence 0.6, not 0.5)
    + 1.0 GB                                   (CUDA context, cuDNN workspace, allocator slack)

The projection is an estimate from CPU measurements, not a GPU measurement; the recipes'
batch sizes keep it under ~13 GB so that the estimate has room to be wrong.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATIC_BYTES_PER_PARAM = 20
AMP_ACTIVATION_FACTOR = 0.6
OVERHEAD_GB = 1.0
CARD_GB = 16.0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _phantom(work: Path, size: tuple[int, int]) -> Path:
    from rsna_infer.synth import make_dataset

    root = work / f"phantom_{size[0]}_{size[1]}"
    if not (root / "train.csv").is_file():
        make_dataset(root, 1, split="train", seed=11, image_size=size, progress=False)
    return root


def _batch(cfg, data, sid):
    """One study's training samples at full size, collated (and the axial stack at its cap)."""
    import numpy as np
    import torch

    from rsna_infer.models.registry import make_family
    from rsna_infer.train.samples import Collate, StudyDataset

    family = make_family(cfg.model_entry(0))
    ds = StudyDataset(family, data, [sid], train=True, seed=0)
    item = ds[(0, 0)]
    if not item.samples:
        raise RuntimeError(f"{cfg.name}: the phantom study yields no training sample ({item.error})")
    cap = int(cfg.input.extra.get("max_slices", 0) or 0)
    if family.name == "axial_level" and cap:
        for s, t in zip(item.samples, item.targets):  # worst case: a stack as long as the cap
            n = len(s.inputs["image"])
            idx = np.arange(cap) % n
            s.inputs["image"] = s.inputs["image"][idx]
            t["cls"] = t["cls"][idx]
    batch = Collate(family, with_targets=True)([item])
    return family, batch, torch


def _one(args: argparse.Namespace) -> None:
    """Child: one recipe; prints a JSON line."""
    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from rsna_infer.train.config import load_config
    from rsna_infer.train.data import TrainingData
    from rsna_infer.train.trainer import batch_loss, param_groups

    cfg = load_config(args.recipe, check_family=False)
    root = _phantom(Path(args.work), tuple(args.image_size))
    data = TrainingData.open(root, cache_dir=Path(args.work) / "cache")
    sid = data.study_ids[0]
    family, batch, _ = _batch(cfg, data, sid)
    model = family.build().train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            saved[st.data_ptr()] = st.nbytes()
        return t

    def step(measure: bool) -> float:
        t0 = time.perf_counter()
        if measure:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = batch_loss(family, model(batch.inputs), batch)
        else:
            loss = batch_loss(family, model(batch.inputs), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t0

    rss0 = _rss_mb()
    step(measure=True)  # warm-up (allocates grads and AdamW state) + activation count
    times = [step(measure=False) for _ in range(args.steps)]
    shapes = {k: list(v.shape) for k, v in batch.inputs.items()}
    print(json.dumps({
        "recipe": cfg.name, "family": cfg.family, "arch": cfg.arch, "batch_size": cfg.batch_size, "params": params,
        "inputs": shapes, "samples": len(batch.samples), "step_s": min(times), "rss_growth_mb": _rss_mb() - rss0,
        "peak_rss_mb": _rss_mb(), "activations_mb": sum(saved.values()) / 2**20, "threads": args.threads,
    }))


def project_gb(r: dict) -> float:
    """Projected peak on a CUDA card at the recipe's batch size with fp16 AMP (see the module doc)."""
    static = r["params"] * STATIC_BYTES_PER_PARAM / 2**30
    return static + AMP_ACTIVATION_FACTOR * r["activations_mb"] / 1024 * r["batch_size"] + OVERHEAD_GB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", type=Path, default=REPO / "configs")
    p.add_argument("--only", nargs="*", default=None, help="recipe names (default: all)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up (the fastest is reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--image-size", type=int, nargs=2, default=(384, 512), metavar=("MIN", "MAX"),
                   help="phantom image sizes (real studies: 256-1024 px)")
    p.add_argument("--work", default=None, help="folder for the phantom study (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--rows", type=Path, default=None,
                   help="print the table of rows measured before (--json output), projected at the recipes' current "
                        "batch sizes, without measuring again")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown (docs/train.md)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--recipe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        _one(args)
        return
    sys.path.insert(0, str(REPO))
    from rsna_infer.train.config import load_config
    from rsna_infer.train.recipes import recipe_paths

    paths = {load_config(q, check_family=False).name: q for q in recipe_paths(args.configs)}
    names = args.only or list(paths)
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_") if args.work is None else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.rows is not None:
        batch = {n: load_config(q, check_family=False).batch_size for n, q in paths.items()}
        rows = [{**r, "batch_size": batch.get(r["recipe"], r["batch_size"])} for r in json.loads(args.rows.read_text())]
        rows = [r for r in rows if r["recipe"] in names]
    else:
        print(f"full-size training step per study, fp32 on CPU ({args.threads} threads), phantom images "
              f"{args.image_size[0]}-{args.image_size[1]} px; projection: 16 GB card, fp16 AMP, recipe batch")
    if args.markdown:
        print("| recipe | params | input of one study | step s / study (CPU) | RSS growth GB | activations GB / study | batch | projected GB |")
        print("|---|---|---|---|---|---|---|---|")
    else:
        print(f"{'recipe':32} {'params':>7} {'input (one study)':28} {'step s':>7} {'RSS+ GB':>8} {'act GB':>7} "
              f"{'batch':>5} {'proj GB':>8}")
    for name in names if args.rows is None else [r["recipe"] for r in rows]:
        if args.rows is None:
            cmd = [sys.executable, __file__, "--one", "--recipe", str(paths[name]), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--work", str(work), "--image-size", *map(str, args.image_size)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name:32} FAILED: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(r)
        else:
            r = next(x for x in rows if x["recipe"] == name)
        r["projected_gb"] = project_gb(r)
        main_input = max(r["inputs"].items(), key=lambda kv: len(kv[1]))
        shape = "x".join(map(str, main_input[1]))
        cells = (name, f"{r['params'] / 1e6:.1f}M", shape, f"{r['step_s']:.1f}", f"{r['rss_growth_mb'] / 1024:.2f}",
                 f"{r['activations_mb'] / 1024:.2f}", str(r["batch_size"]), f"{r['projected_gb']:.1f}")
        if args.markdown:
            print("| " + " | ".join(f"`{c}`" if i == 0 else c for i, c in enumerate(cells)) + " |")
        else:
            print(f"{cells[0]:32} {cells[1]:>7} {cells[2]:28} {cells[3]:>7} {cells[4]:>8} {cells[5]:>7} {cells[6]:>5} "
                  f"{cells[7]:>8}" + ("" if r["projected_gb"] <= CARD_GB else "  > 16 GB"))
    if args.json and args.rows is None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
