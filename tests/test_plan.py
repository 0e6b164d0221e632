"""PrunePlan: validation on construction, normalisation, JSON round-trip."""

from __future__ import annotations

import json

import pytest

from diffusers_hprune import PlanError, PrunePlan


def test_round_trip_through_dict_and_file(tmp_path):
    plan = PrunePlan(
        removed_blocks=[30, 7],
        removed_components={12: ["norm1", "ff_context"], "20": ["attn"]},
        family="sd3",
        num_blocks=38,
        metadata={"strategy": "hierarchical", "ratio": 0.2},
    )
    assert plan.removed_blocks == [7, 30]
    assert plan.removed_components == {12: ["ff_context", "norm1"], 20: ["attn"]}
    data = plan.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert PrunePlan.from_dict(json.loads(json.dumps(data))) == plan
    path = plan.save(tmp_path / "plan.json")
    assert PrunePlan.load(path) == plan
    assert PrunePlan.load(tmp_path) == plan  # a folder holding plan.json
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary files left behind


def test_flux_global_indices():
    plan = PrunePlan(removed_blocks=[56], removed_components={18: ["ff"], 19: ["mlp"]}, family="flux", num_blocks=57)
    assert plan.kept_blocks()[-1] == 55
    assert plan.first_pruned_block() == 18


def test_components_of_a_removed_block_are_covered_by_the_removal():
    plan = PrunePlan(removed_blocks=[3], removed_components={3: ["ff"], 4: []}, family="sd3", num_blocks=8)
    assert plan.removed_components == {}
    assert plan.removed_blocks == [3]
    assert "removes blocks 3" in plan.describe()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(removed_blocks=[38], family="sd3", num_blocks=38), "out of range"),
        (dict(removed_blocks=[-1], family="sd3", num_blocks=38), "out of range"),
        (dict(removed_components={40: ["ff"]}, family="sd3", num_blocks=38), "valid indices 0..37"),
        (dict(removed_components={1: ["mlp"]}, family="sd3", num_blocks=38), "valid names are attn, ff"),
        (dict(removed_components={1: ["feedforward"]}, family="flux", num_blocks=57), "Unknown component"),
        (dict(removed_blocks=list(range(4)), family="sd3", num_blocks=4), "removes all 4 blocks"),
        (dict(removed_blocks=["x"], family="sd3", num_blocks=4), "not an integer"),
        (dict(removed_blocks=[1.5], family="sd3", num_blocks=4), "not an integer"),
        (dict(family="unet", num_blocks=4), "supported families are sd3, flux"),
        (dict(family="sd3", num_blocks=0), "positive integer"),
    ],
)
def test_invalid_plans_are_rejected_with_a_clear_error(kwargs, message):
    with pytest.raises(PlanError, match=message):
        PrunePlan(**kwargs)


def test_bad_files(tmp_path):
    with pytest.raises(PlanError, match="No prune plan"):
        PrunePlan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        PrunePlan.load(tmp_path / "bad.json")
    newer = PrunePlan(family="sd3", num_blocks=4).to_dict() | {"version": 99}
    with pytest.raises(PlanError, match="newer"):
        PrunePlan.from_dict(newer)
    with pytest.raises(PlanError, match="missing the field"):
        PrunePlan.from_dict({"removed_blocks": [1]})
