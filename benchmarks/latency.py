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
from diffusers_hprune.evaluation.measure import device_description, step_inputs  # noqa: E402
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


def step_flops(transformer, inputs) -> int:
    """FLOPs of one step, attention included (``evaluation.measure.step_flops``: counted on the meta device, where
    attention runs as matrix products; a CPU run's fused attention kernel is not counted by torch's counter)."""
    from diffusers_hprune.evaluation.measure import step_flops as architecture_flops

    flops = architecture_flops(transformer, inputs)
    if flops is None:
        raise SystemExit(f"cannot count the FLOPs of {type(transformer).__name__} on the meta device")
    return flops


def interleaved_latency(models: dict, inputs: dict, repeats: int, warmup: int = 3) -> dict:
    """(median seconds per step, standard error) of each model on the same ``inputs``, timing them in turn so drift
    hits all alike."""
    return _interleaved({name: (model, inputs) for name, model in models.items()}, repeats, warmup)


def _interleaved(models: dict, repeats: int, warmup: int) -> dict:
    """(median seconds per step, standard error) of each ``name: (model, inputs)``, timed in turn."""
    device = next(next(iter(models.values()))[0].parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for model, inputs in models.values():
            for _ in range(warmup):
                model(**inputs, return_dict=False)
        times = {name: [] for name in models}
        for _ in range(repeats):
            for name, (model, inputs) in models.items():
                sync()
                start = time.perf_counter()
                model(**inputs, return_dict=False)
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), statistics.stdev(t) / len(t) ** 0.5 if len(t) > 1 else 0.0)
            for name, t in times.items()}


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


