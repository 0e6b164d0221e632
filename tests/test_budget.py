"""hprune budget: meta-device traces equal the same code on real tensors, and the stage terms follow the options."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from diffusers_hprune import toy
from diffusers_hprune.architecture import get_family
from diffusers_hprune.architecture.inventory import inspect_transformer, load_transformer_config
from diffusers_hprune.budget import BudgetError, BudgetOptions, predict
from diffusers_hprune.budget.traces import Shapes, forward_trace, meta_inputs, meta_transformer, step_peak, step_trace
from diffusers_hprune.cli import main
from diffusers_hprune.commands.budget import format_budget
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.pruning.surgery import prune_transformer
from diffusers_hprune.utils.live_memory import LiveTensorBytes


def _real_like(inputs: dict) -> dict:
    return {k: torch.randn(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _toy_transformer(family: str):
    folder = toy.model_path(family)
    config = load_transformer_config(folder)
    model = get_family(config).base_class.from_pretrained(folder / "transformer", dtype=torch.float32)
    return config, model.eval()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_forward_trace_on_meta_equals_the_real_call(family):
    config, model = _toy_transformer(family)
    shapes = Shapes(batch=2, height=64, width=64, max_sequence_length=16, clip_length=10, vae_scale_factor=2)
    predicted = forward_trace(config, None, shapes, torch.float32)
    inputs = _real_like(meta_inputs(meta_transformer(config, None, torch.float32), shapes, torch.float32))
    counter = LiveTensorBytes([*model.parameters(), *model.buffers(), inputs])
    sizes = []
    hooks = [model.get_submodule(s.path).register_forward_hook(
        lambda m, a, out: sizes.append(sum(t.numel() * t.element_size() for t in out if t is not None)))
        for s in get_family(model).block_specs(model.config)]
    with torch.no_grad(), counter:
        out = model(**inputs, return_dict=False)[0]
    for h in hooks:
        h.remove()
    assert predicted.peak == counter.peak > 0
    assert predicted.block_outputs == sum(sizes)
    assert predicted.output == out.numel() * out.element_size()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_step_trace_on_meta_equals_the_real_step(family):
    config, teacher = _toy_transformer(family)
    teacher.requires_grad_(False)
    plan = PrunePlan(family=get_family(config).name, num_blocks=get_family(config).num_blocks(config), removed_blocks=[2])
    shapes = Shapes(batch=2, height=32, width=32, max_sequence_length=8, clip_length=10, vae_scale_factor=2)
    predicted = step_trace(config, plan, shapes, torch.float32, pwp=False)
    student = prune_transformer(teacher, plan)  # shares the teacher's weights, as the trainer's does
    for p in student.parameters():
        p.data = p.data.clone()
    student.requires_grad_(True).train()
    inputs = _real_like(meta_inputs(meta_transformer(config, plan, torch.float32), shapes, torch.float32))
    channels = get_family(config).latent_channels(config)
    latents = torch.randn(2, channels, 16, 16)
    peak, gradients = step_peak(teacher, student, inputs, latents)
    assert predicted.peak == peak > 0
    assert predicted.gradients == gradients == 4 * sum(p.numel() for p in student.parameters())


@pytest.mark.slow
def test_gradient_checkpointing_and_lora_lower_the_traced_step():
    config = load_transformer_config("sd3.5-medium")
    plan = PrunePlan(family=get_family(config).name, num_blocks=get_family(config).num_blocks(config), removed_blocks=[2, 3])
    shapes = Shapes(batch=2, height=1024, width=1024, max_sequence_length=256)
    full = step_trace(config, plan, shapes, torch.bfloat16)
    checkpointed = step_trace(config, plan, shapes, torch.bfloat16, gradient_checkpointing=True)
    lora = step_trace(config, plan, shapes, torch.bfloat16, lora_rank=8)
    assert checkpointed.peak < full.peak
    assert lora.trainable < full.trainable / 10 and lora.gradients < full.gradients / 10


@pytest.mark.slow
def test_full_size_inference_matches_the_papers_peaks():
    """Transformer-only inference at the paper's protocol: original SD3.5 Large 15.8 GiB, FLUX.1-schnell 22.6 GiB."""
    sd3 = predict("sd3.5-large-turbo", ratio=0.3)
    original = sd3.stage("inference (original, 16-bit)")
    assert abs(original.device_peak / 2**30 - 15.8) < 0.5
    nf4 = sd3.stage("inference (pruned, NF4)")
    assert abs(nf4.device_peak / 2**30 - 3.24) < 0.3
    assert nf4.device_peak < sd3.stage("inference (pruned, 16-bit)").device_peak < original.device_peak
    assert "333 text tokens" in original.notes[0]


