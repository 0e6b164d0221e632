"""Distil a pruned SD3 / FLUX transformer from its teacher (HierarchicalPrune stage 2: PWP + SGDistill).

    accelerate launch examples/distill.py --teacher MODEL --plan plan.json --analysis analysis.json \
        (--prompts prompts.txt | --train_data_dir DIR | --dataset_name NAME) --output_dir OUT

A thin wrapper over ``diffusers_hprune.distillation`` (the same as ``hprune distill``); run
``python examples/distill.py --help`` for every option. The output folder is a pruned
pipeline: ``import diffusers_hprune; DiffusionPipeline.from_pretrained(OUT)``.

Where each step lives (``diffusers_hprune/distillation/trainer.py``, ``distill()`` calls them in
this order):

    options, data spec, resume point   _accelerator, _checked_data_spec, _resume_point
    teacher and pruned student         _teacher_and_student  (the plan applied by prune_transformer)
    PWP: freeze the early blocks       pwp.apply_pwp
    SGDistill groups (and LoRA)        _trainable_groups -> sgdistill.sgdistill_param_groups
    optimizer                          _optimizer
    training data (cached once)        _training_data -> data.build_training_cache
    the loop (L_KD + L_feat)           _train -> _micro_step -> loss.distillation_loss
    the saved student                  _save_student
"""

import argparse

from diffusers_hprune.distillation.arguments import add_distill_arguments, config_from_args
from diffusers_hprune.distillation.trainer import distill


def main(argv=None):
    parser = add_distill_arguments(argparse.ArgumentParser(description=__doc__,
                                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    distill(config_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
