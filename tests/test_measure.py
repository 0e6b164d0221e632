"""Measured weight bytes, step memory and step latency (diffusers_hprune.evaluation.measure)."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusers_hprune import toy
from diffusers_hprune.evaluation.measure import (
    MeasureError,
    logical_params,
    step_inputs,
    step_latency,
    step_memory,
    stored_bytes,
)
from diffusers_hprune.families.sizes import model_weight_bytes
from diffusers_hprune.quantization import quantize


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_stored_bytes_match_the_analytic_estimate(family):
    pipe = toy.load_pipeline(family)
    t = pipe.transformer
    # The estimate counts the persistent buffers (SD3's positional-embedding table) as the checkpoint does.
    assert stored_bytes(t) == model_weight_bytes(t, "fp32")
    q = quantize(copy.deepcopy(t).to(torch.bfloat16))
    # bitsandbytes' codes, absmax, nested absmax and code tables, counted from the live quant state
    assert stored_bytes(q) == model_weight_bytes(t, "nf4")
    assert stored_bytes(q) < 0.35 * stored_bytes(t) / 2
    assert logical_params(q) == logical_params(t) == sum(p.numel() for p in t.parameters())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_step_inputs_latency_and_memory(family):
    pipe = toy.load_pipeline(family)
    inputs = step_inputs(pipe, "a red circle", batch_size=2)
    with torch.no_grad():
        out = pipe.transformer(**inputs, return_dict=False)[0]
    assert out.shape == inputs["hidden_states"].shape and out.shape[0] == 2
    timing = step_latency(pipe.transformer, inputs, warmup=1, repeats=4)
    assert len(timing["times"]) == 4 and all(t > 0 for t in timing["times"])
    assert timing["min"] <= timing["median"] <= timing["max"] and timing["stdev"] >= 0
    memory = step_memory(pipe.transformer, inputs)
    assert memory["weights"] == stored_bytes(pipe.transformer) and memory["peak"] >= memory["weights"]
    assert memory["step"] >= 0 and memory["method"]
    # The activations are in the figure: at least the output and one block's hidden states are held at once.
    assert memory["step"] >= 2 * out.numel() * out.element_size()
    with pytest.raises(MeasureError, match="at least 1"):
        step_latency(pipe.transformer, inputs, repeats=0)


def test_nf4_student_runs_on_the_same_inputs():
    pipe = toy.load_pipeline("sd3")
    pipe.transformer = quantize(copy.deepcopy(pipe.transformer))
    inputs = step_inputs(pipe, "two blue squares")
    assert step_latency(pipe.transformer, inputs, warmup=0, repeats=2)["repeats"] == 2


def test_unquantized_bytes_counts_what_nf4_leaves_in_16_bit():
    import torch.nn as nn

    from diffusers_hprune.families.sizes import nf4_weight_bytes, unquantized_bytes

    model = nn.Module()
    model.block = nn.Linear(64, 64)  # weight quantised; bias 16-bit
    model.proj_out = nn.Linear(8, 4)  # in the default skip list: all 16-bit
    model.norm = nn.LayerNorm(8)
    model.register_buffer("table", torch.zeros(10))  # persistent float buffer: 16-bit
    model.register_buffer("steps", torch.zeros(3, dtype=torch.int64))  # stored at its own size
    model.register_buffer("scratch", torch.zeros(100), persistent=False)  # not stored
    expected = 2 * (64 + 32 + 4 + 16 + 10) + 3 * 8
    assert unquantized_bytes(model) == expected
    assert model_weight_bytes(model, "nf4") == expected + nf4_weight_bytes(64 * 64)
    assert unquantized_bytes(model, skip_modules=()) == expected - 2 * 32  # proj_out's weight goes 4-bit


def test_live_tensor_peak_counts_what_a_step_holds_at_once():
    from diffusers_hprune.evaluation.measure import live_tensor_peak

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(256, 256))

        def forward(self, x, return_dict=False):
            a = x * self.scale  # 256 KiB
            b = a + 1  # 256 KiB, a still alive: 512 KiB
            del a
            c = b.t()  # a view: no new storage
            d = c.contiguous()  # 256 KiB: b (through c) and d alive: 512 KiB
            del b, c
            return d * 2  # d and the output: 512 KiB

    size = 256 * 256 * 4
    assert live_tensor_peak(Step(), {"x": torch.randn(256, 256)}) == 2 * size
