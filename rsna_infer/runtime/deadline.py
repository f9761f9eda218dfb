"""The deadline guard: finish a complete submission inside a time budget.

After every chunk of studies the guard updates its cost model from measured throughput,
projects the finish time of the remaining studies, and picks the richest *plan* that fits.
Plans form a fixed ladder, cheapest last:

1. everything (all members, flip TTA as requested);
2. TTA off;
3. stage-2 members dropped one by one, lowest blend weight first, never the last member
   with weight in a condition group that was covered;
4. extra stage-1 folds dropped (one fold per family/variant always stays).

The guard only moves down the ladder (no oscillation). When even the cheapest plan cannot
finish the next studies in time, those studies get prior rows without being read
(`admit`; `give_up` when the caller runs out of time waiting). Before the first
measurement nothing is known, so the predictor runs a one-study probe chunk first; every
decision is logged (the first projection and each change at INFO/WARNING, the rest at
DEBUG) and every change recorded in ``events``. Cost model per study: a fixed part (reading, decoding, preprocessing, stage-2
cropping; measured as the chunk's wall time minus its model time) plus each active member's
measured model time; a member never measured without TTA is assumed to cost
1/`TTA_COST_FACTOR` of its TTA cost. With streamed members (`rsna_infer.runtime.memory`) moving a
member's weights to the device is a cost per *chunk*, not per study: it is measured per
member and spread over ``chunk_studies`` (a one-study probe chunk would otherwise make it
look 16 times dearer), and shedding a member saves its loads too. All times come from an
injectable ``clock``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..models.ensemble import member_weights
from ..specs import ModelEntry

logger = logging.getLogger(__name__)

#: Assumed cost ratio of a flip-TTA forward to a plain one until one is measured.
TTA_COST_FACTOR = 2.0


@dataclass(frozen=True)
class Plan:
    """What to run for a chunk: flip TTA on/off and the active member names."""

    tta: bool
    members: frozenset[str]
    label: str = "full"


@dataclass
class ShedEvent:
    """One step down the ladder, or the switch to priors, for the run report."""

    elapsed_s: float
    studies_done: int
    action: str
    projected_s: float
    budget_s: float

    def to_dict(self) -> dict[str, object]:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def default_reserve_s(budget_s: float) -> float:
    """Time kept back for writing the CSV and the report and for chunk granularity."""
    return min(60.0 + 0.01 * budget_s, 0.1 * budget_s)


def build_ladder(entries: Sequence[ModelEntry], tta: bool) -> list[Plan]:
    """The plans in shedding order (see module docstring); the first runs everything."""
    names = [e.name for e in entries]
    plans = [Plan(tta, frozenset(names), "full")]
    if tta:
        plans.append(Plan(False, frozenset(names), "tta off"))
    active = set(names)
    stage2 = [e for e in entries if e.stage == 2]
    if stage2:
        w = member_weights(stage2)  # [M, 3]
        covered = w.sum(0) > 0
        share = (w / np.where(w.sum(0) > 0, w.sum(0), 1.0)).sum(1)  # each member's share of its groups
        order = sorted(range(len(stage2)), key=lambda i: (share[i], stage2[i].name))
        keep = np.ones(len(stage2), bool)
        for i in order:
            trial = keep.copy()
            trial[i] = False
            if np.all((w[trial].sum(0) > 0) | ~covered) and trial.any():
                keep = trial
                active.discard(stage2[i].name)
                plans.append(Plan(False, frozenset(active), f"drop {stage2[i].name}"))
    groups: dict[tuple[str, str], list[ModelEntry]] = {}
    for e in entries:
        if e.stage == 1:
            groups.setdefault((e.family, e.variant), []).append(e)
    extra = [m for g in groups.values() for m in sorted(g, key=lambda e: (e.fold, e.name))[1:]]
    for e in sorted(extra, key=lambda e: (-e.fold, e.name)):
        active.discard(e.name)
        plans.append(Plan(False, frozenset(active), f"drop {e.name}"))
    return plans


@dataclass
class _Cost:
    seconds: float = 0.0
    studies: int = 0

    def add(self, seconds: float, studies: int) -> None:
        self.seconds += seconds
        self.studies += studies

    @property
    def per_study(self) -> float | None:
        return self.seconds / self.studies if self.studies else None


@dataclass
class DeadlineGuard:
    """Chooses the plan per chunk so that the run finishes within ``budget_s`` of ``start``."""

    budget_s: float
    ladder: list[Plan]
    clock: Callable[[], float] = time.monotonic
    start: float | None = None
    reserve_s: float | None = None
    chunk_studies: int = 16  # studies per chunk of the run: what a per-chunk cost is spread over
    level: int = 0
    events: list[ShedEvent] = field(default_factory=list)
    studies_done: int = 0
    skipped: int = 0
    _fixed: _Cost = field(default_factory=_Cost)
    _member: dict[tuple[str, bool], _Cost] = field(default_factory=dict)
    _load: dict[str, _Cost] = field(default_factory=dict)  # streamed: seconds per chunk moving a member in
    _projected: bool = False  # the first projection was logged

    def __post_init__(self) -> None:
        if not (self.budget_s > 0 and math.isfinite(self.budget_s)):
            raise ValueError(f"time budget must be a positive number of seconds, got {self.budget_s}")
        if not self.ladder:
            raise ValueError("the plan ladder is empty")
        if self.start is None:
            self.start = self.clock()
        if self.reserve_s is None:
            self.reserve_s = default_reserve_s(self.budget_s)

    @property
    def plan(self) -> Plan:
        return self.ladder[self.level]

    @property
    def deadline(self) -> float:
        """When the models should be done: the budget less the reserve."""
        return float(self.start) + self.budget_s - float(self.reserve_s)

    @property
    def hard_deadline(self) -> float:
        """When waiting for anything must stop: the budget less a quarter of the reserve
        (writing the CSV and the report takes seconds)."""
        return float(self.start) + self.budget_s - 0.25 * float(self.reserve_s)

    @property
    def measured(self) -> bool:
        """Whether a chunk has been observed (costs are known)."""
        return self._fixed.per_study is not None

    def elapsed(self) -> float:
        return self.clock() - float(self.start)

    # -- measurements ---------------------------------------------------------------------
    def observe(self, n_studies: int, wall_s: float, member_s: dict[str, float], tta: bool, n_devices: int = 1,
                load_s: dict[str, float] | None = None) -> None:
        """Record one finished chunk: ``wall_s`` from the caller's clock, ``member_s`` model
        seconds per member (summed over its batches; divided by ``n_devices`` when chunks run
        on several devices at once), ``load_s`` seconds spent moving streamed members' weights
        to the device (per member, once per chunk)."""
        if n_studies <= 0:
            return
        load_s = load_s or {}
        model = sum(member_s.values()) / n_devices
        loads = sum(load_s.values()) / n_devices
        self._fixed.add(max(0.0, wall_s - model - loads), n_studies)
        for name, s in member_s.items():
            self._member.setdefault((name, tta), _Cost()).add(s / n_devices, n_studies)
        for name, s in load_s.items():
            self._load.setdefault(name, _Cost()).add(s / n_devices, 1)  # per chunk
        self.studies_done += n_studies

    def member_cost(self, name: str, tta: bool) -> float:
        c = self._member.get((name, tta))
        if c is not None and c.per_study is not None:
            return c.per_study
        other = self._member.get((name, not tta))
        if other is None or other.per_study is None:
            return 0.0
        return other.per_study / TTA_COST_FACTOR if not tta else other.per_study * TTA_COST_FACTOR

    def cost_per_study(self, plan: Plan) -> float | None:
        """Projected seconds per study under ``plan`` (None before the first measurement)."""
        fixed = self._fixed.per_study
        if fixed is None:
            return None
        loads = sum(c.per_study or 0.0 for n, c in self._load.items() if n in plan.members) / max(1, self.chunk_studies)
        return fixed + loads + sum(self.member_cost(n, plan.tta) for n in plan.members)

    # -- decisions ------------------------------------------------------------------------
    def choose(self, remaining: int) -> Plan:
        """The plan for the next chunk given ``remaining`` studies (this chunk included)."""
        if remaining <= 0:
            return self.plan
        if self._fixed.per_study is None:
            logger.debug("deadline guard: no measurement yet; plan %r", self.plan.label)
            return self.plan
        now = self.clock()
        for level in range(self.level, len(self.ladder)):
            cost = self.cost_per_study(self.ladder[level])
            projected = now + remaining * float(cost)
            if projected <= self.deadline or level == len(self.ladder) - 1:
                if level != self.level:
                    for step in range(self.level + 1, level + 1):
                        self._event(self.ladder[step].label, projected)
                    logger.warning(
                        "deadline guard: %d studies left, %.0fs of %.0fs used; shedding to plan %r "
                        "(projected finish %.0fs)", remaining, now - self.start, self.budget_s,
                        self.ladder[level].label, projected - self.start,
                    )
                    self.level = level
                else:
                    log = logger.debug if self._projected else logger.info
                    log("deadline guard: %d studies left at %.2fs each, %.0fs of %.0fs used; plan %r "
                        "(projected finish %.0fs)", remaining, cost, now - self.start, self.budget_s,
                        self.plan.label, projected - self.start)
                self._projected = True
                return self.plan
        return self.plan  # pragma: no cover - the loop always returns at the last level

    def admit(self, n: int) -> int:
        """How many of the next ``n`` studies can still be finished under the cheapest plan.

        When fewer than ``n``, the caller gives the rest, and every later study, prior rows
        (and reports them with `gave_priors`)."""
        now = self.clock()
        cost = self.cost_per_study(self.ladder[-1]) if self._fixed.per_study is not None else None
        if cost is None:
            fit = n if now <= self.deadline else 0
        else:
            room = self.deadline - now
            fit = n if room >= n * cost else max(0, int(room // cost)) if cost > 0 else n
        if fit < n:
            why = ("the budget was used up before any study was measured" if cost is None else
                   f"the cheapest plan needs {cost:.2f}s per study and {max(0.0, self.deadline - now):.0f}s are left")
            self.give_up(why, now + n * (cost or 0.0))
        return fit

    def give_up(self, why: str, projected_abs: float | None = None) -> None:
        """No time left: the studies not yet read get prior rows. Logged and recorded once."""
        if any(e.action == "priors for the rest" for e in self.events):
            return
        now = self.clock()
        self._event("priors for the rest", now if projected_abs is None else projected_abs)
        logger.warning("deadline guard: no time left to run the models (%s; %.0fs of %.0fs used); the remaining "
                       "studies get prior rows", why, now - float(self.start), self.budget_s)

    def gave_priors(self, n: int) -> None:
        """Record that ``n`` studies got prior rows unread (after `admit` said no)."""
        self.skipped += n

    def _event(self, action: str, projected_abs: float) -> None:
        self.events.append(ShedEvent(self.elapsed(), self.studies_done, action, projected_abs - float(self.start), self.budget_s))

    def to_dict(self) -> dict[str, object]:
        return {
            "budget_s": self.budget_s,
            "reserve_s": round(float(self.reserve_s), 2),
            "final_plan": self.plan.label,
            "final_tta": self.plan.tta,
            "final_members": sorted(self.plan.members),
            "studies_given_priors": self.skipped,
            "shed": [e.to_dict() for e in self.events],
        }
