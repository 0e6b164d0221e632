"""Predicted peak accelerator memory and host RAM of every stage, from the model's config and the plan.

Each stage is modelled as the code runs it (``docs/budget.md`` lists every term): the weights
it holds, in the dtypes it holds them, plus what its calls hold at once, traced on the meta
device through the real modules (:mod:`.traces`). A stage runs in phases (loading, drawing,
training, saving); its peak is the largest phase, on the device and on the host separately.
On a CPU the device is the host: every term is counted once, in the device column.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from diffusers_hprune import toy
from diffusers_hprune.analysis import eval_step_indices, synthetic_report
from diffusers_hprune.architecture import get_family
from diffusers_hprune.architecture.inventory import inspect_transformer, load_transformer_config
from diffusers_hprune.architecture.sizes import unquantized_bytes
from diffusers_hprune.budget.components import PipelineParts, pipeline_parts
from diffusers_hprune.budget.terms import (
    CARDS_GIB,
    DTYPE_BYTES,
    GIB,
    StageBudget,
    nf4_working_bytes,
    optimizer_state_bytes,
    peak_phase,
    shard_bytes,
)
from diffusers_hprune.budget.traces import Shapes, forward_trace, meta_transformer, step_trace, vae_decode_trace
from diffusers_hprune.distillation.settings import DistillConfig
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.planning import make_plan
from diffusers_hprune.profiles import identify
from diffusers_hprune.utils.errors import HPruneError

_MIXED = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class BudgetError(HPruneError):
    """Budget options that describe no run."""


@dataclass(frozen=True)
class BudgetOptions:
    """The run the budget is for: the flags of ``hprune analyze`` / ``distill`` / ``quantize`` that change memory."""

    device: str = "cuda"  # what the stages run on: "cuda" or "cpu"
    resolution: int | None = None  # analysis, training data and training (default: the model's profile)
    # distillation
    mixed_precision: str = "bf16"  # what the stages should run in on a GPU (`hprune distill` takes the launch config's)
    # the distillation's own flags take its defaults (one source: DistillConfig)
    train_batch_size: int = DistillConfig.train_batch_size
    lora_rank: int = DistillConfig.lora_rank
    teacher_4bit: bool = DistillConfig.teacher_4bit
    use_8bit_adam: bool = DistillConfig.use_8bit_adam
    gradient_checkpointing: bool = DistillConfig.gradient_checkpointing
    pwp: bool = DistillConfig.pwp
    sgdistill: bool = DistillConfig.sgdistill
    r_thres: float = DistillConfig.r_thres
    train_samples: int = 1000
    cache_batch_size: int = 8
    num_processes: int = 1
    validation: bool = False  # --validation_steps: the student draws the validation prompts between steps
    validation_prompts: int = 4
    # analysis
    analysis_prompts: int = 8
    analysis_batch_size: int = 8
    eval_steps: int = 4
    cache_device: str | None = None  # None: beside the model; "cpu": host memory
    steps: int | None = None  # denoising steps of analysis and the training data (default: the profile's)
    # inference of the result (the paper's protocol)
    inference_resolution: int | None = None  # default: the model's profile (1024 for SD3.5 and FLUX.1)
    inference_max_sequence_length: int | None = None  # default: 256 for SD3 (77 + 256 tokens), 512 for FLUX
    vae_tiling: bool = False  # analysis and evaluation decode in tiles (--vae-tiling)
    # evaluation of the result beside its teacher (`hprune evaluate`, compress's last stage)
    eval_batch_size: int = 8
    quantize: bool = True  # the student compared is the NF4 one (compress quantises before it evaluates)

    def check(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise BudgetError(f"device must be 'cuda' or 'cpu', got {self.device!r}.")
        if self.mixed_precision not in _MIXED:
            raise BudgetError(f"--mixed-precision must be one of {', '.join(_MIXED)}, got {self.mixed_precision!r}.")
        for name in ("train_batch_size", "train_samples", "cache_batch_size", "num_processes", "analysis_prompts",
                     "validation_prompts",
                     "analysis_batch_size", "eval_steps", "inference_resolution", "resolution", "eval_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BudgetError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.lora_rank < 0:
            raise BudgetError(f"--lora-rank must be >= 0 (0 trains full weights), got {self.lora_rank}.")


@dataclass
class Budget:
    """Every stage's budget for one model, plan and set of options."""

    model: str
    profile: str
    plan: str
    removed_fraction: float
    options: BudgetOptions
    stages: list[StageBudget]
    notes: list[str] = field(default_factory=list)

    def stage(self, name: str) -> StageBudget:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {', '.join(s.stage for s in self.stages)}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "profile": self.profile, "plan": self.plan,
                "removed_fraction": self.removed_fraction, "options": asdict(self.options),
                "stages": [s.to_dict() for s in self.stages], "notes": list(self.notes)}


