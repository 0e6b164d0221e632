"""Issue 15, item 4: the real stages at full depth and reduced width, measured beside `hprune budget`.

    python benchmarks/rehearsal.py [--models sd3.5-large-turbo flux.1-schnell] [--resolution 256] [--device cpu]

For SD3.5 Large Turbo and FLUX.1-schnell it builds a pipeline whose transformer has every block
of the published config (38; 19 double + 38 single) and the real head size, with the number of
heads cut (6 x 64 for SD3.5, 3 x 128 for FLUX) and the text width cut to the tiny text encoders',
real text lengths (CLIP 77 tokens, T5 256), and a 16-channel VAE that downsamples by 8 as the real
one does (tiny channel counts), stored in bf16 as the published checkpoints are. The folder is named after the model, so every stage takes its
generation profile (4 steps, no guidance). Then it runs the stages through the package's own API,
each in a fresh process:

    analyze -> plan (30 %) -> distill (2 steps, batch 2) -> quantize (NF4) -> evaluate -> inference of the result

and beside them the QLoRA student (issue 34: ``--teacher_4bit --lora_rank 8 --gradient_checkpointing``, its base
the NF4 teacher's own layers) and the save of a trained student in bf16, one shard of at most 64 MiB at a time
(``distillation.saving.write_transformer``: host memory bounded by one shard, not the model)

and records each stage's peak: the growth of the process's peak resident size (``VmHWM`` after
``clear_refs``) over its size before the stage, on a CPU; ``torch.cuda.max_memory_allocated``
with ``--device cuda``. Allocations of 128 KiB and more are mapped and unmapped directly
(``MALLOC_MMAP_THRESHOLD_``), so freed memory leaves the resident size as it does a GPU's
allocated bytes. Beside each it prints ``hprune budget``'s prediction for the same reduced
folder, the same plan and options, and the difference; the stages must agree within 15 %.
Last, the budget of the full-size models. Results go to BENCHMARKS.md.

The analysis computes only the block entries of three blocks (first, middle, last): its peak is
the block-output cache plus one ablation, which every entry repeats; all entries would take an
hour on two CPU cores. The 30 % plan therefore comes from a synthetic analysis of the same config.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, update_section  # noqa: E402

MODELS = {
    "sd3.5-large-turbo": {"folder": "stable-diffusion-3.5-large-turbo", "heads": 6},
    "flux.1-schnell": {"folder": "FLUX.1-schnell", "heads": 3},
}
TOLERANCE = 0.15
STEPS = 2
BATCH = 2
PROMPTS = ["a red circle above a blue square", "two green triangles to the left of a yellow circle"]


# -- the reduced pipelines ---------------------------------------------------------------------
def build(name: str, root: Path) -> Path:
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from diffusers_hprune.architecture.inventory import load_transformer_config
    from diffusers_hprune.toy.components import build_flux_pipeline, build_sd3_pipeline, build_vae

    spec = MODELS[name]
    folder = root / spec["folder"]
    if (folder / "model_index.json").is_file():
        return folder
    config = {k: v for k, v in load_transformer_config(name).items() if not k.startswith("_")}
    heads = spec["heads"]
    torch.manual_seed(0)
    vae = build_vae(latent_channels=16, block_out_channels=(8, 8, 16, 16), norm_num_groups=4)
    if name.startswith("sd3"):
        config.update(num_attention_heads=heads, caption_projection_dim=heads * config["attention_head_dim"],
                      joint_attention_dim=64, pooled_projection_dim=64)
        pipe = build_sd3_pipeline(SD3Transformer2DModel(**config), t5_d_model=64, vae=vae)
    else:
        config.update(num_attention_heads=heads, joint_attention_dim=64, pooled_projection_dim=32)
        pipe = build_flux_pipeline(FluxTransformer2DModel(**config), t5_d_model=64, vae=vae)
    pipe.to(torch.bfloat16).save_pretrained(folder)  # stored in bf16, as the published checkpoints are
    return folder


# -- one stage in a fresh process ----------------------------------------------------------------
def _real(inputs: dict) -> dict:
    """Random CPU tensors of the shapes and dtypes of ``inputs`` (meta tensors from ``budget.traces.meta_inputs``)."""
    import torch

    return {k: torch.randn(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _warm_imports() -> None:
    import bitsandbytes  # noqa: F401
    import datasets  # noqa: F401
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from accelerate import Accelerator  # noqa: F401

    import diffusers_hprune  # noqa: F401
    from diffusers_hprune import analysis, distillation, quantization  # noqa: F401


def _warm_up(spec: dict) -> None:
    """Initialise what every process pays once (kernels, thread pools, the loaders) on the toy of the same family."""
    import torch

    from diffusers_hprune import toy
    from diffusers_hprune.architecture import get_family
    from diffusers_hprune.architecture.inventory import load_transformer_config
    from diffusers_hprune.budget.traces import Shapes, meta_inputs, meta_transformer
    from diffusers_hprune.quantization import quantize

    config = load_transformer_config(spec["family_config"])
    name = get_family(config).name
    pipe = toy.load_pipeline(name, torch.float32)
    inputs = _real(meta_inputs(meta_transformer(dict(pipe.transformer.config), None, torch.float32),
                               Shapes(2, 32, 32, 8, 10, pipe.vae_scale_factor), torch.float32))
    pipe.transformer(**inputs, return_dict=False)[0].sum().backward()
    with torch.no_grad():
        quantize(pipe.transformer)(**inputs, return_dict=False)
    del pipe


SHARD = 64 * 2**20  # the shard size of the rehearsed save: a few shards for the reduced models


def _prepare(stage: str, spec: dict):
    """What a stage needs loaded before its measurement starts (the save: the trained student, in fp32)."""
    if stage != "save":
        return None
    from diffusers_hprune.architecture import get_family
    from diffusers_hprune.architecture.inventory import load_transformer_config
    from diffusers_hprune.models import pruned_class_for

    family = get_family(load_transformer_config(spec["model"]))
    model = pruned_class_for(family).from_pretrained(Path(spec["model"]) / "transformer")
    for tensor in list(model.parameters()) + list(model.buffers()):  # resident, as a trained student is: not pages
        tensor.data = tensor.data.clone()  # of the mapped file, which the save would read in
    gc.collect()
    return model


def _stage(stage: str, spec: dict, prepared=None) -> None:
    import torch

    from diffusers_hprune.architecture import get_family

    if stage == "save":
        from diffusers_hprune.distillation.saving import empty_twin, saved_tensors, write_transformer

        write_transformer(Path(spec["out"]), empty_twin(prepared, get_family(prepared)),
                          saved_tensors(prepared, torch.bfloat16), torch.bfloat16, max_shard_size=SHARD)
    elif stage == "analyze":
        from diffusers_hprune.analysis import analyze
        from diffusers_hprune.contributions import ContributionReport

        config = json.loads((Path(spec["model"]) / "transformer" / "config.json").read_text())
        blocks = get_family(config).num_blocks(config)
        keep = {(0, "block"), (blocks // 2, "block"), (blocks - 1, "block")}
        original = ContributionReport.expected_keys
        ContributionReport.expected_keys = lambda self: [k for k in original(self) if k in keep]
        analyze(spec["model"], spec["out"], n_prompts=spec["prompts"], batch_size=spec["batch"],
                eval_steps=spec["eval_steps"], height=spec["resolution"], width=spec["resolution"],
                dtype=_dtype(spec["precision"]), progress=False)
    elif stage == "distill":
        from diffusers_hprune.distillation.trainer import DistillConfig, distill

        distill(DistillConfig(mixed_precision=spec["precision"],
                              **{k: v for k, v in spec.items() if k not in ("family_config", "precision")}))
    elif stage == "quantize":
        from diffusers_hprune.quantization import quantize_pipeline

        quantize_pipeline(spec["source"], spec["out"], overwrite=True)
    elif stage == "evaluate":
        from diffusers_hprune.evaluation.compare import evaluate_pipelines, load_for_evaluation, load_student

        teacher = load_for_evaluation(spec["teacher"], "cuda" if spec["precision"] == "bf16" else "cpu")
        r = spec["resolution"]
        evaluate_pipelines({"teacher": teacher, "student": lambda: load_student(teacher, spec["teacher"], spec["model"])},
                           PROMPTS[: spec["batch"]], num_inference_steps=STEPS, height=r, width=r,
                           batch_size=spec["batch"], cost=False, metrics=["fidelity"])
    elif stage == "inference":
        from diffusers_hprune.architecture.inventory import load_transformer_config
        from diffusers_hprune.budget.traces import Shapes, meta_inputs, meta_transformer
        from diffusers_hprune.models import pruned_class_for

        config = load_transformer_config(spec["model"])
        family = get_family(config)
        dtype = _dtype(spec["precision"])
        # on a GPU bitsandbytes' loader puts the model there; its inputs follow it, in the dtype it computes in
        model = pruned_class_for(family).from_pretrained(Path(spec["model"]) / "transformer", dtype=dtype).eval()
        device = next(model.parameters()).device
        r = spec["resolution"]
        shapes = Shapes(1, r, r, spec["max_sequence_length"], 77, 8)
        inputs = _real(meta_inputs(meta_transformer(config, None, torch.float32), shapes, torch.float32))
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
                  for k, v in inputs.items()}
        with torch.no_grad():
            model(**inputs, return_dict=False)
    else:
        raise SystemExit(f"unknown stage {stage}")


def _dtype(precision: str):
    """The weights' dtype of a stage: bf16 on a GPU (as users run it), float32 on a CPU."""
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def child(stage: str, spec: dict, device: str) -> None:
    import torch

    from diffusers_hprune.utils.live_memory import process_memory, reset_peak_rss

    _warm_imports()
    _warm_up(spec)
    prepared = _prepare(stage, spec)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        _stage(stage, spec, prepared)
        peak = torch.cuda.max_memory_allocated()
    else:
        before = process_memory("VmRSS")
        reset_peak_rss()
        _stage(stage, spec, prepared)
        peak = process_memory("VmHWM") - before
    print("RESULT " + json.dumps({"peak": peak}), flush=True)


