"""PWP, SGDistill and the distillation loss (DESIGN.md section 6, steps 5-7) on tiny SD3 and FLUX models."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import transformer_inputs

from diffusers_hprune import BLOCK, PlanError, PrunePlan, prune_transformer
from diffusers_hprune.distillation import (
    BlockFeatures,
    apply_pwp,
    distillation_loss,
    first_pruned_block,
    sensitivity_multipliers,
    sgdistill_param_groups,
)
from diffusers_hprune.distillation.loss import kept_blocks


def _student(pipe, **plan):
    family = "sd3" if "joint_attention_dim" in pipe.transformer.config and "num_single_layers" not in pipe.transformer.config else "flux"
    n = 4 if family == "sd3" else 5
    return prune_transformer(copy.deepcopy(pipe.transformer), PrunePlan(family=family, num_blocks=n, **plan))


def _frozen(model):
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def test_pwp_freezes_exactly_what_runs_before_the_first_pruned_location(sd3_pipeline, flux_pipeline):
    student = _student(sd3_pipeline, removed_blocks=[2], removed_components={3: ["ff"]})
    result = apply_pwp(student)
    assert result.first_pruned == 2
    assert result.frozen_modules == ["pos_embed", "time_text_embed", "context_embedder", "transformer_blocks.0",
                                     "transformer_blocks.1"]
    assert result.trainable_modules == ["transformer_blocks.3", "norm_out", "proj_out"]
    prefixes = ("pos_embed.", "time_text_embed.", "context_embedder.", "transformer_blocks.0.", "transformer_blocks.1.")
    assert _frozen(student) == {n for n, _ in student.named_parameters() if n.startswith(prefixes)}
    assert result.frozen_params + result.trainable_params == sum(p.numel() for p in student.parameters())
    assert "first pruned location is block 2" in result.summary()

    # FLUX: execution order is double blocks (0, 1), then single blocks (2, 3, 4).
    student = _student(flux_pipeline, removed_components={3: ["mlp"]})
    result = apply_pwp(student)
    assert result.first_pruned == 3
    assert result.trainable_modules == ["single_transformer_blocks.1", "single_transformer_blocks.2", "norm_out",
                                        "proj_out"]
    assert "single_transformer_blocks.0.attn.to_q.weight" in _frozen(student)
    assert "x_embedder.weight" in _frozen(student)

    off = apply_pwp(student, enabled=False)
    assert not off.frozen_modules and not _frozen(student)
    with pytest.raises(PlanError, match="removes nothing"):
        first_pruned_block(PrunePlan(family="sd3", num_blocks=4))


def test_pwp_warns_when_it_leaves_almost_nothing_to_train(sd3_pipeline, flux_pipeline):
    # the plan removes only the last block: every kept block is before it, only the output head trains
    student = _student(sd3_pipeline, removed_blocks=[3])
    result = apply_pwp(student)
    assert result.trainable_modules == ["norm_out", "proj_out"]
    share = result.trainable_params / (result.frozen_params + result.trainable_params)
    assert share < 0.05
    warning = result.warning()
    assert warning.startswith(f"warning: PWP leaves {share:.1%} of the student trainable")
    assert "no kept block trains" in warning and "--no-pwp" in warning and "first pruned location is block 3" in warning
    assert apply_pwp(student, enabled=False).warning() is None  # --no-pwp: everything trains
    # a block in the middle: the blocks after it train, no warning
    assert apply_pwp(_student(sd3_pipeline, removed_blocks=[1])).warning() is None
    # FLUX, the last single block's MLP: the head alone trains again
    flux = apply_pwp(_student(flux_pipeline, removed_components={4: ["mlp"]}))
    assert flux.trainable_modules == ["single_transformer_blocks.2", "norm_out", "proj_out"]
    assert (flux.warning() is None) == (flux.trainable_params >= 0.05 * (flux.trainable_params + flux.frozen_params))


def test_sgdistill_learning_rates_are_the_hand_computed_ones(sd3_pipeline):
    student = _student(sd3_pipeline, removed_blocks=[2], removed_components={3: ["ff"]})
    apply_pwp(student)
    dp = {(3, "attn"): 0.4, (3, "norm1"): 0.1, (3, "norm1_context"): -0.05, (3, BLOCK): 0.9}
    groups = {g.name: g for g in sgdistill_param_groups(student, dp, lr=1e-4, eps=1e-12)}
    # m = (1 / |dP|) / max: 2.5 / 20, 10 / 20, 20 / 20
    assert groups["block 3: attn"].lr == pytest.approx(1e-4 * 0.125)
    assert groups["block 3: norm1"].lr == pytest.approx(1e-4 * 0.5)
    assert groups["block 3: norm1_context"].lr == pytest.approx(1e-4)
    assert groups["outside the blocks"].lr == 1e-4  # norm_out, proj_out: no measured dP
    # The default eps is the median |dP| of the trainable components (0.1): 1/0.5, 1/0.2, 1/0.15 over 1/0.15.
    median = {g.name: g.multiplier for g in sgdistill_param_groups(student, dp, lr=1e-4)}
    assert median["block 3: attn"] == pytest.approx(0.3)
    assert median["block 3: norm1"] == pytest.approx(0.75)
    assert median["block 3: norm1_context"] == pytest.approx(1.0)
    assert set(groups) == {"block 3: attn", "block 3: norm1", "block 3: norm1_context", "outside the blocks"}
    in_groups = {id(p) for g in groups.values() for p in g.params}
    assert in_groups == {id(p) for p in student.parameters() if p.requires_grad}  # each trainable one, once
    assert sum(g.numel for g in groups.values()) == sum(p.numel() for p in student.parameters() if p.requires_grad)

    # A floor: attn's 0.125 falls below 0.2, so it gets no update at all.
    floored = {g.name: g for g in sgdistill_param_groups(student, dp, lr=1e-4, floor=0.2, eps=1e-12)}
    assert "block 3: attn" not in floored
    assert not any(p.requires_grad for p in student.transformer_blocks[3].attn.parameters())
    # The official code's binary variant: 0 below the floor, full rate above.
    for p in student.parameters():
        p.requires_grad_(True)
    apply_pwp(student)
    binary = {g.name: g.lr for g in sgdistill_param_groups(student, dp, lr=1e-4, floor=0.2, binary=True,
                                                                eps=1e-12)}
    assert binary == {"block 3: norm1": 1e-4, "block 3: norm1_context": 1e-4, "outside the blocks": 1e-4}
    # Plain distillation: one group.
    plain = sgdistill_param_groups(student, None, lr=3e-5, enabled=False)
    assert len(plain) == 1 and plain[0].lr == 3e-5
    with pytest.raises(PlanError, match="no dP for"):
        sgdistill_param_groups(student, {(3, "attn"): 0.4}, lr=1e-4)


def test_sgdistill_shared_flux_projection_uses_the_block_dp(flux_pipeline):
    student = _student(flux_pipeline, removed_components={4: ["mlp"]})
    apply_pwp(student)
    dp = {(4, "attn"): 0.2, (4, "norm"): 0.05, (4, BLOCK): 0.1}
    groups = {g.name: g for g in sgdistill_param_groups(student, dp, lr=1.0, eps=1e-12)}
    assert groups["block 4: attn"].multiplier == pytest.approx(0.25)
    assert groups["block 4: norm"].multiplier == pytest.approx(1.0)
    shared = groups["block 4: shared"]
    assert shared.multiplier == pytest.approx(0.5)  # (1 / 0.1) / (1 / 0.05)
    names = {n for n, p in student.named_parameters() if any(p is q for q in shared.params)}
    assert names == {"single_transformer_blocks.2.proj_out.weight", "single_transformer_blocks.2.proj_out.bias"}


def test_sensitivity_multipliers():
    m = sensitivity_multipliers({(0, "a"): 0.0, (0, "b"): 1.0}, eps=1e-2)
    assert m[(0, "a")] == 1.0 and m[(0, "b")] == pytest.approx(0.01 / 1.01)
    assert sensitivity_multipliers({}) == {}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_feature_loss_pairs_blocks_by_original_index(family, request):
    pipe = request.getfixturevalue(f"{family}_pipeline")
    teacher = pipe.transformer
    student = _student(pipe, removed_blocks=[1])  # a block in the middle is gone
    kept = kept_blocks(student)
    assert 1 not in kept and kept[0] == 0 and len(kept) == (3 if family == "sd3" else 4)
    inputs = transformer_inputs(teacher)
    with torch.no_grad(), BlockFeatures(student, kept) as fs, BlockFeatures(teacher, kept) as ft:
        v_s = student(**inputs, return_dict=False)[0]
        v_t = teacher(**inputs, return_dict=False)[0]
    assert sorted(fs.outputs) == sorted(ft.outputs) == kept
    # Block 0 sees the same input in both models: its pair contributes exactly nothing.
    torch.testing.assert_close(fs.outputs[0][1], ft.outputs[0][1], rtol=0, atol=0)
    loss, parts = distillation_loss(v_s, v_t, fs.outputs, ft.outputs, lambda_feat=0.5)
    expected = 0.0
    for i in kept:
        for s, t in zip(fs.outputs[i], ft.outputs[i]):
            if s is not None and t is not None:
                expected += float(((s - t) ** 2).mean())
    assert parts["feat"] == pytest.approx(expected, rel=1e-5) and expected > 0
    assert parts["kd"] == pytest.approx(float(((v_s - v_t) ** 2).mean()), rel=1e-5)
    assert float(loss) == pytest.approx(parts["kd"] + 0.5 * parts["feat"], rel=1e-5)


def test_training_steps_change_only_trainable_parameters(sd3_pipeline):
    teacher = sd3_pipeline.transformer.eval()
    student = _student(sd3_pipeline, removed_blocks=[2], removed_components={3: ["ff"]}).train()
    apply_pwp(student)
    dp = {(3, "attn"): 0.4, (3, "norm1"): 0.1, (3, "norm1_context"): 0.05}
    groups = sgdistill_param_groups(student, dp, lr=1e-3)
    optimizer = torch.optim.AdamW([g.as_dict() for g in groups], weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    kept = kept_blocks(student)
    losses, reached = [], set()
    for step in range(8):
        inputs = transformer_inputs(teacher, seed=step % 2)
        with torch.no_grad(), BlockFeatures(teacher, kept) as ft:
            v_t = teacher(**inputs, return_dict=False)[0]
        with BlockFeatures(student, kept) as fs:
            v_s = student(**inputs, return_dict=False)[0]
        loss, _ = distillation_loss(v_s, v_t, fs.outputs, ft.outputs)
        optimizer.zero_grad()
        loss.backward()
        reached.update(n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0)
        optimizer.step()
        losses.append(float(loss))
    # The last SD3 block's text-query projection feeds only the text output the block drops: no gradient.
    assert {n for n, p in student.named_parameters() if p.requires_grad} - reached == {
        "transformer_blocks.3.attn.add_q_proj.weight", "transformer_blocks.3.attn.add_q_proj.bias",
        "transformer_blocks.3.attn.norm_added_q.weight"}
    for name, p in student.named_parameters():
        if name in reached:
            assert p.requires_grad
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"{name} changed although frozen"
    assert losses[-1] < losses[0]


def test_the_budgets_training_state_matches_the_real_student(sd3_pipeline):
    """``hprune budget`` counts the distillation's trainable parameters, gradients and optimizer state on the meta
    device; they are the real student's under PWP, with full weights and with LoRA adapters."""
    from diffusers_hprune.budget import optimizer_state_bytes
    from diffusers_hprune.budget.traces import Shapes, step_trace

    plan = PrunePlan(removed_blocks=[2], removed_components={3: ["ff"]}, family="sd3", num_blocks=4)
    config = dict(sd3_pipeline.transformer.config, _class_name="SD3Transformer2DModel")
    student = _student(sd3_pipeline, removed_blocks=[2], removed_components={3: ["ff"]})
    pwp = apply_pwp(student)
    shapes = Shapes(batch=1, height=32, width=32, max_sequence_length=16)
    full = step_trace(config, plan, shapes, torch.float32)
    assert full.trainable == pwp.trainable_params > 0
    assert optimizer_state_bytes(full.trainable) == 8 * pwp.trainable_params
    assert optimizer_state_bytes(full.trainable, use_8bit_adam=True) == 2 * full.trainable + 8 * -(-full.trainable // 2048)
    lora = step_trace(config, plan, shapes, torch.float32, lora_rank=4)
    linears = [m for path in pwp.trainable_modules for m in student.get_submodule(path).modules()
               if isinstance(m, torch.nn.Linear)]
    assert lora.trainable == sum(4 * (m.in_features + m.out_features) for m in linears)
    assert lora.trainable < full.trainable and lora.gradients < full.gradients


@pytest.mark.parametrize("kind", ["sd3", "flux-schnell", "flux-dev"])
def test_training_inputs_are_what_the_pipeline_gives_its_transformer(kind):
    """The family's denoiser_inputs (packing, ids, timestep scale, dev guidance) match a pipeline step."""
    from diffusers_hprune.architecture import get_family
    from diffusers_hprune.toy.components import tiny_flux_pipeline, tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(seed=0) if kind == "sd3" else tiny_flux_pipeline(seed=0, guidance_embeds=kind == "flux-dev")
    pipe.set_progress_bar_config(disable=True)
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    guidance = 2.5 if kind == "flux-dev" else (1.0 if kind == "sd3" else 0.0)  # no CFG batch doubling in SD3
    pipe("a red circle", num_inference_steps=1, height=32, width=32, guidance_scale=guidance, output_type="latent",
         max_sequence_length=10, generator=torch.Generator().manual_seed(0))
    handle.remove()
    family = get_family(pipe.transformer)
    sigma = pipe.scheduler.sigmas[:1].to(torch.float32)
    latents = captured["hidden_states"]
    if kind != "sd3":
        from diffusers import FluxPipeline

        latents = FluxPipeline._unpack_latents(latents, 32, 32, pipe.vae_scale_factor)
    text = {"prompt_embeds": captured["encoder_hidden_states"], "pooled_projections": captured["pooled_projections"]}
    ours = family.denoiser_inputs(pipe.transformer, latents, sigma, text, guidance if kind == "flux-dev" else None)
    for key, value in ours.items():
        theirs = captured.get(key)
        if value is None:
            assert theirs is None, key
        else:
            torch.testing.assert_close(value.float(), theirs.float(), msg=key)
    if kind == "flux-dev":
        assert float(ours["guidance"][0]) == 2.5
    # And the output convention inverts the packing: a packed prediction comes back as latents.
    out = pipe.transformer(**ours, return_dict=False)[0]
    assert family.denoiser_output(out, latents).shape == latents.shape


def test_sgdistill_follows_the_target_ratio_not_the_achieved_one():
    """Algorithm 1: ``if r >= r_thres`` with r the target. Whole-block plans land near, not at, their target."""
    from diffusers_hprune import toy
    from diffusers_hprune.architecture.inventory import inspect_transformer
    from diffusers_hprune.distillation.models import sgdistill_ratio
    from diffusers_hprune.planning import make_plan

    inventory = inspect_transformer(toy.model_path("sd3") / "transformer")
    # Equal dP: the position weight ranks the later blocks first (11: 5.1 %, then 10, 9, ...: 8.0 % each).
    flat = {(b.spec.index, c): 0.01 for b in inventory.blocks for c in (BLOCK, *b.spec.components)}
    # Target 0.25 = r_thres: blocks 8-10 (24.1 %; 11 + 10 + 9 + 8 = 29.2 % overshoots by more than 2 points) are
    # the set within 2 points, below r_thres; SGDistill still applies.
    at = make_plan(flat, inventory, ratio=0.25).plan
    assert at.removed_blocks == [8, 9, 10]
    assert at.metadata["achieved_ratio"] < 0.25 <= at.metadata["target_ratio"]
    assert sgdistill_ratio(at, at.metadata["achieved_ratio"]) == (0.25, "target ratio")
    # Target 0.28 below an r_thres of 0.29: blocks 8-11 (29.2 %) are within 2 points, above it: no SGDistill.
    below = make_plan(flat, inventory, ratio=0.28, r_thres=0.29).plan
    assert below.removed_blocks == [8, 9, 10, 11]
    assert below.metadata["target_ratio"] < 0.29 <= below.metadata["achieved_ratio"]
    assert sgdistill_ratio(below, below.metadata["achieved_ratio"]) == (0.28, "target ratio")
    # A memory-budget plan: the target fraction it was made for; a hand-written plan: the achieved ratio.
    budget = make_plan(flat, inventory, memory_bytes=int(inventory.original_bytes["bf16"] * 0.7))
    assert sgdistill_ratio(budget.plan, budget.ratio)[0] == pytest.approx(0.3, abs=1e-6)
    hand = PrunePlan(removed_blocks=[3], family="sd3", num_blocks=12)
    assert sgdistill_ratio(hand, 0.08) == (0.08, "achieved ratio (the plan records no target)")


def test_a_wall_clock_budget_shows_the_step_it_will_stop_at():
    from diffusers_hprune.distillation.trainer import projected_total

    # 10 steps in 10 s with 90 s left: 90 more steps, under a step budget of 400.
    assert projected_total(10, 10.0, 100.0, 10, 400) == 100
    assert projected_total(10, 10.0, 1000.0, 10, 400) == 400  # the step budget ends it first
    assert projected_total(10, 10.0, 5.0, 10, 400) == 10  # out of time: stops where it is
    assert projected_total(0, 0.0, 100.0, 50, 400) == 400  # nothing measured yet (a resumed run at step 50)
    assert projected_total(5, 10.0, 100.0, 55, 400) == 100  # resumed at 50: rate of this segment only
