"""The distillation run (`hprune distill`, `examples/distill.py`) on the toy SD3 and FLUX pipelines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_hprune import toy
from diffusers_hprune.analysis import analyze
from diffusers_hprune.cli import main
from diffusers_hprune.inventory import inspect_transformer
from diffusers_hprune.planning import make_plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Per family: analysis, a 30 % plan and a prompt file (data-free distillation)."""
    base = tmp_path_factory.mktemp("distill")
    out = {}
    for family in ("sd3", "flux"):
        pipe = toy.load_pipeline(family)
        report = analyze(pipe, base / f"{family}-analysis.json", n_prompts=2, eval_steps=2, progress=False)
        outcome = make_plan(report.contributions(), inspect_transformer(pipe.transformer), ratio=0.3)
        outcome.plan.save(base / f"{family}-plan.json")
        out[family] = (base / f"{family}-analysis.json", base / f"{family}-plan.json", outcome.plan)
    (base / "prompts.txt").write_text("\n".join(toy.prompts(split="train", n=8, seed=1)) + "\n")
    return base, out


def _args(base, family, analysis, plan, out, *extra):
    return ["distill", "--teacher", family, "--plan", str(plan), "--analysis", str(analysis),
            "--prompts", str(base / "prompts.txt"), "--output-dir", str(out), "--train_batch_size", "4",
            "--cache-dir", str(base / "cache"), "--no-progress", *extra]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_distill_saves_a_loadable_pruned_pipeline(setup, family, capsys):
    from diffusers import DiffusionPipeline

    base, plans = setup
    analysis, plan_path, plan = plans[family]
    out = base / f"{family}-out"
    assert main(_args(base, family, analysis, plan_path, out, "--max_train_steps", "6", "--checkpointing_steps",
                      "3", "--learning-rate", "1e-3")) == 0
    printed = capsys.readouterr().out
    assert "PWP: first pruned location is block" in printed and "parameter group" in printed
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["steps"] == 6 and summary["sgdistill"] and summary["ranks_identical"]
    assert (out / "checkpoint-3").is_dir() and (out / "checkpoint-6").is_dir()
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__.startswith("HierarchicalPruned")
    assert pipe.transformer.prune_plan.removed_blocks == plan.removed_blocks
    # PWP: what runs before the first pruned location is bit-identical to the teacher; the rest trained.
    teacher = dict(toy.load_pipeline(family).transformer.named_parameters())
    first = summary["first_pruned_block"]
    from diffusers_hprune import get_family

    fam = get_family(pipe.transformer)
    frozen_paths = list(fam.input_modules) + [s.path for s in fam.block_specs(pipe.transformer.config)
                                               if s.index < first]
    changed = 0
    for name, p in pipe.transformer.named_parameters():
        if any(name.startswith(f + ".") for f in frozen_paths):
            assert torch.equal(p, teacher[name]), name
        elif name.startswith(("norm_out.", "proj_out.")):
            changed += not torch.equal(p, teacher[name])
    assert changed  # the output layers (m = 1) trained
    images = pipe(toy.prompts(n=2), **{**toy.generation_kwargs(family), "num_inference_steps": 2}).images
    assert len(images) == 2