def test_options_change_the_terms_they_should():
    base = predict("sd3", ratio=0.3, options=BudgetOptions(train_batch_size=1))
    nf4 = predict("sd3", ratio=0.3, options=BudgetOptions(train_batch_size=1, teacher_4bit=True, lora_rank=4),
                  stages=("distillation",))
    config = load_transformer_config(toy.model_path("sd3"))
    original = inspect_transformer(config)
    d_base, d_nf4 = base.stage("distillation"), nf4.stage("distillation")
    assert d_base.device["teacher (bf16 weights)"] == original.nbytes("bf16")
    assert d_nf4.device["teacher (NF4 weights)"] == original.nbytes("nf4")
    assert not any("bf16 weights" in k for k in d_nf4.device if k.startswith("teacher"))
    assert d_nf4.device_peak < d_base.device_peak
    cpu_cache = predict("sd3", ratio=0.3, options=BudgetOptions(train_batch_size=1, cache_device="cpu"),
                        stages=("analysis",))
    assert "block-output cache" in base.stage("analysis").device
    assert "block-output cache" not in cpu_cache.stage("analysis").device
    cache = base.stage("analysis").device["block-output cache"]
    assert cpu_cache.stage("analysis").host_peak >= cache > 0
    assert cpu_cache.stage("analysis").device_peak < base.stage("analysis").device_peak
    table = format_budget(base)
    for stage in ("analysis", "distillation", "quantisation", "inference (pruned, NF4)"):
        assert f"\n{stage} " in table
    assert "fits:" in table and "24 GB" in table and "teacher (bf16 weights)" in table


def test_bad_options_are_refused():
    with pytest.raises(BudgetError, match="train-batch-size must be at least 1"):
        predict("sd3", options=BudgetOptions(train_batch_size=0))
    with pytest.raises(BudgetError, match="validation-prompts must be at least 1"):
        predict("sd3", options=BudgetOptions(validation=True, validation_prompts=0))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_nf4_teacher_counts_the_weight_it_dequantises(device):
    """--teacher_4bit runs on a CPU too now; on either device a 4-bit layer holds its weight dequantised while it
    computes (on a CPU what the CPU dequantisation holds: more than the 16-bit copy a GPU makes)."""
    terms = predict("sd3", ratio=0.3, options=BudgetOptions(device=device, teacher_4bit=True),
                    stages=("distillation",)).stage("distillation").device
    assert terms["teacher (NF4 weights)"] > 0
    assert terms["teacher (one weight dequantised for its matmul)"] > 0


def test_validation_adds_a_phase_with_the_vae_and_no_text_encoder():
    """--validation_steps: the VAE comes to the GPU between steps to draw the (pre-encoded) prompts."""
    options = BudgetOptions(validation=True, gradient_checkpointing=True, train_batch_size=1)
    budget = predict("sd3.5-large-turbo", ratio=0.3, options=options, stages=("distillation",)).stage("distillation")
    without = predict("sd3.5-large-turbo", ratio=0.3, options=BudgetOptions(gradient_checkpointing=True,
                                                                            train_batch_size=1),
                      stages=("distillation",)).stage("distillation")
    assert budget.device_peak >= without.device_peak
    huge = predict("sd3.5-large-turbo", ratio=0.3, stages=("distillation",),
                   options=BudgetOptions(validation=True, validation_prompts=64, gradient_checkpointing=True,
                                         train_batch_size=1)).stage("distillation")
    assert "device peak while validation" in huge.notes
    assert "VAE (weights)" in huge.device and not any(k.startswith("text_encoder") for k in huge.device)