def _timed(models: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per step of each ``name: (model, inputs)``, timed in turn (drift hits every row alike)."""
    return {name: median for name, (median, _) in _interleaved(models, repeats, warmup).items()}


def format_models(base, plan, inputs: dict, device: torch.device) -> dict:
    """Every format the project writes of the pruned model, beside the original (fp32 and bf16 on a CPU, bf16 on a
    GPU): ``name: factory`` returning ``(model, inputs)``, so a GPU can hold one format at a time. torchao's kinds are
    quantised in memory with the configs ``hprune quantize`` passes to Diffusers, skipping the same modules; NF4
    through ``quantization.quantize`` (on a CPU it computes in fp32). ``base`` is fp32 on a CPU, bf16 on a GPU."""
    from diffusers_hprune.quantization import quantize

    def bf16(x):
        return {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}

    def pruned():
        return prune_transformer(copy.deepcopy(base), plan).eval()

    cpu = device.type == "cpu"
    factories = {}
    if cpu:
        factories["original, fp32"] = lambda: (base, inputs)
    factories["original, bf16"] = lambda: (copy.deepcopy(base).to(torch.bfloat16) if cpu else base, bf16(inputs))
    if cpu:
        factories["pruned, fp32"] = lambda: (pruned(), inputs)
    factories["pruned, bf16"] = lambda: (pruned().to(torch.bfloat16), bf16(inputs))
    factories["pruned, NF4"] = lambda: (quantize(pruned()), inputs if cpu else bf16(inputs))
    try:
        import torchao.quantization as ao
    except ImportError:
        print("torchao is not installed: its rows are left out (pip install 'diffusers-hprune[torchao]')")
        return factories
    skip = tuple(get_family(base).default_nf4_skip_modules)

    def keep(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not any(part in skip for part in fqn.split("."))

    def torchao_kind(config, compiled: bool = False):
        def make():
            model = pruned().to(torch.bfloat16)
            ao.quantize_(model, config, filter_fn=keep)
            return (torch.compile(model) if compiled else model), bf16(inputs)
        return make

    factories["pruned, int8 weight-only"] = torchao_kind(ao.Int8WeightOnlyConfig())
    factories["pruned, int8 dynamic"] = torchao_kind(ao.Int8DynamicActivationInt8WeightConfig())
    if not cpu:  # torch.compile fuses the int8 matmuls and the element-wise work around them
        factories["pruned, bf16 + torch.compile"] = lambda: (torch.compile(pruned().to(torch.bfloat16)), bf16(inputs))
        factories["pruned, int8 dynamic + torch.compile"] = torchao_kind(ao.Int8DynamicActivationInt8WeightConfig(), True)
        if torch.cuda.get_device_capability(device) >= (8, 9):
            factories["pruned, fp8 weight-only"] = torchao_kind(ao.Float8WeightOnlyConfig())
    return factories


def _measure_formats(factories: dict, repeats: int, device: torch.device) -> tuple[dict, dict]:
    """Median seconds per step and stored bytes of every format: on a CPU all in memory and timed in turn (drift hits
    every row alike); on a GPU one at a time, each freed before the next is built."""
    from diffusers_hprune.evaluation.measure import stored_bytes

    if device.type == "cpu":
        models = {name: make() for name, make in factories.items()}
        sizes = {name: stored_bytes(m) for name, (m, _) in models.items()}
        return _timed(models, repeats), sizes
    timing, sizes = {}, {}
    for name, make in factories.items():
        model, x = make()
        sizes[name] = stored_bytes(getattr(model, "_orig_mod", model))
        timing.update(_timed({name: (model, x)}, repeats))
        del model, x
        torch.cuda.empty_cache()
    return timing, sizes


def format_case(label: str, base, inputs: dict, plan, repeats: int, device: torch.device) -> list[list]:
    """One model's format table: latency of each format against the fastest original, beside the pruning's FLOP
    bound; the goal: the fastest pruned format beats the fastest original and reaches 0.9 x the bound."""
    flops = {"original": step_flops(base, inputs), "pruned": step_flops(prune_transformer(copy.deepcopy(base), plan),
                                                                        inputs)}
    timing, sizes = _measure_formats(format_models(base, plan, inputs, device), repeats, device)
    sixteen = timing["original, bf16"]  # the reference: the 16-bit original
    fastest_original = min(t for n, t in timing.items() if n.startswith("original"))  # on a CPU fp32 can be faster
    bound = 1 - flops["pruned"] / flops["original"]
    fastest = min((n for n in timing if n.startswith("pruned")), key=timing.get)
    rows = []
    for name in timing:
        pruned = name.startswith("pruned")
        against = [1 - timing[name] / sixteen, 1 - timing[name] / fastest_original]
        goal = ""
        if name == fastest:
            goal = " / ".join("yes" if m > 0 and m >= 0.9 * bound else "no" for m in against)
        rows.append([label, name, f"{sizes[name] / 2**20:.1f}", f"{flops['pruned' if pruned else 'original'] / 1e9:.2f}",
                     f"{timing[name] * 1e3:.1f}", f"{timing[name] / sixteen:.1%}",
                     f"{timing[name] / fastest_original:.1%}", f"{bound:.1%}" if pruned else "-",
                     " / ".join(f"{m / bound:.2f}" for m in against) if pruned else "-", goal])
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


def formats(args, device: torch.device) -> None:
    """The table of every format (issue 35): the HPP 20 % plan (whole blocks) of each model, in each format."""
    rows = []
    if device.type == "cpu":
        for family in ("sd3", "flux"):
            pipe = toy.load_pipeline(family)
            transformer = pipe.transformer.eval()
            rows += format_case(f"{family} toy, 32 px", transformer, step_inputs(pipe, toy.prompts(n=1)[0]),
                                plans_for(dict(transformer.config))[0.2], args.format_repeats, device)
    for name in ("sd3.5-large-turbo", "flux.1-schnell"):
        config = scaled_config(name, full_size=device.type == "cuda")
        family = get_family(config)
        torch.manual_seed(0)
        with device:  # on a GPU: random weights made there, in bf16 (an fp32 FLUX.1 and its copies would not fit)
            base = family.base_class.from_config(config).eval()
            if device.type == "cuda":
                base = base.to(torch.bfloat16)
        resolution = 1024 if device.type == "cuda" else 512
        size = "full size" if device.type == "cuda" else "width 256, every block"
        rows += format_case(f"{name} ({size}), {resolution} px", base, random_inputs(base, resolution, device,
                            torch.float32), plans_for(config)[0.2], args.format_repeats, device)
        del base
    body = markdown_table(["model", "format", "transformer MiB", "GFLOPs / step", "latency (ms, median)",
                           "of the 16-bit original", "of the fastest original", "FLOP bound (reduction)",
                           "measured / bound (16-bit / fastest original)",
                           "fastest pruned format: faster and >= 0.9 x bound (16-bit / fastest original)"], rows)
    body += (
        f"\n\nOne transformer step, batch 1, {args.format_repeats} timed steps per row after 2 warm-up steps, rows "
        "timed in turn. Plan: HPP at 20 % from a synthetic analysis, whole blocks only (below r_thres), so every "
        "format holds it. FLOPs: `evaluation.measure.step_flops` (counted on the meta device, attention included); "
        "a quantised kind computes the FLOPs of its 16-bit self. The FLOP bound is the reduction in FLOPs; measured / "
        "bound is the latency reduction against the 16-bit (bf16) original, the issue's reference, and against the "
        "original in its fastest dtype here (on this CPU the toys' small matrices run faster in fp32, so the second "
        "is the stricter test). NF4 on a CPU "
        "computes in fp32 after dequantising each weight; torchao's int8 kinds compute in bf16 "
        f"(torchao quantize_ with the configs `hprune quantize` passes to Diffusers). Measured on "
        f"{device_description(device)}.\n")
    if not args.no_write:
        update_section(f"latency-formats-{device.type}", f"Per-step latency of every format ({device.type}, "
                       "issue 35)", body)
    print(body)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    parser.add_argument("--formats-only", action="store_true", help="only the table of every format (issue 35)")
    parser.add_argument("--format-repeats", type=int, default=10, help="timed steps per format row (default 10)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; run on a GPU machine or drop the flag.")
    device = torch.device(args.device)
    formats(args, device)
    if args.formats_only:
        return
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
        "torch.utils.flop_counter on the meta device (`evaluation.measure.step_flops`: matrix products, attention "
        "as its two batched matrix products; norms and element-wise work are not counted, which is why the bound can "
        "overstate what removal of a block saves on small widths). Before 2026-12-06 the count came from a CPU run, "
        "where the fused attention kernel has no FLOP formula: attention was left out of every bound. HPP plans from a "
        "synthetic analysis (later blocks matter less). Random weights: latency does not depend on their values.\n"
    )
    if args.device == "cpu":
        body += (
            "\nWhy a plan that removes components can fall short of its FLOP bound: the time a component takes is "
            "not its share of the FLOPs. Removing one kind of component from all but the last block of a short "
            "scaled SD3.5 model (same width, resolution and text length as above):\n\n"
            + markdown_table(["model", "component removed", "blocks", "FLOP reduction", "measured reduction"],
                             breakdown)
            + "\n\nWith attention counted, each kind of component's time follows its share of the FLOPs; the "
            "modulations (`norm1`, `norm1_context`) have almost none, and the element-wise work (norms, gating) is "
            "not in the count at all, which is where a plan can fall short of its bound. Whole-block removal saves "
            "all of a block's kinds of work at once.\n"
        )
    if not args.no_write:
        update_section(section, title, body)
    print(body)


if __name__ == "__main__":
    main()
