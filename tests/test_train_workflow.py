"""docs/train.md's whole path, every command exactly as written, on phantom studies:

competition zip -> cache -> folds -> stage 1 (torchrun, 2 gloo processes, --fold all) ->
out-of-fold keypoints -> stage 2 -> merge -> fit-blend -> verify -> build_wheel.sh -> the Kaggle
notebook's cells: an offline install (``pip --no-index`` from the bundle's wheelhouse) into a
fresh virtual environment that has the image's packages but not rsna_infer, then ``predict``.

The docs' blocks are taken from the file (between ``<!-- workflow:... -->`` markers) and run
with the variables their first lines read pointed at temporary folders and tiny configs
(demo-sized models, one epoch of two steps), so the commands users copy are the ones tested.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from rsna_infer.synth import make_dataset

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "train.md"
DEMO_CONFIGS = REPO / "configs" / "demo"
#: the tiny ensemble: two stage-1 families (sagittal T2 and T1), two graders
STAGE1 = ("sag2d_t2", "sag2d_t1")
STAGE2 = ("roi_spinal", "fusion")


def doc_block(name: str) -> str:
    """The fenced code block after ``<!-- workflow:NAME -->`` in docs/train.md."""
    text = DOC.read_text()
    m = re.search(rf"<!-- workflow:{name} -->\s*```\w*\n(.*?)```\s*<!-- /workflow -->", text, re.S)
    assert m, f"docs/train.md has no <!-- workflow:{name} --> block"
    return m.group(1)


def _tiny_configs(dest: Path) -> Path:
    for stage, names in (("stage1", STAGE1), ("stage2", STAGE2)):
        (dest / stage).mkdir(parents=True)
        for name in names:
            cfg = json.loads((DEMO_CONFIGS / f"{name}.json").read_text())
            cfg.update(batch_size=2, export_dtype="float32")
            (dest / stage / f"{name}.json").write_text(json.dumps(cfg))
    return dest


def _zip_like_kaggle(root: Path, zip_path: Path) -> Path:
    """The competition zip's layout: train.csv, train_images/... at the top."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(root).as_posix())
    return zip_path


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # rsna-infer, torchrun, python
    env["PYTHONPATH"] = str(REPO)  # this checkout's rsna_infer, also in torchrun's processes
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def _fresh_venv(path: Path) -> Path:
    """A virtual environment that sees the running interpreter's packages (torch, timm, timm-3d,
    pydicom, the decoders, pip: a stand-in for Kaggle's image, without installing GBs of torch)
    but not rsna_infer: a folder of links to every site-packages entry except rsna_infer's,
    on the new environment's path through a .pth file."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    shared = path / "shared-site"
    shared.mkdir()
    for site in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        for entry in Path(site).iterdir():
            low = entry.name.lower()
            if low.startswith(("rsna_infer", "rsna-infer", "__editable__", "_rsna_infer")) or low.endswith(".pth"):
                continue
            if not (shared / entry.name).exists():
                (shared / entry.name).symlink_to(entry)
    py = path / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "kaggle_image.pth").write_text(str(shared) + "\n")
    return py


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="build_wheel.sh needs git")
def test_docs_path_from_the_competition_zip_to_a_kaggle_submission(tmp_path):
    # the "competition data": phantom studies in the Kaggle layout, zipped like the download
    phantom = make_dataset(tmp_path / "phantom", 10, split="train", seed=21, image_size=(64, 96), progress=False)
    zip_path = _zip_like_kaggle(phantom.root, tmp_path / "rsna-2024-lumbar-spine-degenerative-classification.zip")
    work = tmp_path / "work"
    env = _env(ZIP=str(zip_path), DATA=str(tmp_path / "data"), WORK=str(work), CONFIGS=str(_tiny_configs(tmp_path / "configs")),
               NPROC="2", TRAIN_ARGS="--set epochs=1 --max-steps 2 --no-progress", BUNDLE_NO_DOWNLOAD="1")
    done = subprocess.run(["bash", "-c", doc_block("train")], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]

    # what the path produced: one split everywhere, every fold of every model, an honest blend
    folds = pd.read_csv(work / "folds.csv")
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4] and len(folds) == 10
    man = json.loads((work / "bundle" / "weights_manifest.json").read_text())
    names = sorted(m["name"] for m in man["models"])
    assert names == sorted(f"demo_{n}_f{k}" for n in STAGE1 + STAGE2 for k in range(5))
    assert all(not Path(m["file"]).is_absolute() and m["file"].startswith("weights/") for m in man["models"])
    assert len({r["split"] for r in (json.loads(p.read_text()) for p in work.glob("stage*/*/run_f*.json"))}) == 1
    record = json.loads((work / "stage1" / "sag2d_t2" / "run_f0.json").read_text())
    assert record["world_size"] == 2 and record["split"] == man["split"]  # trained under torchrun, 2 processes
    record = json.loads((work / "stage2" / "roi_spinal" / "run_f3.json").read_text())
    assert record["validation"]["keypoints"] == "predicted" and not record["validation"]["truth_keypoint_studies"]
    assert "fitted blend" in done.stdout and "class priors" in done.stdout  # fit-blend's report
    assert all(set(m["blend"]) == {"spinal", "foraminal", "subarticular"} for m in man["models"] if m["stage"] == 2)
    kaggle = work / "kaggle"
    assert (kaggle / "weights" / "weights_manifest.json").is_file()
    assert [p.name for p in (kaggle / "wheels").glob("rsna_infer-*.whl")]

    # the notebook's cells, pointed at the bundle and a phantom test set, in a fresh environment
    test = make_dataset(tmp_path / "test_root", 3, split="test", seed=22, image_size=(64, 96), progress=False)
    cells = doc_block("kaggle")
    cells = (cells.replace("/kaggle/input/rsna-infer-bundle", str(kaggle))
             .replace("/kaggle/input/rsna-2024-lumbar-spine-degenerative-classification", str(test.root))
             .replace("/kaggle/working", str(tmp_path / "working")))
    (tmp_path / "working").mkdir()
    py = _fresh_venv(tmp_path / "venv")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_FIND_LINKS")}
    clean["PIP_CONFIG_FILE"] = os.devnull
    for line in cells.splitlines():
        if line.startswith("!pip "):
            pip = subprocess.run([str(py), "-m", "pip", *shlex.split(line[len("!pip "):]), "--no-cache-dir",
                                  "--disable-pip-version-check"], cwd=tmp_path / "working", env=clean,
                                 capture_output=True, text=True, timeout=600)
            assert pip.returncode == 0, pip.stdout + pip.stderr
            assert "--no-index" in line
    code = "\n".join(ln for ln in cells.splitlines() if not ln.startswith("!"))
    code += "\nprint('RSNA_INFER_FROM', rsna_infer.__file__)"
    run = subprocess.run([str(py), "-c", code], cwd=tmp_path / "working", env=clean, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    installed = Path(run.stdout.split("RSNA_INFER_FROM", 1)[1].split()[0])
    assert str(tmp_path / "venv") in str(installed) and str(REPO) not in str(installed)  # the bundle's wheel, not this checkout
    sub = pd.read_csv(tmp_path / "working" / "submission.csv")
    assert len(sub) == 25 * 3 and list(sub.columns) == ["row_id", "normal_mild", "moderate", "severe"]
    report = json.loads((tmp_path / "working" / "run_report.json").read_text())
    assert report["manifest"]["demo"] is False and report["models"]
