"""The QLoRA student (issue 34, item 1) and the student saved in the weight dtype, one shard at a time (item 3).

With ``--teacher_4bit --lora_rank R`` the student's base is the NF4 teacher's own kept 4-bit layers (same objects,
same storage), only adapters train, and the parameter storage of teacher and student together is the NF4 teacher
plus the adapters (plus a sliced FLUX layer's own 16-bit copy) exactly. The trained student is written in the weight
dtype, adapters merged, and loads with plain Diffusers.
"""

from __future__ import annotations

import json
import weakref

import pytest
import torch

from diffusers_hprune import PrunePlan, get_family, prune_transformer, toy
from diffusers_hprune.architecture.inventory import load_transformer_config
from diffusers_hprune.cli import main
from diffusers_hprune.distillation import saving, trainer
from diffusers_hprune.distillation.models import _lora_config, _own_trainable_copies, _trainable_groups
from diffusers_hprune.distillation.pwp import apply_pwp
from diffusers_hprune.distillation.qlora import dequantized_weight, logical_numel, storage_bytes


def _plan(family: str) -> PrunePlan:
    config = load_transformer_config(toy.model_path(family))
    fam = get_family(config)
    if family == "flux":  # a whole double block, and single blocks without attn / without mlp: proj_out sliced
        first_single = int(config["num_layers"])
        return PrunePlan(family="flux", num_blocks=fam.num_blocks(config), removed_blocks=[1],
                         removed_components={first_single + 2: ["attn"], first_single + 3: ["mlp"]})
    return PrunePlan(family="sd3", num_blocks=fam.num_blocks(config), removed_blocks=[9],
                     removed_components={5: ["attn", "ff_context"], 7: ["ff"]})


def _models(family: str, tmp_path, *, lora_rank: int = 4, precision: str = "no"):
    plan = _plan(family)
    plan.save(tmp_path / "plan.json")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    config = trainer.DistillConfig(teacher=family, plan=str(tmp_path / "plan.json"), output_dir=str(tmp_path / "o"),
                                   prompts=str(tmp_path / "prompts.txt"), teacher_4bit=True, lora_rank=lora_rank,
                                   mixed_precision=precision, sgdistill=False)
    return config, trainer._teacher_and_student(config, plan, torch.device("cpu"))


