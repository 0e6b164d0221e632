"""The kept answers of the meta-device counting: the same answer as counting afresh, never shared mutable state."""

from __future__ import annotations

import torch

from diffusers_hprune.architecture.inventory import inspect_transformer, load_transformer_config
from diffusers_hprune.budget.traces import Shapes, _forward_trace, forward_trace
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.memo import Memo, config_key


def test_memo_keeps_the_newest_answers_and_computes_each_key_once():
    memo: Memo[int] = Memo(size=2)
    calls = []

    def answer(value):
        calls.append(value)
        return value * 10

    assert memo.get("a", lambda: answer(1)) == 10 and memo.get("a", lambda: answer(99)) == 10
    memo.get("b", lambda: answer(2))
    memo.get("c", lambda: answer(3))  # "a" is the oldest: dropped
    assert len(memo) == 2 and calls == [1, 2, 3]
    assert memo.get("a", lambda: answer(4)) == 40 and calls == [1, 2, 3, 4]


def test_config_key_ignores_bookkeeping_and_order_but_not_values():
    config = {"_class_name": "SD3Transformer2DModel", "num_layers": 4, "axes": (1, 2), "_name_or_path": "/a"}
    same = {"axes": [1, 2], "num_layers": 4, "_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.42"}
    assert config_key(config) == config_key(same)
    assert config_key(config) != config_key(dict(config, num_layers=5))
    assert config_key(config) != config_key(dict(config, _class_name="FluxTransformer2DModel"))
    assert config_key(dict(config, prune_plan={"x": 1}), drop=("prune_plan",)) == config_key(config)


def test_inventories_from_kept_counts_are_fresh_and_follow_the_config():
    config = load_transformer_config("sd3.5-large")
    first = inspect_transformer(config)
    first.name = "changed by a caller"
    first.blocks[0].components["attn"] = -1
    first.blocks[0].nbytes["bf16"]["attn"] = -1
    again = inspect_transformer(config)
    assert again.name != first.name and again.blocks[0].components["attn"] > 0
    assert again.blocks[0].nbytes["bf16"]["attn"] > 0
    shallower = inspect_transformer(dict(config, num_layers=config["num_layers"] - 1))
    assert len(shallower.blocks) == len(again.blocks) - 1 and shallower.original_params < again.original_params
    plan = PrunePlan(family="sd3", num_blocks=config["num_layers"], removed_blocks=[3])
    pruned = inspect_transformer(dict(config, prune_plan=plan.to_dict()))
    assert pruned.original_params == again.original_params
    assert pruned.params == again.params - again.blocks[3].params and pruned.blocks[3].removed


def test_a_kept_trace_equals_tracing_afresh():
    config = load_transformer_config("sd3.5-large")
    config = dict(config, num_layers=2)  # small: two blocks traced
    plan = PrunePlan(family="sd3", num_blocks=2, removed_blocks=[1])
    shapes = Shapes(batch=1, height=64, width=64, max_sequence_length=8)
    kept = forward_trace(config, plan, shapes, torch.bfloat16)
    assert forward_trace(config, plan, shapes, torch.bfloat16) is kept
    assert _forward_trace(config, plan, shapes, torch.bfloat16) == kept
    assert forward_trace(config, None, shapes, torch.bfloat16).peak >= kept.peak
