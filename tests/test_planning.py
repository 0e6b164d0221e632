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
    # 2 bytes per remaining parameter, plus the stored positional-embedding table (max_size^2 x width, 16-bit)
    table = sd35.config["pos_embed_max_size"] ** 2 * sd35.config["num_attention_heads"] * sd35.config["attention_head_dim"]
    assert outcome.estimated_bytes == (outcome.total_params - outcome.removed_params) * 2 + table * 2


def test_baseline_strategies(sd35):
    contributions = _contributions(sd35, lambda i: 0.5 if i > 30 else 0.001 * i)
    last = make_plan({}, sd35, ratio=0.1, strategy="last").plan
    assert last.removed_blocks == list(range(38 - len(last.removed_blocks), 38))
    alignment = {i: 0.0 if i > 30 else 0.01 for i in range(38)}  # disagrees with the velocity dP above
    bk = make_plan(contributions, sd35, ratio=0.1, strategy="bk-sdm", alignment=alignment).plan
    assert set(bk.removed_blocks) <= set(range(31, 38)) and not bk.removed_components
    assert bk.removed_blocks == sorted(range(38 - len(bk.removed_blocks), 38))  # ties: the later block first
    assert bk.metadata["alpha"] == 0.0
    hpp = make_plan(contributions, sd35, ratio=0.1, alpha=0.0).plan
    assert hpp.removed_blocks[:2] == [0, 1]  # by the velocity dP: what bk-sdm no longer does


def test_bk_sdm_ranks_by_the_alignment_drop_and_needs_it(sd35):
    velocity = _contributions(sd35, lambda i: 0.001 * i)  # would remove block 0 first
    alignment = {i: 1.0 - i / 38 for i in range(38)}  # removing a late block costs least alignment
    alignment[5] = -0.2  # removing block 5 raised the score: the first to go
    bk = make_plan(velocity, sd35, ratio=0.05, strategy="bk-sdm", alignment=alignment)
    assert bk.order[0] == (5, BLOCK) and all(i >= 30 or i == 5 for i, _ in bk.order)
    with pytest.raises(PlanError, match="alignment score.*--alignment-metric auto"):
        make_plan(velocity, sd35, ratio=0.05, strategy="bk-sdm")
    partial = {i: v for i, v in alignment.items() if i != 7}
    with pytest.raises(PlanError, match="lacks it for 1 block.*e.g. 7"):
        make_plan(velocity, sd35, ratio=0.05, strategy="bk-sdm", alignment=partial)


def test_a_strategy_registered_twice_raises():
    from diffusers_hprune.planning.strategies import Strategy, get_strategy, register_strategy, strategy_names

    with pytest.raises(PlanError, match="'koala' is registered already"):
        register_strategy(Strategy("koala", "again", lambda inputs: []))
    assert get_strategy("koala").description.startswith("whole blocks by input/output cosine")
    mine = register_strategy(Strategy("test-first-block", "block 0 first", lambda inputs: [0]))
    try:
        with pytest.raises(PlanError, match="registered already"):
            register_strategy(Strategy("test-first-block", "again", lambda inputs: [1]))
        assert get_strategy("test-first-block") is mine
    finally:
        from diffusers_hprune.planning import strategies

        del strategies._STRATEGIES["test-first-block"]
    assert "test-first-block" not in strategy_names()


