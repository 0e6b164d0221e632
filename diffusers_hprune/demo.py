"""``hprune demo``: the flow on the embedded toy pipelines, on CPU, in about a minute.

For each toy (SD3 and FLUX, trained on the captioned-shapes dataset): draw a grid
for held-out prompts and score it with ShapeEval; measure the contribution of every
block and component (fidelity analysis on training prompts); plan with HPP for the
target ratio and plot the analysis with the plan marked; prune; save the pruned
pipeline, load it back the ordinary Diffusers way, check it draws exactly what the
pruned pipeline drew, and score it too (pruning without distillation costs quality;
the distillation stage recovers it). Distillation and quantisation join the demo as
they land.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import toy
from .fileio import atomic_directory

DEMO_ANALYSIS = {"n_prompts": 4, "eval_steps": 2}


def run_demo(out_dir: str | os.PathLike = "hprune-demo", families=("sd3", "flux"), n_prompts: int = 24,
             overwrite: bool = False, ratio: float = 0.2) -> dict:
    """Run the demo, write ``out_dir`` (analyses, plans, reports, pipelines, sample grids, summary.json)."""
    from diffusers import DiffusionPipeline

    from .analysis import analyze
    from .inventory import inspect_transformer
    from .pipelines import prune_pipeline
    from .planning import make_plan
    from .report import write_report

    out_dir = Path(out_dir)
    prompts = toy.prompts(split="heldout", n=n_prompts)
    summary = {}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for family in tqdm(list(families), desc="hprune demo", unit="model"):
            pipe = toy.load_pipeline(family)
            images = toy.generate(pipe, prompts)
            analysis = analyze(pipe, tmp / family / "analysis.json", progress=False, **DEMO_ANALYSIS)
            outcome = make_plan(analysis.contributions(), inspect_transformer(pipe.transformer), ratio=ratio,
                                metadata={"source": "hprune demo", "analysis": "analysis.json"})
            plan = outcome.plan
            plan.save(tmp / family / "plan.json")
            write_report(analysis, tmp / family / "report", plan)
            pruned = prune_pipeline(pipe, plan)
            folder = tmp / family / "pruned-pipeline"
            pruned.save_pretrained(folder)
            reloaded = DiffusionPipeline.from_pretrained(folder)
            reloaded.set_progress_bar_config(disable=True)
            pruned_images = toy.generate(pruned, prompts)  # same batches as below: bit-comparable
            reloaded_images = toy.generate(reloaded, prompts)
            toy.save_grid(images, tmp / family / "samples.png")
            toy.save_grid(reloaded_images, tmp / family / "samples-pruned.png")
            (tmp / family / "prompts.txt").write_text("\n".join(prompts) + "\n")
            inventory = inspect_transformer(pruned.transformer)
            diff = max(float(np.abs(toy.dataset.to_array(a) - toy.dataset.to_array(b)).max())
                       for a, b in zip(pruned_images, reloaded_images))
            summary[family] = {
                "pipeline_class": type(reloaded).__name__,
                "analysis": {"entries": len(analysis.entries), "metric": analysis.metric["name"],
                             "block_evaluations": analysis.run["block_evaluations"],
                             "seconds": analysis.run["seconds"]},
                "target_ratio": ratio,
                "plan": plan.describe(),
                "original_params": inventory.original_params,
                "pruned_params": inventory.params,
                "removed_fraction": round(inventory.removed_fraction, 4),
                "reload_max_abs_diff": diff,
                "shapeeval": toy.shapeeval(images, prompts),
                "shapeeval_pruned": toy.shapeeval(reloaded_images, prompts),
            }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict, out_dir: str | os.PathLike) -> str:
    out = Path(out_dir)
    lines = []
    for family, s in summary.items():
        a = s["analysis"]
        lines.append(
            f"{family} toy: ShapeEval {s['shapeeval']['overall']:.2f} on {out / family / 'samples.png'}\n"
            f"  analysis: {a['entries']} blocks and components measured ({a['metric']}, {a['seconds']:.0f} s) in "
            f"{out / family / 'analysis.json'}; plots in {out / family / 'report'}\n"
            f"  HPP plan for {s['target_ratio']:.0%} ({out / family / 'plan.json'}): {s['plan']}\n"
            f"  parameters {s['original_params']:,} -> {s['pruned_params']:,} ({s['removed_fraction']:.1%} removed), "
            f"ShapeEval {s['shapeeval_pruned']['overall']:.2f} without distillation on "
            f"{out / family / 'samples-pruned.png'}\n"
            f"  saved and reloaded as {s['pipeline_class']}: draws exactly as before saving "
            f"(max pixel difference {s['reload_max_abs_diff']:.2g})"
        )
    lines.append(f"prompts: {out / '<family>' / 'prompts.txt'}; summary: {out / 'summary.json'}")
    return "\n".join(lines)
