import pytest

from rsna_infer.runtime.deadline import DeadlineGuard, build_ladder
from rsna_infer.specs import ModelEntry


def _e(name, family, variant="t2", fold=0, blend=None):
    return ModelEntry.from_dict({"name": name, "family": family, "variant": variant, "arch": "a", "fold": fold,
                                 "input": {"size": [8, 8]}, "file": "f", **({"blend": blend} if blend else {})})


ENTRIES = [
    _e("kp0", "sag2d", fold=0), _e("kp1", "sag2d", fold=1), _e("kp2", "sag2d", fold=2),
    _e("big", "roi", "spinal", blend={"spinal": 3.0, "foraminal": 1.0}),
    _e("small", "roi", "spinal", blend={"spinal": 1.0}),
    _e("sub", "roi", "subarticular", blend={"subarticular": 1.0}),
]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_ladder_sheds_tta_then_lowest_weight_then_extra_folds_keeping_coverage():
    ladder = build_ladder(ENTRIES, tta=True)
    assert [p.label for p in ladder] == ["full", "tta off", "drop small", "drop kp2", "drop kp1"]
    assert ladder[0].tta and not any(p.tta for p in ladder[1:])
    last = ladder[-1].members
    assert {"big", "sub", "kp0"} <= last  # 'big' is the only foraminal member, 'sub' the only subarticular
    assert build_ladder(ENTRIES, tta=False)[0].label == "full" and len(build_ladder(ENTRIES, tta=False)) == 4


def _guard(budget, clock, **kw):
    return DeadlineGuard(budget, build_ladder(ENTRIES, tta=True), clock=clock, reserve_s=0.0, **kw)


def _chunk(guard, clock, n, fixed, member_cost, plan):
    """Simulate a chunk: fixed cost plus each active member's cost (x2 with TTA) per study."""
    per = {m: member_cost[m] * n * (2 if plan.tta else 1) for m in plan.members}
    t0 = clock.t
    clock.t += n * fixed + sum(per.values())
    guard.observe(n, clock.t - t0, per, plan.tta)


COST = {"kp0": 1.0, "kp1": 1.0, "kp2": 1.0, "big": 2.0, "small": 2.0, "sub": 1.0}  # 8/study, 16 with TTA


def test_full_plan_kept_when_it_fits():
    clock = Clock()
    g = _guard(10_000, clock)
    for _ in range(5):
        plan = g.choose(100)
        _chunk(g, clock, 10, 1.0, COST, plan)
    assert g.plan.label == "full" and not g.events
    assert g.cost_per_study(g.plan) == pytest.approx(17.0)


def test_tta_goes_first_then_members():
    clock = Clock()
    g = _guard(1000, clock)  # 100 studies: full needs 17/study, tta off 9, minus small 7
    _chunk(g, clock, 10, 1.0, COST, g.choose(100))  # t = 170, 90 left
    plan = g.choose(90)
    assert plan.label == "tta off" and not plan.tta  # 170 + 90 * 9 = 980 <= 1000
    _chunk(g, clock, 10, 1.0, COST, plan)  # t = 260
    assert g.member_cost("big", False) == pytest.approx(2.0)  # now measured, no longer estimated
    assert g.choose(80).label == "tta off"  # 260 + 80 * 9 = 980
    clock.t += 200  # something slowed down: 460 + 80 * 9 > 1000, 460 + 80 * 7 = 1020 > 1000 ...
    plan = g.choose(80)
    assert plan.label == "drop kp2"  # ... without kp2 6/study: 460 + 480 = 940
    assert [e.action for e in g.events] == ["tta off", "drop small", "drop kp2"]
    assert "small" not in plan.members and {"big", "sub", "kp0"} <= plan.members


def test_never_climbs_back_up():
    clock = Clock()
    g = _guard(1000, clock)
    _chunk(g, clock, 10, 1.0, COST, g.choose(100))
    assert g.choose(90).label == "tta off"
    assert g.choose(1).label == "tta off"  # one study left would fit with TTA, but no oscillation


