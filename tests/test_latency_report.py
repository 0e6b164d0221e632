"""Honest latency (issue 35, item 4): every evaluated model's step latency beside its FLOP bound and the device it was
measured on, in `hprune evaluate`'s table, the compress / demo summary and the model card."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import MIXED_PLANS, tiny_pipeline

from diffusers_hprune import PrunePlan, prune_pipeline
from diffusers_hprune.commands.evaluate import format_evaluation
from diffusers_hprune.compression.run import format_summary
from diffusers_hprune.evaluation import evaluate_pipelines
from diffusers_hprune.evaluation.measure import device_description, step_flops, step_inputs
from diffusers_hprune.hub import write_model_card

GEN = dict(num_inference_steps=2, height=32, width=32)


def _counted(model, inputs) -> int:
    """FLOPs of a real run with attention as plain matmuls (the CPU's fused kernel has no FLOP formula)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs, return_dict=False)
    return counter.get_total_flops()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_step_flops_count_the_architecture_attention_included(family):
    pipe = tiny_pipeline(family)
    inputs = step_inputs(pipe, height=32, width=32)
    pruned = prune_pipeline(pipe, MIXED_PLANS[family]).transformer
    for model in (pipe.transformer, pruned):
        assert step_flops(model, inputs) == _counted(model, inputs)
    assert step_flops(pruned, inputs) < step_flops(pipe.transformer, inputs)


def test_a_quantised_model_has_the_flops_of_its_16_bit_self():
    from diffusers_hprune.quantization import quantize

    pipe = tiny_pipeline("sd3")
    inputs = step_inputs(pipe, height=32, width=32)
    pruned = prune_pipeline(pipe, PrunePlan(removed_blocks=[1], family="sd3", num_blocks=4)).transformer
    nf4 = quantize(copy.deepcopy(pruned))
    assert step_flops(nf4, inputs) == step_flops(pruned, inputs) > 0


def test_evaluation_reports_the_flop_bound_and_the_device(tmp_path):
    pipe = tiny_pipeline("sd3")
    pruned = prune_pipeline(pipe, PrunePlan(removed_blocks=[1, 2], family="sd3", num_blocks=4))
    result = evaluate_pipelines({"teacher": pipe, "unquantized": pruned, "student": pruned},
                                ["a red circle", "a blue square"], latency_repeats=2, warmup=0, **GEN)
    assert result["device"] == device_description("cpu")
    t, u = result["models"]["teacher"], result["models"]["unquantized"]
    assert u["relative"]["flop_bound"] == pytest.approx(u["step_flops"] / t["step_flops"]) and 0 < u["relative"][
        "flop_bound"] < 1
    assert u["weights"] == "float32"
    table = format_evaluation(result)
    assert "FLOP bound" in table and f"measured on {result['device']}" in table
    assert table.splitlines()[0].split() == ["teacher", "unquantized", "student", "unquantized", "/", "teacher",
                                             "student", "/", "teacher"]
    # the compress / demo summary and the card: one row per model, the bound beside each latency
    summary = {"stages": [], "metrics": result["models"], "device": result["device"], "final": str(tmp_path)}
    text = format_summary(summary)
    assert "compressed, 16-bit (float32)" in text and f"measured on {result['device']}" in text
    folder = tmp_path / "pruned"
    pruned.save_pretrained(folder)
    card = write_model_card(folder, base_model="someone/base", evaluation=result).read_text()
    bound = f"{u['step_flops'] / t['step_flops']:.1%}"
    assert "| this model before quantisation | float32 |" in card and f"| {bound} |" in card
    assert f"Measured on {result['device']}" in card
