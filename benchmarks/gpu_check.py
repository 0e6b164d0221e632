"""Issue 31: the GPU-only paths of every stage, in one command, in bf16 (results in BENCHMARKS.md, "gpu-check").

    python benchmarks/gpu_check.py                  # one GPU: under 8 minutes on one 80 GB GPU
    python benchmarks/gpu_check.py --processes 2    # two GPUs: DDP and FSDP2 across them as well
    python benchmarks/gpu_check.py --device cpu --no-write   # the same script on a CPU: what runs there

Every check runs in fresh processes, the way a user runs the command, and ends PASS, FAIL (with the
reason) or SKIP (with why it cannot run here). On the toys and, for the memory and speed checks, on the
rehearsal's full-depth reduced-width models and the full-size configs:

1. ``validation-bf16``: `hprune distill --mixed_precision bf16 --validation_steps 1` with the plan of issue 31
   (a whole block, and attn + ff_context of block 3): the validation drawings exist, the summary records bf16
   weights, float32 trainable copies and the CUDA device.
2. ``teacher-4bit-flux-slices``: `--teacher_4bit` quantised by Diffusers' GPU loader, a FLUX plan that slices
   single blocks' proj_out both ways; the saved student loads and draws.
3. ``qlora-flux-slices``: the QLoRA student (`--teacher_4bit --lora_rank 8`, 8-bit AdamW, gradient checkpointing)
   on the GPU-quantised FLUX teacher with sliced single blocks; the transformer is saved in the weight dtype.
4. ``lora-8bit-checkpointing``: LoRA + bitsandbytes' 8-bit AdamW (its CUDA kernels) + gradient checkpointing;
   the checkpoint holds 8-bit optimizer state.
5. ``ddp-launch-config``: issue 31's plan under `accelerate launch --config_file multi_gpu.yaml` (bf16 from the
   config, no flag) on two GPUs: every trainable parameter gets a gradient, both ranks end identical.
6. ``fsdp2``: the shipped FSDP2 config through the trainer (bf16, LoRA, gradient checkpointing, validation on every
   process), on one GPU or two; the checksum is the saved model's. 8-bit AdamW is refused under it.
7. ``deepspeed-zero2``: the shipped ZeRO-2 config (needs the `deepspeed` package: skipped without it); 8-bit
   AdamW is refused under it.
8. ``nf4-stock-diffusers``: a whole-block student quantised on the GPU (`hprune quantize`), exported
   (`hprune export`), loaded by stock Diffusers in a process that never imports diffusers_hprune, drawn on the GPU.
9. ``torchao-kinds``: `hprune quantize --method int8-weight-only / int8-dynamic` and, on a GPU of compute
   capability 8.9+, `fp8-weight-only` (issue 35), each exported stock and drawn by stock Diffusers on the GPU (on a
   CPU: the pruned class draws the int8 folders); skipped without torchao.
10. ``analysis-bf16``: `hprune analyze` on the device in its default dtype (bf16 on a GPU), with every image and
   with `--images auto` (issue 37): both complete, the adaptive entries within their images, the 30 % plans compared.
11. ``gpu-tests``: the tests marked `gpu` (`pytest -m gpu`: each model's own step peak in `hprune evaluate`; the
   teacher, loaded on the host, draws on the GPU with its T5 on the CPU, then the student alone).
12. ``rehearsal``: `benchmarks/rehearsal.py --device cuda`: every stage's measured peak within 15 % of
   `hprune budget --device cuda` (section "rehearsal-gpu").
13. ``latency``: `benchmarks/latency.py --device cuda --repeats 5` (section "latency-gpu").

``--only NAME ...`` runs some; ``--device cpu`` runs 1-4 and 8-10 through the CPU paths (the others need CUDA and
say so), which is how the script itself is tested (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate_configs"
#: issue 31's plans: on the SD3 toy a whole block and attn + ff_context of block 3; on the FLUX toy single blocks
#: without attn (proj_out keeps the MLP columns) and without mlp (the attention columns), a whole double block
PLANS = {
    "sd3": {"family": "sd3", "num_blocks": 12, "removed_blocks": [10], "removed_components": {"3": ["attn", "ff_context"]}},
    "flux": {"family": "flux", "num_blocks": 12, "removed_blocks": [1], "removed_components": {"5": ["attn"], "7": ["mlp"]}},
    "sd3-blocks": {"family": "sd3", "num_blocks": 12, "removed_blocks": [9, 10]},
}
VALIDATION_PROMPT = "a red circle above a blue square"


class CheckFailed(Exception):
    """A check that ran and found something wrong."""


class Skipped(Exception):
    """A check that cannot run here (no GPU, one GPU, a package missing)."""


@dataclass
class Context:
    work: Path
    device: str
    processes: int
    timeout: int
    no_write: bool = False

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


# -- running commands ----------------------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               DIFFUSERS_VERBOSITY="error", TRANSFORMERS_VERBOSITY="error")
    return env


def _label(cmd: list[str]) -> str:
    """A short name of a command for messages (inline code shown as `python -c ...`)."""
    shown = ["python" if c == sys.executable else ("<code>" if "\n" in c else c) for c in map(str, cmd)]
    return " ".join(shown[:8]) + (" ..." if len(shown) > 8 else "")


def run(cmd: list[str], ctx: Context, *, cpu: bool | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; a CheckFailed with the end of its output when it fails or times out."""
    env = _env()
    if cpu if cpu is not None else not ctx.cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=ctx.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"`{_label(cmd)}` did not end within {ctx.timeout} s") from None
    if proc.returncode:
        raise CheckFailed(f"`{_label(cmd)}` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-1200:]}")
    return proc


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(ctx: Context, config: str, processes: int, args: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file CONFIG --num_processes N -m diffusers_hprune ARGS`."""
    return run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
                "--num_processes", str(processes), "--main_process_port", _port(), "-m", "diffusers_hprune", *args],
               ctx)


def refused(ctx: Context, config: str, processes: int, args: list[str], message: str) -> None:
    """The launch must stop with ``message`` (a combination refused before anything is loaded)."""
    try:
        launch(ctx, config, processes, args)
    except CheckFailed as e:
        expect(message in str(e), f"expected the refusal {message!r}, got: {e}")
    else:
        raise CheckFailed(f"not refused: {message}")


def plan_file(ctx: Context, name: str) -> Path:
    path = ctx.work / f"plan-{name}.json"
    path.write_text(json.dumps(PLANS[name]))
    return path


def prompts_file(ctx: Context) -> Path:
    from diffusers_hprune import toy

    path = ctx.work / "prompts.txt"
    path.write_text("\n".join(toy.prompts(split="train", n=8, seed=7)) + "\n")
    return path


def distill_args(ctx: Context, family: str, plan: str, out: Path, *extra: str, precision: bool = True) -> list[str]:
    return ["distill", "--teacher", family, "--plan", str(plan_file(ctx, plan)), "--prompts", str(prompts_file(ctx)),
            "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "2", "--max_samples", "4",
            "--teacher_steps", "4", "--checkpointing_steps", "0", "--no-sgdistill", "--no-progress",
            "--cache_dir", str(ctx.work / "cache"), *(["--mixed_precision", "bf16"] if precision else []), *extra]


def hprune(ctx: Context, args: list[str]) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "diffusers_hprune", *args], ctx)


def summary_of(out: Path) -> dict:
    return json.loads((out / "distill_summary.json").read_text())


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)


def check_run(summary: dict, ctx: Context, processes: int = 1, trainable: str | None = "float32") -> None:
    """What every distillation must show: finite losses, a gradient for every trainable parameter, bf16 with
    ``trainable`` copies (DeepSpeed keeps its float32 masters inside its optimizer: ``None``)."""
    import math

    losses = [v for step in summary["losses"] for k, v in step.items() if k != "step"]
    expect(losses and all(math.isfinite(v) for v in losses), f"losses not finite: {summary['losses']}")
    expect(summary["trainable_without_gradient"] == [0] * processes,
           f"parameters without a gradient: {summary['trainable_without_gradient']}")
    expect(summary["mixed_precision"] == "bf16" and (trainable is None or summary["trainable_dtype"] == trainable),
           f"precision {summary['mixed_precision']}, trainable {summary['trainable_dtype']}")
    expect(summary["device"].startswith(ctx.device), f"ran on {summary['device']}, not {ctx.device}")
    expect(summary["processes"] == processes and summary["ranks_identical"],
           f"processes {summary['processes']}, identical {summary['ranks_identical']}")


DRAW = """
import json, sys, torch
{imports}
from diffusers import DiffusionPipeline
folder, device, steps, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
if device == "cuda" and not getattr(pipe.transformer.config, "quantization_config", None):
    pipe.to(device)
elif device == "cuda":
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and name != "transformer":
            module.to(device)
image = pipe(["a red circle"], num_inference_steps=steps, height=size, width=size,
             generator=torch.Generator(device).manual_seed(0)).images[0]
pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
print("RESULT " + json.dumps({{"class": type(pipe).__name__, "transformer": type(pipe.transformer).__name__,
                              "std": float(pixels.std()), "hprune_imported": "diffusers_hprune" in sys.modules}}))
"""


def draw(ctx: Context, folder: Path, *, stock: bool = False) -> dict:
    """Load ``folder`` in a fresh process and draw one image; ``stock``: without importing diffusers_hprune."""
    code = DRAW.format(imports="" if stock else "import diffusers_hprune")
    proc = run([sys.executable, "-c", code, str(folder), ctx.device, "2", "32"], ctx)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    expect(bool(line), f"no result from the drawing: {proc.stderr[-800:]}")
    result = json.loads(line[-1][len("RESULT "):])
    expect(result["std"] > 0, f"{folder} draws a flat image")
    return result


# -- the checks ----------------------------------------------------------------------------------------------
def validation_bf16(ctx: Context) -> str:
    out = ctx.work / "validation-bf16"
    hprune(ctx, distill_args(ctx, "sd3", "sd3", out, "--validation_steps", "1",
                             "--validation_prompt", VALIDATION_PROMPT))
    summary = summary_of(out)
    check_run(summary, ctx)
    expect(all((out / "validation" / f"step-{k}.png").is_file() for k in (1, 2)), "no validation drawings")
    expect("norm1_context" in summary["plan"], f"the unread modulation was kept: {summary['plan']}")
    return f"{summary['plan']}; frozen {summary['frozen_dtype']}, trained {summary['trainable_dtype']}"


def teacher_4bit_flux_slices(ctx: Context) -> str:
    out = ctx.work / "teacher-4bit"
    hprune(ctx, distill_args(ctx, "flux", "flux", out, "--teacher_4bit", "--validation_steps", "2",
                             "--validation_prompt", VALIDATION_PROMPT))
    summary = summary_of(out)
    check_run(summary, ctx)
    expect(summary["teacher_dtype"] == "nf4", f"teacher {summary['teacher_dtype']}")
    drawn = draw(ctx, out)
    return f"{summary['plan']}; teacher nf4; drawn by {drawn['transformer']}"


def qlora_flux_slices(ctx: Context) -> str:
    """The QLoRA student (--teacher_4bit --lora_rank) on the FLUX toy with sliced single blocks, bf16, 8-bit AdamW and
    gradient checkpointing: its base is the GPU-quantised teacher's own layers; the saved transformer is bf16."""
    from safetensors import safe_open

    out = ctx.work / "qlora"
    hprune(ctx, distill_args(ctx, "flux", "flux", out, "--teacher_4bit", "--lora_rank", "8", "--use_8bit_adam",
                             "--gradient_checkpointing"))
    summary = summary_of(out)
    check_run(summary, ctx)
    expect(summary["teacher_dtype"] == "nf4" and summary["trainable_dtype"] == "float32",
           f"teacher {summary['teacher_dtype']}, trained {summary['trainable_dtype']}")
    dtypes = set()
    for file in (out / "transformer").glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    expect(dtypes == {summary["frozen_dtype"].replace("bfloat16", "BF16").replace("float32", "F32")},
           f"saved dtypes {sorted(dtypes)}, weight dtype {summary['frozen_dtype']}")
    drawn = draw(ctx, out)
    return f"{summary['plan']}; adapters over the NF4 teacher; saved {sorted(dtypes)}; drawn by {drawn['transformer']}"


def lora_8bit_checkpointing(ctx: Context) -> str:
    import torch

    out = ctx.work / "lora-8bit"
    args = distill_args(ctx, "sd3", "sd3", out, "--lora_rank", "8", "--use_8bit_adam", "--gradient_checkpointing")
    args[args.index("--checkpointing_steps") + 1] = "2"
    hprune(ctx, args)
    summary = summary_of(out)
    check_run(summary, ctx)
    state = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True, map_location="cpu")["state"]
    moments = [s.get("__bnb_optimizer_quant_state__", s) for s in state.values()]
    expect(any(v.dtype == torch.uint8 for s in moments for k, v in s.items() if k in ("state1", "state2")),
           "no 8-bit optimizer state in the checkpoint")
    draw(ctx, out)
    return f"LoRA r=8 merged; 8-bit AdamW state; {len(summary['losses'])} steps"


def ddp_launch_config(ctx: Context) -> str:
    if not ctx.cuda or ctx.processes < 2:
        raise Skipped("needs 2 GPUs (--processes 2); tests/test_option_matrix.py runs DDP on 2 gloo CPU processes")
    out = ctx.work / "ddp"
    launch(ctx, "multi_gpu.yaml", 2, distill_args(ctx, "sd3", "sd3", out, precision=False))
    summary = summary_of(out)
    check_run(summary, ctx, processes=2)
    expect(summary["distributed"] == "MULTI_GPU", f"distributed {summary['distributed']}")
    return f"bf16 from the launch config; {summary['plan']}; ranks identical"


def fsdp2(ctx: Context) -> str:
    if not ctx.cuda:
        raise Skipped("Accelerate sets up FSDP on GPUs only; tests/test_option_matrix.py runs it on gloo "
                      "(tests/fsdp_on_cpu.py)")
    import torch

    n = min(ctx.processes, torch.cuda.device_count())
    results = []
    for label, extra in (("full weights", []), ("LoRA + checkpointing", ["--lora_rank", "8", "--gradient_checkpointing"])):
        out = ctx.work / f"fsdp-{len(results)}"
        launch(ctx, "fsdp.yaml", n, distill_args(ctx, "flux", "flux", out, "--validation_steps", "1",
                                                 "--validation_prompt", VALIDATION_PROMPT, *extra))
        summary = summary_of(out)
        check_run(summary, ctx, processes=n)
        expect(summary["distributed"] == "FSDP", f"distributed {summary['distributed']}")
        expect(all(step["grad_norm"] > 0 for step in summary["losses"]), "a gradient norm of 0: stale clipping")
        expect((out / "validation" / "step-2.png").is_file(), "no validation drawing")
        if not extra:
            from diffusers import DiffusionPipeline

            import diffusers_hprune  # noqa: F401

            saved = DiffusionPipeline.from_pretrained(out).transformer
            total = sum(float(p.detach().double().sum()) for p in saved.parameters())
            expect(abs(total - summary["rank_checksums"][0]) <= 1e-9 * abs(total), "saved model != trained model")
        results.append(label)
    refused(ctx, "fsdp.yaml", n, distill_args(ctx, "flux", "flux", ctx.work / "fsdp-8bit", "--use_8bit_adam"),
            "--use_8bit_adam does not work under FSDP")
    return f"{n} process(es): {', '.join(results)}; 8-bit AdamW refused"


def deepspeed_zero2(ctx: Context) -> str:
    if not ctx.cuda:
        raise Skipped("Accelerate sets up DeepSpeed on GPUs only")
    if importlib.util.find_spec("deepspeed") is None:
        raise Skipped("the deepspeed package is not installed (pip install 'diffusers-hprune[deepspeed]')")
    import torch

    n = min(ctx.processes, torch.cuda.device_count())
    out = ctx.work / "deepspeed"
    launch(ctx, "deepspeed_zero2.yaml", n, distill_args(ctx, "sd3", "sd3", out, precision=False))
    summary = summary_of(out)
    check_run(summary, ctx, processes=n, trainable=None)
    expect(summary["distributed"] == "DEEPSPEED", f"distributed {summary['distributed']}")
    draw(ctx, out)
    refused(ctx, "deepspeed_zero2.yaml", n, distill_args(ctx, "sd3", "sd3", ctx.work / "ds-8bit", "--use_8bit_adam",
                                                         precision=False), "--use_8bit_adam is not supported under DeepSpeed")
    return f"{n} process(es), bf16 from the DeepSpeed config; 8-bit AdamW refused"


def nf4_stock_diffusers(ctx: Context) -> str:
    out = ctx.work / "blocks"
    hprune(ctx, distill_args(ctx, "sd3", "sd3-blocks", out))
    quantized, export = ctx.work / "blocks-nf4", ctx.work / "blocks-nf4-stock"
    hprune(ctx, ["quantize", str(out), "--out", str(quantized)])
    hprune(ctx, ["export", str(quantized), "--out", str(export)])
    if not ctx.cuda:  # stock Diffusers refuses bitsandbytes without a GPU: the pruned class's CPU path loads it
        drawn = draw(ctx, quantized)
        return f"NF4 folder drawn through diffusers_hprune's CPU path ({drawn['transformer']}); export written"
    drawn = draw(ctx, export, stock=True)
    expect(not drawn["hprune_imported"] and drawn["transformer"] == "SD3Transformer2DModel",
           f"loaded as {drawn['transformer']} (diffusers_hprune imported: {drawn['hprune_imported']})")
    return "quantised on the GPU, exported, loaded and drawn by stock Diffusers (SD3Transformer2DModel, NF4)"


def torchao_kinds(ctx: Context) -> str:
    """``hprune quantize --method`` with torchao's kinds (issue 35): int8 on every device, fp8 on a GPU of compute
    capability 8.9+ (H100: 9.0); each exported stock and drawn by stock Diffusers on a GPU."""
    if importlib.util.find_spec("torchao") is None:
        raise Skipped("torchao is not installed (pip install 'diffusers-hprune[torchao]')")
    import torch

    out = ctx.work / "blocks"
    if not (out / "model_index.json").is_file():
        hprune(ctx, distill_args(ctx, "sd3", "sd3-blocks", out))
    methods = ["int8-weight-only", "int8-dynamic"]
    if ctx.cuda and torch.cuda.get_device_capability() >= (8, 9):
        methods.append("fp8-weight-only")
    done = []
    for method in methods:
        quantized, export = ctx.work / f"blocks-{method}", ctx.work / f"blocks-{method}-stock"
        hprune(ctx, ["quantize", str(out), "--out", str(quantized), "--method", method])
        hprune(ctx, ["export", str(quantized), "--out", str(export)])
        drawn = draw(ctx, export if ctx.cuda else quantized, stock=ctx.cuda)
        expect(drawn["transformer"] in ("SD3Transformer2DModel", "HierarchicalPrunedSD3Transformer2DModel"),
               f"{method}: loaded as {drawn['transformer']}")
        done.append(method)
    return f"quantised, exported and drawn: {', '.join(done)}" + ("" if ctx.cuda else " (pruned class, CPU)")


def gpu_tests(ctx: Context) -> str:
    if not ctx.cuda:
        raise Skipped("the tests marked gpu need CUDA")
    proc = run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"], ctx)
    return proc.stdout.strip().splitlines()[-1]


def rehearsal(ctx: Context) -> str:
    if not ctx.cuda:
        raise Skipped("--device cuda measures CUDA allocations; the CPU rehearsal is benchmarks/rehearsal.py")
    proc = run([sys.executable, "benchmarks/rehearsal.py", "--device", "cuda", "--work", str(ctx.work / "rehearsal"),
                *(["--no-write"] if ctx.no_write else [])], ctx)
    return "every stage within 15 % of `hprune budget --device cuda`" + _tail(proc)


def latency(ctx: Context) -> str:
    if not ctx.cuda:
        raise Skipped("the GPU latency section; benchmarks/latency.py measures the CPU one")
    proc = run([sys.executable, "benchmarks/latency.py", "--device", "cuda", "--repeats", "5",
                *(["--no-write"] if ctx.no_write else [])], ctx)
    return "section latency-gpu written" + _tail(proc)


def analysis_bf16(ctx: Context) -> str:
    """The contribution analysis on the device in its default dtype (bf16 on a GPU), full and adaptive: both complete,
    every adaptive entry within its images, the plans at 30 % from each compared."""
    from diffusers_hprune.architecture.inventory import inspect_transformer
    from diffusers_hprune.contributions import ContributionReport
    from diffusers_hprune.planning import make_plan

    settings = ["--n-prompts", "8", "--batch-size", "4", "--steps", "4"]
    full, auto = ctx.work / "analysis-full.json", ctx.work / "analysis-auto.json"
    hprune(ctx, ["analyze", "sd3", "--out", str(full), *settings])
    hprune(ctx, ["analyze", "sd3", "--out", str(auto), *settings, "--images", "auto", "--plan-ratios", "0.3"])
    reports = [ContributionReport.load(path) for path in (full, auto)]
    dtype = "bfloat16" if ctx.cuda else "float32"
    for report in reports:
        expect(report.complete, "an analysis is incomplete")
        expect(report.calibration["dtype"] == dtype, f"the analysis ran in {report.calibration['dtype']}, not {dtype}")
    expect(all(1 <= reports[1].images_of(k) <= reports[1].entry_images(k) for k in reports[1].entries),
           "an adaptive entry has more images than its own")
    inventory = inspect_transformer(reports[0].transformer_config)
    plans = [make_plan(r.contributions(), inventory, ratio=0.3).plan.describe() for r in reports]
    spent = reports[1].run["adaptive"]
    return (f"{dtype}; adaptive {spent['images_used']} of {spent['images_full']} entry images; plans at 30 % "
            + ("the same" if plans[0] == plans[1] else f"differ: {plans[0]} vs {plans[1]}"))


def _tail(proc) -> str:
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    return f" ({lines[-1][:160]})" if lines else ""


CHECKS = {
    "validation-bf16": validation_bf16,
    "teacher-4bit-flux-slices": teacher_4bit_flux_slices,
    "qlora-flux-slices": qlora_flux_slices,
    "lora-8bit-checkpointing": lora_8bit_checkpointing,
    "ddp-launch-config": ddp_launch_config,
    "fsdp2": fsdp2,
    "deepspeed-zero2": deepspeed_zero2,
    "nf4-stock-diffusers": nf4_stock_diffusers,
    "torchao-kinds": torchao_kinds,
    "analysis-bf16": analysis_bf16,
    "gpu-tests": gpu_tests,
    "rehearsal": rehearsal,
    "latency": latency,
}


def environment(device: str) -> str:
    import diffusers
    import torch

    what = f"torch {torch.__version__}, diffusers {diffusers.__version__}"
    for name in ("accelerate", "bitsandbytes", "peft", "deepspeed", "torchao", "gguf"):
        spec = importlib.util.find_spec(name)
        if spec is not None:
            from importlib.metadata import PackageNotFoundError, version

            try:
                what += f", {name} {version(name)}"
            except PackageNotFoundError:
                pass
    if device == "cuda":
        what = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()} "
                f"(CUDA {torch.version.cuda}), {what}")
    return what


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--processes", type=int, choices=(1, 2), default=1,
                        help="GPUs for the multi-process checks (default 1; 2 runs DDP and FSDP2 across two)")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="run these checks only")
    parser.add_argument("--work", help="folder for the runs (default: a temporary one)")
    parser.add_argument("--timeout", type=int, default=420, help="seconds a single command may take (default 420)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but no CUDA device is visible here; run it on a GPU machine, or pass "
              "--device cpu to run what a CPU can.", file=sys.stderr)
        return 2
    if args.device == "cuda" and args.processes > torch.cuda.device_count():
        print(f"gpu_check: --processes {args.processes} needs {args.processes} GPUs; "
              f"{torch.cuda.device_count()} visible.", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hprune-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(work, args.device, args.processes, args.timeout, args.no_write)
    rows, results, started = [], {}, time.perf_counter()
    for name in args.only or list(CHECKS):
        start = time.perf_counter()
        try:
            detail, outcome = CHECKS[name](ctx), "PASS"
        except Skipped as e:
            detail, outcome = str(e), "SKIP"
        except CheckFailed as e:
            detail, outcome = str(e), "FAIL"
        except Exception as e:  # noqa: BLE001 - a check's own error is a failure to report, not a reason to stop
            detail, outcome = f"{type(e).__name__}: {e}", "FAIL"
        seconds = time.perf_counter() - start
        results[name] = {"outcome": outcome, "seconds": round(seconds, 1), "detail": detail}
        shown = detail if outcome != "FAIL" else detail[:200] + (" ... " + detail[-300:] if len(detail) > 500 else "")
        rows.append([name, outcome, f"{seconds:.0f}", shown.replace("\n", " ").replace("|", "/")[:520]])
        print(f"{name:26} {outcome:5} {seconds:6.0f} s  {detail[:200]}", flush=True)
    total = time.perf_counter() - started
    body = (f"{environment(args.device)}; `--processes {args.processes}`; {total / 60:.1f} minutes in all.\n\n"
            + markdown_table(["check", "outcome", "seconds", "detail"], rows)
            + "\n\nWhat each check runs: `benchmarks/gpu_check.py`'s docstring; what each covers: docs/combinations.md.\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "processes": args.processes,
                                               "seconds": round(total, 1), "checks": results}, indent=2))
    if not args.no_write:
        update_section("gpu-check" if args.device == "cuda" else "gpu-check-cpu",
                       "GPU check: the GPU-only paths in bf16 (issue 31)" if args.device == "cuda"
                       else "GPU check script on a CPU (what runs without CUDA)", body)
    print(body)
    return 1 if any(r["outcome"] == "FAIL" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