def _plan_for(config: dict, plan: PrunePlan | None, ratio: float | None) -> tuple[PrunePlan, str]:
    family = get_family(config)
    if plan is not None:
        return family.check_plan(plan, config), plan.describe()
    if ratio is None:
        ratio = 0.3
    report = synthetic_report(config)
    outcome = make_plan(report.contributions(), inspect_transformer(config), ratio=ratio)
    return outcome.plan, (f"a {ratio:.0%} HPP plan from a synthetic analysis (later blocks matter less; which blocks "
                          "go changes little in the bytes): " + outcome.plan.describe())


STAGES = ("analysis", "distillation", "quantisation", "evaluation", "inference")


def predict(model, plan: PrunePlan | None = None, *, ratio: float | None = None,
            options: BudgetOptions | None = None, stages=STAGES) -> Budget:
    """The budget of analysis, distillation, quantisation, evaluation and inference of ``model`` under ``plan`` (or ``ratio``).

    ``model``: a built-in config name (``sd3.5-large-turbo``, ``flux.1-schnell``, ...), a toy
    name, a pipeline or transformer folder, a cached Hub id, or a config dict. ``stages``: the
    stages to predict (default all; ``inference`` gives the three inference rows).
    """
    options = options or BudgetOptions()
    options.check()
    config = load_transformer_config(model if not _is_toy_name(model) else _toy_folder(model))
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if config.get("prune_plan"):
        raise BudgetError(f"{model} is already pruned; give the original model the stages start from.")
    family = get_family(config)
    profile, assumed = identify(model if isinstance(model, str) else config)
    plan, plan_text = _plan_for(config, plan, ratio)
    inventory = inspect_transformer(dict(config, prune_plan=plan.to_dict()))
    original = inspect_transformer(config)
    parts = pipeline_parts(model, family) if isinstance(model, str) else pipeline_parts(None, family)
    notes = [n for n in [assumed] if n] + parts.notes
    largest = _largest_resolution(config, parts)
    resolution = options.resolution or (profile.resolution if profile else min(1024, largest or 1024))
    for flag, value in (("--resolution", resolution), ("inference_resolution", options.inference_resolution)):
        if largest and value and value > largest:
            raise BudgetError(f"{model} draws at most {largest}x{largest} pixels (pos_embed_max_size "
                              f"{config['pos_embed_max_size']} x patch {config.get('patch_size', 2)} x VAE "
                              f"{parts.vae_scale_factor}); {flag} {value} is larger. Give {flag} {largest} or less.")
    max_len = profile.max_sequence_length if profile else 256
    steps = options.steps or (profile.num_inference_steps if profile else 28)
    cfg = bool(profile and profile.guidance_scale > 1 and profile.guidance_argument == "guidance_scale"
               and not config.get("guidance_embeds") and family.guidance_is_cfg)
    ctx = _Context(config, plan, inventory, original, parts, options, resolution, max_len, steps, cfg)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise BudgetError(f"Unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}.")
    built = {"analysis": lambda: [_analysis(ctx)], "distillation": lambda: [_distillation(ctx)],
             "quantisation": lambda: [_quantisation(ctx)], "evaluation": lambda: [_evaluation(ctx)],
             "inference": lambda: _inference(ctx, profile)}
    stages = [s for name in STAGES if name in stages for s in built[name]()]
    return Budget(str(model) if not isinstance(model, dict) else config.get("_name_or_path", "config"),
                  profile.display_name if profile else "unknown (pipeline defaults)", plan_text,
                  inventory.removed_fraction, options, stages, notes)