def test_whole_block_plans_land_nearest_the_target(flux):
    """FLUX: 19 double blocks (~3 % each) then 38 single blocks (~1.4 %): a rank-order prefix can overshoot."""
    from diffusers_hprune.planning.hpp import BUDGET_TOLERANCE, nearest_block_set

    sizes = {b.spec.index: b.params for b in flux.blocks}
    total = flux.original_params
    # Ranked: single blocks first until just under 30 %, then a double block that would overshoot.
    order = list(range(19, 57)) + list(range(19))
    for ratio in (0.1, 0.2, 0.3):
        outcome = make_plan({}, flux, ratio=ratio, strategy="last")
        assert abs(outcome.ratio - ratio) <= BUDGET_TOLERANCE, (ratio, outcome.ratio)
    chosen = nearest_block_set(order, sizes, total, 0.3, 56)
    reached = sum(sizes[i] for i in chosen) / total
    assert abs(reached - 0.3) <= BUDGET_TOLERANCE
    # By hand: blocks of 10, 10, 25 and 5 out of 100, target 20 %: the prefix [a, b] hits it exactly;
    # target 25 %: prefix [a, b, c] = 45 %, [a, b] = 20 %, the fill skips c and takes d (5) = 25 %.
    hand = {0: 10, 1: 10, 2: 25, 3: 5}
    assert nearest_block_set([0, 1, 2, 3], hand, 100, 0.2, 3) == [0, 1]
    assert nearest_block_set([0, 1, 2, 3], hand, 100, 0.25, 3) == [0, 1, 3]
    # Target 30 %: those three land 15, 10 and 5 points off; of the sets taking the first blocks of each size,
    # c + d = 30 % is the only one within 2 points.
    assert nearest_block_set([0, 1, 2, 3], hand, 100, 0.3, 3) == [2, 3]
    # The ranked fill skips a block that would overshoot and takes a later one: [0, 2] = 45 %, [0] = 10 %,
    # the fill [0, 1] = 20 %.
    assert nearest_block_set([0, 2, 1], {0: 10, 1: 10, 2: 35}, 100, 0.2, 3) == [0, 1]
    # Nothing within the tolerance: the nearest candidate (10 % for 16 %; 45 % is further).
    assert nearest_block_set([0, 2], {0: 10, 2: 35}, 100, 0.16, 2) == [0]
    # The FLUX toy's sizes (4 double-stream blocks of 13.24 %, 8 single-stream of 5.51 %), ranked singles first
    # as BK-SDM ranks them: 5 singles = 27.56 %, 6 = 33.07 %; within 2 points of 30 %: 1 double + 3 singles
    # (29.77 %, reaching rank 8 of the order) and 2 doubles + 1 single (31.99 %, rank 9): the first.
    toy = {**{i: 1324 for i in range(4)}, **{i: 551 for i in range(4, 12)}}
    ranked = [5, 7, 8, 9, 11, 10, 4, 6, 0, 1, 2, 3]
    assert nearest_block_set(ranked, toy, 10000, 0.3, 11) == [5, 7, 8, 0]
    # 20 %: 4 singles = 22.04 % is just outside; 1 double + 1 single = 18.75 % is within.
    assert nearest_block_set(ranked, toy, 10000, 0.2, 11) == [5, 0]
    # A plan always removes something, even for a target below one block's share: the nearest set, here the
    # smaller, second-ranked block (10 %, 9 points off; the first-ranked one is 24 points off).
    assert nearest_block_set([2, 0], hand, 100, 0.01, 3) == [0]
    assert nearest_block_set([2], hand, 100, 0.01, 3) == [2]


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


# -- a small made-up analysis on the 4-block tiny SD3, every step computed by hand -----------------
@pytest.fixture(scope="module")
def tiny():
    from diffusers_hprune.toy.components import tiny_sd3_transformer_config

    return inspect_transformer(dict(tiny_sd3_transformer_config(), _class_name="SD3Transformer2DModel"))


def test_a_transformer_built_in_code_is_inspected_like_its_config(tiny):
    """A transformer made in code (not from_pretrained) has no _class_name in its config; its class names it."""
    from diffusers_hprune.toy.components import tiny_sd3_pipeline

    transformer = tiny_sd3_pipeline(seed=0).transformer
    assert "_class_name" not in transformer.config
    built = inspect_transformer(transformer)
    assert [b.components for b in built.blocks] == [b.components for b in tiny.blocks]
    assert built.params == built.original_params == tiny.params


