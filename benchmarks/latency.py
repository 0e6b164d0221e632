"""Issue 7, table 2 / 5 in kind: per-step latency of original vs pruned transformers, beside the FLOP bound.

    python benchmarks/latency.py [--repeats 20] [--device cpu|cuda]

Models (one denoising step of the transformer, batch 1, the same inputs for every row):

* the SD3 and FLUX toys at their own resolution (32 px);
* "scaled-down real" configs: the public SD3.5 Large Turbo and FLUX.1-schnell configs with every
  block kept (38; 19 + 38) but the width cut to 4 heads of 64 (hidden size 256), random weights,
  a 512 px latent (1024 image tokens) and the real text lengths (333 and 256 tokens);
* on a GPU (``--device cuda``) the full-size real configs in bf16 and NF4, random weights, 1024 px.

Pruned rows use the HPP plans at 20 % and 30 % from a synthetic analysis (later blocks matter
less, as in the paper). The FLOP count of one step comes from torch's FlopCounterMode on the same
inputs; the bound is the reduction in FLOPs (1 - FLOPs_pruned / FLOPs_original). The goal is a
measured latency reduction of at least 0.9 x that bound. Latency: median of ``--repeats`` timed
steps after warm-up, rows interleaved so that drift in the machine's speed hits every row alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _report import markdown_table, update_section  # noqa: E402

from diffusers_hprune import prune_transformer, toy  # noqa: E402
from diffusers_hprune.analysis import synthetic_report  # noqa: E402
from diffusers_hprune.architecture import get_family  # noqa: E402
from diffusers_hprune.architecture.inventory import inspect_transformer, load_transformer_config  # noqa: E402
from diffusers_hprune.evaluation.measure import step_inputs  # noqa: E402
from diffusers_hprune.planning import make_plan  # noqa: E402

SCALED = {"num_attention_heads": 4, "attention_head_dim": 64}
TEXT_TOKENS = {"sd3": 333, "flux": 256}


def scaled_config(name: str, full_size: bool) -> dict:
    config = dict(load_transformer_config(name))
    if full_size:
        return config
    hidden = SCALED["num_attention_heads"] * SCALED["attention_head_dim"]
    config.update(SCALED, joint_attention_dim=hidden, pooled_projection_dim=hidden)
    if "caption_projection_dim" in config:
        config["caption_projection_dim"] = hidden
    if get_family(config).name == "flux":  # FLUX's rotary axes must add up to the head size: keep their shares
        import inspect

        default = inspect.signature(get_family(config).base_class).parameters["axes_dims_rope"].default
        dims = config.get("axes_dims_rope", default)
        scale = SCALED["attention_head_dim"] / sum(dims)
        config["axes_dims_rope"] = [int(d * scale) for d in dims]
    return config


def random_inputs(transformer, resolution: int, device, dtype) -> dict:
    """One step's inputs for a transformer without a pipeline (random latents and text embeddings)."""
    family = get_family(transformer)
    cfg = transformer.config
    gen = torch.Generator().manual_seed(0)
    channels = cfg.in_channels // 4 if family.name == "flux" else cfg.in_channels
    side = resolution // 8
    latents = torch.randn(1, channels, side, side, generator=gen).to(device, dtype)
    text = {"prompt_embeds": torch.randn(1, TEXT_TOKENS[family.name], cfg.joint_attention_dim, generator=gen),
            "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=gen)}
    text = {k: v.to(device, dtype) for k, v in text.items()}
    return family.denoiser_inputs(transformer, latents, torch.full((1,), 0.5, device=device, dtype=dtype), text)


@torch.no_grad()
def step_flops(transformer, inputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        transformer(**inputs, return_dict=False)
    return counter.get_total_flops()


@torch.no_grad()
def interleaved_latency(models: dict, inputs: dict, repeats: int, warmup: int = 3) -> dict:
    """(median seconds per step, standard error) of each model, timing them in turn so drift hits all alike."""
    device = next(next(iter(models.values())).parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for model in models.values():
        for _ in range(warmup):
            model(**inputs, return_dict=False)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            sync()
            start = time.perf_counter()
            model(**inputs, return_dict=False)
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), statistics.stdev(t) / len(t) ** 0.5) for name, t in times.items()}


def plans_for(config: dict):
    report = synthetic_report(config)
    inventory = inspect_transformer(config)
    return {ratio: make_plan(report.contributions(), inventory, ratio=ratio).plan for ratio in (0.2, 0.3)}


def measure_case(label: str, base, inputs: dict, plans: dict, repeats: int, quantized: bool = False) -> list[list]:
    from diffusers_hprune.quantization import quantize

    models = {"original": base}
    for ratio, plan in plans.items():
        models[f"HPP {ratio:.0%}"] = prune_transformer(copy.deepcopy(base), plan).eval()
    flops = {name: step_flops(m, inputs) for name, m in models.items()}
    if quantized:
        models = {f"{name} + NF4": quantize(m) for name, m in models.items()}
        flops = {f"{name} + NF4": f for name, f in flops.items()}
    timing = interleaved_latency(models, inputs, repeats)
    base_name = next(iter(models))
    rows = []
    for name in models:
        params = sum(p.numel() for p in models[name].parameters())
        t, se = timing[name]
        if name == base_name:
            rows.append([label, name, f"{params / 1e6:.1f} M", f"{flops[name] / 1e9:.2f}", f"{t * 1e3:.1f} ± "
                         f"{se * 1e3:.1f}", "-", "-", "-", "-"])
            continue
        bound = 1 - flops[name] / flops[base_name]
        measured = 1 - t / timing[base_name][0]
        rows.append([label, name, f"{params / 1e6:.1f} M", f"{flops[name] / 1e9:.2f}",
                     f"{t * 1e3:.1f} ± {se * 1e3:.1f}", f"{bound:.1%}", f"{measured:.1%}",
                     f"{measured / bound:.2f}", "yes" if measured >= 0.9 * bound else "no"])
    print("\n".join(" | ".join(map(str, r)) for r in rows), flush=True)
    return rows