def _largest_resolution(config: dict, parts) -> int | None:
    """The largest image side an SD3 transformer can draw (its cropped position embedding); None when unbounded."""
    if not config.get("pos_embed_max_size"):
        return None
    return int(config["pos_embed_max_size"]) * int(config.get("patch_size") or 2) * parts.vae_scale_factor


def _is_toy_name(model) -> bool:
    return isinstance(model, str) and toy.name_of(model) is not None


def _toy_folder(model):
    return toy.model_path(toy.name_of(model))


@dataclass
class _Context:
    config: dict
    plan: PrunePlan
    inventory: Any
    original: Any
    parts: PipelineParts
    options: BudgetOptions
    resolution: int
    max_len: int
    steps: int
    cfg: bool  # classifier-free guidance doubles the batch of a transformer call
    _meta: dict = field(default_factory=dict)

    def meta(self, plan: PrunePlan | None) -> torch.nn.Module:
        """The original (``plan=None``) or the pruned transformer on the meta device, in bf16; built once each."""
        key = plan is not None
        if key not in self._meta:
            self._meta[key] = meta_transformer(self.config, plan, torch.bfloat16)
        return self._meta[key]

    def shapes(self, batch: int, resolution: int | None = None, max_len: int | None = None) -> Shapes:
        r = resolution or self.resolution
        return Shapes(batch, r, r, max_len or self.max_len, self.parts.clip_length, self.parts.vae_scale_factor)

    def component_bytes(self, nbytes: int) -> dict[str, int]:
        return {f"{name} (weights)": n * nbytes for name, n in self.parts.params.items()}

    def loading(self, nbytes: int, transformer: tuple[int, int] | None = None) -> dict:
        """Host terms while ``from_pretrained`` runs: every checkpoint file, memory-mapped and read, and the weights
        it is converted into when the dtype differs (in the stored dtype the weights are the mapped pages).

        ``transformer``: ``(weight bytes at the load dtype, bytes of its files)``.
        """
        items = [(name, n * nbytes, self.parts.stored.get(name, 2 * n)) for name, n in self.parts.params.items()]
        if transformer is not None:
            items.append(("transformer", *transformer))
        terms = {}
        for name, weights, stored in items:
            terms[f"{name} (checkpoint files, mapped while loading)"] = stored
            if stored != weights:
                terms[f"{name} (weights)"] = weights
        if transformer is not None:
            terms.update(self.constructor_buffers())
        return terms

    def constructor_buffers(self, plan: PrunePlan | None = None) -> dict[str, int]:
        """The float buffers the transformer's constructor computes in fp32 (SD3: its positional table), alive
        until the loaded values replace them."""
        n = sum(b.numel() for b in self.meta(plan).buffers() if b.is_floating_point())
        return {"transformer (buffers built by its constructor, fp32)": 4 * n} if n else {}

    def transformer_files(self) -> int:
        return self.parts.stored.get("transformer", self.original.nbytes("bf16"))