def _tiny_contributions():
    # Block sizes: 45264, 45264, 37856, 24224 of 168484 parameters.
    d = {(0, BLOCK): 0.9, (1, BLOCK): 0.2, (2, BLOCK): 0.2, (3, BLOCK): 0.3}
    d.update({(0, c): 0.5 for c in ("attn", "ff", "ff_context", "norm1", "norm1_context")})
    d.update({(1, "attn"): 0.05, (1, "ff"): 0.01, (1, "ff_context"): 0.01, (1, "norm1"): 0.3, (1, "norm1_context"): 0.02})
    d.update({(2, c): 0.1 for c in ("attn", "ff", "ff_context", "norm1", "norm1_context")})
    d.update({(3, "attn"): 0.2, (3, "ff"): 0.01, (3, "norm1"): 0.3, (3, "norm1_context"): 0.01})
    return d


def test_hand_computed_moderate_plan(tiny):
    assert [b.params for b in tiny.blocks] == [45264, 45264, 37856, 24224] and tiny.original_params == 168484
    # W_pos = exp(0.55 (i - 4) / 4) = .577, .662, .760, .872; Score = -dP / W = -1.560, -.302, -.263, -.344
    outcome = make_plan(_tiny_contributions(), tiny, ratio=0.2)
    assert outcome.order == [(2, BLOCK)]  # 37856 / 168484 = 22.5 % >= 20 %
    assert outcome.plan.removed_blocks == [2] and not outcome.plan.removed_components
    assert outcome.removed_params == 37856


def test_hand_computed_aggressive_plan(tiny):
    # r = 0.4 > r_thres: block 2 (22.5 %); block 1 next would pass 25 %, so components follow, by
    # Score: 3:ff = 3:norm1_context (-.0115, same block: component order), 1:ff = 1:ff_context (-.0151),
    # 1:norm1_context (-.0302): 37856 + 8352 + 2112 + 8352 + 8352 + 6336 = 71360 = 42.4 % >= 40 %.
    outcome = make_plan(_tiny_contributions(), tiny, ratio=0.4)
    assert outcome.order == [(2, BLOCK), (3, "ff"), (3, "norm1_context"), (1, "ff"), (1, "ff_context"),
                             (1, "norm1_context")]
    assert outcome.removed_params == 71360
    assert outcome.plan.removed_blocks == [2]
    assert outcome.plan.removed_components == {1: ["ff", "ff_context", "norm1_context"], 3: ["ff", "norm1_context"]}
    # r just below r_thres: blocks only.
    assert not make_plan(_tiny_contributions(), tiny, ratio=0.24).plan.removed_components


def test_ties_go_to_the_later_block(tiny):
    # alpha = 0: blocks 1 and 2 tie at Score -0.2; the later one goes first.
    outcome = make_plan(_tiny_contributions(), tiny, ratio=0.2, alpha=0.0)
    assert outcome.order == [(2, BLOCK)]
    d = _tiny_contributions()
    d[(2, BLOCK)] = 0.25
    d[(3, BLOCK)] = 0.5
    assert make_plan(d, tiny, ratio=0.25, alpha=0.0).order == [(1, BLOCK)]  # 26.9 %, within 2 points of 25 %
    # For 20 % no set is within 2 points: block 1 (26.9 %) and block 2 (22.5 %) overshoot, block 3 (14.4 %)
    # falls short; the nearest is block 2 (2.5 points off; block 3, the ranked fill, is 5.6 off).
    assert make_plan(d, tiny, ratio=0.2, alpha=0.0).order == [(2, BLOCK)]


