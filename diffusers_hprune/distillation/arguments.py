"""Command-line options of a distillation run, shared by ``hprune distill`` and ``examples/distill.py``.

Names follow Diffusers' training scripts where they overlap; every option is accepted with
underscores or dashes (``--max_train_steps`` = ``--max-train-steps``).
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from diffusers_hprune.distillation.settings import DistillConfig
from diffusers_hprune.utils.checks import (
    finite_float,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from diffusers_hprune.utils.distributed import PRECISIONS


def _add(parser, name, **kwargs):
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*flags, dest=name, **kwargs)


def add_distill_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = DistillConfig(teacher="", plan="", output_dir="")
    _add(parser, "teacher", required=True, help="teacher pipeline: a folder, a Hub repo id, or a toy name (sd3, flux)")
    _add(parser, "plan", required=True, help="plan.json from `hprune plan`")
    _add(parser, "analysis", help="analysis.json of the teacher (needed by SGDistill)")
    _add(parser, "output_dir", required=True, help="where the pruned pipeline, checkpoints and logs go")
    g = parser.add_argument_group("data (exactly one source)")
    _add(g, "prompts", help="data-free: a text file, one prompt a line; the teacher draws the training latents")
    _add(g, "train_data_dir", help="an imagefolder with captions (metadata.jsonl)")
    _add(g, "dataset_name", help="a datasets name or builder (parquet, webdataset with --data_files)")
    _add(g, "dataset_config_name")
    _add(g, "data_files", help="files for --dataset_name builders, e.g. 'shards/*.tar'")
    _add(g, "image_column", default=d.image_column)
    _add(g, "caption_column", default=d.caption_column)
    _add(g, "resolution", type=positive_int, help="training resolution in pixels, a multiple of what the model needs "
         "(16 for SD3 / FLUX; default: the teacher's generation profile)")
    _add(g, "teacher_steps", type=positive_int, help="data-free: denoising steps of the teacher's drawings (default: its generation profile, 4 for turbo/schnell)")
    _add(g, "guidance_scale", type=nonnegative_float, help="data-free drawings (default: the teacher's profile; FLUX.1-dev: its guidance input)")
    _add(g, "max_samples", type=positive_int, help="use at most this many samples")
    _add(g, "cache_dir", help="where encoded data is cached (default OUTPUT_DIR/data-cache)")
    g = parser.add_argument_group("optimisation")
    _add(g, "max_train_steps", type=positive_int, default=d.max_train_steps)
    _add(g, "max_train_minutes", type=positive_float, help="also stop after this many minutes")
    _add(g, "learning_rate", type=positive_float, default=d.learning_rate)
    _add(g, "train_batch_size", type=positive_int, default=d.train_batch_size)
    _add(g, "gradient_accumulation_steps", type=positive_int, default=d.gradient_accumulation_steps)
    _add(g, "max_grad_norm", type=nonnegative_float, default=d.max_grad_norm, help="gradient clipping (0: none)")
    _add(g, "adam_weight_decay", type=nonnegative_float, default=d.adam_weight_decay)
    _add(g, "use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW")
    _add(g, "mixed_precision", choices=PRECISIONS, default=d.mixed_precision,
         help="weights of the teacher and the frozen parts, and the autocast of the student (the trainable copies "
         "stay float32); default: the launch config's (`accelerate launch`), else no")
    _add(g, "seed", type=nonnegative_int, default=d.seed)
    _add(g, "logit_mean", type=finite_float, default=d.logit_mean, help="logit-normal timestep sampling (SD3 training)")
    _add(g, "logit_std", type=positive_float, default=d.logit_std)
    g = parser.add_argument_group("the method")
    _add(g, "lambda_feat", type=nonnegative_float, default=d.lambda_feat, help="weight of the block-output loss")
    _add(g, "lambda_task", type=nonnegative_float, default=d.lambda_task, help="weight of the flow-matching task loss")
    _add(g, "no_pwp", action="store_true", help="train every parameter (no Positional Weight Preservation)")
    _add(g, "no_sgdistill", action="store_true", help="one learning rate for everything (no SGDistill)")
    _add(g, "sensitivity_floor", type=fraction, default=d.sensitivity_floor,
         help="SGDistill: components with m below this get no update (default 0.2: on the SD3 toy it kept more of "
         "the teacher's ShapeEval than 0, 0.1 or 0.5 at the same budget; 0 trains every component)")
    _add(g, "sensitivity_eps", type=positive_float, default=d.sensitivity_eps,
         help="SGDistill: m is proportional to 1 / (|dP| + eps) (default: the median |dP| of the trainable "
         "components); a larger eps narrows the spread of rates")
    _add(g, "binary_freeze", action="store_true",
         help="the official code's SGDistill: freeze below the floor, full rate above")
    _add(g, "r_thres", type=fraction, default=d.r_thres,
         help="SGDistill only when the plan's target ratio is at least this (Algorithm 1)")
    g = parser.add_argument_group("low memory")
    _add(g, "gradient_checkpointing", action="store_true")
    # a negative --lora_rank is refused by DistillConfig.check, which says what 0 means
    _add(g, "lora_rank", type=int, default=0, help="train LoRA adapters of this rank instead of full weights "
         "(merged into the saved model); 0 = full weights")
    _add(g, "lora_alpha", type=positive_float, help="LoRA scaling (default: the rank)")
    _add(g, "teacher_4bit", action="store_true", help="load the teacher in NF4, quantised as it loads; with "
         "--lora_rank the student's base is the NF4 teacher's own layers (QLoRA)")
    g = parser.add_argument_group("bookkeeping")
    _add(g, "checkpointing_steps", type=nonnegative_int, default=d.checkpointing_steps,
         help="save a resumable checkpoint every N steps (0: never)")
    _add(g, "checkpoints_total_limit", type=positive_int, help="keep only the newest N checkpoints")
    _add(g, "resume_from_checkpoint", help="a checkpoint folder or 'latest'")
    _add(g, "validation_steps", type=nonnegative_int, default=0, help="draw validation images every N steps (0: never)")
    _add(g, "validation_prompt", action="append", default=[],
         help="a prompt drawn every --validation_steps (repeatable; default: the last lines of --prompts, held out of "
         "training)")
    _add(g, "validation_prompts", nargs="*", default=[], help="several validation prompts at once")
    _add(g, "report_to", help="Accelerate trackers, comma-separated, e.g. tensorboard (logs in OUTPUT_DIR/logs)")
    _add(g, "process_timeout_minutes", type=positive_float,
         help="several processes: how long one waits at a barrier for another (default: sized to the work the main "
         "process does alone: drawing or encoding the training data, saving; at least 30)")
    _add(g, "overwrite", action="store_true",
         help="start a new run in an OUTPUT_DIR that holds a run of this command (its checkpoints are deleted); a "
         "folder holding anything else is always refused")
    _add(g, "no_progress", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    values = vars(args)
    names = {f.name for f in fields(DistillConfig)}
    kwargs = {k: v for k, v in values.items() if k in names}
    kwargs["pwp"] = not values.get("no_pwp", False)
    kwargs["sgdistill"] = not values.get("no_sgdistill", False)
    kwargs["progress"] = not values.get("no_progress", False)
    kwargs["validation_prompts"] = list(values.get("validation_prompts") or []) + list(values.get("validation_prompt") or [])
    return DistillConfig(**kwargs)