def _sliced_bytes(models) -> int:
    sliced = models.family.sliced_layers(models.teacher.config, models.plan)
    return sum(p.untyped_storage().nbytes() for path in sliced
               for p in [models.student.get_submodule(path).weight])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_qlora_student_is_built_on_the_nf4_teachers_own_layers(family, tmp_path):
    """Every 4-bit layer the plan keeps whole is the teacher's module (same packed codes); only adapters train;
    teacher + student hold exactly the NF4 teacher, the adapters, their AdamW moments and the sliced copies."""
    import bitsandbytes as bnb

    config, models = _models(family, tmp_path)
    teacher, student = models.teacher, models.student
    teacher_layers = dict(teacher.named_modules())
    sliced = models.family.sliced_layers(teacher.config, models.plan)
    shared = [name for name, m in student.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert shared and not set(shared) & set(sliced)
    for name in shared:
        assert student.get_submodule(name) is teacher_layers[name]
        assert student.get_submodule(name).weight.data_ptr() == teacher_layers[name].weight.data_ptr()
    for name in sliced:  # its own 16-bit layer: the kept columns of the teacher's dequantised weight
        layer = student.get_submodule(name)
        assert not isinstance(layer, bnb.nn.Linear4bit)
        assert layer.weight.shape[1] < teacher_layers[name].in_features
    assert bool(sliced) == (family == "flux")
    nf4_teacher = storage_bytes(teacher)

    pwp = apply_pwp(student, enabled=True)
    # PWP counts weights, not a 4-bit layer's packed bytes: the plain pruned model's parameters
    twin = saving.empty_twin(student, models.family)
    assert pwp.frozen_params + pwp.trainable_params == sum(logical_numel(p) for p in student.parameters()) == sum(
        p.numel() for p in twin.parameters())
    _, lora, groups, _ = _trainable_groups(config, models, pwp, lambda *_: None)
    _own_trainable_copies(student)
    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n, _ in trainable)
    assert all(p.dtype == torch.float32 for _, p in trainable)
    frozen_blocks = [path for path in pwp.frozen_modules if "blocks" in path]
    assert frozen_blocks and not any(n.startswith(tuple(f"{b}." for b in frozen_blocks)) for n, _ in trainable)
    adapters = sum(p.numel() * 4 for _, p in trainable)
    both = torch.nn.ModuleList([teacher, student])
    assert storage_bytes(both) == nf4_teacher + adapters + _sliced_bytes(models)

    optimizer = trainer._optimizer(config, groups, lora, lambda *_: None)
    for _, p in trainable:
        p.grad = torch.ones_like(p)
    optimizer.step()
    moments = sum(s[k].numel() * s[k].element_size() for s in optimizer.state.values() for k in ("exp_avg",
                                                                                                  "exp_avg_sq"))
    assert moments == 2 * adapters


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_qlora_student_computes_the_pruned_dequantised_teacher(family, tmp_path):
    """Before training (LoRA's B starts at zero) the QLoRA student is the pruned model of the teacher's dequantised
    weights: a view of the NF4 teacher, not an approximation of the 16-bit one."""
    from helpers import transformer_inputs

    config, models = _models(family, tmp_path)
    pwp = apply_pwp(models.student, enabled=True)
    _trainable_groups(config, models, pwp, lambda *_: None)
    dense = toy.load_pipeline(family, torch.float32).transformer
    for name, module in models.teacher.named_modules():
        if getattr(getattr(module, "weight", None), "quant_state", None) is not None:
            dense.get_submodule(name).weight.data = dequantized_weight(module)
    reference = prune_transformer(dense, models.plan).eval()
    inputs = transformer_inputs(reference, batch=2, seed=3)
    with torch.no_grad():
        expected = reference(**inputs, return_dict=False)[0]
        got = models.student.eval()(**inputs, return_dict=False)[0]
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), float((got - expected).abs().max())