def test_admit_gives_priors_when_even_the_cheapest_plan_cannot_fit():
    clock = Clock()
    g = _guard(100, clock)
    _chunk(g, clock, 2, 1.0, COST, g.choose(50))  # t = 34
    g.choose(48)
    cheapest = g.cost_per_study(g.ladder[-1])  # 1 fixed + kp0 1 + big 2 + sub 1 = 5
    assert cheapest == pytest.approx(5.0)
    assert g.admit(10) == 10  # 34 + 50 = 84 <= 100
    clock.t = 90
    assert g.admit(10) == 2  # 10 s of room, 5 s each
    assert g.events[-1].action == "priors for the rest"
    g.gave_priors(8)
    assert g.to_dict()["studies_given_priors"] == 8
    clock.t = 101
    assert g.admit(4) == 0


def test_before_any_measurement_everything_runs():
    clock = Clock()
    g = _guard(50, clock)
    assert g.choose(1000).label == "full" and g.admit(16) == 16 and not g.measured
    clock.t = 60
    assert g.admit(16) == 0


def test_no_time_left_is_logged_and_recorded_even_before_a_measurement(caplog):
    clock = Clock()
    g = _guard(50, clock)
    clock.t = 60
    with caplog.at_level("WARNING"):
        assert g.admit(16) == 0
        assert g.admit(16) == 0
    assert [e.action for e in g.events] == ["priors for the rest"]  # once
    assert caplog.text.count("no time left") == 1 and "before any study was measured" in caplog.text
    assert g.to_dict()["shed"][0]["action"] == "priors for the rest"


def test_hard_deadline_leaves_less_reserve_than_the_planning_deadline():
    g = DeadlineGuard(1000.0, build_ladder(ENTRIES, tta=True), clock=Clock())
    assert g.start + 1000.0 > g.hard_deadline > g.deadline


def test_the_first_projection_is_logged(caplog):
    clock = Clock()
    g = _guard(10_000, clock)
    _chunk(g, clock, 10, 1.0, COST, g.choose(100))
    with caplog.at_level("INFO", logger="rsna_infer.runtime.deadline"):
        g.choose(90)
        g.choose(80)
    assert caplog.text.count("projected finish") == 1 and "plan 'full'" in caplog.text


def test_bad_budget_rejected():
    with pytest.raises(ValueError, match="budget"):
        DeadlineGuard(0, build_ladder(ENTRIES, True))


def test_report_dict():
    clock = Clock()
    g = _guard(1000, clock)
    _chunk(g, clock, 10, 1.0, COST, g.choose(100))
    g.choose(90)
    d = g.to_dict()
    assert d["final_plan"] == "tta off" and d["shed"][0]["action"] == "tta off" and d["studies_given_priors"] == 0


def test_streaming_loads_are_a_cost_per_chunk_spread_over_its_studies():
    """A one-study probe chunk that spent 8 s moving streamed weights must not make every
    study look 8 s dearer: loads count per chunk, spread over the run's chunk size, and a
    member shed takes its loads with it."""
    from rsna_infer.runtime.deadline import DeadlineGuard, Plan

    clock = lambda: 0.0  # noqa: E731
    full = Plan(True, frozenset({"a", "b"}))
    guard = DeadlineGuard(1000.0, [full, Plan(True, frozenset({"a"}), "drop b")], clock=clock, chunk_studies=16)
    guard.observe(1, wall_s=10.0, member_s={"a": 0.5, "b": 0.5}, tta=True, load_s={"a": 4.0, "b": 4.0})
    # fixed = 10 - 1 (models) - 8 (loads) = 1 s per study; loads 8 s per chunk of 16 = 0.5 s per study
    assert guard.cost_per_study(full) == pytest.approx(1.0 + 1.0 + 0.5)
    assert guard.cost_per_study(guard.ladder[1]) == pytest.approx(1.0 + 0.5 + 0.25)
