"""`RunSettings`: every option of a prediction run, declared once.

Each option is one field below: its name, type, default, a one-line doc, and what its
command-line flag needs (the flag, a metavar, the allowed values). Everything else is
derived from that declaration:

- ``rsna_infer.predict(..., **options)`` and ``Predictor(..., **options)`` accept the fields
  as keywords (`RunSettings.of`);
- ``rsna-infer predict``'s flags are generated from it (`add_arguments`, `RunSettings.from_cli`);
- construction validates every value (`ValueError` saying what to fix, before anything runs);
- `RunSettings.resolve` fills in, in one place, the defaults that depend on the machine
  (loading workers, read-ahead, batch size, the per-study watchdog), once the devices are
  known; the predictor's setup then records what it decided for the two options that depend
  on the manifest (`RunSettings.set_up`: resident or streamed members, the precision the
  members really run in);
- the run report's ``settings`` is `RunSettings.report` of those resolved settings, as they
  are: what the run used is what the report says.

Adding an option: a field here (with its flag, if the CLI should have one) and the code that
uses it; nothing else. Torch-free, so ``rsna-infer predict --help`` starts fast.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Default studies per chunk: large enough for full batches, small enough to bound memory.
DEFAULT_CHUNK_SIZE = 16
#: Model batch size by default, on CUDA and elsewhere.
DEFAULT_BATCH_SIZE = {"cuda": 32, "cpu": 8}


# -- value checks: each returns the normalised value or raises ValueError saying what to fix --


def _flag(name: str, v: Any) -> bool:
    return bool(v)


def _whole(name: str, v: Any) -> int:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    raise ValueError(f"{name} must be a whole number, got {v!r}")


def _seconds(name: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = math.nan
    if not (f > 0 and math.isfinite(f)):
        raise ValueError(f"{name} must be a positive number of seconds, got {v}")
    return f


def _gigabytes(name: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = math.nan
    if not (f > 0 and math.isfinite(f)):
        raise ValueError(f"{name} must be a positive number, got {v}")
    return f


def _text(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"{name} must be a non-empty string, got {v!r}")
    return v


def _path(name: str, v: Any) -> Path:
    if not isinstance(v, (str, os.PathLike)):
        raise ValueError(f"{name} must be a path, got {v!r}")
    return Path(v)


def _devices(name: str, v: Any) -> str | tuple[str, ...]:
    """A device string (``"cuda:0,cuda:1"``) or a sequence of device names; the names
    themselves are checked when the devices are resolved (`rsna_infer.runtime.devices`)."""
    if isinstance(v, str):
        return v
    if isinstance(v, Sequence) and v and all(isinstance(d, str) or hasattr(d, "type") for d in v):
        return tuple(str(d) for d in v)
    raise ValueError(f"{name} must be a device name such as 'cuda', 'cuda:1', 'cuda:0,cuda:1' or 'cpu' "
                     f"(or a list of them), got {v!r}")


def _study_ids(name: str, v: Any) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise ValueError(f"{name} must be a list of study ids, got {v!r}")
    return tuple(_whole(name, s) for s in v)


def _one_of(choices: Callable[[], tuple[str, ...]]) -> Callable[[str, Any], str]:
    def check(name: str, v: Any) -> str:
        if v not in choices():
            raise ValueError(f"{name} must be one of {choices()}, got {v!r}")
        return v

    return check


def _precisions() -> tuple[str, ...]:
    from .models.members import PRECISIONS

    return PRECISIONS


def _member_modes() -> tuple[str, ...]:
    from .runtime.memory import MODES

    return MODES


#: Which part of the run reads an option: the models' setup (`rsna_infer.inference.engine.Predictor`,
#: fixed for its life), one run over studies (``Predictor.run``), or the call around it
#: (`rsna_infer.api.predict`: which studies, the report, the QA pages).
PARTS = ("models", "run", "call")


def setting(
    default: Any,
    doc: str,
    check: Callable[[str, Any], Any],
    part: str,
    *,
    flag: str | None = None,
    help: str | None = None,
    metavar: str | None = None,
    choices: Callable[[], tuple[str, ...]] | None = None,
    cli_type: Callable[[str], Any] | None = None,
    report: bool = False,
) -> Any:
    """A `RunSettings` field: ``default``, a one-line ``doc``, ``check`` (validates and
    normalises a given value; None always passes), the ``part`` of the run that reads it
    (`PARTS`), the command-line ``flag`` (None: Python only) with its ``help`` (default: the
    doc), ``metavar``, ``choices`` and ``cli_type``, and whether the run report's
    ``settings`` records it."""
    assert part in PARTS, part
    meta = {"doc": doc, "check": check, "part": part, "flag": flag, "help": help or doc, "metavar": metavar,
            "choices": choices, "cli_type": cli_type, "report": report}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunSettings:
    """The options of one prediction run (see the module docstring). Fields in the order of
    ``rsna-infer predict --help``; ``None`` means "the default for this machine", filled in
    by `resolve`."""

    device: str | tuple[str, ...] | None = setting(
        None, "cuda | cuda:1 | cuda:0,cuda:1 | cpu (default: every GPU, else CPU)", _devices, "models",
        flag="--device")
    tta: bool = setting(True, "flip TTA inside every family's run", _flag, "models",
                        flag="--no-tta", help="no flip TTA (about half the model time)", report=True)
    num_workers: int | None = setting(
        None, "preprocessing processes; 0 = in-process (default: spare cores, at most 4)", _whole, "run",
        flag="--workers", metavar="N", cli_type=int, report=True)
    time_budget_s: float | None = setting(
        None, "finish within this many seconds: shed TTA, then low-weight members", _seconds, "run",
        flag="--time-budget", metavar="SECONDS", cli_type=float, report=True)
    chunk_size: int = setting(
        DEFAULT_CHUNK_SIZE, f"studies per chunk (default {DEFAULT_CHUNK_SIZE})", _whole, "run",
        flag="--chunk-size", cli_type=int, report=True)
    batch_size: int | None = setting(
        None, "model batch size (default 32 on CUDA, 8 on CPU)", _whole, "models",
        flag="--batch-size", cli_type=int, report=True)
    split: str = setting("test", "which {split}_images folder to read (default: test)", _text, "call",
                         flag="--split", report=True)
    qa_dir: Path | None = setting(
        None, "write QA pages (what the models saw) of the worst studies here (needs Pillow)", _path, "call",
        flag="--qa-dir", cli_type=Path)
    qa_worst: int = setting(
        10, "studies that get a QA page (default 10; see docs/viz.md for the ranking)", _whole, "call",
        flag="--qa-worst", metavar="N", cli_type=int)
    qa_labels: Path | None = setting(
        None, "train_label_coordinates.csv: draw the ground-truth points on the QA pages", _path, "call",
        flag="--qa-labels", metavar="CSV", cli_type=Path)
    precision: str = setting(
        "auto", "weights on a GPU: auto = fp16 (bf16 where a member asks), fp32 = full precision",
        _one_of(_precisions), "models", flag="--precision", choices=_precisions, report=True)
    channels_last: bool = setting(False, "convolution weights in channels-last format", _flag, "models",
                                  flag="--channels-last", report=True)
    members: str = setting(
        "auto", "auto: every member on the card when they fit, else streamed (loaded group by group)",
        _one_of(_member_modes), "models", flag="--members", choices=_member_modes, report=True)
    device_memory_gb: float | None = setting(
        None, "plan with this much device memory instead of the card's free memory", _gigabytes, "models",
        flag="--device-memory", metavar="GB", cli_type=float)
    read_ahead: int | None = setting(
        None, "studies decoded ahead of the running chunks (default: workers + 2; more overlaps more loading "
        "with the device, at ~60 MB per study)", _whole, "run", flag="--read-ahead", metavar="N", cli_type=int,
        report=True)
    study_timeout_s: float | None = setting(
        None, "kill a loading worker still busy with one study after this long; the study gets priors "
        "(default 600, or a tenth of --time-budget)", _seconds, "run", flag="--study-timeout", metavar="SECONDS",
        cli_type=float, report=True)
    study_ids: tuple[int, ...] | None = setting(
        None, "run only these studies of the series CSV (debugging; the CSV then holds only their rows)",
        _study_ids, "call")
    report_path: Path | None = setting(None, "where run_report.json goes (default: beside the CSV)", _path, "call")
    progress: bool = setting(True, "a progress bar on stderr", _flag, "run")
    #: Set by `resolve` (machine defaults filled in) and `set_up` (the predictor's decisions);
    #: not an option.
    resolved: bool = field(default=False, metadata={"doc": "", "report": False}, repr=False)

    def __post_init__(self) -> None:
        """The one place run options are validated: each value checked and normalised."""
        for f in option_fields():
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "precision" and self.resolved:  # set_up put what the members run in
                continue
            object.__setattr__(self, f.name, f.metadata["check"](f.name, value))

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def of(cls, settings: "RunSettings | None" = None, **options: Any) -> "RunSettings":
        """``settings`` (default: every default) with ``options`` (field names) replaced: the
        options of a run as given. An unknown name is a `TypeError` naming the known ones;
        resolved settings (one predictor's, see `resolve`) are not options to start from."""
        unknown = sorted(set(options) - set(option_names()))
        if unknown:
            raise TypeError(f"unknown run option(s) {unknown}; run options: {', '.join(option_names())}")
        base = cls() if settings is None else settings
        if base.resolved:
            raise ValueError("these settings are already resolved for one predictor's devices; "
                             "pass the options as given (RunSettings(...)) instead")
        return replace(base, **options) if options else base

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "RunSettings":
        """The settings of parsed ``rsna-infer predict`` arguments (see `add_arguments`)."""
        return cls.of(**{f.name: getattr(args, f.name) for f in option_fields() if f.metadata["flag"]})

    # -- resolution --------------------------------------------------------------------------
    def resolve(self, devices: Sequence["torch.device"], cpus: int | None = None) -> "RunSettings":
        """The machine-dependent defaults filled in, once the devices are known: loading
        workers (`rsna_infer.models.prep_groups.default_num_workers` on ``cpus``, default this
        process's), read-ahead (`rsna_infer.runtime.streaming.default_read_ahead`), the batch
        size (`DEFAULT_BATCH_SIZE` of the first device's type), the per-study watchdog
        (`rsna_infer.runtime.streaming.study_timeout_for` the budget), and the chunk size at
        least 1. Resolved settings resolve to themselves."""
        from .models.prep_groups import default_num_workers
        from .runtime.streaming import default_read_ahead, study_timeout_for

        if self.resolved:
            return self
        workers = default_num_workers(cpus) if self.num_workers is None else self.num_workers
        kind = "cuda" if devices and devices[0].type == "cuda" else "cpu"
        return replace(
            self,
            num_workers=workers,
            read_ahead=default_read_ahead(workers) if self.read_ahead is None else max(1, self.read_ahead),
            batch_size=self.batch_size or DEFAULT_BATCH_SIZE[kind],
            study_timeout_s=self.study_timeout_s or study_timeout_for(self.time_budget_s),
            chunk_size=max(1, self.chunk_size),
            resolved=True,
        )

    def set_up(self, *, members: str, precision: str) -> "RunSettings":
        """What the predictor's setup decided (resolved settings only): ``members``, the
        memory plan's mode (``resident`` or ``streamed``); ``precision``, how the members hold
        their weights and compute (``"fp16 weights, fp16 autocast"``, as the report says it)."""
        if not self.resolved:
            raise ValueError("set_up needs resolved settings (RunSettings.resolve)")
        return replace(self, members=members, precision=precision)

    # -- reporting ---------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The run report's ``settings``: the reported fields as they are."""
        return {f.name: _plain(getattr(self, f.name)) for f in option_fields() if f.metadata["report"]}


def _plain(v: Any) -> Any:
    return str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v


def option_fields() -> Iterator[Field]:
    """The fields of `RunSettings` that are run options (all but ``resolved``)."""
    return (f for f in fields(RunSettings) if "check" in f.metadata)


def option_names() -> list[str]:
    return [f.name for f in option_fields()]


def part_options(part: str) -> frozenset[str]:
    """The options read by one part of the run (`PARTS`)."""
    return frozenset(f.name for f in option_fields() if f.metadata["part"] == part)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option that declares one, generated from `RunSettings`: its help is the
    option's doc, its destination the option's name; ``--no-X`` / ``--X`` for booleans."""
    for f in option_fields():
        meta = f.metadata
        if not meta["flag"]:
            continue
        kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if f.default is True:
            kw.update(action="store_false")
        elif f.default is False:
            kw.update(action="store_true")
        else:
            kw.update(default=f.default)
            if meta["cli_type"] is not None:
                kw["type"] = meta["cli_type"]
            if meta["metavar"] is not None:
                kw["metavar"] = meta["metavar"]
            if meta["choices"] is not None:
                kw["choices"] = meta["choices"]()
        parser.add_argument(meta["flag"], **kw)