def test_resume_from_latest_checkpoint(setup, capsys):
    base, plans = setup
    analysis, plan_path, _ = plans["sd3"]
    out = base / "resume-out"
    args = _args(base, "sd3", analysis, plan_path, out, "--checkpointing_steps", "2", "--no-sgdistill")
    assert main(args + ["--max_train_steps", "2"]) == 0
    capsys.readouterr()
    assert main(args + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"]) == 0
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["steps"] == 4 and [entry["step"] for entry in summary["losses"]] == [3, 4]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--train_data_dir", "somewhere"], "exactly one data source"),
        (["--teacher_4bit"], "CUDA only"),
        (["--lora_rank", "-1"], "lora_rank must be >= 0"),
    ],
)
def test_bad_options(setup, extra, message, capsys):
    base, plans = setup
    analysis, plan_path, _ = plans["sd3"]
    if extra[0] == "--teacher_4bit" and torch.cuda.is_available():
        pytest.skip("a CUDA machine accepts --teacher_4bit")
    assert main(_args(base, "sd3", analysis, plan_path, base / "bad", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (base / "bad" / "model_index.json").exists()


def test_analysis_of_another_model_is_refused(setup, capsys):
    base, plans = setup
    assert main(_args(base, "sd3", plans["flux"][0], plans["sd3"][1], base / "mismatch")) == 2
    assert "made for a flux model" in capsys.readouterr().err


def test_two_processes_end_with_identical_weights(setup, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) runs examples/distill.py."""
    base, plans = setup
    analysis, plan_path, _ = plans["sd3"]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "examples" / "distill.py"), *_args(base, "sd3", analysis, plan_path, out)[1:],
           "--max_train_steps", "12", "--learning_rate", "1e-3", "--no-sgdistill", "--checkpointing_steps", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["processes"] == 2
    assert len(summary["rank_checksums"]) == 2 and summary["ranks_identical"]
    assert summary["fixed_batch_loss"]["end"] < summary["fixed_batch_loss"]["start"]


def test_lora_with_gradient_checkpointing_is_merged_into_the_saved_model(setup):
    from diffusers import DiffusionPipeline

    base, plans = setup
    analysis, plan_path, plan = plans["sd3"]
    out = base / "lora-out"
    assert main(_args(base, "sd3", analysis, plan_path, out, "--max_train_steps", "4", "--lora_rank", "4",
                      "--gradient_checkpointing", "--no-sgdistill", "--learning_rate", "1e-3",
                      "--checkpointing_steps", "0")) == 0
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["lora_rank"] == 4
    pipe = DiffusionPipeline.from_pretrained(out)  # strict loading: no adapter keys left
    assert not [n for n, _ in pipe.transformer.named_parameters() if "lora" in n]
    teacher = dict(toy.load_pipeline("sd3").transformer.named_parameters())
    last = f"transformer_blocks.{max(s for s in range(12) if s not in plan.removed_blocks)}"
    moved = [n for n, p in pipe.transformer.named_parameters() if n.startswith(last) and not torch.equal(p, teacher[n])]
    assert any(n.endswith(".weight") for n in moved)  # the merged adapters changed the linear weights
    assert torch.equal(pipe.transformer.pos_embed.proj.weight, teacher["pos_embed.proj.weight"])


def test_image_caption_data_is_encoded_once(tmp_path):
    import numpy as np
    from PIL import Image

    from diffusers_hprune.distillation.data import DataError, DataSpec, build_training_cache

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for k, (image, caption) in enumerate(toy.sample(6, "train", seed=3)):
        Image.fromarray((toy.dataset.to_array(image) * 255).round().astype(np.uint8)).save(folder / f"{k}.png")
        rows.append(json.dumps({"file_name": f"{k}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    pipe = toy.load_pipeline("sd3")
    spec = DataSpec(train_data_dir=str(folder), batch_size=4)
    ds, path = build_training_cache(pipe, spec, tmp_path / "cache", progress=False)
    assert len(ds) == 6 and tuple(ds[0]["latents"].shape) == (4, 16, 16)
    assert ds["prompt"] == [json.loads(r)["text"] for r in rows]
    # The latents are the VAE's (scaled) encoding of the image; the cache is reused on the next call.
    vae = pipe.vae
    image = Image.open(folder / "0.png")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        z = (vae.encode(x).latent_dist.mean - (vae.config.shift_factor or 0)) * vae.config.scaling_factor
    torch.testing.assert_close(ds[0]["latents"], z[0], rtol=1e-4, atol=1e-4)
    again, path2 = build_training_cache(pipe, spec, tmp_path / "cache", progress=False)
    assert path2 == path and len(list((tmp_path / "cache").iterdir())) == 1
    with pytest.raises(DataError, match="no column 'caption'"):
        build_training_cache(pipe, DataSpec(train_data_dir=str(folder), caption_column="caption"), tmp_path / "c2")
