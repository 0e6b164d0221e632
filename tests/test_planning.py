"""HPP planning (DESIGN.md section 6, steps 2-4) on the real SD3.5 Large / FLUX.1 inventories."""

from __future__ import annotations

import math

import pytest

from diffusers_hprune import BLOCK, PlanError, inspect_transformer
from diffusers_hprune.planning import make_plan, position_weight, prunability


@pytest.fixture(scope="module")
def sd35():
    return inspect_transformer("sd3.5-large")


@pytest.fixture(scope="module")
def flux():
    return inspect_transformer("flux.1-schnell")


def _contributions(inventory, block_drop, component_drop=None):
    out = {}
    for b in inventory.blocks:
        out[(b.spec.index, BLOCK)] = block_drop(b.spec.index)
        for c in b.spec.components:
            out[(b.spec.index, c)] = (component_drop or (lambda i, c: block_drop(i) / 4))(b.spec.index, c)
    return out


def test_position_weight_and_score():
    assert position_weight(0, 38, 0.55) == pytest.approx(math.exp(-0.55))
    assert position_weight(38, 38, 0.55) == 1.0
    assert position_weight(5, 38, 0.0) == 1.0
    # Same drop: the early block is costlier to remove (lower score).
    assert prunability(0.1, 0, 38, 0.55) < prunability(0.1, 37, 38, 0.55)
    assert prunability(-0.1, 3, 38, 0.0) == prunability(0.1, 3, 38, 0.0) == -0.1
    with pytest.raises(PlanError, match="alpha must be >= 0"):
        position_weight(0, 4, -1)


def test_moderate_ratio_removes_whole_blocks_minimally(sd35):
    contributions = _contributions(sd35, lambda i: 0.01)  # equal drops: position decides
    outcome = make_plan(contributions, sd35, ratio=0.2)
    plan = outcome.plan
    assert not plan.removed_components
    assert outcome.ratio >= 0.2
    # Later blocks go first; one block fewer would miss the target.
    assert plan.removed_blocks == list(range(38 - len(plan.removed_blocks), 38))
    smallest = min(sd35.blocks[i].params for i in plan.removed_blocks)
    assert (outcome.removed_params - smallest) / outcome.total_params < 0.2
    assert plan.metadata["strategy"] == "hierarchical" and plan.metadata["alpha"] == 0.55


def test_contribution_beats_position_when_alpha_is_zero(sd35):
    contributions = _contributions(sd35, lambda i: 0.001 if i in (3, 4, 5) else 0.5)
    plan = make_plan(contributions, sd35, ratio=0.05, alpha=0.0).plan
    assert set(plan.removed_blocks) <= {3, 4, 5}
    # With a strong position weight the early blocks are protected.
    plan = make_plan(contributions, sd35, ratio=0.05, alpha=10.0).plan
    assert not set(plan.removed_blocks) & {3, 4, 5}


def test_aggressive_ratio_removes_blocks_then_components(sd35):
    contributions = _contributions(sd35, lambda i: 0.02 + 0.001 * (38 - i), lambda i, c: 0.001 if c == "ff_context" else 0.05)
    outcome = make_plan(contributions, sd35, ratio=0.3, r_thres=0.25)
    plan = outcome.plan
    block_part = sum(sd35.blocks[i].params for i in plan.removed_blocks)
    assert plan.removed_components, "aggressive pruning must remove components"
    assert outcome.ratio >= 0.3
    first_component = next(k for k, (i, c) in enumerate(outcome.order) if c != BLOCK)
    stage_one = sum(sd35.blocks[i].params for i, _ in outcome.order[:first_component])
    assert stage_one / outcome.total_params <= 0.25
    assert block_part >= stage_one
    assert all(i not in plan.removed_blocks for i in plan.removed_components)
    assert {c for cs in plan.removed_components.values() for c in cs} == {"ff_context"}


def test_block_losing_all_branches_becomes_a_removed_block(flux):
    # Single blocks are cheap to strip: attn and mlp of the same blocks go first.
    contributions = _contributions(flux, lambda i: 1.0, lambda i, c: 1e-4 if i >= 50 and c in ("attn", "mlp") else 1.0)
    outcome = make_plan(contributions, flux, ratio=0.3, r_thres=0.0)
    assert set(outcome.plan.removed_blocks) & set(range(50, 57))
    for i in outcome.plan.removed_blocks:
        assert i not in outcome.plan.removed_components
    assert outcome.plan.family == "flux" and outcome.plan.num_blocks == 57


def test_memory_budget(sd35):
    contributions = _contributions(sd35, lambda i: 0.01)
    outcome = make_plan(contributions, sd35, memory_bytes=12 * 10**9, weight_dtype="bf16")
    assert outcome.estimated_bytes <= 12 * 10**9
    assert outcome.estimated_bytes == (outcome.total_params - outcome.removed_params) * 2


def test_baseline_strategies(sd35):
    contributions = _contributions(sd35, lambda i: 0.5 if i > 30 else 0.001 * i)
    last = make_plan({}, sd35, ratio=0.1, strategy="last").plan
    assert last.removed_blocks == list(range(38 - len(last.removed_blocks), 38))
    bk = make_plan(contributions, sd35, ratio=0.1, strategy="bk-sdm").plan
    assert bk.removed_blocks[:2] == [0, 1] and not bk.removed_components
    assert bk.metadata["alpha"] == 0.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(ratio=1.5), r"must lie in \(0, 1\)"),
        (dict(ratio=0.0), r"must lie in \(0, 1\)"),
        (dict(), "exactly one target"),
        (dict(ratio=0.2, memory_bytes=10), "exactly one target"),
        (dict(memory_bytes=10**12), "already fits"),
        (dict(ratio=0.2, strategy="magic"), "Unknown strategy"),
        (dict(ratio=0.2, weight_dtype="int3"), "Unknown weight dtype"),
    ],
)
def test_bad_targets(sd35, kwargs, message):
    with pytest.raises(PlanError, match=message):
        make_plan(_contributions(sd35, lambda i: 0.01), sd35, **kwargs)


def test_missing_contributions_are_named(sd35):
    contributions = _contributions(sd35, lambda i: 0.01)
    del contributions[(7, "ff")]
    with pytest.raises(PlanError, match="lacks 1 contribution.*7:ff"):
        make_plan(contributions, sd35, ratio=0.3)
    make_plan(contributions, sd35, ratio=0.1)  # block-only plans do not need component entries


def test_unreachable_target(sd35):
    with pytest.raises(PlanError, match="without removing every block"):
        make_plan({}, sd35, ratio=0.999, strategy="last")