def component_breakdown(name: str, repeats: int) -> list[list]:
    """Time vs FLOP reduction of removing one kind of component from most blocks of a short scaled model."""
    from diffusers_hprune.plan import PrunePlan

    config = dict(scaled_config(name, full_size=False), num_layers=4, dual_attention_layers=())
    family = get_family(config)
    torch.manual_seed(0)
    base = family.base_class.from_config(config).eval()
    inputs = random_inputs(base, 512, torch.device("cpu"), torch.float32)
    specs = family.block_specs(config)
    models = {"none": base}
    for component in specs[0].components:
        plan = PrunePlan.from_dict(dict(family.empty_plan(config).to_dict(),
                                        removed_components={str(s.index): [component] for s in specs[:-1]}))
        models[component] = prune_transformer(copy.deepcopy(base), plan).eval()
    flops = {k: step_flops(m, inputs) for k, m in models.items()}
    timing = interleaved_latency(models, inputs, repeats)
    rows = []
    for k in list(models)[1:]:
        bound, measured = 1 - flops[k] / flops["none"], 1 - timing[k][0] / timing["none"][0]
        rows.append([f"{name} (width 256, {len(specs)} blocks), 512 px", k, f"{len(specs) - 1} of {len(specs)}",
                     f"{bound:.1%}", f"{measured:.1%}"])
    print("\n".join(" | ".join(map(str, r)) for r in rows), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; run on a GPU machine or drop the flag.")
    device = torch.device(args.device)
    rows = []
    if args.device == "cpu":
        for family in ("sd3", "flux"):
            pipe = toy.load_pipeline(family)
            transformer = pipe.transformer.eval()
            config = dict(transformer.config)
            rows += measure_case(f"{family} toy, 32 px", transformer, step_inputs(pipe, toy.prompts(n=1)[0]), plans_for(config),
                                 args.repeats)
        for name in ("sd3.5-large-turbo", "flux.1-schnell"):
            config = scaled_config(name, full_size=False)
            torch.manual_seed(0)
            family = get_family(config)
            base = family.base_class.from_config(config).eval()
            rows += measure_case(f"{name} (width 256), 512 px", base, random_inputs(base, 512, device, torch.float32),
                                 plans_for(config), args.repeats)
            del base
        breakdown = component_breakdown("sd3.5-large-turbo", args.repeats)
        section, title = "latency-cpu", "Per-step latency on CPU: original vs HPP at 20 % and 30 % (issue 7)"
    else:
        for name in ("sd3.5-large-turbo", "flux.1-schnell"):
            config = scaled_config(name, full_size=True)
            family = get_family(config)
            torch.manual_seed(0)
            with device:  # random weights made on the GPU (on the host: minutes per 12 B parameters), then bf16
                base = family.base_class.from_config(config).to(torch.bfloat16).eval()
            inputs = random_inputs(base, 1024, device, torch.bfloat16)
            for quantized in (False, True):  # the NF4 rows last: quantising consumes the model
                rows += measure_case(f"{name}, 1024 px, {'NF4' if quantized else 'bf16'}", base, inputs,
                                     plans_for(config), args.repeats, quantized=quantized)
            del base
            torch.cuda.empty_cache()
        section, title = "latency-gpu", f"Per-step latency on {torch.cuda.get_device_name()} (issue 7)"
    body = markdown_table(["model", "row", "params", "GFLOPs / step", "latency (ms, median ± s.e.)",
                           "FLOP bound", "measured reduction", "measured / bound", ">= 0.9 x bound"], rows)
    body += (
        f"\n\nOne transformer step, batch 1, {args.repeats} timed steps per row after 3 warm-up steps, rows timed "
        "in turn; ± is the standard error of the median's sample (stdev / sqrt(n)). FLOPs counted by "
        "torch.utils.flop_counter (matrix products and attention; norms and element-wise work are not counted, "
        "which is why the bound can overstate what removal of a block saves on small widths). HPP plans from a "
        "synthetic analysis (later blocks matter less). Random weights: latency does not depend on their values.\n"
    )
    if args.device == "cpu":
        body += (
            "\nWhy a plan that removes components can fall short of its FLOP bound: the time a component takes is "
            "not its share of the FLOPs. Removing one kind of component from all but the last block of a short "
            "scaled SD3.5 model (same width, resolution and text length as above):\n\n"
            + markdown_table(["model", "component removed", "blocks", "FLOP reduction", "measured reduction"],
                             breakdown)
            + "\n\nOn this CPU a FLOP of the MLPs' large matrix products costs less time than a FLOP of attention, "
            "and the element-wise work (norms, modulation, gating) is not in the FLOP count at all, so removing "
            "MLPs saves less time than FLOPs, and removing attention more. Whole-block removal saves "
            "all of a block's kinds of work at once and tracks the bound more closely.\n"
        )
    if not args.no_write:
        update_section(section, title, body)
    print(body)


if __name__ == "__main__":
    main()
