"""Measured weight bytes, step memory and step latency (diffusers_hprune.evaluation.measure)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import record_keyword

from diffusers_hprune import toy
from diffusers_hprune.architecture.sizes import model_weight_bytes
from diffusers_hprune.evaluation.measure import (
    MeasureError,
    logical_params,
    step_inputs,
    step_latency,
    step_memory,
    stored_bytes,
)
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

    from diffusers_hprune.architecture.sizes import nf4_weight_bytes, unquantized_bytes

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


# -- one transformer on the GPU at a time; each model's own step peak (issue 31) --------------------------------------
def test_pipelines_are_evaluated_one_at_a_time_and_the_student_shares_the_encoders(tmp_path, monkeypatch):
    """Before the student's turn the teacher's transformer leaves the GPU, and the student (loaded only then) is
    built around the teacher's own text encoders and VAE: one T5, not two, and on the GPU only to encode the
    prompts, never while a transformer draws. The device is simulated: this
    machine has none, so `_device_of` reports what the `.to` calls made of each module."""
    import shutil

    from diffusers_hprune import PrunePlan, prune_pipeline
    from diffusers_hprune.evaluation import compare

    teacher_folder = tmp_path / "teacher"
    shutil.copytree(toy.model_path("sd3"), teacher_folder)
    teacher = compare.load_for_evaluation(teacher_folder, "cpu")
    student_folder = tmp_path / "student"
    prune_pipeline(teacher, PrunePlan(family="sd3", num_blocks=12, removed_blocks=[10])).save_pretrained(student_folder)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "tokenizer", "tokenizer_2",
                 "tokenizer_3", "scheduler"):  # as `hprune distill` writes it: the teacher's files
        shutil.rmtree(student_folder / name)
        shutil.copytree(teacher_folder / name, student_folder / name)
    assert compare.shares_components(teacher_folder, student_folder)

    cuda = torch.device("cuda", 0)
    where = {}  # id(module) -> the simulated device
    events = []

    def fake_to(module, *args, **kwargs):
        target = torch.device(args[0]) if args and isinstance(args[0], (str, torch.device)) else None
        if target is not None:
            where[id(module)] = target
            events.append((type(module).__name__, str(target)))
        return module

    monkeypatch.setattr(torch.nn.Module, "to", fake_to)
    monkeypatch.setattr(compare, "_device_of", lambda m: where.get(id(m), cuda))
    original_generate = compare.generate
    on_gpu = []

    def generate(pipe, *args, **kwargs):  # what the GPU holds while each pipeline draws
        on_gpu.append(sorted(type(m).__name__ for m in set(compare._modules(teacher) + compare._modules(pipe))
                             if where.get(id(m), cuda) == cuda))
        return original_generate(pipe, *args, **kwargs)

    monkeypatch.setattr(compare, "generate", generate)
    original_embeddings = compare.prompt_embeddings
    encoding = []

    def prompt_embeddings(pipe, *args, **kwargs):  # what the GPU holds while the prompts are encoded
        encoding.append(sorted(type(m).__name__ for m in set(compare._modules(teacher) + compare._modules(pipe))
                               if where.get(id(m), cuda) == cuda))
        return original_embeddings(pipe, *args, **kwargs)

    monkeypatch.setattr(compare, "prompt_embeddings", prompt_embeddings)
    loaded, students = [], []

    def student():
        loaded.append(list(events))  # the teacher has drawn and its transformer left the GPU before this
        students.append(compare.load_student(teacher, teacher_folder, student_folder))
        return students[-1]

    result = compare.evaluate_pipelines({"teacher": teacher, "student": student}, ["a red circle"], cost=False,
                                        metrics=["fidelity"], num_inference_steps=2)
    assert "fidelity" in result["models"]["student"]
    assert loaded and ("SD3Transformer2DModel", "cpu") in loaded[0]
    teacher_turn, student_turn = on_gpu
    assert "SD3Transformer2DModel" in teacher_turn and "HierarchicalPrunedSD3Transformer2DModel" not in teacher_turn
    assert "SD3Transformer2DModel" not in student_turn and "HierarchicalPrunedSD3Transformer2DModel" in student_turn
    assert students[0].text_encoder_3 is teacher.text_encoder_3  # the teacher's encoders: one T5, not two
    # issue 34: the prompts are encoded first (the text encoders on the GPU for that), then drawn without them
    assert "T5EncoderModel" not in teacher_turn and "T5EncoderModel" not in student_turn
    # one model on the GPU at a time: while each pipeline encodes, its text encoders are there alone
    assert [set(names) for names in encoding] == [{"CLIPTextModelWithProjection", "T5EncoderModel"}] * 2
    # per pipeline: to the GPU to encode, then to the CPU (where they stay while the transformer draws)
    assert events.count(("T5EncoderModel", "cuda:0")) == 2 and events.count(("T5EncoderModel", "cpu")) == 2
    assert "AutoencoderKL" in student_turn


def test_shares_components_compares_the_files_byte_for_byte(tmp_path):
    import shutil

    from diffusers_hprune.evaluation.compare import shares_components

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(toy.model_path("sd3"), a)
    shutil.copytree(toy.model_path("sd3"), b)
    assert shares_components(a, b)
    weights = next((b / "vae").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert not shares_components(a, b)


@pytest.mark.gpu
def test_each_model_reports_its_own_step_peak_on_a_gpu():
    """On a GPU `max_memory_allocated` is the whole device's: with the teacher also on it, the student's peak was about
    the teacher's. Each is now its own weights plus what its step allocates (benchmarks/gpu_check.py runs this)."""
    from diffusers_hprune import PrunePlan, prune_transformer

    pipe = toy.load_pipeline("sd3")
    teacher = pipe.transformer.to("cuda", torch.bfloat16)
    student = prune_transformer(copy.deepcopy(teacher), PrunePlan(family="sd3", num_blocks=12,
                                                                    removed_blocks=[6, 7, 8, 9, 10]))
    inputs = {k: v.to("cuda", torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else
              (v.to("cuda") if torch.is_tensor(v) else v) for k, v in step_inputs(pipe, "a red circle").items()}
    t, s = step_memory(teacher, inputs), step_memory(student, inputs)
    assert t["peak"] == t["weights"] + t["step"] and s["peak"] == s["weights"] + s["step"]
    assert s["weights"] < t["weights"] and s["peak"] < t["peak"]


@pytest.mark.gpu
def test_the_teacher_leaves_the_gpu_before_the_student_draws():
    """On a real GPU: while the student draws, the teacher's transformer is on the CPU and the text encoders are the
    teacher's own (one copy); each reports its own step peak (benchmarks/gpu_check.py runs this)."""
    import shutil
    import tempfile
    from pathlib import Path

    from diffusers_hprune import PrunePlan, prune_pipeline
    from diffusers_hprune.evaluation import compare

    with tempfile.TemporaryDirectory() as tmp:
        teacher_folder, student_folder = Path(tmp) / "teacher", Path(tmp) / "student"
        shutil.copytree(toy.model_path("sd3"), teacher_folder)
        teacher = compare.load_for_evaluation(teacher_folder, "cuda")
        prune_pipeline(teacher, PrunePlan(family="sd3", num_blocks=12, removed_blocks=[8, 9, 10])) \
            .save_pretrained(student_folder)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
            shutil.rmtree(student_folder / name)
            shutil.copytree(teacher_folder / name, student_folder / name)
        seen, students = {}, []
        generate = compare.generate

        def spying(pipe, *args, **kwargs):  # while each draws: where the teacher's transformer and its T5 are
            seen[type(pipe.transformer).__name__] = (next(teacher.transformer.parameters()).device.type,
                                                     next(teacher.text_encoder_3.parameters()).device.type)
            return generate(pipe, *args, **kwargs)

        def student():
            students.append(compare.load_student(teacher, teacher_folder, student_folder))
            return students[-1]

        compare.generate = spying
        try:
            result = compare.evaluate_pipelines({"teacher": teacher, "student": student}, ["a red circle"],
                                                metrics=["fidelity"], num_inference_steps=2, latency_repeats=2,
                                                warmup=1)
        finally:
            compare.generate = generate
    # loaded on the host, the teacher computes on the GPU; the T5 is on the CPU while either transformer draws
    assert seen["SD3Transformer2DModel"] == ("cuda", "cpu")
    assert seen["HierarchicalPrunedSD3Transformer2DModel"] == ("cpu", "cpu")
    assert students[0].text_encoder_3 is teacher.text_encoder_3
    t, s = result["models"]["teacher"], result["models"]["student"]
    assert s["step_peak_bytes"] < t["step_peak_bytes"]


def test_drawings_decode_one_image_at_a_time_and_leave_the_vae_as_it_was():
    """The budget counts one image's VAE decode whatever the batch: `generate` (evaluation, analysis) decodes with
    Diffusers' VAE slicing and leaves the VAE's setting as it found it."""
    from diffusers_hprune.loading import generate

    pipe = toy.load_pipeline("sd3")
    batches = []
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    prompts = ["a red circle", "a blue square", "a green triangle"]
    images = generate(pipe, prompts, [0, 1, 2], dict(toy.generation_kwargs("sd3"), num_inference_steps=2), 3)
    assert len(images) == 3 and batches == [1, 1, 1] and pipe.vae.use_slicing is False
    pipe.vae.enable_slicing()
    generate(pipe, prompts[:2], [0, 1], dict(toy.generation_kwargs("sd3"), num_inference_steps=2), 2)
    assert pipe.vae.use_slicing is True


def test_evaluate_vae_tiling_decodes_every_pipeline_in_tiles(tmp_path, monkeypatch):
    """`hprune evaluate --vae-tiling`: every pipeline's drawings decode in tiles, and the result says so."""
    from diffusers_hprune.cli import main
    from diffusers_hprune.evaluation import compare

    tiled = record_keyword(monkeypatch, compare, "generate", "tiled")
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "sd3", "sd3", "--n", "2", "--steps", "2", "--no-cost", "--vae-tiling",
                 "--out", str(out)]) == 0
    assert tiled == [True, True] and json.loads(out.read_text())["vae_tiling"] is True