def run_child(stage: str, spec: dict, device: str) -> int:
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="131072",
               DIFFUSERS_VERBOSITY="error", TRANSFORMERS_VERBOSITY="error")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, __file__, "--child", stage, json.dumps(spec), "--device", device],
                          capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{stage} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])["peak"]


# -- the rehearsal -------------------------------------------------------------------------------
def rehearse(name: str, root: Path, resolution: int, device: str) -> list[list[str]]:
    from diffusers_hprune.analysis import synthetic_report
    from diffusers_hprune.architecture.inventory import inspect_transformer
    from diffusers_hprune.budget import BudgetOptions, predict
    from diffusers_hprune.contributions import ContributionReport
    from diffusers_hprune.planning import make_plan

    folder = build(name, root)
    work = root / f"{name}-run"
    work.mkdir(exist_ok=True)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    analysis = work / "analysis.json"
    analysis.unlink(missing_ok=True)  # this script's own file from an earlier rehearsal: measure a fresh analysis
    measured = {}

    precision = "bf16" if device == "cuda" else "no"  # what the budget assumes on each device

    def run_stage(stage: str, spec: dict) -> int:
        return run_child(stage, dict(spec, family_config=str(folder), precision=precision), device)

    print(f"{name}: analyze", flush=True)
    measured["analysis"] = run_stage("analyze", {"model": str(folder), "out": str(analysis), "prompts": BATCH,
                                                 "batch": BATCH, "eval_steps": STEPS, "resolution": resolution})
    ContributionReport.load(analysis)  # written and readable
    # The plan needs every entry; three were measured, so plan from a synthetic analysis of the same config.
    plan = make_plan(synthetic_report(folder).contributions(), inspect_transformer(folder), ratio=0.3).plan
    plan.save(work / "plan.json")
    print(f"{name}: distill ({plan.describe()})", flush=True)
    distilled = work / "distilled"
    measured["distillation"] = run_stage("distill", {
        "teacher": str(folder), "plan": str(work / "plan.json"), "output_dir": str(distilled),
        "analysis": str(analysis), "prompts": str(prompts), "max_train_steps": STEPS, "train_batch_size": BATCH,
        "resolution": resolution, "checkpointing_steps": 0, "progress": False, "overwrite": True,
        "sgdistill": False})
    print(f"{name}: distill, the QLoRA student", flush=True)
    qlora = {"lora_rank": 8, "teacher_4bit": True, "gradient_checkpointing": True}
    measured["distillation (QLoRA)"] = run_stage("distill", {
        "teacher": str(folder), "plan": str(work / "plan.json"), "output_dir": str(work / "distilled-qlora"),
        "prompts": str(prompts), "max_train_steps": STEPS, "train_batch_size": BATCH, "resolution": resolution,
        "checkpointing_steps": 0, "progress": False, "overwrite": True, "sgdistill": False, **qlora})
    if device == "cpu":  # host memory: what the save holds
        print(f"{name}: save in bf16, shards of {SHARD >> 20} MiB", flush=True)
        measured["saving (bf16, one shard at a time)"] = run_stage("save", {"model": str(distilled),
                                                                            "out": str(work / "saved")})
    print(f"{name}: quantize", flush=True)
    quantized = work / "quantized"
    measured["quantisation"] = run_stage("quantize", {"source": str(distilled), "out": str(quantized)})
    print(f"{name}: evaluate (the teacher, then the distilled student; one model on the device at a time)", flush=True)
    measured["evaluation"] = run_stage("evaluate", {"teacher": str(folder), "model": str(distilled), "batch": BATCH,
                                                    "resolution": resolution})
    print(f"{name}: inference", flush=True)
    measured["inference (pruned, NF4)"] = run_stage("inference", {"model": str(quantized), "resolution": resolution,
                                                                  "max_sequence_length": 256})
    options = BudgetOptions(device=device, resolution=resolution, mixed_precision=precision, train_batch_size=BATCH,
                            train_samples=len(PROMPTS), analysis_prompts=BATCH,
                            analysis_batch_size=BATCH, eval_steps=STEPS, sgdistill=False,
                            inference_resolution=resolution, inference_max_sequence_length=256,
                            eval_batch_size=BATCH, quantize=False)
    budget = predict(str(folder), plan, options=options)
    predictions = {stage.stage: stage.device_peak for stage in budget.stages}
    predictions["distillation (QLoRA)"] = predict(str(folder), plan, options=replace(options, **qlora),
                                                  stages=("distillation",)).stage("distillation").device_peak
    predictions["saving (bf16, one shard at a time)"] = _save_prediction(folder, plan)
    rows = []
    for stage, value in measured.items():
        predicted = predictions[stage]
        diff = (value - predicted) / predicted
        rows.append([name, stage, f"{value / 2**20:.0f}", f"{predicted / 2**20:.0f}", f"{diff:+.1%}",
                     "yes" if abs(diff) <= TOLERANCE else "**no**"])
        print(f"  {stage:26} measured {value / 2**20:8.0f} MiB  predicted {predicted / 2**20:8.0f} MiB  {diff:+.1%}",
              flush=True)
    return rows


