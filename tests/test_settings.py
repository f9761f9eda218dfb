"""RunSettings: every run option declared once, validated on construction, resolved once,
the CLI flags generated from it, and the run report writing it as it is."""

import argparse
import dataclasses
import inspect
import json

import pytest
import torch
from predict_fakes import fake_entries, use_fake_families, write_fake_root

from rsna_infer import settings as S
from rsna_infer.api import predict
from rsna_infer.commands import predict as command
from rsna_infer.inference.engine import Predictor
from rsna_infer.models.random_weights import make_random_manifest
from rsna_infer.settings import DEFAULT_CHUNK_SIZE, RunSettings

CPU = [torch.device("cpu")]
KEEP = lambda study, kp: kp  # noqa: E731  (stage-1 finalize: the fakes need none)
#: The keywords `rsna_infer.predict` took before RunSettings (besides test_dir, out_csv,
#: manifest, clock and finalize): every one is still accepted.
PREDICT_KEYWORDS = ("device", "tta", "num_workers", "time_budget_s", "chunk_size", "batch_size", "split", "report_path",
                    "progress", "study_timeout_s", "study_ids", "qa_dir", "qa_worst", "qa_labels", "read_ahead",
                    "precision", "channels_last", "members", "device_memory_gb")
#: The run report's ``settings`` keys.
REPORT_KEYS = {"tta", "num_workers", "read_ahead", "chunk_size", "batch_size", "time_budget_s", "study_timeout_s",
               "split", "precision", "members", "channels_last"}


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(["root", *argv])


def test_every_predict_keyword_is_a_run_option_and_predict_spells_none_out():
    assert set(PREDICT_KEYWORDS) == set(S.option_names())
    params = inspect.signature(predict).parameters
    assert not set(params) & set(S.option_names())  # declared once: in RunSettings, not in predict's signature
    assert params["options"].kind is inspect.Parameter.VAR_KEYWORD
    assert {f.name for f in dataclasses.fields(RunSettings) if f.metadata.get("report")} == REPORT_KEYS
    with pytest.raises(TypeError, match=r"unknown run option\(s\) \['workers'\]; run options: device, tta"):
        RunSettings.of(workers=2)


@pytest.mark.parametrize("options, message", [
    ({"time_budget_s": 0}, "time_budget_s must be a positive number of seconds, got 0"),
    ({"study_timeout_s": float("nan")}, "study_timeout_s must be a positive number of seconds, got nan"),
    ({"device_memory_gb": -1}, "device_memory_gb must be a positive number, got -1"),
    ({"members": "all"}, r"members must be one of \('auto', 'resident', 'streamed'\), got 'all'"),
    ({"precision": "bf16"}, r"precision must be one of \('auto', 'fp32', 'fp16'\), got 'bf16'"),
    ({"num_workers": 1.5}, "num_workers must be a whole number, got 1.5"),
    ({"chunk_size": "16"}, "chunk_size must be a whole number, got '16'"),
    ({"study_ids": 12}, "study_ids must be a list of study ids, got 12"),
    ({"device": 3}, "device must be a device name such as 'cuda'"),
    ({"split": ""}, "split must be a non-empty string"),
    ({"qa_dir": 5}, "qa_dir must be a path, got 5"),
])
def test_bad_values_fail_on_construction_saying_what_to_fix(options, message):
    with pytest.raises(ValueError, match=message):
        RunSettings(**options)


def test_values_are_normalised():
    s = RunSettings(device=["cpu", "cpu"], time_budget_s=60, study_ids=[3, 1], qa_dir="qa", num_workers=2.0, tta=0)
    assert s.device == ("cpu", "cpu") and s.time_budget_s == 60.0 and isinstance(s.time_budget_s, float)
    assert s.study_ids == (3, 1) and s.qa_dir.name == "qa" and s.num_workers == 2 and s.tta is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tta = True  # type: ignore[misc]