def _analysis(ctx: _Context) -> StageBudget:
    o = ctx.options
    dtype = torch.bfloat16 if o.device == "cuda" else torch.float32
    nb = DTYPE_BYTES[dtype]
    batch = min(o.analysis_batch_size, o.analysis_prompts)
    call_batch = batch * (2 if ctx.cfg else 1)
    chunks = math.ceil(o.analysis_prompts / batch)
    fwd = forward_trace(ctx.config, None, ctx.shapes(call_batch), dtype)
    decode = vae_decode_trace(ctx.parts.vae_config, 1, ctx.resolution, ctx.resolution, dtype,  # one image at a time
                              o.vae_tiling)
    selected = len(eval_step_indices(ctx.steps, o.eval_steps)) * chunks
    encoders = ctx.component_bytes(nb)
    text = {k: v for k, v in encoders.items() if k != "vae (weights)"}
    # the prompts are encoded first, the transformer still on the host; then the text encoders leave the device
    pipeline = {"transformer (weights)": ctx.original.nbytes("fp32" if nb == 4 else "bf16"),
                "vae (weights)": encoders["vae (weights)"]}
    # the inputs of the compared steps' calls are kept where the block cache lives
    recorded = {"recorded transformer inputs (compared steps)": fwd.inputs * selected}
    cache = {"block-output cache": fwd.block_outputs * selected}
    outputs = {"reference and ablated outputs": 2 * fwd.output * selected}

    def placed(terms: dict) -> tuple[dict, dict]:
        """``(device terms, host terms)``: on the host with ``--cache-device cpu``, else beside the model."""
        return ({}, dict(terms)) if o.cache_device == "cpu" else (dict(terms), {})

    drawn_device, drawn_host = placed(recorded)
    kept_device, kept_host = placed({**recorded, **cache})
    phases = [
        ("loading", {}, ctx.loading(nb, transformer=(pipeline["transformer (weights)"], ctx.transformer_files()))),
        ("encoding the prompts", dict(text), dict(pipeline)),
        ("drawing the calibration images", {**pipeline, **drawn_device,
                                            "activations (transformer call or VAE decode)": max(fwd.peak, decode)},
         {**text, **drawn_host}),
        ("cache and ablations", {**pipeline, **kept_device, **outputs,
                                 "activations (transformer call)": fwd.peak}, {**text, **kept_host}),
    ]
    (dev_phase, device, _), (host_phase, _, host) = peak_phase(o.device, phases)
    notes = [f"device peak while {dev_phase}", f"{o.analysis_prompts} prompts, batch {batch}, {ctx.steps} steps, "
             + ("VAE decoding in tiles, " if o.vae_tiling else "") +
             f"{selected} recorded calls cached, {ctx.resolution}px, {str(dtype).removeprefix('torch.')}"]
    if o.device == "cuda":
        notes.append(f"host peak while {host_phase}")
    return StageBudget("analysis", device, host, notes)


