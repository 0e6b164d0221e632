"""``hprune demo``: ``hprune compress`` on the embedded SD3 toy, sized for a laptop CPU.

The whole method on a real (tiny) ``StableDiffusion3Pipeline`` trained on the captioned-shapes
dataset: contribution analysis, the HPP plan for 30 %, pruning, distillation with PWP and
SGDistill on the teacher's own drawings (400 steps, at most 5 minutes), NF4
quantisation, evaluation (ShapeEval of teacher and student, fidelity, bytes, per-step
latency, a sample grid) and the model card. About 7 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from diffusers_hprune import toy
from diffusers_hprune.compression.config import HPruneConfig
from diffusers_hprune.compression.run import RUN_CONFIG, compress, holds_something_else

DEMO_MODEL = toy.DEMO_TOY
# Settings from the toy measurements (BENCHMARKS.md "toy-ablation-curve-sd3", "sgdistill-floor-sd3"): the HPP + PWP +
# SGDistill student's ShapeEval stops rising at about 400 steps of batch 8 (200 -> 400 -> 800: 0.528, 0.536, 0.528),
# the analysis uses the 8 calibration prompts those plans came from, and 200 held-out prompts (as there) make the
# reported share of the teacher's score less noisy than 40 did.
DEMO_CONFIG = HPruneConfig(
    ratio=0.3,
    analysis_prompts=8,
    eval_steps=2,
    train_prompts=400,
    max_train_steps=400,
    max_train_minutes=5.0,  # a cap for slower machines
    learning_rate=1e-3,
    train_batch_size=8,
    checkpointing_steps=200,
    eval_prompts=200,
    latency_repeats=10,
)


class DemoFolderError(FileExistsError):
    """The demo's output folder holds something that is not a demo run."""


def run_demo(out_dir: str | os.PathLike = "hprune-demo", overrides: dict | None = None,
             overwrite: bool = False, progress: bool = True, say=print) -> dict:
    """Run ``compress`` on the SD3 toy into ``out_dir`` with :data:`DEMO_CONFIG` (``overrides`` on top).

    A folder left by an earlier demo continues where it stopped (finished stages are skipped);
    ``overwrite`` deletes it first. A folder holding anything else is refused, with or without ``overwrite``
    (those are the user's files).
    """

    out = Path(out_dir)
    if holds_something_else(out):
        raise DemoFolderError(f"{out} already exists and is not an hprune run folder (no {RUN_CONFIG}); "
                              + ("--overwrite replaces only a run folder, and would delete its files. " if overwrite
                                 else "") + "Choose another --out, or move those files away first.")
    if overwrite and out.is_symlink():
        out.unlink()  # the link is replaced; the run folder it names is left as it is
    elif overwrite and out.exists():
        shutil.rmtree(out)  # an earlier run's folder
    config = replace(DEMO_CONFIG, **(overrides or {}))
    return compress(DEMO_MODEL, out, config, progress=progress, say=say)


def format_demo_summary(summary: dict) -> str:
    """Where to look, after the compress summary table."""
    out, final = Path(summary["out"]), Path(summary["final"])
    t, s = summary["metrics"]["teacher"], summary["metrics"]["student"]
    teacher, student = t["metrics"]["shapeeval"]["overall"], s["metrics"]["shapeeval"]["overall"]
    lines = [
        "",
        f"ShapeEval (prompt adherence, higher is better): teacher {teacher:.3f}, compressed {student:.3f}"
        + (f" ({student / teacher:.1%} of the teacher's)" if teacher > 0 else ""),
        f"model card: {final / 'README.md'}",
        f"sample grid (teacher | compressed, same prompts and seeds): {out / '6-evaluation' / 'grid.png'}",
        f"contribution analysis: {out / '1-analysis' / 'analysis.json'}; plan: {out / '2-plan' / 'plan.json'}",
        f"load it: import diffusers_hprune; DiffusionPipeline.from_pretrained({str(final)!r})",
    ]
    return "\n".join(lines)


__all__ = ["DEMO_CONFIG", "DEMO_MODEL", "DemoFolderError", "format_demo_summary", "run_demo"]
