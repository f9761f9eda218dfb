"""``rsna-infer predict`` on fake families (see predict_fakes.py and fake_cli.py)."""

import json

import pandas as pd
import pytest
from predict_fakes import fake_manifest, fake_root, use_fake_cli, use_fake_families

from rsna_infer import cli


@pytest.fixture
def fam(monkeypatch):
    use_fake_families(monkeypatch)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fake_root(tmp_path_factory.mktemp("root"))


def test_cli_predict(fam, root, tmp_path, capsys, monkeypatch):
    man = fake_manifest(tmp_path)
    out = tmp_path / "cli" / "sub.csv"
    use_fake_cli(monkeypatch)
    rc = cli.main(["predict", str(root), "--out", str(out), "--manifest", str(man), "--workers", "0", "--no-tta",
                   "--device", "cpu", "--chunk-size", "3"])
    assert rc == 0 and out.is_file() and (out.parent / "run_report.json").is_file()
    assert len(pd.read_csv(out)) == 175
    assert json.loads((out.parent / "run_report.json").read_text())["settings"]["tta"] is False
    assert cli.main(["predict", str(root), "--out", str(out), "--manifest", str(tmp_path / "none.json")]) == 1
    err = capsys.readouterr().err
    assert "manifest not found" in err and "Traceback" not in err