def test_budget_command_prints_a_table_and_json(capsys, tmp_path):
    config = load_transformer_config(toy.model_path("sd3"))
    plan = PrunePlan(family=get_family(config).name, num_blocks=get_family(config).num_blocks(config), removed_blocks=[9, 10])
    plan.save(tmp_path / "plan.json")
    assert main(["budget", "sd3", "--plan", str(tmp_path / "plan.json"), "--json", "--lora-rank", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    stages = {s["stage"]: s for s in data["stages"]}
    assert data["plan"].startswith("sd3") and data["options"]["lora_rank"] == 4
    distill = stages["distillation"]
    assert distill["device_peak"] == sum(distill["device"].values()) and isinstance(distill["device_peak"], int)
    assert set(distill["fits"]) == {"16 GB", "24 GB", "48 GB", "80 GB"}


def test_a_stage_that_would_not_fit_is_refused_with_the_flags_that_fit():
    from diffusers_hprune.budget import fit
    from diffusers_hprune.budget.terms import CUDA_RESERVE

    config = load_transformer_config(toy.model_path("sd3"))
    plan = PrunePlan(family="sd3", num_blocks=get_family(config).num_blocks(config), removed_blocks=[9, 10])
    options = BudgetOptions(train_batch_size=4)
    need = predict("sd3", plan, options=options, stages=("distillation",)).stage("distillation").device_peak
    fit.check_fits("distillation", "sd3", plan, options, capacity=CUDA_RESERVE + need)  # fits exactly: no error
    with pytest.raises(BudgetError) as err:
        fit.check_fits("distillation", "sd3", plan, options, capacity=CUDA_RESERVE + need - 1)
    message = str(err.value)
    assert "distillation stage would need" in message and "--gradient_checkpointing" in message
    assert "--no-budget-check" in message


@pytest.mark.slow
def test_distill_command_refuses_a_run_that_would_not_fit_before_writing(tmp_path, capsys, monkeypatch):
    from diffusers_hprune.budget import fit
    from diffusers_hprune.budget.terms import CUDA_RESERVE

    config = load_transformer_config(toy.model_path("sd3"))
    plan = PrunePlan(family="sd3", num_blocks=get_family(config).num_blocks(config), removed_blocks=[9, 10])
    plan.save(tmp_path / "plan.json")
    monkeypatch.setattr(fit, "gpu_memory", lambda: CUDA_RESERVE + 1024)  # a GPU too small for anything
    out = tmp_path / "run"
    code = main(["distill", "--teacher", "sd3", "--plan", str(tmp_path / "plan.json"), "--prompts",
                 str(tmp_path / "plan.json"), "--output_dir", str(out), "--max_train_steps", "1"])
    assert code == 2 and "distillation stage would need" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was loaded or written


def test_a_copy_of_a_toy_folder_is_budgeted_at_the_size_it_can_draw(tmp_path, capsys):
    """Issue 32: `hprune budget` on any copy of a toy folder was a traceback (Height (256) cannot be greater than
    pos_embed_max_size): without a profile the budget assumed 1024 px, beyond what the SD3 toy can draw."""
    copy = tmp_path / "toy-copy"
    shutil.copytree(toy.model_path("sd3"), copy)
    assert main(["budget", str(copy), "--ratio", "0.3"]) == 0
    assert "64x64" in capsys.readouterr().out  # 16 position patches x patch 2 x VAE 2
    assert main(["budget", str(copy), "--ratio", "0.3", "--resolution", "512"]) == 2
    assert "draws at most 64x64 pixels" in capsys.readouterr().err
    with pytest.raises(BudgetError, match="inference_resolution 128 is larger"):
        predict(str(copy), ratio=0.3, options=BudgetOptions(inference_resolution=128))


@pytest.mark.parametrize("damage", ["empty", "huge header", "vae config a list"])
def test_budget_on_a_damaged_folder_is_a_clear_error(damage, tmp_path, capsys):
    """Issue 32: a 0-byte or oversized-header safetensors file was a struct.error or MemoryError traceback."""
    copy = tmp_path / "toy-copy"
    shutil.copytree(toy.model_path("sd3"), copy)
    weights = next((copy / "vae").glob("*.safetensors"))
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "huge header":
        weights.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    else:
        (copy / "vae" / "config.json").write_text("[1, 2]")
    assert main(["budget", str(copy), "--ratio", "0.3"]) == 2
    err = capsys.readouterr().err
    expected = "is a JSON list, not an object" if damage == "vae config a list" else (
        f"The vae weights file {weights} is damaged")
    assert expected in err and "Traceback" not in err


def test_the_qlora_student_holds_only_its_adapters_and_sliced_copies():
    """Issue 34: with --teacher-4bit --lora-rank the student's base is the NF4 teacher's own layers: its terms are
    the fp32 adapters and, for a plan that slices FLUX's proj_out, those layers' own 16-bit copies; with full weights
    and an NF4 teacher it still holds every kept weight. The prompts are encoded before the teacher draws."""
    config = load_transformer_config(toy.model_path("flux"))
    fam = get_family(config)
    first_single = int(config["num_layers"])
    sliced = PrunePlan(family="flux", num_blocks=fam.num_blocks(config), removed_components={first_single: ["attn"]})
    whole = PrunePlan(family="flux", num_blocks=fam.num_blocks(config), removed_blocks=[first_single])
    qlora = BudgetOptions(teacher_4bit=True, lora_rank=4, mixed_precision="bf16")
    d = predict("flux", sliced, options=qlora, stages=("distillation",)).stage("distillation").device
    assert not any("kept weights" in k for k in d)
    assert any(k.startswith("student (fp32 adapters") for k in d)
    # FLUX's single block: proj_out maps [attention (inner) | MLP (4 x inner)] to inner; without attn the MLP columns
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    assert d["student (sliced layers' own bf16 copies)"] == inner * 4 * inner * 2
    unsliced = predict("flux", whole, options=qlora, stages=("distillation",)).stage("distillation").device
    assert not any("sliced" in k for k in unsliced)
    full = predict("flux", whole, options=BudgetOptions(teacher_4bit=True, mixed_precision="bf16"),
                   stages=("distillation",)).stage("distillation").device
    assert any("kept weights" in k for k in full)


def test_gpu_memory_names_each_stages_flags_for_that_gpu(capsys):
    """`hprune budget --gpu-memory SIZE`: per stage, the flags of its command with which it fits (none when it fits
    as given), its peak with them, and whether it fits; in --json too. A card's GB are read as GiB."""
    from diffusers_hprune.budget import fit
    from diffusers_hprune.budget.terms import CUDA_RESERVE, GIB
    from diffusers_hprune.commands.options import card_memory

    assert card_memory("24GB") == card_memory("24") == card_memory("24GiB") == 24 * GIB
    assert card_memory("16384MB") == 16 * GIB
    for bad in ("0GB", "24 apples", "-3"):
        with pytest.raises(Exception, match="GPU's memory"):
            card_memory(bad)
    options = BudgetOptions(train_batch_size=4, mixed_precision="no")  # the first remedy is then bf16
    given = predict("sd3", ratio=0.3, options=options).stage("distillation").device_peak
    roomy = fit.fit_stage("distillation", "sd3", None, options, capacity=given + CUDA_RESERVE, ratio=0.3)
    assert roomy.flags == () and roomy.fits and roomy.device_peak == given
    tight = fit.fit_stage("distillation", "sd3", None, options, capacity=given + CUDA_RESERVE - 1, ratio=0.3)
    assert tight.flags[0] == "--mixed_precision bf16" and tight.device_peak < given
    assert tight.fits == (tight.device_peak + CUDA_RESERVE <= tight.capacity)
    tiny = fit.fit_stage("analysis", "sd3", None, options, capacity=CUDA_RESERVE + 1, ratio=0.3)
    assert not tiny.fits and tiny.flags == ("--cache-device cpu", "--batch-size 1", "--vae-tiling")

    assert main(["budget", "sd3", "--ratio", "0.3", "--gpu-memory", "1GB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    stages = data["gpu_memory"]["stages"]
    assert data["gpu_memory"]["capacity"] == GIB and set(stages) == {s["stage"] for s in data["stages"]}
    assert stages["analysis"]["flags"][0] == "--cache-device cpu"
    assert main(["budget", "sd3", "--ratio", "0.3", "--gpu-memory", "80GB"]) == 0
    text = capsys.readouterr().out
    assert "On one GPU with 80.0 GiB" in text and "nothing more" in text and "NOT" not in text
    assert main(["budget", "sd3", "--device", "cpu", "--gpu-memory", "24GB"]) == 2
    assert "--gpu-memory fits the stages to a GPU" in capsys.readouterr().err


def test_the_cache_goes_to_host_memory_only_where_the_budget_says_it_must(tmp_path, capsys, monkeypatch):
    """Issue 34, item 2: without --cache-device the analysis keeps its block-output cache beside the model where the
    budget says that fits the GPU, else in host memory, and says so (no flag the user must know)."""
    from diffusers_hprune.budget import fit
    from diffusers_hprune.budget.terms import CUDA_RESERVE

    options = BudgetOptions(analysis_prompts=2, analysis_batch_size=2, eval_steps=1)
    beside = predict("sd3", options=options, stages=("analysis",)).stage("analysis").device_peak
    host = predict("sd3", options=replace(options, cache_device="cpu"), stages=("analysis",)).stage("analysis")
    assert host.device_peak < beside
    assert fit.cache_placement("sd3", options, capacity=beside + CUDA_RESERVE) is None
    assert fit.cache_placement("sd3", options, capacity=beside + CUDA_RESERVE - 1) == "cpu"
    monkeypatch.setattr(fit, "gpu_memory", lambda: None)  # no GPU: the cache stays with the model (the host)
    assert fit.cache_placement("sd3", options) is None

    monkeypatch.setattr(fit, "gpu_memory", lambda: host.device_peak + CUDA_RESERVE)  # fits only with the cache out
    from diffusers_hprune.commands import analyze as command

    class Called(Exception):
        pass

    def analyze(*args, **kwargs):  # where the command would start the analysis: what it was given
        raise Called(kwargs["cache_device"])

    monkeypatch.setattr(command, "analyze", analyze)
    with pytest.raises(Called) as called:
        main(["analyze", "sd3", "--out", str(tmp_path / "a.json"), "--n-prompts", "2", "--batch-size", "2",
              "--eval-steps", "1"])
    assert called.value.args == ("cpu",)
    assert "block-output cache: in host memory" in capsys.readouterr().out


def test_compress_fits_every_stage_to_the_gpu_it_is_given(capsys):
    """`hprune compress --gpu-memory SIZE`: the distillation flags and the analysis placement with which every stage
    fits are applied to the run's settings (and printed); a GPU too small for a stage even so is refused."""
    from diffusers_hprune.budget.terms import CUDA_RESERVE, GIB
    from diffusers_hprune.commands.compress import fitted_to_gpu
    from diffusers_hprune.compression.config import HPruneConfig

    config = HPruneConfig(mixed_precision="no", train_batch_size=4, analysis_prompts=2, train_prompts=4)
    roomy, placement = fitted_to_gpu("sd3", config, None, 80 * GIB)
    assert roomy == config and placement == {}
    need = predict("sd3", ratio=0.3, options=config.distillation_budget(), stages=("distillation",)).stage(
        "distillation").device_peak
    tight, _ = fitted_to_gpu("sd3", config, None, need + CUDA_RESERVE - 1)
    assert tight.mixed_precision == "bf16" and tight != config
    after = predict("sd3", ratio=0.3, options=tight.distillation_budget(), stages=("distillation",)).stage(
        "distillation").device_peak
    assert after + CUDA_RESERVE <= need + CUDA_RESERVE - 1
    assert "distillation: --mixed_precision bf16" in capsys.readouterr().out
    with pytest.raises(BudgetError, match="does not fit a GPU of"):
        fitted_to_gpu("sd3", config, None, CUDA_RESERVE + 1)


def test_evaluation_holds_one_model_on_the_device_at_a_time():
    """Issue 34: the evaluation stage (compress's last) encodes with the text encoders alone on the device, and each
    transformer draws beside the VAE alone; the NF4 student (bitsandbytes keeps it on the GPU) is loaded only after the
    teacher's turn; the VAE decodes one image at a time, so the decode term does not grow with the batch."""
    def stage(**options):
        return predict("sd3.5-large-turbo", ratio=0.3, options=BudgetOptions(**options),
                       stages=("evaluation",)).stage("evaluation")

    eight, one = stage(), stage(eval_batch_size=1)
    for budget in (eight, one):
        assert "device peak while the teacher drawing" in budget.notes
        assert set(budget.device) == {"teacher transformer (bf16 weights)", "vae (weights)",
                                      *[k for k in budget.device if k.startswith("activations (teacher call")]}
        assert any(k.startswith("text_encoder") for k in budget.host)  # they wait on the host meanwhile

    def activations(budget):
        return next(v for k, v in budget.device.items() if k.startswith("activations"))

    # at batch 1 the decode of one 1024 px image is the larger term; eight images are still decoded one at a time
    assert activations(one) < activations(eight) < 8 * activations(one)
    assert stage(quantize=False, eval_batch_size=1).device_peak == one.device_peak  # the teacher's turn is the peak
    assert predict("sd3.5-large-turbo", ratio=0.3, stages=("evaluation",)).stage("evaluation").device_peak \
        == eight.device_peak


@pytest.mark.parametrize("tiled", [False, True])
def test_vae_decode_trace_on_meta_equals_the_real_decode(tiled):
    """The budget's decode term is the real decode, on meta: whole, or in tiles as `--vae-tiling` sets them up
    (`loading.sliced_decoding`; a 1024 px image decodes as 3 x 3 tiles of up to 512 px), at under a third of the memory
    (FLUX's VAE: 0.38 GiB instead of 1.5)."""
    from diffusers_hprune.budget.traces import vae_decode_trace
    from diffusers_hprune.loading import sliced_decoding

    pipe = toy.load_pipeline("sd3")
    vae = pipe.vae.eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn(1, vae.config.latent_channels, 1024 // factor, 1024 // factor)
    tiles = []
    hook = vae.decoder.register_forward_pre_hook(lambda module, args: tiles.append(tuple(args[0].shape[-2:])))
    counter = LiveTensorBytes([*vae.parameters(), *vae.buffers(), latents])
    with torch.no_grad(), sliced_decoding(pipe, tiled), counter:
        image = vae.decode(latents, return_dict=False)[0]
    hook.remove()
    assert image.shape[-2:] == (1024, 1024)
    assert vae.use_tiling is False  # as it was
    predicted = vae_decode_trace(dict(vae.config), 1, 1024, 1024, torch.float32, tiled=tiled)
    assert predicted == counter.peak > 0
    if tiled:
        assert len(tiles) == 9 and max(tiles) == (512 // factor, 512 // factor)  # the last row and column: smaller
        assert predicted * 3 < vae_decode_trace(dict(vae.config), 1, 1024, 1024, torch.float32)
    else:
        assert tiles == [(1024 // factor, 1024 // factor)]


def test_every_stage_of_both_seed_models_fits_one_24_gb_gpu(capsys):
    """Issue 34's goal, as the budget predicts it (1024 px, bf16, a 30 % plan): `hprune compress --gpu-memory 24GB`
    finds flags with which every stage of SD3.5 Large Turbo and FLUX.1-schnell fits one 24 GB GPU (FLUX.1-schnell's
    16-bit analysis and evaluation only with the VAE decoding in tiles, one prompt at a time), and the QLoRA
    distillation of SD3.5 Large Turbo fits 16 GB."""
    from diffusers_hprune.budget.terms import CUDA_RESERVE, GIB
    from diffusers_hprune.commands.compress import fitted_to_gpu
    from diffusers_hprune.compression.config import HPruneConfig

    sd3, placement = fitted_to_gpu("sd3.5-large-turbo", HPruneConfig(), None, 24 * GIB)
    assert placement == {"cache_device": "cpu"} and not sd3.vae_tiling and sd3.teacher_4bit and sd3.lora_rank == 64
    flux, placement = fitted_to_gpu("flux.1-schnell", HPruneConfig(), None, 24 * GIB)
    assert placement == {"cache_device": "cpu", "analysis_batch_size": 1}
    assert flux.vae_tiling and flux.eval_batch_size == 1 and flux.teacher_4bit and flux.lora_rank == 64
    printed = capsys.readouterr().out
    assert "analysis: --cache-device cpu --batch-size 1 --vae-tiling" in printed
    assert "evaluation: --batch-size 1:" in printed  # the analysis's --vae-tiling is the run's setting already
    assert "compress runs with " in printed and "--vae-tiling true" in printed and "--eval-batch-size 1" in printed
    qlora = predict("sd3.5-large-turbo", ratio=0.3, options=sd3.distillation_budget(), stages=("distillation",))
    assert qlora.stage("distillation").device_peak + CUDA_RESERVE <= 16 * GIB