def _distillation(ctx: _Context) -> StageBudget:
    o = ctx.options
    w = _MIXED[o.mixed_precision] if o.device == "cuda" else torch.float32
    nb = DTYPE_BYTES[w]
    wname = "fp32" if nb == 4 else "bf16"
    use_sg = o.sgdistill and ctx.inventory.removed_fraction >= o.r_thres
    step = step_trace(ctx.config, ctx.plan, ctx.shapes(o.train_batch_size), w, lora_rank=o.lora_rank, pwp=o.pwp,
                      gradient_checkpointing=o.gradient_checkpointing, per_block_groups=use_sg)
    trainable = step.trainable
    teacher = {"teacher (NF4 weights)" if o.teacher_4bit else f"teacher ({wname} weights)":
               ctx.original.nbytes("nf4" if o.teacher_4bit else wname)}
    if o.teacher_4bit:  # each 4-bit layer dequantises its weight for its matmul
        teacher["teacher (one weight dequantised for its matmul)"] = nf4_working_bytes(ctx.meta(None), o.device)
    if o.teacher_4bit and o.lora_rank:  # the QLoRA student: its base is the NF4 teacher's own layers
        student = {"student (fp32 adapters; its base is the NF4 teacher's own layers)": 4 * trainable}
        sliced = _sliced_layer_bytes(ctx, nb)
        if sliced:
            student[f"student (sliced layers' own {wname} copies)"] = sliced
    elif o.teacher_4bit:  # full weights: no 16-bit teacher to share with, the student holds every kept weight
        base = ctx.inventory.nbytes(wname) - trainable * nb
        student = {f"student ({wname} kept weights)": base, "student (fp32 trainable copies)": 4 * trainable}
    else:
        student = {"student (fp32 trainable copies; the rest shares the teacher's)": 4 * trainable}
    optimizer = {"optimizer state (8-bit AdamW)" if o.use_8bit_adam else "optimizer state (AdamW, 2 x fp32)":
                 optimizer_state_bytes(trainable, o.use_8bit_adam)}
    # foreach AdamW on CUDA: one fp32 temporary per parameter group; the CPU loop: two of the largest tensor
    temporaries = 0 if o.use_8bit_adam else 4 * step.largest_group if o.device == "cuda" else 8 * step.largest_param
    step_peak = step.peak
    if nb == 2:  # fp32 gradients of the fp32 trainable copies, and autocast's 16-bit copies of them
        step_peak += (4 - nb) * trainable + nb * trainable
    step_bytes = max(step_peak, 4 * trainable + temporaries)
    gen_batch = min(o.cache_batch_size, o.train_samples) * (2 if ctx.cfg else 1)
    draw = forward_trace(ctx.config, None, ctx.shapes(gen_batch), w)
    sample = (draw.inputs // max(gen_batch, 1)) * 4 // nb  # one sample's latents and text, stored in fp32
    encoders = ctx.component_bytes(nb)
    text_encoders = {k: v for k, v in encoders.items() if k != "vae (weights)"}
    records = {f"cached samples ({o.train_samples}, fp32, in host memory until written)": sample * o.train_samples}
    phases = [
        # The 16-bit teacher loads on the host and then moves; the NF4 one is quantised onto the GPU as it loads.
        ("loading", dict(teacher) if o.teacher_4bit else {},
         ctx.loading(nb, transformer=None if o.teacher_4bit else (ctx.original.nbytes(wname), ctx.transformer_files()))),
        # every prompt is encoded first; the text encoders leave the device before the teacher draws beside the VAE
        ("encoding the prompts", {**teacher, **student, **text_encoders}, {}),
        ("drawing the training data", {**teacher, **student, "vae (weights)": encoders["vae (weights)"],
                                       f"activations (teacher call, batch {gen_batch})": draw.peak}, records),
        ("training", {**teacher, **student, **optimizer,
                      f"step: activations, block features, gradients (batch {o.train_batch_size})": step_bytes},
         dict(encoders)),
        # written one shard at a time in the weight dtype, one layer merged (fp32) at a time
        ("saving", {**teacher, **student, **optimizer}, {**encoders,
                                                          f"trained student (one {wname} shard)": shard_bytes(
                                                              ctx.inventory.nbytes(wname)),
                                                          "one layer merged (fp32)": 4 * _largest_weight(ctx)}),
    ]
    if o.validation:  # between steps (gradients freed): the VAE comes to the device; the prompts come encoded
        val_batch = o.validation_prompts * (2 if ctx.cfg else 1)
        drawing = max(forward_trace(ctx.config, ctx.plan, ctx.shapes(val_batch), w).peak,
                      vae_decode_trace(ctx.parts.vae_config, 1, ctx.resolution, ctx.resolution, w))
        phases.append(("validation", {**teacher, **student, **optimizer, "VAE (weights)": ctx.parts.params["vae"] * nb,
                                      f"activations (student call or VAE decode, {o.validation_prompts} prompts)":
                                      drawing}, dict(encoders)))
    (dev_phase, device, _), (host_phase, _, host) = peak_phase(o.device, phases)
    mode = ", ".join(filter(None, [f"LoRA r={o.lora_rank}" if o.lora_rank else "full weights",
                                   "8-bit AdamW" if o.use_8bit_adam else "AdamW",
                                   "NF4 teacher" if o.teacher_4bit else f"{wname} teacher",
                                   "gradient checkpointing" if o.gradient_checkpointing else "",
                                   "PWP" if o.pwp else "no PWP", "SGDistill" if use_sg else ""]))
    notes = [mode, f"{trainable:,} trainable parameters", f"device peak while {dev_phase}"]
    if o.device == "cuda":
        notes.append(f"host peak while {host_phase}, per process")
        if o.num_processes > 1:
            others = {k: v for k, v in phases[0][2].items() if not k.startswith("text_encoder")}
            notes.append(f"{o.num_processes} processes (DDP): every GPU holds the device figure; the host figure is the "
                         "main process's; each other process loads no text encoder (it reads the cache): "
                         f"{sum(others.values()) / GIB:.1f} GiB while loading")
    return StageBudget("distillation", device, host, notes)


def _largest_weight(ctx: _Context) -> int:
    """Parameters of the pruned model's largest tensor (the save merges one layer at a time, in fp32)."""
    return max(p.numel() for p in ctx.meta(ctx.plan).parameters())


def _sliced_layer_bytes(ctx: _Context, nb: int) -> int:
    """Bytes of the layers the plan slices (a FLUX single block's ``proj_out``), which the QLoRA student holds as
    16-bit copies of their own: packed 4-bit codes cannot be cut by column."""
    family = get_family(ctx.config)
    model = ctx.meta(ctx.plan)
    return sum(model.get_submodule(path).weight.numel() * nb for path in family.sliced_layers(ctx.config, ctx.plan))


def _quantisation(ctx: _Context) -> StageBudget:
    o = ctx.options
    sixteen = ctx.inventory.nbytes("bf16")
    nf4 = ctx.inventory.nbytes("nf4")
    saved = "fp32" if o.device != "cuda" or _MIXED[o.mixed_precision] == torch.float32 else "bf16"
    shard = shard_bytes(ctx.inventory.nbytes(saved))  # `hprune distill` saves in its weight dtype; one shard mapped
    phases = [
        ("loading", {}, {"transformer (bf16 weights)": sixteen,
                         f"transformer (one {saved} checkpoint shard, mapped while loading)": shard,
                         **ctx.constructor_buffers(ctx.plan)}),
        ("quantising", {"transformer (bf16 weights)": sixteen, "transformer (NF4 weights)": nf4}, {}),
    ]
    (dev_phase, device, _), (_, _, host) = peak_phase(o.device, phases)
    return StageBudget("quantisation", device, host, [f"device peak while {dev_phase}"])


def _evaluation(ctx: _Context) -> StageBudget:
    """The student beside its teacher, one model on the device at a time (:mod:`diffusers_hprune.evaluation.compare`):
    each pipeline's text encoders encode its prompts there alone and leave; its transformer and VAE come to draw
    (the VAE decoding one image at a time) and go back to the host when the next pipeline's turn comes. The student
    (compress evaluates the NF4 one, which bitsandbytes keeps on the GPU) loads after the teacher's turn."""
    o = ctx.options
    dtype = torch.bfloat16 if o.device == "cuda" else torch.float32
    nb = DTYPE_BYTES[dtype]
    wname = "fp32" if nb == 4 else "bf16"
    call = ctx.shapes(o.eval_batch_size * (2 if ctx.cfg else 1))
    decode = vae_decode_trace(ctx.parts.vae_config, 1, ctx.resolution, ctx.resolution, dtype, o.vae_tiling)
    parts = ctx.component_bytes(nb)
    vae = {"vae (weights)": parts["vae (weights)"]}
    text = {k: v for k, v in parts.items() if k != "vae (weights)"}
    teacher = {f"teacher transformer ({wname} weights)": ctx.original.nbytes(wname)}
    nf4 = o.quantize and o.device == "cuda"
    student = {f"student transformer ({'NF4' if nf4 else wname} weights)": ctx.inventory.nbytes("nf4" if nf4 else wname)}
    phases = [
        ("loading", {}, ctx.loading(nb, transformer=(ctx.original.nbytes(wname), ctx.transformer_files()))),
        ("encoding the teacher's prompts", dict(text), {**teacher, **vae}),
        ("the teacher drawing", {**teacher, **vae, f"activations (teacher call, batch {o.eval_batch_size}, or one "
                                 "VAE decode)": max(forward_trace(ctx.config, None, call, dtype).peak, decode)},
         dict(text)),
        ("encoding the student's prompts", {**text, **(student if nf4 else {})},
         {**teacher, **vae, **({} if nf4 else student)}),
        ("the student drawing", {**student, **vae, f"activations (student call, batch {o.eval_batch_size}, or one "
                                 "VAE decode)": max(forward_trace(ctx.config, ctx.plan, call, dtype).peak, decode)},
         {**text, **teacher}),
    ]
    (dev_phase, device, _), (host_phase, _, host) = peak_phase(o.device, phases)
    notes = [f"device peak while {dev_phase}", f"{'NF4' if nf4 else wname} student, batch {o.eval_batch_size}, "
             f"{ctx.resolution}px, {str(dtype).removeprefix('torch.')}; one model on the device at a time"
             + ("; VAE decoding in tiles" if o.vae_tiling else "")]
    if o.device == "cuda":
        notes.append(f"host peak while {host_phase}")
    return StageBudget("evaluation", device, host, notes)


def _inference(ctx: _Context, profile) -> list[StageBudget]:
    o = ctx.options
    family = get_family(ctx.config)
    paper = family.paper_max_sequence_length  # the paper's protocol: 77 + 256 tokens for SD3.5, 512 for FLUX
    max_len = o.inference_max_sequence_length or (paper if profile is None or not profile.name.startswith("toy")
                                                  else profile.max_sequence_length)
    dtype = torch.bfloat16 if o.device == "cuda" else torch.float32
    largest = _largest_resolution(ctx.config, ctx.parts)
    resolution = o.inference_resolution or (profile.resolution if profile else min(1024, largest or 1024))
    shapes = ctx.shapes(1, resolution, max_len)
    tokens = family.text_tokens(max_len, ctx.parts.clip_length)
    sixteen_part = unquantized_bytes(ctx.meta(ctx.plan))
    activations = {}  # per plan: the pruned model's 16-bit and NF4 rows share one trace
    out = []
    for label, plan, files in (("inference (original, 16-bit)", None, ctx.original.nbytes("bf16")),
                               ("inference (pruned, 16-bit)", ctx.plan, ctx.inventory.nbytes("bf16")),
                               ("inference (pruned, NF4)", ctx.plan, ctx.inventory.nbytes("nf4"))):
        nf4 = "NF4" in label
        # On a GPU the weights compute in bf16 as stored. On a CPU they compute in fp32: the 16-bit tensors are
        # converted (copies beside the mapped files), the 4-bit codes are used where they were read (no copy).
        if o.device == "cuda":
            weights, converted = files, 0
        elif nf4:
            weights, converted = files + sixteen_part, 2 * sixteen_part
        else:
            weights = converted = 2 * files
        pruned = plan is not None
        if pruned not in activations:
            activations[pruned] = forward_trace(ctx.config, plan, shapes, dtype).peak
        act = activations[pruned]
        device = {"transformer (weights)": weights, "activations (one call)": act}
        if nf4:
            device["one weight dequantised for its matmul"] = nf4_working_bytes(ctx.meta(ctx.plan), o.device)
        loading = {"transformer (checkpoint files, mapped while loading)": files, **ctx.constructor_buffers(plan)}
        if converted:
            loading["transformer (converted weights)"] = converted
        (_, device, _), (_, _, host) = peak_phase(o.device, [("loading", {}, loading), ("one call", device, {})])
        out.append(StageBudget(label, device, host, [
            f"transformer only, batch 1, {resolution}x{resolution}, {tokens} text tokens"]))
    return out


__all__ = ["CARDS_GIB", "STAGES", "Budget", "BudgetError", "BudgetOptions", "StageBudget", "optimizer_state_bytes",
           "predict"]
