"""``hprune quantize``: W4A16, NF4 weights for a pipeline folder's transformer (step 8), or a torchao int8 kind for
speed (``--method``)."""

from __future__ import annotations

import argparse

import torch

from diffusers_hprune.architecture.inventory import inspect_transformer, load_transformer_config
from diffusers_hprune.architecture.sizes import format_bytes
from diffusers_hprune.quantization.folder import quantize_pipeline
from diffusers_hprune.quantization.torchao_weights import METHODS
from diffusers_hprune.utils.checks import InputError, check_not_inside, check_output_folder, check_replaceable


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="W4A16: NF4 weights (bitsandbytes) for a pipeline's transformer, or int8 (torchao) for speed",
        description="Quantise the transformer of a pipeline folder (pruned or not); everything else is copied. "
        "--method nf4 (default, least memory): NF4 with double quantisation (block size 64) through Diffusers' "
        "bitsandbytes quantizer; it loads with DiffusionPipeline.from_pretrained, with stock Diffusers on a GPU and "
        "after `import diffusers_hprune` on a CPU too. --method int8-weight-only / int8-dynamic (speed; the "
        "torchao extra): int8 weights through Diffusers' TorchAoConfig, in bf16, saved as safetensors; "
        "fp8-weight-only on GPUs of compute capability 8.9 and newer.",
    )
    p.add_argument("model", help="a pipeline folder (from save_pretrained or `hprune distill`)")
    p.add_argument("--out", required=True, help="the new pipeline folder")
    p.add_argument("--method", choices=METHODS, default="nf4", help="nf4 (default: 4-bit weights, least memory, "
                   "dequantised before each matmul) or a torchao kind (int8 weights its kernels use directly: "
                   "speed; needs `pip install 'diffusers-hprune[torchao]'`)")
    p.add_argument("--skip-modules", nargs="+", metavar="NAME",
                   help="modules kept in 16-bit (default: the family's input embedders, norm_out, and for SD3 proj_out)")
    p.add_argument("--compute-dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="nf4: compute dtype recorded for the 4-bit layers, used on GPUs (auto: bf16, also when "
                   "quantised on a CPU; on a CPU they compute in fp32)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="nf4: storage dtype of the transformer's parameters that stay unquantised (default bf16; the "
                   "torchao kinds are bf16 throughout)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is a pipeline folder (an earlier output); a folder holding anything else is refused")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_folder(args.out, "--out")  # before the transformer is loaded and quantised
    if args.overwrite:  # replaces a pipeline folder (an earlier output), never the model or a folder of the user's
        check_not_inside(args.out, args.model, "--out", "MODEL")
        check_replaceable(args.out, "--out")
    dtypes = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if args.method != "nf4" and (args.compute_dtype != "auto" or args.dtype not in (None, "bf16")):
        raise InputError(f"--compute-dtype and --dtype apply to --method nf4; torchao's {args.method} computes and "
                         "stores in bf16. Leave them out.")
    out = quantize_pipeline(args.model, args.out, skip_modules=args.skip_modules,
                            compute_dtype=dtypes[args.compute_dtype], dtype=dtypes[args.dtype or "bf16"],
                            overwrite=args.overwrite, method=args.method)

    config = load_transformer_config(out)
    inventory = inspect_transformer(config)
    on_disk = sum(f.stat().st_size for f in (out / "transformer").glob("*.safetensors"))
    bf16 = inventory.nbytes("bf16")
    if args.method == "nf4":
        skip = config["quantization_config"]["llm_int8_skip_modules"]
        print(f"quantised the transformer to NF4 (double quantisation, block size 64); kept in 16-bit: {', '.join(skip)}")
        nf4 = inventory.nbytes("nf4")
        print(f"transformer file: {on_disk:,} bytes = {format_bytes(on_disk)}; computed NF4 weights {nf4:,} bytes, "
              f"bf16 {bf16:,} bytes ({nf4 / bf16:.1%})")
    else:
        skip = config["quantization_config"].get("modules_to_not_convert") or []
        print(f"quantised the transformer to {args.method} (torchao, bf16 compute); kept in bf16: {', '.join(skip)}")
        print(f"transformer file: {on_disk:,} bytes = {format_bytes(on_disk)}; bf16 weights {bf16:,} bytes "
              f"({on_disk / bf16:.1%})")
    print(f"wrote {out}; load it with `import diffusers_hprune` then `DiffusionPipeline.from_pretrained('{out}')`")
    return 0