def test_nf4_memory_mode(sd35):
    contributions = _contributions(sd35, lambda i: 0.01)
    budget = 3 * 10**9
    outcome = make_plan(contributions, sd35, memory_bytes=budget, weight_dtype="nf4")
    assert outcome.estimated_bytes <= budget
    removed = sum(sd35.blocks[i].nbytes["nf4"][BLOCK] for i in outcome.plan.removed_blocks) + sum(
        sd35.blocks[i].nbytes["nf4"][c] for i, cs in outcome.plan.removed_components.items() for c in cs)
    assert outcome.estimated_bytes == sd35.original_bytes["nf4"] - removed
    # NF4 packs linear weights at about 0.52 bytes per weight; the rest stays 16-bit.
    assert 0.25 < sd35.original_bytes["nf4"] / sd35.original_bytes["bf16"] < 0.30
    with pytest.raises(PlanError, match="No plan fits"):
        make_plan(contributions, sd35, memory_bytes=10**6, weight_dtype="nf4")


def test_koala_ranks_by_similarity(tiny):
    similarity = {0: 0.5, 1: 0.99, 2: 0.7, 3: 0.98}
    outcome = make_plan({}, tiny, ratio=0.4, strategy="koala", similarity=similarity)
    assert outcome.order == [(1, BLOCK), (3, BLOCK)]
    assert outcome.plan.removed_blocks == [1, 3]  # 45264 + 24224 = 41.2 %
    with pytest.raises(PlanError, match="koala strategy needs"):
        make_plan({}, tiny, ratio=0.2, strategy="koala", similarity={0: 1.0})


def test_strategies_are_registered_objects_and_names_are_unique(monkeypatch, sd35):
    """Each strategy is one entry of a table; a new one is usable by name, a duplicate name is refused."""
    from diffusers_hprune.planning import strategies
    from diffusers_hprune.planning.strategies import Strategy, get_strategy, register_strategy, strategy_names

    assert strategy_names() == ("hierarchical", "bk-sdm", "koala", "last")
    assert get_strategy("hierarchical").position_weight and get_strategy("hierarchical").components
    assert not any(get_strategy(n).components or get_strategy(n).position_weight for n in ("bk-sdm", "koala", "last"))
    with pytest.raises(PlanError, match="'koala' is registered already"):
        register_strategy(Strategy("koala", "again", lambda inputs: []))
    with pytest.raises(PlanError, match="Unknown strategy 'first'.*hierarchical, bk-sdm, koala, last"):
        get_strategy("first")
    monkeypatch.setattr(strategies, "_STRATEGIES", dict(strategies._STRATEGIES))  # undone after the test
    register_strategy(Strategy("first", "the first blocks first", lambda inputs: list(range(len(inputs.inventory.blocks)))))
    assert "first" in strategy_names()
    outcome = make_plan({}, sd35, ratio=0.2, strategy="first")
    assert outcome.plan.removed_blocks == list(range(len(outcome.plan.removed_blocks)))
    assert outcome.plan.metadata["strategy"] == "first" and outcome.ratio >= 0.2


def test_a_modulation_left_without_readers_counts_as_removed(tiny):
    """The last SD3 block's text modulation feeds only its attention: removing attn takes it along, in the order and in
    the count, and the count is the pruned model's own."""
    d = _tiny_contributions()
    d[(3, "attn")] = 0.001  # the last block's attention goes first
    # block 2 (37856 = 22.5 %), then 3:attn (7424: 26.9 %) and its unread norm1_context (2112: 28.1 % >= 27 %)
    outcome = make_plan(d, tiny, ratio=0.27)
    assert outcome.order == [(2, BLOCK), (3, "attn"), (3, "norm1_context")]
    k = outcome.order.index((3, "attn"))
    assert outcome.order[k + 1] == (3, "norm1_context")
    assert outcome.order.count((3, "norm1_context")) == 1  # not counted again when its own turn comes
    assert outcome.plan.removed_components[3] == ["attn", "norm1_context"]
    planned = dict(tiny.config, prune_plan=outcome.plan.to_dict())
    assert outcome.removed_params == inspect_transformer(planned).original_params - inspect_transformer(planned).params