def test_resolution_fills_the_machine_defaults_once(monkeypatch):
    s = RunSettings(time_budget_s=100.0, chunk_size=0, read_ahead=0)
    r = s.resolve(CPU, cpus=3)
    assert (r.num_workers, r.read_ahead, r.batch_size, r.chunk_size) == (2, 1, 8, 1)
    assert r.study_timeout_s == 10.0 and r.resolved and not s.resolved  # a tenth of the budget
    assert r.resolve(CPU, cpus=64) is r  # resolved once: a second resolution changes nothing
    d = RunSettings().resolve(CPU, cpus=16)
    assert (d.num_workers, d.read_ahead, d.study_timeout_s) == (4, 6, 600.0)
    cuda = type("Dev", (), {"type": "cuda"})()
    assert RunSettings().resolve([cuda], cpus=1).batch_size == 32
    assert RunSettings(batch_size=5, num_workers=0).resolve([cuda]).batch_size == 5
    for options in ({}, {"tta": False}):
        with pytest.raises(ValueError, match="already resolved"):
            RunSettings.of(r, **options)
    with pytest.raises(ValueError, match="needs resolved settings"):
        s.set_up(members="resident", precision="fp32")
    up = r.set_up(members="streamed", precision="fp16 weights, fp16 autocast")
    assert up.report()["precision"] == "fp16 weights, fp16 autocast" and up.report()["members"] == "streamed"


def test_cli_flags_are_generated_from_the_settings():
    flagged = [f for f in S.option_fields() if f.metadata["flag"]]
    assert {f.metadata["flag"] for f in flagged} == {
        "--device", "--no-tta", "--workers", "--time-budget", "--chunk-size", "--batch-size", "--split", "--qa-dir",
        "--qa-worst", "--qa-labels", "--precision", "--channels-last", "--members", "--device-memory", "--read-ahead",
        "--study-timeout"}
    assert RunSettings.from_cli(_parse()) == RunSettings()  # every flag's default is the option's default
    got = RunSettings.from_cli(_parse("--no-tta", "--workers", "0", "--time-budget", "90", "--chunk-size", "3",
                                      "--members", "streamed", "--device-memory", "2.5", "--channels-last",
                                      "--qa-dir", "qa", "--study-timeout", "30", "--device", "cpu,cpu"))
    assert got == RunSettings(tta=False, num_workers=0, time_budget_s=90.0, chunk_size=3, members="streamed",
                              device_memory_gb=2.5, channels_last=True, qa_dir="qa", study_timeout_s=30.0,
                              device="cpu,cpu")
    assert got.chunk_size == 3 and DEFAULT_CHUNK_SIZE == 16
    with pytest.raises(SystemExit):
        _parse("--precision", "bf16")  # choices come from the declaration too


def test_the_report_writes_the_resolved_settings_as_they_are(monkeypatch, tmp_path):
    use_fake_families(monkeypatch)
    root = write_fake_root(tmp_path / "root", [1, 2])
    man = make_random_manifest(tmp_path / "man", fake_entries())
    options = {"device": "cpu", "num_workers": 0, "chunk_size": 0, "time_budget_s": 600, "read_ahead": 5}
    predict(root, tmp_path / "out" / "submission.csv", manifest=man, progress=False, finalize=KEEP, **options)
    reported = json.loads((tmp_path / "out" / "run_report.json").read_text())["settings"]
    pred = Predictor(man, RunSettings(**options), finalize=KEEP)
    assert set(reported) == REPORT_KEYS
    assert reported == pred.settings.report()
    assert reported["chunk_size"] == 1 and reported["study_timeout_s"] == 60.0 and reported["batch_size"] == 8
    assert reported["members"] == "resident" and reported["precision"] == "fp32"
    assert pred.memory_report()["precision"] == reported["precision"]  # one resolution, used everywhere
    with pytest.raises(ValueError, match=r"\['qa_dir', 'tta'\] cannot change for one run"):
        pred.run([], tta=False, qa_dir="qa")