def _save_prediction(folder: Path, plan) -> int:
    """The save's host memory as the budget's saving phase counts it, with this rehearsal's shard size: one shard of
    the bf16 student (a full-weights student: no adapter to merge)."""
    from diffusers_hprune.architecture.inventory import inspect_transformer, load_transformer_config

    total = inspect_transformer(dict(load_transformer_config(folder), prune_plan=plan.to_dict())).nbytes("bf16")
    return min(total, SHARD)


def full_size_rows() -> list[list[str]]:
    from diffusers_hprune.budget import BudgetOptions, predict

    rows = []
    every = None  # the first mode gives every stage; the others only the stages they change
    modes = [("-", {}, every),
             ("full weights, AdamW, gradient checkpointing, batch 1",
              {"gradient_checkpointing": True, "train_batch_size": 1}, ("distillation",)),
             ("QLoRA r=64 (NF4 teacher's own layers), gradient checkpointing, batch 1",
              {"lora_rank": 64, "teacher_4bit": True, "gradient_checkpointing": True, "train_batch_size": 1},
              ("distillation",)),
             ("one prompt at a time, the VAE in tiles (--batch-size 1 --vae-tiling; analysis --cache-device cpu)",
              {"cache_device": "cpu", "analysis_batch_size": 1, "eval_batch_size": 1, "vae_tiling": True},
              ("analysis", "evaluation"))]
    for name in MODELS:
        for label, changes, stages in modes:
            budget = predict(name, ratio=0.3, options=BudgetOptions(**changes))
            for stage in budget.stages:
                if stages is not None and stage.stage not in stages:
                    continue
                fits = ", ".join(f"{g} GB" for g, ok in stage.fits().items() if ok) or "none"
                shown = "full weights, AdamW" if stage.stage == "distillation" and stages is None else label
                rows.append([name, stage.stage, shown, f"{stage.device_peak / 2**30:.2f}",
                             f"{stage.host_peak / 2**30:.2f}", fits])
        print(f"{name}: full-size budget done", flush=True)
    return rows


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "a GPU"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--work", default=None, help="folder for the pipelines and runs (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args(argv)
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hprune-rehearsal-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = [row for name in args.models for row in rehearse(name, root, args.resolution, args.device)]
    full = full_size_rows()
    failed = [r for r in rows if r[-1] != "yes"]
    body = markdown_table(["model (reduced width)", "stage", "measured (MiB)", "predicted (MiB)", "difference",
                           "within 15 %"], rows)
    body += (
        f"\n\nFull depth (every block of the published configs), heads cut (SD3.5: 6 x 64, FLUX: 3 x 128), text "
        f"width cut to the tiny encoders' (64), real text lengths (CLIP 77 + T5 256), {args.resolution} x "
        f"{args.resolution} images with an 8x-downsampling 16-channel VAE; "
        f"{'fp32 on the CPU' if args.device == 'cpu' else 'bf16 on ' + _gpu_name()}. "
        f"Stages: analysis (2 prompts, batch 2, {STEPS} cached steps; the block entries of three blocks), "
        f"a 30 % plan, distillation ({STEPS} steps, batch {BATCH}, full weights, AdamW, PWP), the QLoRA student "
        f"(the same with `--teacher_4bit --lora_rank 8 --gradient_checkpointing`), "
        + (f"the save of the distilled student in bf16 in shards of {SHARD >> 20} MiB (predicted: one shard, the "
           "budget's saving phase), " if args.device == "cpu" else "")
        + f"NF4 quantisation, the evaluation of the distilled (16-bit) student beside its teacher ({BATCH} prompts, "
        f"batch {BATCH}, {STEPS} steps), one call of the NF4 transformer. Measured: "
        + ("growth of the process's peak resident size during the stage, in a fresh process (allocations of 128 KiB "
           "and more mapped directly)" if args.device == "cpu" else
           "`torch.cuda.max_memory_allocated` during the stage, in a fresh process")
        + f"; predicted: `hprune budget` for the same folder, plan and options (`--device {args.device}`).\n\n"
        "The full-size budget (`hprune budget MODEL --ratio 0.3`, bf16 on a GPU, 1024 x 1024):\n\n"
        + markdown_table(["model", "stage", "mode", "GPU peak (GiB)", "host RAM (GiB)", "fits"], full)
        + "\n"
    )
    print(body)
    if not args.no_write:
        if args.device == "cpu":
            update_section("rehearsal", "Rehearsal: full depth, reduced width (issue 15)", body)
        else:
            update_section("rehearsal-gpu", f"Rehearsal on {_gpu_name()}: full depth, reduced width", body)
    if failed:
        raise SystemExit(f"{len(failed)} stage(s) outside 15 %: " + "; ".join(f"{r[0]} {r[1]} {r[4]}" for r in failed))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
        child(sys.argv[2], json.loads(sys.argv[3]), device)
    else:
        main()
