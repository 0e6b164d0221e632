"""Issue 7, distillation cost: steps/s and peak memory of each low-memory mode, measured on the SD3 toy.

    python benchmarks/distill_cost.py [--steps 60]

The SD3 toy at its 30 % HPP plan (from a fidelity analysis), PWP + SGDistill, batch 8, the same
cached training data for every mode. Each mode runs in a fresh process twice: once for ``--steps``
optimizer steps and once for 0 steps (the same set-up: teacher, student, LoRA wrapping, data). The
peak resident memory (VmHWM) of the first minus that of the second is what training itself added:
gradients, optimizer state and activations. Beside it, the computed gradients + optimizer state of
the mode, as ``hprune budget`` counts them (``diffusers_hprune.budget``). What every mode needs for
SD3.5 Large Turbo and FLUX.1-schnell: ``hprune budget MODEL --ratio 0.3 [flags]``.

``--teacher_4bit`` needs CUDA (Diffusers' bitsandbytes loader) and is not measured on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _report import markdown_table, update_section  # noqa: E402

MODES = {
    "full weights, AdamW": {},
    "full weights, 8-bit AdamW": {"use_8bit_adam": True},
    "full weights, AdamW, gradient checkpointing": {"gradient_checkpointing": True},
    "full weights, AdamW, bf16 mixed precision": {"mixed_precision": "bf16"},
    "LoRA r=16, AdamW": {"lora_rank": 16},
    "LoRA r=16, AdamW, gradient checkpointing": {"lora_rank": 16, "gradient_checkpointing": True},
}


def child(spec: dict) -> None:
    from diffusers_hprune.distillation.trainer import DistillConfig, distill
    from diffusers_hprune.utils.live_memory import process_memory

    summary = distill(DistillConfig(**spec))
    print("RESULT " + json.dumps({"steps": summary["steps"], "seconds": summary["seconds"], "peak_kib": process_memory("VmHWM") // 1024,
                                  "trainable": summary["trainable_params"]}), flush=True)


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=dict(os.environ, TQDM_DISABLE="1"))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"distillation child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="build/distill-cost")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))

    from diffusers_hprune import toy
    from diffusers_hprune.analysis import analyze
    from diffusers_hprune.architecture.inventory import inspect_transformer
    from diffusers_hprune.budget import optimizer_state_bytes
    from diffusers_hprune.budget.traces import Shapes, step_trace
    from diffusers_hprune.planning import make_plan

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = toy.load_pipeline("sd3")
    report = analyze(teacher, out / "analysis.json", n_prompts=8, eval_steps=4, progress=False, overwrite=True)
    config = dict(teacher.transformer.config)
    plan = make_plan(report.contributions(), inspect_transformer(teacher.transformer), ratio=0.3).plan
    plan.save(out / "plan.json")
    train = toy.prompts(split="train")
    (out / "prompts.txt").write_text("\n".join(train[k % len(train)] for k in range(200)) + "\n")
    del teacher
    base = {"teacher": "sd3", "plan": str(out / "plan.json"), "analysis": str(out / "analysis.json"),
            "prompts": str(out / "prompts.txt"), "cache_dir": str(out / "cache"), "learning_rate": 1e-3,
            "train_batch_size": 8, "checkpointing_steps": 0, "progress": False, "overwrite": True}
    run_child(dict(base, output_dir=str(out / "warm-cache"), max_train_steps=0))  # draws the data once
    rows, measured = [], {}
    for mode, options in MODES.items():
        spec = dict(base, output_dir=str(out / "run"), **options)
        setup = run_child(dict(spec, max_train_steps=0))
        trained = run_child(dict(spec, max_train_steps=args.steps))
        if trained["steps"] != args.steps:
            raise SystemExit(f"{mode}: ran {trained['steps']} steps, not {args.steps}")
        trainable = step_trace(config, plan, Shapes(batch=1, height=64, width=64, max_sequence_length=16),
                               torch.float32, lora_rank=options.get("lora_rank", 0)).trainable
        computed = 4 * trainable + optimizer_state_bytes(trainable, options.get("use_8bit_adam", False))
        extra = (trained["peak_kib"] - setup["peak_kib"]) / 1024
        speed = trained["steps"] / trained["seconds"]
        measured[mode] = {"speed": speed, "extra": extra, "computed": computed / 2**20}
        rows.append([mode, trained["trainable"], f"{speed:.2f}", f"{setup['peak_kib'] / 1024:.0f}",
                     f"{trained['peak_kib'] / 1024:.0f}", f"{extra:+.0f}", f"{measured[mode]['computed']:.1f}"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    rows.append(["NF4 teacher (--teacher_4bit)", "-", "not run: needs CUDA", "-", "-", "-", "-"])
    body = markdown_table(["mode", "trainable params", "steps / s", "peak RSS, set-up only (MiB)",
                           f"peak RSS, {args.steps} steps (MiB)", "added by training (MiB)",
                           "computed gradients + optimizer (MiB)"], rows)
    full = measured["full weights, AdamW"]
    lowest = min(measured, key=lambda k: measured[k]["extra"])
    notes = [
        f"Least memory added by training: {lowest} ({measured[lowest]['extra']:+.0f} MiB against "
        f"{full['extra']:+.0f} MiB for full weights + AdamW, at {measured[lowest]['speed'] / full['speed']:.2f}x "
        "its speed).",
        f"The added memory of full weights + AdamW is {full['extra'] / full['computed']:.1f}x its computed gradients "
        "+ optimizer state: on this toy, activations and allocator slack are most of it, so the modes that shrink "
        "weights and optimizer state (LoRA, 8-bit AdamW, an NF4 teacher) show their effect on the real models, "
        "where those are gigabytes (`hprune budget`, README's 'Will it fit?').",
    ]
    bf16 = measured["full weights, AdamW, bf16 mixed precision"]
    notes.append(f"bf16 autocast runs at {bf16['speed'] / full['speed']:.2f}x the speed of fp32 on this CPU (not "
                 "measured on a GPU here).")
    body += (
        f"\n\nSD3 toy, 30 % HPP plan ({plan.describe()}), PWP + SGDistill, batch 8, {args.steps} steps per mode "
        f"in a fresh process, {torch.get_num_threads()} threads. Peak RSS is the process's VmHWM (teacher, "
        "student, libraries and data included); 'added by training' is the difference to the same set-up with "
        "0 steps (gradients, optimizer state, activations, allocator slack). " + " ".join(notes) + "\n"
    )
    update_section("distill-cost", "Distillation cost per low-memory mode on the SD3 toy (issue 7, measured)", body)
    print(body)


if __name__ == "__main__":
    main()