def test_a_qlora_run_saves_a_bf16_pipeline_with_the_adapters_merged(tmp_path, capsys):
    """`hprune distill --teacher_4bit --lora_rank 4 --mixed_precision bf16` end to end on the FLUX toy (a sliced
    plan): the transformer is written in bf16; a frozen (PWP) block holds the teacher's dequantised NF4 weights; a
    trained layer holds base + B @ A; the folder loads with plain Diffusers and draws."""
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    _plan("flux").save(tmp_path / "plan.json")
    (tmp_path / "prompts.txt").write_text("\n".join(toy.prompts(split="train", n=6, seed=1)) + "\n")
    out = tmp_path / "out"
    code = main(["distill", "--teacher", "flux", "--plan", str(tmp_path / "plan.json"), "--prompts",
                 str(tmp_path / "prompts.txt"), "--output_dir", str(out), "--teacher_4bit", "--lora_rank", "4",
                 "--mixed_precision", "bf16", "--max_train_steps", "3", "--train_batch_size", "2",
                 "--learning_rate", "1e-2", "--max_samples", "4", "--teacher_steps", "2", "--no-sgdistill",
                 "--no-progress", "--checkpointing_steps", "0"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["teacher_dtype"] == "nf4" and summary["trainable_dtype"] == "float32"
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    config, models = _models("flux", tmp_path / "again", precision="bf16")
    teacher = models.teacher
    frozen = "transformer_blocks.0.ff.net.2"  # before the first pruned block: frozen, no adapters
    assert torch.equal(saved[f"{frozen}.weight"], dequantized_weight(teacher.get_submodule(frozen)).bfloat16())
    trained = "transformer_blocks.2.ff.net.2"  # after it: adapters trained and merged
    assert not torch.equal(saved[f"{trained}.weight"],
                           dequantized_weight(teacher.get_submodule(trained)).bfloat16())
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe.transformer).__name__ == "HierarchicalPrunedFluxTransformer2DModel"
    images = pipe(["a red circle"], **{**toy.generation_kwargs("flux"), "num_inference_steps": 2},
                  generator=torch.Generator().manual_seed(0)).images
    assert images[0].size[0] > 0


def test_the_student_is_written_one_shard_at_a_time(tmp_path, monkeypatch):
    """write_transformer with a small shard size: several shards and an index, named as Diffusers names them; when a
    shard is written no tensor of a later shard is held; the folder loads into the same weights."""
    from safetensors import torch as st

    pipe = toy.load_pipeline("sd3", torch.float32)
    student = prune_transformer(pipe.transformer, _plan("sd3"))
    twin = saving.empty_twin(student, get_family(student))
    yielded: list[tuple[str, weakref.ref, int]] = []

    def tensors():
        for key, tensor in saving.saved_tensors(student, torch.bfloat16):
            yielded.append((key, weakref.ref(tensor), tensor.numel() * tensor.element_size()))
            yield key, tensor

    held_at_write = []
    original = st.save_file

    def save_file(shard, path, metadata=None):
        alive = [(key, size) for key, ref, size in yielded if ref() is not None]
        held_at_write.append((sorted(shard), [key for key, _ in alive if key not in shard]))
        return original(shard, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", save_file)
    limit = 400_000
    folder = tmp_path / "transformer"
    saving.write_transformer(folder, twin, tensors(), torch.bfloat16, max_shard_size=limit)
    index = json.loads((folder / saving.INDEX_FILE).read_text())
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(files) == len(held_at_write) > 2 and files == sorted(set(index["weight_map"].values()))
    assert all(not others for _, others in held_at_write)  # only the shard being written is alive
    # a file loads into the pruned class with the same (bf16-rounded) weights
    pipe.transformer = None
    loaded = type(student).from_pretrained(folder)
    for name, value in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.bfloat16().float()), name


def test_the_lora_config_targets_4bit_layers(tmp_path):
    """The adapters of the QLoRA student go onto the shared 4-bit layers themselves (bitsandbytes' Linear4bit is a
    torch Linear), so every linear layer of a trainable block gets one."""
    config, models = _models("sd3", tmp_path)
    pwp = apply_pwp(models.student, enabled=True)
    lora = _lora_config(models.student, pwp.trainable_modules, 4, None)
    block = next(p for p in pwp.trainable_modules if p.startswith("transformer_blocks."))
    linears = [n for n, m in models.student.get_submodule(block).named_modules() if isinstance(m, torch.nn.Linear)]
    assert {f"{block}.{n}" for n in linears} <= set(lora.target_modules)


@pytest.mark.slow
def test_the_qlora_student_trains_under_two_processes(tmp_path):
    """Two DDP processes (gloo) train the QLoRA student in fp32 on SD3 plans the option matrix's NF4 + LoRA rows do
    not reach (a whole block and components; the last block gone with --lambda_feat 0): every adapter gets a
    gradient on both ranks, the ranks end identical, and the saved folder loads and draws."""

    from test_option_matrix import PLANS, _check_summary, _distill_args, _launch, assert_saved_folders_draw

    (tmp_path / "prompts.txt").write_text("\n".join(toy.prompts(split="train", n=6, seed=4)) + "\n")
    saved = []
    for name in ("sd3-a", "sd3-c"):
        family, spec, _ = PLANS[name]
        PrunePlan(family=family, num_blocks=12, **spec).save(tmp_path / f"{name}.json")
        row = {"plan": name, "precision": "no", "data": "prompts", "weights": "lora", "optimizer": "adamw",
               "checkpointing": False, "validation": False, "teacher": "nf4"}
        out = tmp_path / name
        proc = _launch(_distill_args(row, tmp_path, out), 2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "distill_summary.json").read_text())
        assert summary["processes"] == 2 and summary["teacher_dtype"] == "nf4"
        assert not _check_summary(summary, 2), _check_summary(summary, 2)
        saved.append((str(out), family))
    assert_saved_folders_draw(saved)