def test_evaluate_checks_the_budget_before_loading(tmp_path, monkeypatch, capsys):
    """`hprune evaluate MODEL STUDENT` on a GPU too small for the evaluation stops before loading anything, naming
    the flags with which it would fit (or that none do); --no-budget-check runs anyway."""
    from diffusers_hprune import PrunePlan, prune_pipeline
    from diffusers_hprune.budget import fit
    from diffusers_hprune.budget.terms import CUDA_RESERVE
    from diffusers_hprune.cli import main
    from diffusers_hprune.commands import evaluate as command

    student = tmp_path / "student"
    prune_pipeline(toy.load_pipeline("sd3"), PrunePlan(family="sd3", num_blocks=12, removed_blocks=[10])) \
        .save_pretrained(student)
    loaded = record_keyword(monkeypatch, command, "load_for_evaluation", "device")
    monkeypatch.setattr(fit, "gpu_memory", lambda: CUDA_RESERVE + 1024)  # a GPU too small for anything
    assert main(["evaluate", "sd3", str(student), "--n", "1", "--steps", "1", "--no-cost"]) == 2
    err = capsys.readouterr().err
    assert "The evaluation stage would need about" in err and "--batch-size 1 --vae-tiling" in err and not loaded
    assert main(["evaluate", "sd3", str(student), "--n", "1", "--steps", "1", "--no-cost", "--no-budget-check"]) == 0
    assert loaded
