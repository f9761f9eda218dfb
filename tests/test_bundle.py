"""Kaggle bundle tooling: the notebook is a valid nbformat-4 notebook with the expected steps,
and build_wheel.sh parses and checks its inputs before touching anything (no network here)."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "kaggle_submission.ipynb"
SCRIPT = REPO / "build_wheel.sh"


def _notebook() -> dict:
    return json.loads(NOTEBOOK.read_text())


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def test_notebook_is_nbformat4() -> None:
    nb = _notebook()
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    ids = [c["id"] for c in nb["cells"]]
    assert len(ids) == len(set(ids))
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["source"], list) and all(isinstance(s, str) for s in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_notebook_steps_in_order() -> None:
    code = [_source(c) for c in _notebook()["cells"] if c["cell_type"] == "code"]
    joined = "\n".join(code)
    install = joined.index("pip install")
    predict = joined.index("rsna_infer.predict(")
    check = joined.index("validate_submission(")
    assert install < predict < check
    assert "--no-index --find-links /kaggle/input/rsna-infer-bundle/wheels" in joined
    assert '"rsna-infer[dicom]"' in joined
    assert "/kaggle/input/rsna-2024-lumbar-spine-degenerative-classification" in joined
    assert 'BUNDLE / "weights" / "weights_manifest.json"' in joined
    assert "/kaggle/working/submission.csv" in joined
    assert "test_series_descriptions.csv" in joined


def test_notebook_code_compiles() -> None:
    for cell in _notebook()["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = [ln for ln in _source(cell).splitlines() if not ln.lstrip().startswith("!")]
        ast.parse("\n".join(lines))


def test_notebook_uses_public_api() -> None:
    """Every name the notebook imports from rsna_infer.submission exists."""
    from rsna_infer import submission

    tree = ast.parse("\n".join(ln for c in _notebook()["cells"] if c["cell_type"] == "code" for ln in _source(c).splitlines() if not ln.lstrip().startswith("!")))
    names = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "rsna_infer.submission" for a in node.names]
    assert names and all(hasattr(submission, n) for n in names)


def test_build_wheel_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    help_text = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    assert "Usage:" in help_text and "WEIGHTS_DIR" in help_text


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_build_wheel_rejects_bad_weights(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), "--no-download", *args], capture_output=True, text=True)

    out = run(str(tmp_path / "nope"), str(tmp_path / "out"))
    assert out.returncode == 1 and "does not exist" in out.stderr

    weights = tmp_path / "w"
    (weights / "weights").mkdir(parents=True)
    (weights / "weights" / "a.safetensors").write_bytes(b"abc")
    manifest = {"models": [{"name": "a", "file": "weights/a.safetensors", "sha256": "0" * 64}, {"name": "b", "file": "weights/b.safetensors"}]}
    (weights / "weights_manifest.json").write_text(json.dumps(manifest))
    out = run(str(weights), str(tmp_path / "out"))
    assert out.returncode == 1
    assert "weights/a.safetensors: sha256" in out.stderr and "weights/b.safetensors: missing" in out.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the inputs check out


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_build_wheel_offline_bundle(tmp_path: Path) -> None:
    import hashlib
    import zipfile

    weights = tmp_path / "w"
    (weights / "weights").mkdir(parents=True)
    blob = b"not really safetensors"
    (weights / "weights" / "a.safetensors").write_bytes(blob)
    manifest = {"models": [{"name": "a", "file": "weights/a.safetensors", "sha256": hashlib.sha256(blob).hexdigest()}]}
    (weights / "demo_manifest.json").write_text(json.dumps(manifest))
    out_dir = tmp_path / "bundle"
    (out_dir / "wheels").mkdir(parents=True)
    (out_dir / "wheels" / "stale.whl").write_text("old")
    done = subprocess.run(["bash", str(SCRIPT), "--no-download", str(weights), str(out_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    wheels = sorted(p.name for p in (out_dir / "wheels").iterdir())
    assert len(wheels) == 1 and wheels[0].startswith("rsna_infer-") and wheels[0].endswith("-py3-none-any.whl")
    with zipfile.ZipFile(out_dir / "wheels" / wheels[0]) as zf:
        names = zf.namelist()
    assert "rsna_infer/metric.py" in names and "rsna_infer/submission.py" in names
    assert not any(n.startswith("tests/") for n in names)
    assert (out_dir / "weights" / "weights" / "a.safetensors").read_bytes() == blob
    assert (out_dir / "weights" / "demo_manifest.json").is_file()
    assert "weights/demo_manifest.json" in done.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_demo_weights_are_reported_as_demo_wherever_they_are(tmp_path: Path, phantom_test_root: Path) -> None:
    """Recognised by sha256, not by path: a copy of the demo weights under another name is a
    demo bundle for build_wheel.sh, for --merge and for predict."""
    from rsna_infer.models.manifest import demo_entries, load_manifest

    copy = tmp_path / "my_weights"
    shutil.copytree(REPO / "rsna_infer" / "demo", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "weights_manifest.json").rename(copy / "final.json")
    assert demo_entries(load_manifest(copy / "final.json"))
    done = subprocess.run(["bash", str(SCRIPT), "--no-download", "--manifest", "final.json", str(copy), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "DEMO weights" in done.stderr and "meaningless on real MRI" in done.stderr
    import rsna_infer

    rsna_infer.predict(phantom_test_root, tmp_path / "sub" / "submission.csv", manifest=copy / "final.json", device="cpu",
                       num_workers=0, progress=False)
    report = json.loads((tmp_path / "sub" / "run_report.json").read_text())
    assert report["manifest"]["demo"] is True and any("DEMO" in w for w in report["warnings"])