class _DeviceLog:
    """Which pipeline components are on the training device (inside ``components_on``), seen at every transformer
    forward (a global forward pre-hook: the teacher, the student, the ablated models)."""

    def __init__(self, monkeypatch, *modules):
        import contextlib

        from diffusers_hprune import loading

        self.on: set[str] = set()
        self.ever: set[str] = set()  # every component that was on the device at some point
        self.calls: list[tuple[str, frozenset]] = []
        real = loading.components_on

        @contextlib.contextmanager
        def recorded(pipe, device, names=loading.ENCODERS):
            present = {n for n in names if isinstance(getattr(pipe, n, None), torch.nn.Module)}
            self.on |= present
            self.ever |= present
            try:
                with real(pipe, device, names) as p:
                    yield p
            finally:
                self.on -= present

        for module in modules:
            monkeypatch.setattr(module, "components_on", recorded)

        def hook(module, args):
            if type(module).__name__.endswith("Transformer2DModel"):
                self.calls.append((type(module).__name__, frozenset(self.on)))

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)

    def close(self):
        self.handle.remove()


def test_the_text_encoders_are_off_the_device_whenever_a_transformer_runs(tmp_path, monkeypatch):
    """Issue 34, item 2: in distillation (the teacher drawing the data, the training steps, validation) and in the
    analysis (the full model's drawing, the ablations), no text encoder is on the device while a transformer runs;
    they were there to encode (the prompts first), and the VAE comes only where it decodes or sets FLUX's device."""
    from diffusers_hprune import analyze
    from diffusers_hprune.analysis import measurement
    from diffusers_hprune.distillation import data, launch
    from diffusers_hprune.loading import TEXT_ENCODERS

    log = _DeviceLog(monkeypatch, data, launch, measurement)
    try:
        _plan("flux").save(tmp_path / "plan.json")
        (tmp_path / "prompts.txt").write_text("\n".join(toy.prompts(split="train", n=6, seed=1)) + "\n")
        code = main(["distill", "--teacher", "flux", "--plan", str(tmp_path / "plan.json"), "--prompts",
                     str(tmp_path / "prompts.txt"), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2",
                     "--train_batch_size", "2", "--max_samples", "4", "--teacher_steps", "2", "--no-sgdistill",
                     "--no-progress", "--checkpointing_steps", "0", "--validation_steps", "2",
                     "--validation_prompt", "a red circle"])
        assert code == 0
        distill_calls, distill_encoders = list(log.calls), set(log.ever)
        analyze("sd3", tmp_path / "analysis.json", metric="image_fidelity", n_prompts=2, eval_steps=1,
                num_inference_steps=2, progress=False)
    finally:
        log.close()
    analysis_calls = log.calls[len(distill_calls):]
    teacher = [on for name, on in distill_calls if not name.startswith("HierarchicalPruned")]
    student = [on for name, on in distill_calls if name.startswith("HierarchicalPruned")]
    assert teacher and student and analysis_calls
    for on in teacher + student + [on for _, on in analysis_calls]:
        assert not on & set(TEXT_ENCODERS), on
    assert any(on == {"vae"} for on in teacher)  # drawing the data: the VAE (FLUX's pipeline device) alone
    # the text encoders did come to the device, to encode: FLUX's two in distillation, SD3's three in the analysis
    assert distill_encoders >= {"text_encoder", "text_encoder_2"}
    assert log.ever >= set(TEXT_ENCODERS)

