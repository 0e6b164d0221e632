"""Computed memory of distillation per low-memory mode for SD3.5 Large Turbo and FLUX.1-schnell (30 % plans).

    python benchmarks/distill_memory.py

Weights, gradients and optimizer state per process, from the public configs on the meta device
(diffusers_hprune.distillation.budget); the plans come from a synthetic analysis (as in
plan_real_configs.py). Activations are not included: measure them on a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, update_section  # noqa: E402

from diffusers_hprune.analysis import synthetic_report  # noqa: E402
from diffusers_hprune.distillation.budget import training_memory  # noqa: E402
from diffusers_hprune.families.inventory import inspect_transformer  # noqa: E402
from diffusers_hprune.planning import make_plan  # noqa: E402

MODES = [
    {},
    {"adam_8bit": True},
    {"teacher_4bit": True, "adam_8bit": True},
    {"lora_rank": 64},
    {"lora_rank": 64, "teacher_4bit": True},
    {"lora_rank": 16, "teacher_4bit": True},
]


def gb(n: int) -> str:
    return f"{n / 1e9:.1f}"


def main():
    rows = []
    for name in ("sd3.5-large-turbo", "flux.1-schnell"):
        report = synthetic_report(name)
        inventory = inspect_transformer(report.transformer_config)
        plan = make_plan(report.contributions(), inventory, ratio=0.3).plan
        for options in MODES:
            m = training_memory(report.transformer_config, plan, **options)
            rows.append([name, m.mode, f"{m.trainable_params / 1e9:.3f} B", gb(m.teacher), gb(m.student_weights),
                         gb(m.gradients), gb(m.optimizer), gb(m.total)])
    body = markdown_table(["model (30 % plan)", "mode", "trainable", "teacher GB", "student GB", "gradients GB",
                           "optimizer GB", "total GB"], rows)
    body += (
        "\n\nPer process, weights + gradients + optimizer state only (GB = 10^9 bytes); activations come on top "
        "(gradient checkpointing keeps only block inputs). PWP on: the blocks before the first pruned location "
        "and the embedders are frozen. Full weights train fp32 master weights; LoRA keeps the student frozen in "
        "bf16 and trains fp32 adapters on every linear layer of the trainable blocks. Plans from a synthetic "
        "analysis (later blocks matter less).\n"
    )
    update_section("distill-memory", "Distillation memory per low-memory mode (issue 5, computed)", body)
    print(body)


if __name__ == "__main__":
    main()
